// GenerationDefaults: which ids end generation, pad and begin a sequence, from a model folder.
#include <filesystem>
#include <fstream>
#include <sstream>

#include "tokenizer/tokenizer.h"

namespace qilin::tokenizer {
namespace {

namespace fs = std::filesystem;

Result<nlohmann::json> ReadOptionalJson(const fs::path& path) {
  std::error_code ec;
  if (!fs::exists(path, ec)) return nlohmann::json();
  std::ifstream in(path, std::ios::binary);
  if (!in) return NotFound("cannot open {}", path.string());
  std::ostringstream ss;
  ss << in.rdbuf();
  nlohmann::json j = nlohmann::json::parse(ss.str(), nullptr, false);
  if (j.is_discarded() || !j.is_object()) {
    return DataLoss("{} is not a valid JSON object", path.string());
  }
  return j;
}

// An id field: an integer, a list of integers, or null/absent (-> empty).
Result<std::vector<TokenId>> IdList(const nlohmann::json& obj, const char* key,
                                    const std::string& file) {
  std::vector<TokenId> ids;
  if (!obj.is_object() || !obj.contains(key) || obj[key].is_null()) return ids;
  const auto& v = obj[key];
  auto one = [&](const nlohmann::json& x) -> Status {
    if (!x.is_number_integer() || x.get<int64_t>() < 0 || x.get<int64_t>() > INT32_MAX) {
      return InvalidArgument("{}: \"{}\" holds {}, not a token id", file, key, x.dump());
    }
    ids.push_back(x.get<TokenId>());
    return Status::Ok();
  };
  if (v.is_array()) {
    for (const auto& x : v) QILIN_RETURN_IF_ERROR(one(x));
  } else {
    QILIN_RETURN_IF_ERROR(one(v));
  }
  return ids;
}

}  // namespace

Result<GenerationDefaults> Tokenizer::ReadGenerationDefaults(const std::string& dir) const {
  fs::path d(dir);
  const std::string gen_path = (d / "generation_config.json").string();
  const std::string cfg_path = (d / "config.json").string();
  const std::string tc_path = (d / "tokenizer_config.json").string();
  QILIN_ASSIGN_OR_RETURN(nlohmann::json gen, ReadOptionalJson(gen_path));
  QILIN_ASSIGN_OR_RETURN(nlohmann::json cfg, ReadOptionalJson(cfg_path));
  QILIN_ASSIGN_OR_RETURN(nlohmann::json tc, ReadOptionalJson(tc_path));

  // tokenizer_config names tokens by text ("<|im_end|>" or {"content": ...}).
  auto named = [&](const char* key) -> Result<std::vector<TokenId>> {
    std::vector<TokenId> ids;
    if (!tc.is_object() || !tc.contains(key) || tc[key].is_null()) return ids;
    const auto& v = tc[key];
    std::string text;
    if (v.is_string()) {
      text = v.get<std::string>();
    } else if (v.is_object() && v.contains("content") && v["content"].is_string()) {
      text = v["content"].get<std::string>();
    } else {
      return InvalidArgument("{}: \"{}\" is neither a string nor {{\"content\": ...}}", tc_path,
                             key);
    }
    auto id = TokenToId(text);
    if (!id)
      return InvalidArgument("{}: {} \"{}\" is not a token of this tokenizer", tc_path, key, text);
    ids.push_back(*id);
    return ids;
  };
  // First source that has the field wins: generation_config, config, tokenizer_config.
  auto pick = [&](const char* id_key, const char* token_key) -> Result<std::vector<TokenId>> {
    QILIN_ASSIGN_OR_RETURN(std::vector<TokenId> ids, IdList(gen, id_key, gen_path));
    if (!ids.empty()) return ids;
    QILIN_ASSIGN_OR_RETURN(ids, IdList(cfg, id_key, cfg_path));
    if (!ids.empty()) return ids;
    return named(token_key);
  };

  GenerationDefaults out;
  QILIN_ASSIGN_OR_RETURN(out.eos_token_ids, pick("eos_token_id", "eos_token"));
  QILIN_ASSIGN_OR_RETURN(std::vector<TokenId> pad, pick("pad_token_id", "pad_token"));
  QILIN_ASSIGN_OR_RETURN(std::vector<TokenId> bos, pick("bos_token_id", "bos_token"));
  if (!pad.empty()) out.pad_token_id = pad[0];
  if (!bos.empty()) out.bos_token_id = bos[0];

  // Qwen v1 (Qwen-7B-Chat): generation_config's chat_format decides the stop ids.
  if (gen.is_object() && gen.contains("chat_format")) {
    const auto& cf = gen["chat_format"];
    std::string format = cf.is_string() ? cf.get<std::string>() : cf.dump();
    if (format == "chatml") {
      auto im_end = TokenToId("<|im_end|>");
      auto eot = TokenToId("<|endoftext|>");
      if (!im_end || !eot) {
        return InvalidArgument(
            "{}: chat_format \"chatml\" needs <|im_end|> and <|endoftext|>, "
            "which this tokenizer lacks",
            gen_path);
      }
      std::vector<TokenId> eos = {*im_end, *eot};
      for (TokenId id : out.eos_token_ids) {
        if (std::find(eos.begin(), eos.end(), id) == eos.end()) eos.push_back(id);
      }
      out.eos_token_ids = std::move(eos);
      if (!out.pad_token_id) out.pad_token_id = *eot;
    } else if (format != "raw") {
      return InvalidArgument("{}: chat_format \"{}\" is not one of \"chatml\", \"raw\"", gen_path,
                             format);
    }
  }
  std::vector<TokenId> unique;
  for (TokenId id : out.eos_token_ids) {
    if (std::find(unique.begin(), unique.end(), id) == unique.end()) unique.push_back(id);
  }
  out.eos_token_ids = std::move(unique);
  return out;
}

}  // namespace qilin::tokenizer
