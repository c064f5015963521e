#include "server/model_repository.h"

#include <google/protobuf/io/tokenizer.h>
#include <google/protobuf/text_format.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

namespace qilin::server {
namespace fs = std::filesystem;
using inference::DataType;
using inference::ModelConfig;

const char* TritonModelKindName(TritonModelKind kind) {
  switch (kind) {
    case TritonModelKind::kEnsemble:
      return "ensemble";
    case TritonModelKind::kTensorrtLlm:
      return "tensorrt_llm";
    case TritonModelKind::kPreprocessing:
      return "preprocessing";
    case TritonModelKind::kPostprocessing:
      return "postprocessing";
  }
  return "?";
}

namespace {

constexpr size_t kMaxConfigBytes = 1 << 20;

struct Placeholder {
  int line;  // 1-based
  std::string text;
  bool in_string;
};

// Every `${...}` in the text, with its line and whether it sits inside a quoted string.
std::vector<Placeholder> FindPlaceholders(std::string_view text) {
  std::vector<Placeholder> out;
  int line = 1;
  char quote = 0;
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (c == '\n') {
      ++line;
      quote = 0;  // text format strings do not span lines
      continue;
    }
    if (quote) {
      if (c == '\\') {
        ++i;
      } else if (c == quote) {
        quote = 0;
      }
    } else if (c == '"' || c == '\'') {
      quote = c;
      continue;
    } else if (c == '#') {
      while (i + 1 < text.size() && text[i + 1] != '\n') ++i;
      continue;
    }
    if (c == '$' && i + 1 < text.size() && text[i + 1] == '{') {
      size_t end = text.find('}', i);
      size_t nl = text.find('\n', i);
      if (end == std::string_view::npos || (nl != std::string_view::npos && nl < end)) {
        end = std::min(text.size(), nl) - 1;
      }
      out.push_back({line, std::string(text.substr(i, end - i + 1)), quote != 0});
      i = end;
    }
  }
  return out;
}

class Collector : public google::protobuf::io::ErrorCollector {
 public:
  void AddError(int line, google::protobuf::io::ColumnNumber column,
                const std::string& message) override {
    errors.push_back(fmt::format("line {}:{}: {}", line + 1, column + 1, message));
  }
  void AddWarning(int line, google::protobuf::io::ColumnNumber column,
                  const std::string& message) override {
    errors.push_back(fmt::format("line {}:{}: {}", line + 1, column + 1, message));
  }
  std::vector<std::string> errors;
};

bool IsPlaceholder(const std::string& v) { return v.find("${") != std::string::npos; }

// Parameters of Triton's tensorrtllm backend and tensorrtllm_backend's python models that
// qilin accepts and does not need (GPU tuning of TensorRT-LLM, LoRA caches, speculative
// decoding, executor processes). Anything outside these and the honoured keys is an error.
const std::set<std::string, std::less<>>& IgnoredParameters() {
  static const std::set<std::string, std::less<>> keys = {
      "FORCE_CPU_ONLY_INPUT_TENSORS",
      "max_attention_window_size",
      "kv_cache_host_memory_bytes",
      "kv_cache_onboard_blocks",
      "enable_trt_overlap",
      "cancellation_check_period_ms",
      "iter_stats_max_iterations",
      "request_stats_max_iterations",
      "normalize_log_probs",
      "gpu_device_ids",
      "participant_ids",
      "lora_cache_optimal_adapter_size",
      "lora_cache_max_adapter_size",
      "lora_cache_gpu_memory_fraction",
      "lora_cache_host_memory_bytes",
      "lora_prefetch_dir",
      "decoding_mode",
      "executor_worker_path",
      "medusa_choices",
      "eagle_choices",
      "gpu_weights_percent",
      "sink_token_length",
      "encoder_engine_dir",
      "multi_block_mode",
      "enable_context_fmha_fp32_acc",
      "cuda_graph_mode",
      "cuda_graph_cache_size",
      "lookahead_window_size",
      "lookahead_ngram_size",
      "lookahead_verification_set_size",
      "cross_kv_cache_fraction",
      "kv_cache_retention_config",
      "max_queue_delay_microseconds",
      "max_queue_size",
      "recv_poll_period_ms",
      "speculative_decoding_fast_logits",
      "tokenizer_type",  // qilin reads tokenizer.json / qwen.tiktoken, whatever this says
      "accumulate_tokens",
      "tensorrt_llm_model_name",
      "tensorrt_llm_draft_model_name",
      "multimodal_encoders_name",
      "logits_postprocessor_name",
      "visual_model_path",
      "max_num_images",
      "guided_decoding_backend",
      "xgrammar_tokenizer_info_path",
      "add_special_tokens",
      "skip_special_tokens"};
  return keys;
}

// Honoured keys per kind.
const std::set<std::string, std::less<>>& HonouredParameters(TritonModelKind kind) {
  static const std::set<std::string, std::less<>> llm = {"gpt_model_type",
                                                         "gpt_model_path",
                                                         "max_tokens_in_paged_kv_cache",
                                                         "kv_cache_free_gpu_mem_fraction",
                                                         "batch_scheduler_policy",
                                                         "enable_kv_cache_reuse",
                                                         "enable_chunked_context",
                                                         "exclude_input_in_output",
                                                         "max_beam_width"};
  static const std::set<std::string, std::less<>> text = {
      "tokenizer_dir", "tokenizer_type", "add_special_tokens", "skip_special_tokens"};
  static const std::set<std::string, std::less<>> none;
  switch (kind) {
    case TritonModelKind::kTensorrtLlm:
      return llm;
    case TritonModelKind::kPreprocessing:
    case TritonModelKind::kPostprocessing:
      return text;
    default:
      return none;
  }
}

// The value of a parameter, or nullopt when absent or left as an unfilled placeholder in a
// key qilin does not require; a placeholder in `required` keys is an error.
Result<std::optional<std::string>> Param(const RepositoryModel& m, const std::string& key) {
  auto it = m.config.parameters().find(key);
  if (it == m.config.parameters().end()) return std::optional<std::string>();
  const std::string& v = it->second.string_value();
  if (IsPlaceholder(v)) {
    return InvalidArgument(
        "{}: parameter '{}' is the unfilled placeholder \"{}\"; set it to a value (or remove the "
        "parameter to use the default)",
        m.config_path, key, v);
  }
  return std::optional<std::string>(v);
}

Result<bool> ParseBool(const RepositoryModel& m, const std::string& key, const std::string& v) {
  std::string s = v;
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  if (s == "true" || s == "1" || s == "yes") return true;
  if (s == "false" || s == "0" || s == "no") return false;
  return InvalidArgument("{}: parameter '{}' = \"{}\" is not a boolean (true/false)", m.config_path,
                         key, v);
}

Result<int64_t> ParseInt(const RepositoryModel& m, const std::string& key, const std::string& v,
                         int64_t lo, int64_t hi) {
  int64_t x = 0;
  auto [p, ec] = std::from_chars(v.data(), v.data() + v.size(), x);
  if (ec != std::errc() || p != v.data() + v.size()) {
    return InvalidArgument("{}: parameter '{}' = \"{}\" is not an integer", m.config_path, key, v);
  }
  if (x < lo || x > hi) {
    return OutOfRange("{}: parameter '{}' = {} is outside [{}, {}]", m.config_path, key, x, lo, hi);
  }
  return x;
}

Result<double> ParseFraction(const RepositoryModel& m, const std::string& key,
                             const std::string& v) {
  char* end = nullptr;
  errno = 0;
  double x = std::strtod(v.c_str(), &end);
  if (v.empty() || end != v.c_str() + v.size() || errno != 0) {
    return InvalidArgument("{}: parameter '{}' = \"{}\" is not a number", m.config_path, key, v);
  }
  if (!(x > 0.0 && x <= 1.0)) {
    return OutOfRange("{}: parameter '{}' = {} must be in (0, 1]", m.config_path, key, v);
  }
  return x;
}

std::string ResolvePath(const std::string& base, const std::string& p) {
  fs::path path(p);
  if (path.is_relative()) path = fs::path(base) / path;
  return path.lexically_normal().string();
}

Result<TritonModelKind> KindOf(const std::string& name, const ModelConfig& c,
                               const std::string& file) {
  if (c.platform() == "ensemble") return TritonModelKind::kEnsemble;
  if (c.backend() == "tensorrtllm") return TritonModelKind::kTensorrtLlm;
  if (c.backend() == "python") {
    auto has_input = [&](std::string_view n) {
      return std::any_of(c.input().begin(), c.input().end(),
                         [&](const auto& in) { return in.name() == n; });
    };
    if (has_input("QUERY")) return TritonModelKind::kPreprocessing;
    if (has_input("TOKENS_BATCH")) return TritonModelKind::kPostprocessing;
    if (has_input("text_input")) return TritonModelKind::kEnsemble;  // tensorrt_llm_bls
    return InvalidArgument(
        "{}: model '{}' has backend \"python\" but none of the inputs qilin recognizes (QUERY: "
        "preprocessing, TOKENS_BATCH: postprocessing, text_input: tensorrt_llm_bls)",
        file, name);
  }
  return InvalidArgument(
      "{}: model '{}' has backend \"{}\" platform \"{}\"; qilin runs platform \"ensemble\", "
      "backend \"tensorrtllm\" and tensorrtllm_backend's python pre/postprocessing models",
      file, name, c.backend(), c.platform());
}

Status CheckParameters(const RepositoryModel& m) {
  const auto& honoured = HonouredParameters(m.kind);
  std::vector<std::string> unknown;
  for (const auto& [key, value] : m.config.parameters()) {
    if (honoured.count(key) || IgnoredParameters().count(key)) continue;
    unknown.push_back(key);
  }
  std::sort(unknown.begin(), unknown.end());
  if (!unknown.empty()) {
    std::vector<std::string> known(honoured.begin(), honoured.end());
    return InvalidArgument(
        "{}: unknown parameter{} {} for a {} model (qilin reads: {})", m.config_path,
        unknown.size() > 1 ? "s" : "", fmt::format("'{}'", fmt::join(unknown, "', '")),
        TritonModelKindName(m.kind),
        known.empty() ? std::string("none") : fmt::format("{}", fmt::join(known, ", ")));
  }
  return Status::Ok();
}

}  // namespace

