// qilin tokenize: JSON lines in, JSON lines out. {"text": ...} -> {"ids": [...]}, or with
// --decode {"ids": [...]} -> {"text": ...}. Reads --jsonl FILE or stdin; output order = input
// order.
#include <fstream>
#include <iostream>

#include <nlohmann/json.hpp>

#include "cli/command.h"
#include "common/status.h"
#include "tokenizer/tokenizer.h"

namespace qilin::cli {
namespace {

struct TokenizeArgs {
  std::string dir;
  std::string jsonl;
  bool decode = false;
  bool no_special = false;
  bool skip_special = false;
};

int RunTokenize(const TokenizeArgs& args) {
  auto loaded = tokenizer::Tokenizer::Load(args.dir);
  if (!loaded.ok()) throw Error(loaded.status());
  const auto& tok = *loaded;
  std::ifstream file;
  std::istream* in = &std::cin;
  const std::string source = args.jsonl.empty() ? "stdin" : args.jsonl;
  if (!args.jsonl.empty()) {
    file.open(args.jsonl, std::ios::binary);
    if (!file) throw Error(NotFound("cannot open --jsonl file {}", args.jsonl));
    in = &file;
  }
  std::ios::sync_with_stdio(false);
  std::string line;
  size_t line_no = 0;
  std::string out;
  while (std::getline(*in, line)) {
    ++line_no;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.find_first_not_of(" \t") == std::string::npos) continue;
    auto bad = [&](const std::string& why) {
      return Error(InvalidArgument("{} line {}: {}", source, line_no, why));
    };
    nlohmann::json j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded() || !j.is_object()) throw bad("not a JSON object");
    if (!args.decode) {
      if (!j.contains("text") || !j["text"].is_string()) throw bad("expected {\"text\": \"...\"}");
      auto ids = tok->Encode(j["text"].get_ref<const std::string&>(), !args.no_special);
      if (!ids.ok()) throw bad(ids.status().message());
      out = "{\"ids\": [";
      for (size_t i = 0; i < ids->size(); ++i) {
        if (i) out += ", ";
        out += std::to_string((*ids)[i]);
      }
      out += "]}\n";
    } else {
      if (!j.contains("ids") || !j["ids"].is_array()) throw bad("expected {\"ids\": [...]}");
      std::vector<tokenizer::TokenId> ids;
      for (const auto& v : j["ids"]) {
        if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() > INT32_MAX) {
          throw bad(fmt::format("id {} is not a token id", v.dump()));
        }
        ids.push_back(v.get<tokenizer::TokenId>());
      }
      auto text = tok->Decode(ids, args.skip_special);
      if (!text.ok()) throw bad(text.status().message());
      out = nlohmann::json{{"text", *text}}.dump(-1, ' ', false,
                                                 nlohmann::json::error_handler_t::replace);
      out += "\n";
    }
    std::cout << out;
  }
  if (in->bad()) throw Error(DataLoss("error reading {}", source));
  std::cout.flush();
  return 0;
}

RegisterCommand reg("tokenize", "Text <-> token ids as JSON lines with a model's tokenizer",
                    [](CLI::App& sub) {
                      auto args = std::make_shared<TokenizeArgs>();
                      sub.add_option("--tokenizer", args->dir,
                                     "Folder with tokenizer.json (or qwen.tiktoken) and configs")
                          ->required();
                      sub.add_option("--jsonl", args->jsonl, "Input JSON lines (default: stdin)");
                      sub.add_flag("--decode", args->decode,
                                   "Read {\"ids\": [...]} lines, print {\"text\": ...}");
                      sub.add_flag("--no-special", args->no_special,
                                   "Encode special tokens in the text as plain text");
                      sub.add_flag("--skip-special", args->skip_special,
                                   "With --decode: drop special tokens from the text");
                      return [args]() { return RunTokenize(*args); };
                    });

}  // namespace
}  // namespace qilin::cli
