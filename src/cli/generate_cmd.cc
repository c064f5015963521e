// `qilin generate`: greedy generation from token ids, one JSON line per prompt on stdout.
#include <algorithm>
#include <charconv>
#include <fstream>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include <spdlog/spdlog.h>
#include <nlohmann/json.hpp>

#include "cli/command.h"
#include "model/config.h"
#include "model/weights.h"
#include "runtime/backend_factory.h"
#include "runtime/greedy_generate.h"

namespace qilin::cli {
namespace {

struct GenerateOptions {
  std::string model_dir;
  bool dummy_weights = false;
  uint64_t seed = 0;
  std::string prompt_ids;
  bool prompt_ids_given = false;
  std::string prompts_jsonl;
  int64_t max_tokens = 16;
  std::string device = "cpu";
  bool ignore_eos = false;
  int32_t block_size = 32;
};

template <typename T>
T OrThrow(Result<T> r) {
  if (!r.ok()) throw Error(r.status());
  return std::move(r).value();
}
void OrThrow(const Status& s) {
  if (!s.ok()) throw Error(s);
}

int32_t ParseId(const std::string& text, const std::string& what) {
  int64_t v = 0;
  const char* end = text.data() + text.size();
  auto [ptr, ec] = std::from_chars(text.data(), end, v);
  if (ec != std::errc() || ptr != end || v < INT32_MIN || v > INT32_MAX) {
    throw Error(InvalidArgument("{}: '{}' is not a token id", what, text));
  }
  return static_cast<int32_t>(v);
}

int32_t CheckedMaxTokens(int64_t v, const std::string& what) {
  if (v <= 0 || v > INT32_MAX) {
    throw Error(InvalidArgument("{}: max_tokens = {} must be in [1, {}]", what, v, INT32_MAX));
  }
  return static_cast<int32_t>(v);
}

std::vector<GreedyRequest> ReadRequests(const GenerateOptions& o) {
  std::vector<GreedyRequest> reqs;
  if (o.prompt_ids_given) {
    GreedyRequest r;
    if (o.prompt_ids.find_first_not_of(" \t") == std::string::npos) {
      throw Error(InvalidArgument("--prompt-ids: the prompt is empty"));
    }
    size_t start = 0;
    while (start <= o.prompt_ids.size()) {
      size_t comma = o.prompt_ids.find(',', start);
      if (comma == std::string::npos) comma = o.prompt_ids.size();
      std::string item = o.prompt_ids.substr(start, comma - start);
      item.erase(0, item.find_first_not_of(" \t"));
      item.erase(item.find_last_not_of(" \t") + 1);
      r.prompt_ids.push_back(ParseId(item, "--prompt-ids"));
      start = comma + 1;
    }
    r.max_tokens = CheckedMaxTokens(o.max_tokens, "--max-tokens");
    r.ignore_eos = o.ignore_eos;
    reqs.push_back(std::move(r));
    return reqs;
  }
  std::ifstream f(o.prompts_jsonl);
  if (!f) throw Error(NotFound("--prompts-jsonl: cannot open '{}'", o.prompts_jsonl));
  std::string line;
  for (int64_t lineno = 1; std::getline(f, line); ++lineno) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const std::string what = fmt::format("{} line {}", o.prompts_jsonl, lineno);
    nlohmann::json j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded() || !j.is_object()) {
      throw Error(InvalidArgument("{}: not a JSON object", what));
    }
    if (!j.contains("prompt_ids") || !j["prompt_ids"].is_array()) {
      throw Error(InvalidArgument("{}: \"prompt_ids\" must be an array of token ids", what));
    }
    GreedyRequest r;
    for (const auto& id : j["prompt_ids"]) {
      if (!id.is_number_integer() || id.get<int64_t>() < INT32_MIN ||
          id.get<int64_t>() > INT32_MAX) {
        throw Error(InvalidArgument("{}: prompt_ids holds {}, not a token id", what, id.dump()));
      }
      r.prompt_ids.push_back(static_cast<int32_t>(id.get<int64_t>()));
    }
    int64_t max_tokens = o.max_tokens;
    if (j.contains("max_tokens")) {
      if (!j["max_tokens"].is_number_integer()) {
        throw Error(
            InvalidArgument("{}: max_tokens = {} is not an integer", what, j["max_tokens"].dump()));
      }
      max_tokens = j["max_tokens"].get<int64_t>();
    }
    r.max_tokens = CheckedMaxTokens(max_tokens, what);
    r.ignore_eos = o.ignore_eos;
    reqs.push_back(std::move(r));
  }
  if (reqs.empty()) throw Error(InvalidArgument("{}: no prompts", o.prompts_jsonl));
  return reqs;
}