Result<ModelConfig> ParseModelConfig(std::string_view text, const std::string& file) {
  std::vector<std::string> bad;
  for (const Placeholder& p : FindPlaceholders(text)) {
    if (!p.in_string) bad.push_back(fmt::format("line {}: {}", p.line, p.text));
  }
  if (!bad.empty()) {
    return InvalidArgument(
        "{}: unfilled template placeholder{} ({}); qilin does not fill templates: put the values "
        "in, or write a complete repository with `qilin repo init`",
        file, bad.size() > 1 ? "s" : "", fmt::join(bad, ", "));
  }
  ModelConfig config;
  google::protobuf::TextFormat::Parser parser;
  Collector collector;
  parser.RecordErrorsTo(&collector);
  if (!parser.ParseFromString(std::string(text), &config)) {
    if (collector.errors.empty()) collector.errors.push_back("not valid protobuf text format");
    return InvalidArgument("{}: {}", file, fmt::join(collector.errors, "; "));
  }
  return config;
}

Result<ModelConfig> ReadModelConfig(const std::string& path) {
  std::error_code ec;
  auto size = fs::file_size(path, ec);
  if (ec) return NotFound("cannot read {}: {}", path, ec.message());
  if (size > kMaxConfigBytes) {
    return InvalidArgument("{} is {} bytes; a config.pbtxt may have at most {}", path, size,
                           kMaxConfigBytes);
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) return NotFound("cannot open {}", path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ParseModelConfig(ss.str(), path);
}

std::string ModelConfigToText(const ModelConfig& config) {
  google::protobuf::TextFormat::Printer printer;
  printer.SetUseShortRepeatedPrimitives(true);
  std::string out;
  printer.PrintToString(config, &out);
  return out;
}

const RepositoryModel* ModelRepository::Find(std::string_view name) const {
  for (const auto& m : models) {
    if (m.name == name) return &m;
  }
  return nullptr;
}

bool IsModelRepository(const std::string& dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec) || fs::exists(fs::path(dir) / "config.json", ec)) return false;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    if (e.is_directory(ec) && fs::exists(e.path() / "config.pbtxt", ec)) return true;
  }
  return false;
}