int RunGenerate(const GenerateOptions& o) {
  if (o.prompt_ids_given == !o.prompts_jsonl.empty()) {
    throw Error(InvalidArgument("give exactly one of --prompt-ids and --prompts-jsonl"));
  }
  if (o.block_size <= 0) {
    throw Error(InvalidArgument("--block-size = {} must be positive", o.block_size));
  }
  const ModelConfig config = OrThrow(LoadModelConfig(o.model_dir));
  std::vector<GreedyRequest> reqs = ReadRequests(o);
  for (size_t i = 0; i < reqs.size(); ++i) {
    const std::string what =
        !o.prompt_ids_given ? fmt::format("{} prompt {}", o.prompts_jsonl, i + 1) : "--prompt-ids";
    OrThrow(ValidateGreedyRequest(config, reqs[i], what));
  }
  ModelWeights weights;
  if (o.dummy_weights) {
    const DType dtype =
        (config.dtype == DType::kF16 || config.dtype == DType::kF32) ? config.dtype : DType::kBF16;
    spdlog::info("generate: random {} weights for {} (seed {})", DTypeName(dtype),
                 config.architecture, o.seed);
    weights = OrThrow(MakeDummyWeights(config, dtype, o.seed));
  } else {
    weights = OrThrow(LoadModelWeights(config, o.model_dir));
  }
  std::unique_ptr<Backend> backend = OrThrow(MakeBackend(o.device, config, std::move(weights)));
  int32_t blocks = 0;
  for (const auto& r : reqs) blocks = std::max(blocks, GreedyBlocksNeeded(r, o.block_size));
  OrThrow(backend->AllocateKvCache({blocks, o.block_size}));
  for (const auto& r : reqs) {
    std::vector<int32_t> ids = OrThrow(GenerateGreedy(*backend, r));
    std::cout << nlohmann::json{{"token_ids", ids}}.dump() << "\n" << std::flush;
  }
  return 0;
}

RegisterCommand reg(
    "generate", "greedy generation from token ids (no tokenizer needed)", [](CLI::App& sub) {
      auto o = std::make_shared<GenerateOptions>();
      sub.add_option("--model", o->model_dir, "model directory (config.json + safetensors)")
          ->required();
      sub.add_flag("--dummy-weights", o->dummy_weights, "random weights from config.json only");
      sub.add_option("--seed", o->seed, "seed of --dummy-weights");
      CLI::Option* ids =
          sub.add_option("--prompt-ids", o->prompt_ids, "prompt token ids, e.g. 1,2,3");
      sub.add_option("--prompts-jsonl", o->prompts_jsonl,
                     "file of {\"prompt_ids\":[...],\"max_tokens\":N} lines");
      sub.add_option("--max-tokens", o->max_tokens, "tokens to generate")->capture_default_str();
      sub.add_option("--device", o->device, "cpu or cuda")->capture_default_str();
      sub.add_flag("--ignore-eos", o->ignore_eos, "do not stop at eos ids");
      sub.add_option("--block-size", o->block_size, "KV cache block size")->capture_default_str();
      return [o, ids]() {
        o->prompt_ids_given = ids->count() > 0;
        return RunGenerate(*o);
      };
    });

}  // namespace
}  // namespace qilin::cli