Result<ModelRepository> BuildModelRepository(const std::string& dir,
                                             std::vector<RepositoryModel> models) {
  ModelRepository repo;
  repo.dir = dir;
  const RepositoryModel* llm = nullptr;
  for (RepositoryModel& m : models) {
    if (m.config.name().empty()) m.config.set_name(m.name);
    if (m.config.name() != m.name) {
      return InvalidArgument("{}: name \"{}\" differs from its folder name \"{}\"", m.config_path,
                             m.config.name(), m.name);
    }
    QILIN_ASSIGN_OR_RETURN(m.kind, KindOf(m.name, m.config, m.config_path));
    QILIN_RETURN_IF_ERROR(CheckParameters(m));
    if (m.config.max_batch_size() < 0) {
      return OutOfRange("{}: max_batch_size {} is negative", m.config_path,
                        m.config.max_batch_size());
    }
  }
  for (const RepositoryModel& m : models) {
    if (m.kind != TritonModelKind::kTensorrtLlm) continue;
    if (llm) {
      return InvalidArgument(
          "{}: a second tensorrtllm model '{}' (the first is '{}'); qilin "
          "serves one engine per process",
          m.config_path, m.name, llm->name);
    }
    llm = &m;
  }
  if (!llm) {
    return InvalidArgument(
        "{}: no model with backend \"tensorrtllm\" (the engine); found {}", dir,
        models.empty() ? std::string("no models") : [&] {
          std::vector<std::string> n;
          for (const auto& m : models) n.push_back(m.name);
          return fmt::format("{}", fmt::join(n, ", "));
        }());
  }
  // Ensemble steps name models of this repository, with inputs and outputs they have.
  for (const RepositoryModel& m : models) {
    if (!m.config.has_ensemble_scheduling()) continue;
    for (const auto& step : m.config.ensemble_scheduling().step()) {
      const RepositoryModel* target = nullptr;
      for (const auto& t : models) {
        if (t.name == step.model_name()) target = &t;
      }
      if (!target) {
        return NotFound("{}: ensemble step model '{}' is not in the repository", m.config_path,
                        step.model_name());
      }
      for (const auto& [key, value] : step.input_map()) {
        bool found = std::any_of(target->config.input().begin(), target->config.input().end(),
                                 [&](const auto& in) { return in.name() == key; });
        if (!found) {
          return NotFound("{}: ensemble step '{}' maps input '{}', which {} does not have",
                          m.config_path, step.model_name(), key, target->config_path);
        }
      }
      for (const auto& [key, value] : step.output_map()) {
        bool found = std::any_of(target->config.output().begin(), target->config.output().end(),
                                 [&](const auto& out) { return out.name() == key; });
        if (!found) {
          return NotFound("{}: ensemble step '{}' maps output '{}', which {} does not have",
                          m.config_path, step.model_name(), key, target->config_path);
        }
      }
    }
  }

  RepositorySettings& s = repo.settings;
  QILIN_ASSIGN_OR_RETURN(auto path, Param(*llm, "gpt_model_path"));
  if (!path || path->empty()) {
    return InvalidArgument(
        "{}: parameter 'gpt_model_path' is missing; it names the checkpoint "
        "(Hugging Face folder) or engine folder to serve",
        llm->config_path);
  }
  s.model_dir = ResolvePath(dir, *path);
  s.max_batch_size = llm->config.max_batch_size();
  s.decoupled = llm->config.model_transaction_policy().decoupled();
  if (llm->config.has_dynamic_batching()) {
    s.max_queue_size = llm->config.dynamic_batching().default_queue_policy().max_queue_size();
  }
  QILIN_ASSIGN_OR_RETURN(auto type, Param(*llm, "gpt_model_type"));
  if (type) {
    if (*type == "inflight_fused_batching" || *type == "inflight_batching") {
      s.inflight_batching = true;
    } else if (*type == "V1" || *type == "v1") {
      s.inflight_batching = false;
    } else {
      return InvalidArgument(
          "{}: gpt_model_type \"{}\" is not one of inflight_fused_batching, "
          "inflight_batching, V1",
          llm->config_path, *type);
    }
  }
  QILIN_ASSIGN_OR_RETURN(auto policy, Param(*llm, "batch_scheduler_policy"));
  if (policy) {
    if (*policy == "max_utilization") {
      s.guaranteed_no_evict = false;
    } else if (*policy == "guaranteed_no_evict") {
      s.guaranteed_no_evict = true;
    } else {
      return InvalidArgument(
          "{}: batch_scheduler_policy \"{}\" is not one of max_utilization, "
          "guaranteed_no_evict",
          llm->config_path, *policy);
    }
  }
  QILIN_ASSIGN_OR_RETURN(auto kv_tokens, Param(*llm, "max_tokens_in_paged_kv_cache"));
  if (kv_tokens && !kv_tokens->empty()) {
    QILIN_ASSIGN_OR_RETURN(
        s.max_tokens_in_paged_kv_cache,
        ParseInt(*llm, "max_tokens_in_paged_kv_cache", *kv_tokens, 1, int64_t{1} << 40));
  }
  QILIN_ASSIGN_OR_RETURN(auto frac, Param(*llm, "kv_cache_free_gpu_mem_fraction"));
  if (frac && !frac->empty()) {
    QILIN_ASSIGN_OR_RETURN(s.kv_cache_free_gpu_mem_fraction,
                           ParseFraction(*llm, "kv_cache_free_gpu_mem_fraction", *frac));
  }
  for (auto [key, field] : {std::pair{"enable_kv_cache_reuse", &s.enable_kv_cache_reuse},
                            std::pair{"enable_chunked_context", &s.enable_chunked_context},
                            std::pair{"exclude_input_in_output", &s.exclude_input_in_output}}) {
    QILIN_ASSIGN_OR_RETURN(auto v, Param(*llm, key));
    if (v && !v->empty()) {
      QILIN_ASSIGN_OR_RETURN(*field, ParseBool(*llm, key, *v));
    }
  }
  QILIN_ASSIGN_OR_RETURN(auto beams, Param(*llm, "max_beam_width"));
  if (beams && !beams->empty()) {
    QILIN_ASSIGN_OR_RETURN(int64_t b, ParseInt(*llm, "max_beam_width", *beams, 1, 64));
    s.max_beam_width = static_cast<int32_t>(b);
  }
  // The tokenizer: preprocessing's (postprocessing must agree), else the checkpoint's.
  std::string tok_from;
  for (const RepositoryModel& m : models) {
    if (m.kind != TritonModelKind::kPreprocessing && m.kind != TritonModelKind::kPostprocessing) {
      continue;
    }
    QILIN_ASSIGN_OR_RETURN(auto tok, Param(m, "tokenizer_dir"));
    if (tok && !tok->empty()) {
      std::string resolved = ResolvePath(dir, *tok);
      if (!s.tokenizer_dir.empty() && resolved != s.tokenizer_dir) {
        return InvalidArgument("{}: tokenizer_dir \"{}\" differs from {}'s \"{}\"", m.config_path,
                               resolved, tok_from, s.tokenizer_dir);
      }
      s.tokenizer_dir = resolved;
      tok_from = m.config_path;
    }
    QILIN_ASSIGN_OR_RETURN(auto ttype, Param(m, "tokenizer_type"));
    if (ttype && !ttype->empty()) s.tokenizer_type = *ttype;
    QILIN_ASSIGN_OR_RETURN(auto skip, Param(m, "skip_special_tokens"));
    if (skip && !skip->empty() && m.kind == TritonModelKind::kPostprocessing) {
      QILIN_ASSIGN_OR_RETURN(s.skip_special_tokens, ParseBool(m, "skip_special_tokens", *skip));
    }
    QILIN_ASSIGN_OR_RETURN(auto add, Param(m, "add_special_tokens"));
    if (add && !add->empty() && m.kind == TritonModelKind::kPreprocessing) {
      QILIN_ASSIGN_OR_RETURN(s.add_special_tokens, ParseBool(m, "add_special_tokens", *add));
    }
  }
  if (s.tokenizer_dir.empty()) s.tokenizer_dir = s.model_dir;
  repo.models = std::move(models);
  return repo;
}

Result<ModelRepository> LoadModelRepository(const std::string& dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return NotFound("model repository {} is not a folder", dir);
  std::vector<fs::path> folders;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    if (e.is_directory(ec) && fs::exists(e.path() / "config.pbtxt", ec)) {
      folders.push_back(e.path());
    }
  }
  if (ec) return NotFound("cannot list {}: {}", dir, ec.message());
  std::sort(folders.begin(), folders.end());
  if (folders.empty()) {
    return NotFound("{} holds no model folder with a config.pbtxt", dir);
  }
  std::vector<RepositoryModel> models;
  for (const auto& f : folders) {
    RepositoryModel m;
    m.name = f.filename().string();
    m.config_path = (f / "config.pbtxt").string();
    QILIN_ASSIGN_OR_RETURN(m.config, ReadModelConfig(m.config_path));
    models.push_back(std::move(m));
  }
  return BuildModelRepository(fs::absolute(dir).lexically_normal().string(), std::move(models));
}

// ---- Writing a repository -------------------------------------------------------------------

namespace {

void AddInput(ModelConfig* c, const std::string& name, DataType type, std::vector<int64_t> dims,
              bool optional = false) {
  auto* in = c->add_input();
  in->set_name(name);
  in->set_data_type(type);
  for (int64_t d : dims) in->add_dims(d);
  in->set_optional(optional);
}

void AddOutput(ModelConfig* c, const std::string& name, DataType type, std::vector<int64_t> dims) {
  auto* out = c->add_output();
  out->set_name(name);
  out->set_data_type(type);
  for (int64_t d : dims) out->add_dims(d);
}

void SetParam(ModelConfig* c, const std::string& key, const std::string& value) {
  (*c->mutable_parameters())[key].set_string_value(value);
}

void CpuInstance(ModelConfig* c) {
  auto* g = c->add_instance_group();
  g->set_count(1);
  g->set_kind(inference::ModelInstanceGroup::KIND_CPU);
}

// Sampling inputs shared by ensemble (its names) and tensorrt_llm (runtime_ names).
struct SamplingInput {
  const char* ensemble;
  const char* llm;
  DataType type;
};
constexpr SamplingInput kSamplingInputs[] = {
    {"end_id", "end_id", inference::TYPE_INT32},
    {"pad_id", "pad_id", inference::TYPE_INT32},
    {"top_k", "runtime_top_k", inference::TYPE_INT32},
    {"top_p", "runtime_top_p", inference::TYPE_FP32},
    {"temperature", "temperature", inference::TYPE_FP32},
    {"length_penalty", "len_penalty", inference::TYPE_FP32},
    {"repetition_penalty", "repetition_penalty", inference::TYPE_FP32},
    {"min_length", "min_length", inference::TYPE_INT32},
    {"presence_penalty", "presence_penalty", inference::TYPE_FP32},
    {"frequency_penalty", "frequency_penalty", inference::TYPE_FP32},
    {"random_seed", "random_seed", inference::TYPE_UINT64},
    {"return_log_probs", "return_log_probs", inference::TYPE_BOOL},
    {"beam_width", "beam_width", inference::TYPE_INT32},
    {"stream", "streaming", inference::TYPE_BOOL},
};

}  // namespace

std::vector<RepositoryModel> MakeRepositoryModels(const RepoInitOptions& o) {
  std::vector<RepositoryModel> models;
  const std::string model_dir =
      o.model_dir.empty() ? std::string() : fs::absolute(o.model_dir).lexically_normal().string();

  RepositoryModel pre{"preprocessing", TritonModelKind::kPreprocessing, {}, ""};
  {
    ModelConfig& c = pre.config;
    c.set_name("preprocessing");
    c.set_backend("python");
    c.set_max_batch_size(o.max_batch_size);
    AddInput(&c, "QUERY", inference::TYPE_STRING, {-1});
    AddInput(&c, "REQUEST_OUTPUT_LEN", inference::TYPE_INT32, {-1});
    AddInput(&c, "BAD_WORDS_DICT", inference::TYPE_STRING, {-1}, true);
    AddInput(&c, "STOP_WORDS_DICT", inference::TYPE_STRING, {-1}, true);
    AddOutput(&c, "INPUT_ID", inference::TYPE_INT32, {-1});
    AddOutput(&c, "REQUEST_INPUT_LEN", inference::TYPE_INT32, {1});
    AddOutput(&c, "BAD_WORDS_IDS", inference::TYPE_INT32, {2, -1});
    AddOutput(&c, "STOP_WORDS_IDS", inference::TYPE_INT32, {2, -1});
    AddOutput(&c, "REQUEST_OUTPUT_LEN", inference::TYPE_INT32, {-1});
    SetParam(&c, "tokenizer_dir", model_dir);
    SetParam(&c, "tokenizer_type", "auto");
    CpuInstance(&c);
  }
  RepositoryModel llm{"tensorrt_llm", TritonModelKind::kTensorrtLlm, {}, ""};
  {
    ModelConfig& c = llm.config;
    c.set_name("tensorrt_llm");
    c.set_backend("tensorrtllm");
    c.set_max_batch_size(o.max_batch_size);
    c.mutable_model_transaction_policy()->set_decoupled(o.decoupled);
    auto* db = c.mutable_dynamic_batching();
    db->add_preferred_batch_size(o.max_batch_size);
    if (o.max_queue_size) db->mutable_default_queue_policy()->set_max_queue_size(o.max_queue_size);
    AddInput(&c, "input_ids", inference::TYPE_INT32, {-1});
    c.mutable_input(0)->set_allow_ragged_batch(true);
    AddInput(&c, "input_lengths", inference::TYPE_INT32, {1});
    AddInput(&c, "request_output_len", inference::TYPE_INT32, {1});
    AddInput(&c, "stop_words_list", inference::TYPE_INT32, {2, -1}, true);
    AddInput(&c, "bad_words_list", inference::TYPE_INT32, {2, -1}, true);
    for (const auto& s : kSamplingInputs) AddInput(&c, s.llm, s.type, {1}, true);
    AddOutput(&c, "output_ids", inference::TYPE_INT32, {-1, -1});
    AddOutput(&c, "sequence_length", inference::TYPE_INT32, {-1});
    AddOutput(&c, "cum_log_probs", inference::TYPE_FP32, {-1});
    AddOutput(&c, "output_log_probs", inference::TYPE_FP32, {-1, -1});
    CpuInstance(&c);
    SetParam(&c, "gpt_model_type", "inflight_fused_batching");
    SetParam(&c, "gpt_model_path", model_dir);
    if (o.max_tokens_in_paged_kv_cache > 0) {
      SetParam(&c, "max_tokens_in_paged_kv_cache", std::to_string(o.max_tokens_in_paged_kv_cache));
    }
    SetParam(&c, "kv_cache_free_gpu_mem_fraction",
             fmt::format("{}", o.kv_cache_free_gpu_mem_fraction));
    SetParam(&c, "batch_scheduler_policy", o.batch_scheduler_policy);
    SetParam(&c, "enable_kv_cache_reuse", "true");
    SetParam(&c, "enable_chunked_context", "true");
    SetParam(&c, "exclude_input_in_output", "true");
    SetParam(&c, "max_beam_width", "1");
  }
  RepositoryModel post{"postprocessing", TritonModelKind::kPostprocessing, {}, ""};
  {
    ModelConfig& c = post.config;
    c.set_name("postprocessing");
    c.set_backend("python");
    c.set_max_batch_size(o.max_batch_size);
    AddInput(&c, "TOKENS_BATCH", inference::TYPE_INT32, {-1, -1});
    AddInput(&c, "SEQUENCE_LENGTH", inference::TYPE_INT32, {-1});
    AddInput(&c, "CUM_LOG_PROBS", inference::TYPE_FP32, {-1}, true);
    AddInput(&c, "OUTPUT_LOG_PROBS", inference::TYPE_FP32, {-1, -1}, true);
    AddOutput(&c, "OUTPUT", inference::TYPE_STRING, {-1});
    AddOutput(&c, "OUT_CUM_LOG_PROBS", inference::TYPE_FP32, {-1});
    AddOutput(&c, "OUT_OUTPUT_LOG_PROBS", inference::TYPE_FP32, {-1, -1});
    SetParam(&c, "tokenizer_dir", model_dir);
    SetParam(&c, "tokenizer_type", "auto");
    SetParam(&c, "skip_special_tokens", "true");
    CpuInstance(&c);
  }
  RepositoryModel ens{"ensemble", TritonModelKind::kEnsemble, {}, ""};
  {
    ModelConfig& c = ens.config;
    c.set_name("ensemble");
    c.set_platform("ensemble");
    c.set_max_batch_size(o.max_batch_size);
    AddInput(&c, "text_input", inference::TYPE_STRING, {-1});
    AddInput(&c, "max_tokens", inference::TYPE_INT32, {-1});
    AddInput(&c, "bad_words", inference::TYPE_STRING, {-1}, true);
    AddInput(&c, "stop_words", inference::TYPE_STRING, {-1}, true);
    for (const auto& s : kSamplingInputs) AddInput(&c, s.ensemble, s.type, {1}, true);
    AddOutput(&c, "text_output", inference::TYPE_STRING, {-1});
    AddOutput(&c, "cum_log_probs", inference::TYPE_FP32, {-1});
    AddOutput(&c, "output_log_probs", inference::TYPE_FP32, {-1, -1});
    auto* sched = c.mutable_ensemble_scheduling();
    auto* s1 = sched->add_step();
    s1->set_model_name("preprocessing");
    s1->set_model_version(-1);
    (*s1->mutable_input_map())["QUERY"] = "text_input";
    (*s1->mutable_input_map())["REQUEST_OUTPUT_LEN"] = "max_tokens";
    (*s1->mutable_input_map())["BAD_WORDS_DICT"] = "bad_words";
    (*s1->mutable_input_map())["STOP_WORDS_DICT"] = "stop_words";
    (*s1->mutable_output_map())["REQUEST_INPUT_LEN"] = "_REQUEST_INPUT_LEN";
    (*s1->mutable_output_map())["INPUT_ID"] = "_INPUT_ID";
    (*s1->mutable_output_map())["REQUEST_OUTPUT_LEN"] = "_REQUEST_OUTPUT_LEN";
    (*s1->mutable_output_map())["STOP_WORDS_IDS"] = "_STOP_WORDS_IDS";
    (*s1->mutable_output_map())["BAD_WORDS_IDS"] = "_BAD_WORDS_IDS";
    auto* s2 = sched->add_step();
    s2->set_model_name("tensorrt_llm");
    s2->set_model_version(-1);
    (*s2->mutable_input_map())["input_ids"] = "_INPUT_ID";
    (*s2->mutable_input_map())["input_lengths"] = "_REQUEST_INPUT_LEN";
    (*s2->mutable_input_map())["request_output_len"] = "_REQUEST_OUTPUT_LEN";
    (*s2->mutable_input_map())["stop_words_list"] = "_STOP_WORDS_IDS";
    (*s2->mutable_input_map())["bad_words_list"] = "_BAD_WORDS_IDS";
    for (const auto& s : kSamplingInputs) (*s2->mutable_input_map())[s.llm] = s.ensemble;
    (*s2->mutable_output_map())["output_ids"] = "_TOKENS_BATCH";
    (*s2->mutable_output_map())["sequence_length"] = "_SEQUENCE_LENGTH";
    (*s2->mutable_output_map())["cum_log_probs"] = "_CUM_LOG_PROBS";
    (*s2->mutable_output_map())["output_log_probs"] = "_OUTPUT_LOG_PROBS";
    auto* s3 = sched->add_step();
    s3->set_model_name("postprocessing");
    s3->set_model_version(-1);
    (*s3->mutable_input_map())["TOKENS_BATCH"] = "_TOKENS_BATCH";
    (*s3->mutable_input_map())["SEQUENCE_LENGTH"] = "_SEQUENCE_LENGTH";
    (*s3->mutable_input_map())["CUM_LOG_PROBS"] = "_CUM_LOG_PROBS";
    (*s3->mutable_input_map())["OUTPUT_LOG_PROBS"] = "_OUTPUT_LOG_PROBS";
    (*s3->mutable_output_map())["OUTPUT"] = "text_output";
    (*s3->mutable_output_map())["OUT_CUM_LOG_PROBS"] = "cum_log_probs";
    (*s3->mutable_output_map())["OUT_OUTPUT_LOG_PROBS"] = "output_log_probs";
  }
  models.push_back(std::move(ens));
  models.push_back(std::move(pre));
  models.push_back(std::move(post));
  models.push_back(std::move(llm));
  return models;
}

Status WriteModelRepository(const RepoInitOptions& options, const std::string& out) {
  std::error_code ec;
  if (options.model_dir.empty() || !fs::exists(fs::path(options.model_dir) / "config.json", ec)) {
    return NotFound("--model {}: no config.json there (need a Hugging Face checkpoint folder)",
                    options.model_dir);
  }
  if (options.max_batch_size < 1) {
    return OutOfRange("--max-batch-size {} must be at least 1", options.max_batch_size);
  }
  if (!(options.kv_cache_free_gpu_mem_fraction > 0 &&
        options.kv_cache_free_gpu_mem_fraction <= 1)) {
    return OutOfRange("--kv-cache-free-gpu-mem-fraction {} must be in (0, 1]",
                      options.kv_cache_free_gpu_mem_fraction);
  }
  if (options.batch_scheduler_policy != "max_utilization" &&
      options.batch_scheduler_policy != "guaranteed_no_evict") {
    return InvalidArgument(
        "--batch-scheduler-policy \"{}\" is not one of max_utilization, guaranteed_no_evict",
        options.batch_scheduler_policy);
  }
  auto models = MakeRepositoryModels(options);
  for (const auto& m : models) {
    fs::path cfg = fs::path(out) / m.name / "config.pbtxt";
    if (fs::exists(cfg, ec)) {
      return FailedPrecondition("{} exists; qilin repo init does not overwrite (remove {} first)",
                                cfg.string(), out);
    }
  }
  for (const auto& m : models) {
    fs::path folder = fs::path(out) / m.name;
    fs::create_directories(folder / "1", ec);
    if (ec) return Unavailable("cannot create {}: {}", (folder / "1").string(), ec.message());
    std::ofstream f(folder / "config.pbtxt", std::ios::binary);
    f << "# Written by `qilin repo init` for " << fs::absolute(options.model_dir).string()
      << "\n# Served natively by `qilin serve " << out << "`.\n"
      << ModelConfigToText(m.config);
    if (!f) return Unavailable("cannot write {}", (folder / "config.pbtxt").string());
  }
  return Status::Ok();
}

}  // namespace qilin::server
