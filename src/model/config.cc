#include "model/config.h"

#include <cmath>
#include <fstream>
#include <sstream>

#include <spdlog/spdlog.h>

#include "model/json_util.h"

namespace qilin {
namespace {

using nlohmann::json;

struct ArchInfo {
  ModelArch arch;
  const char* name;        // architectures[0]
  const char* model_type;  // model_type
};

constexpr ArchInfo kArchs[] = {
    {ModelArch::kLlama, "LlamaForCausalLM", "llama"},
    {ModelArch::kQwen2, "Qwen2ForCausalLM", "qwen2"},
    {ModelArch::kQwen3, "Qwen3ForCausalLM", "qwen3"},
    {ModelArch::kQwenV1, "QWenLMHeadModel", "qwen"},
};
constexpr const char* kSupportedArchs =
    "LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, QWenLMHeadModel";

// Limits far above any published model; they keep every size product in NumParameters and in
// the loaders inside int64.
constexpr int64_t kMaxHidden = int64_t{1} << 20;
constexpr int64_t kMaxIntermediate = int64_t{1} << 22;
constexpr int64_t kMaxLayers = int64_t{1} << 12;
constexpr int64_t kMaxHeads = int64_t{1} << 14;
constexpr int64_t kMaxHeadDim = int64_t{1} << 14;
constexpr int64_t kMaxVocab = int64_t{1} << 27;
constexpr int64_t kMaxPositions = int64_t{1} << 30;

// Reads a positive integer no larger than `limit`.
Result<int64_t> PositiveInt(const JsonFields& f, const std::string& key, int64_t limit) {
  QILIN_ASSIGN_OR_RETURN(int64_t v, f.Int(key));
  if (v <= 0) return InvalidArgument("{}: must be positive, got {}", f.Where(key), v);
  if (v > limit) return OutOfRange("{}: value {} is over the limit {}", f.Where(key), v, limit);
  return v;
}

Result<int64_t> PositiveIntOr(const JsonFields& f, const std::string& key, int64_t def,
                              int64_t limit) {
  if (!f.Has(key)) return def;
  return PositiveInt(f, key, limit);
}

Result<double> PositiveDouble(const JsonFields& f, const std::string& key, double def) {
  QILIN_ASSIGN_OR_RETURN(double v, f.DoubleOr(key, def));
  if (!(v > 0) || !std::isfinite(v)) {
    return InvalidArgument("{}: must be a positive finite number, got {}", f.Where(key), v);
  }
  return v;
}

// torch_dtype / dtype spellings as transformers writes them.
Result<DType> ParseTorchDtype(const JsonFields& f, const std::string& key) {
  QILIN_ASSIGN_OR_RETURN(std::string s, f.String(key));
  std::string_view v = s;
  if (v.starts_with("torch.")) v.remove_prefix(6);
  if (v == "bfloat16") return DType::kBF16;
  if (v == "float16" || v == "half") return DType::kF16;
  if (v == "float32" || v == "float") return DType::kF32;
  return InvalidArgument("{}: unsupported dtype '{}' (supported: bfloat16, float16, float32)",
                         f.Where(key), s);
}

// bos_token_id: int or null; eos_token_id: int, list of ints, or null.
Status ParseTokenIds(const JsonFields& f, ModelConfig* c) {
  QILIN_ASSIGN_OR_RETURN(c->bos_token_id, f.IntOr("bos_token_id", -1));
  const json* eos = f.Find("eos_token_id");
  if (eos == nullptr) return Status::Ok();
  if (eos->is_number_integer() || eos->is_number_unsigned()) {
    QILIN_ASSIGN_OR_RETURN(int64_t id, f.Int("eos_token_id"));
    c->eos_token_ids.push_back(id);
    return Status::Ok();
  }
  if (!eos->is_array())
    return f.WrongType("eos_token_id", "an integer or a list of integers", *eos);
  for (const json& e : *eos) {
    if (!e.is_number_integer() && !e.is_number_unsigned()) {
      return f.WrongType("eos_token_id", "a list of integers", *eos);
    }
    c->eos_token_ids.push_back(e.get<int64_t>());
  }
  return Status::Ok();
}

// Rope base and scaling. Accepts the classic form (top-level rope_theta plus
// rope_scaling: {type|rope_type, factor, ...}) and transformers 5's form (rope_parameters:
// {rope_type, rope_theta, factor, ...}, possibly nested under a layer type). As transformers
// does, a non-empty rope_scaling wins over rope_parameters, and rope_theta inside the dict
// wins over the top-level key.
Status ParseRope(const JsonFields& f, const std::string& source, ModelConfig* c) {
  QILIN_ASSIGN_OR_RETURN(c->rope_theta, PositiveDouble(f, "rope_theta", 10000.0));
  std::string key = "rope_scaling";
  const json* params = f.Find(key);
  if (params == nullptr || (params->is_object() && params->empty())) {
    key = "rope_parameters";
    params = f.Find(key);
  }
  if (params == nullptr) return Status::Ok();
  if (!params->is_object()) return f.WrongType(key, "an object", *params);
  if (params->contains("full_attention") && !params->contains("rope_type") &&
      !params->contains("type") && !params->contains("rope_theta")) {
    if (params->contains("sliding_attention")) {
      return Unimplemented(
          "{}: key '{}' has per-layer-type rope parameters (sliding_attention): "
          "sliding-window layers are not supported",
          source, key);
    }
    params = &params->at("full_attention");
    key += ".full_attention";
    if (!params->is_object()) return f.WrongType(key, "an object", *params);
  }
  JsonFields p(*params, source, key + ".");
  if (p.Has("rope_theta")) {
    QILIN_ASSIGN_OR_RETURN(c->rope_theta, PositiveDouble(p, "rope_theta", 0));
  }
  for (const JsonFields* holder : {&f, static_cast<const JsonFields*>(&p)}) {
    QILIN_ASSIGN_OR_RETURN(double partial, holder->DoubleOr("partial_rotary_factor", 1.0));
    if (partial != 1.0) {
      return Unimplemented("{}: partial rotary embeddings ({}) are not supported, only 1.0",
                           holder->Where("partial_rotary_factor"), partial);
    }
  }

  QILIN_ASSIGN_OR_RETURN(std::string type, p.StringOr("type", "default"));
  std::string type_key = "type";
  if (p.Has("rope_type")) {
    QILIN_ASSIGN_OR_RETURN(type, p.String("rope_type"));
    type_key = "rope_type";
  }
  RopeScaling& rs = c->rope_scaling;
  if (type == "default" || type == "none") {
    rs.type = RopeScalingType::kNone;
  } else if (type == "linear") {
    rs.type = RopeScalingType::kLinear;
  } else if (type == "dynamic") {
    rs.type = RopeScalingType::kDynamic;
  } else if (type == "yarn") {
    rs.type = RopeScalingType::kYarn;
  } else {
    return InvalidArgument(
        "{}: rope scaling type '{}' is not supported (supported: default, "
        "linear, dynamic, yarn)",
        p.Where(type_key), type);
  }
  if (rs.type == RopeScalingType::kNone) return Status::Ok();

  if (!p.Has("factor")) return p.Missing("factor");
  QILIN_ASSIGN_OR_RETURN(rs.factor, PositiveDouble(p, "factor", 1.0));
  // transformers gives a top-level original_max_position_embeddings priority (Phi3 style).
  if (f.Has("original_max_position_embeddings")) {
    QILIN_ASSIGN_OR_RETURN(rs.original_max_position_embeddings,
                           PositiveInt(f, "original_max_position_embeddings", kMaxPositions));
  } else {
    QILIN_ASSIGN_OR_RETURN(rs.original_max_position_embeddings,
                           PositiveIntOr(p, "original_max_position_embeddings",
                                         c->max_position_embeddings, kMaxPositions));
  }
  if (rs.type == RopeScalingType::kYarn) {
    QILIN_ASSIGN_OR_RETURN(rs.beta_fast, p.DoubleOr("beta_fast", 32.0));
    QILIN_ASSIGN_OR_RETURN(rs.beta_slow, p.DoubleOr("beta_slow", 1.0));
    QILIN_ASSIGN_OR_RETURN(rs.attention_factor, p.DoubleOr("attention_factor", 0.0));
    if (rs.attention_factor < 0 || !std::isfinite(rs.attention_factor)) {
      return InvalidArgument("{}: must be a non-negative number, got {}",
                             p.Where("attention_factor"), rs.attention_factor);
    }
    if (!std::isfinite(rs.beta_fast) || !std::isfinite(rs.beta_slow) ||
        rs.beta_fast < rs.beta_slow) {
      return InvalidArgument("{}: beta_fast ({}) must be >= beta_slow ({})", p.Where("beta_fast"),
                             rs.beta_fast, rs.beta_slow);
    }
  }
  return Status::Ok();
}

// Fills num_kv_heads and head_dim checks shared by every architecture.
Status CheckHeads(const std::string& source, ModelConfig* c) {
  if (c->num_heads % c->num_kv_heads != 0) {
    return InvalidArgument(
        "{}: num_attention_heads ({}) must be a multiple of num_key_value_heads ({})", source,
        c->num_heads, c->num_kv_heads);
  }
  if (c->q_size() > kMaxHidden) {
    return OutOfRange("{}: num_attention_heads x head_dim = {} is over the limit {}", source,
                      c->q_size(), kMaxHidden);
  }
  return Status::Ok();
}

// Llama, Qwen2 and Qwen3: the transformers config classes.
Status ParseHfDecoder(const JsonFields& f, const std::string& source, ModelConfig* c) {
  QILIN_ASSIGN_OR_RETURN(c->vocab_size, PositiveInt(f, "vocab_size", kMaxVocab));
  QILIN_ASSIGN_OR_RETURN(c->hidden_size, PositiveInt(f, "hidden_size", kMaxHidden));
  QILIN_ASSIGN_OR_RETURN(c->intermediate_size,
                         PositiveInt(f, "intermediate_size", kMaxIntermediate));
  QILIN_ASSIGN_OR_RETURN(c->num_layers, PositiveInt(f, "num_hidden_layers", kMaxLayers));
  QILIN_ASSIGN_OR_RETURN(c->num_heads, PositiveInt(f, "num_attention_heads", kMaxHeads));
  QILIN_ASSIGN_OR_RETURN(c->num_kv_heads,
                         PositiveIntOr(f, "num_key_value_heads", c->num_heads, kMaxHeads));

  // head_dim: explicit where given. Qwen3Config defaults it to 128; Llama and Qwen2 derive it.
  if (f.Has("head_dim")) {
    QILIN_ASSIGN_OR_RETURN(c->head_dim, PositiveInt(f, "head_dim", kMaxHeadDim));
  } else if (c->arch == ModelArch::kQwen3) {
    c->head_dim = 128;
  } else {
    if (c->hidden_size % c->num_heads != 0) {
      return InvalidArgument(
          "{}: hidden_size ({}) is not divisible by num_attention_heads ({}) and no head_dim is "
          "given",
          source, c->hidden_size, c->num_heads);
    }
    c->head_dim = c->hidden_size / c->num_heads;
  }
  QILIN_RETURN_IF_ERROR(CheckHeads(source, c));

  const int64_t default_positions = c->arch == ModelArch::kLlama ? 2048 : 32768;
  QILIN_ASSIGN_OR_RETURN(
      c->max_position_embeddings,
      PositiveIntOr(f, "max_position_embeddings", default_positions, kMaxPositions));
  QILIN_ASSIGN_OR_RETURN(c->rms_norm_eps, PositiveDouble(f, "rms_norm_eps", 1e-6));
  QILIN_ASSIGN_OR_RETURN(c->tie_word_embeddings, f.BoolOr("tie_word_embeddings", false));

  QILIN_ASSIGN_OR_RETURN(std::string act, f.StringOr("hidden_act", "silu"));
  if (act != "silu") {
    return Unimplemented("{}: activation '{}' is not supported (only silu)", f.Where("hidden_act"),
                         act);
  }
  if (c->arch == ModelArch::kQwen2) {
    c->attention_bias = true;  // Qwen2Attention always has q/k/v bias, never o bias
  } else {
    // LlamaAttention and Qwen3Attention put attention_bias on q, k, v and o.
    QILIN_ASSIGN_OR_RETURN(c->attention_bias, f.BoolOr("attention_bias", false));
    c->o_bias = c->attention_bias;
    c->qk_norm = c->arch == ModelArch::kQwen3;
  }
  QILIN_ASSIGN_OR_RETURN(bool mlp_bias, f.BoolOr("mlp_bias", false));
  if (mlp_bias) return Unimplemented("{}: MLP biases are not supported", f.Where("mlp_bias"));
  QILIN_ASSIGN_OR_RETURN(bool sliding, f.BoolOr("use_sliding_window", false));
  if (sliding) {
    return Unimplemented("{}: is true: sliding-window attention is not supported",
                         f.Where("use_sliding_window"));
  }
  return ParseRope(f, source, c);
}

// Qwen v1 (QWenLMHeadModel, configuration_qwen.py / modeling_qwen.py from the Qwen repos).
Status ParseQwenV1(const JsonFields& f, const std::string& source, ModelConfig* c) {
  QILIN_ASSIGN_OR_RETURN(c->vocab_size, PositiveInt(f, "vocab_size", kMaxVocab));
  QILIN_ASSIGN_OR_RETURN(c->hidden_size, PositiveInt(f, "hidden_size", kMaxHidden));
  QILIN_ASSIGN_OR_RETURN(c->num_layers, PositiveInt(f, "num_hidden_layers", kMaxLayers));
  QILIN_ASSIGN_OR_RETURN(c->num_heads, PositiveInt(f, "num_attention_heads", kMaxHeads));
  c->num_kv_heads = c->num_heads;
  // QWenMLP: w1 and w2 are each intermediate_size / 2 wide.
  QILIN_ASSIGN_OR_RETURN(int64_t both, PositiveInt(f, "intermediate_size", 2 * kMaxIntermediate));
  if (both % 2 != 0) {
    return InvalidArgument(
        "{}: must be even (Qwen v1 stores twice the width of each MLP branch), got {}",
        f.Where("intermediate_size"), both);
  }
  c->intermediate_size = both / 2;
  if (f.Has("kv_channels")) {
    QILIN_ASSIGN_OR_RETURN(c->head_dim, PositiveInt(f, "kv_channels", kMaxHeadDim));
  } else {
    if (c->hidden_size % c->num_heads != 0) {
      return InvalidArgument(
          "{}: hidden_size ({}) is not divisible by num_attention_heads ({}) and no kv_channels "
          "is given",
          source, c->hidden_size, c->num_heads);
    }
    c->head_dim = c->hidden_size / c->num_heads;
  }
  // QWenAttention splits c_attn's output in hidden_size chunks: q, k and v are each hidden wide.
  if (c->head_dim * c->num_heads != c->hidden_size) {
    return InvalidArgument(
        "{}: kv_channels x num_attention_heads ({} x {}) must equal hidden_size ({}) for "
        "QWenLMHeadModel",
        source, c->head_dim, c->num_heads, c->hidden_size);
  }
  QILIN_RETURN_IF_ERROR(CheckHeads(source, c));
  QILIN_ASSIGN_OR_RETURN(c->rope_theta, PositiveDouble(f, "rotary_emb_base", 10000.0));
  QILIN_ASSIGN_OR_RETURN(double rotary_pct, f.DoubleOr("rotary_pct", 1.0));
  if (rotary_pct != 1.0) {
    return Unimplemented("{}: partial rotary embeddings ({}) are not supported, only 1.0",
                         f.Where("rotary_pct"), rotary_pct);
  }
  QILIN_ASSIGN_OR_RETURN(c->rms_norm_eps, PositiveDouble(f, "layer_norm_epsilon", 1e-6));
  QILIN_ASSIGN_OR_RETURN(c->max_position_embeddings,
                         PositiveIntOr(f, "max_position_embeddings", 8192, kMaxPositions));
  QILIN_ASSIGN_OR_RETURN(c->seq_length, PositiveIntOr(f, "seq_length", 8192, kMaxPositions));
  if (c->seq_length < 2) {
    return InvalidArgument(
        "{}: must be at least 2 (logn attention divides by log(seq_length)), "
        "got {}",
        f.Where("seq_length"), c->seq_length);
  }
  QILIN_ASSIGN_OR_RETURN(c->use_dynamic_ntk, f.BoolOr("use_dynamic_ntk", true));
  QILIN_ASSIGN_OR_RETURN(c->use_logn_attn, f.BoolOr("use_logn_attn", true));
  QILIN_ASSIGN_OR_RETURN(bool no_bias, f.BoolOr("no_bias", true));
  if (!no_bias) {
    return Unimplemented("{}: is false: biases on c_proj and the MLP are not supported",
                         f.Where("no_bias"));
  }
  QILIN_ASSIGN_OR_RETURN(c->tie_word_embeddings, f.BoolOr("tie_word_embeddings", false));
  c->attention_bias = true;  // c_attn always has a bias
  return Status::Ok();
}

}  // namespace

const char* ModelArchName(ModelArch arch) {
  for (const ArchInfo& a : kArchs) {
    if (a.arch == arch) return a.name;
  }
  return "unknown";
}

int64_t ModelConfig::NumParameters() const {
  int64_t per_layer = 2 * hidden_size;                                             // two norms
  per_layer += hidden_size * (q_size() + 2 * kv_size()) + q_size() * hidden_size;  // q k v o
  if (attention_bias) per_layer += q_size() + 2 * kv_size();
  if (o_bias) per_layer += hidden_size;
  if (qk_norm) per_layer += 2 * head_dim;
  per_layer += 3 * hidden_size * intermediate_size;  // gate, up, down
  int64_t n = vocab_size * hidden_size + num_layers * per_layer + hidden_size;
  if (!tie_word_embeddings) n += vocab_size * hidden_size;
  return n;
}

Result<ModelConfig> ParseModelConfig(const std::string& json_text, const std::string& source) {
  QILIN_ASSIGN_OR_RETURN(json root, ParseJsonText(json_text, source));
  if (!root.is_object()) {
    return InvalidArgument("{}: expected a JSON object at the top level, got {}", source,
                           JsonTypeName(root));
  }
  JsonFields f(root, source);
  ModelConfig c;
  QILIN_ASSIGN_OR_RETURN(c.model_type, f.StringOr("model_type", ""));

  const json* archs = f.Find("architectures");
  if (archs != nullptr) {
    if (!archs->is_array() || archs->empty() || !(*archs)[0].is_string()) {
      return f.WrongType("architectures", "a non-empty list of strings", *archs);
    }
    c.architecture = (*archs)[0].get<std::string>();
  } else if (c.model_type.empty()) {
    return InvalidArgument("{}: required key 'architectures' is missing (and no 'model_type')",
                           source);
  }
  const ArchInfo* info = nullptr;
  for (const ArchInfo& a : kArchs) {
    if (c.architecture.empty() ? c.model_type == a.model_type : c.architecture == a.name) {
      info = &a;
    }
  }
  if (info == nullptr) {
    if (c.architecture.empty()) {
      return InvalidArgument("{}: model_type '{}' is not supported (supported architectures: {})",
                             source, c.model_type, kSupportedArchs);
    }
    return InvalidArgument("{}: architecture '{}' is not supported (supported: {})", source,
                           c.architecture, kSupportedArchs);
  }
  if (c.architecture.empty()) {
    spdlog::debug("{}: no 'architectures'; using {} from model_type '{}'", source, info->name,
                  c.model_type);
    c.architecture = info->name;
  }
  if (!c.model_type.empty() && c.model_type != info->model_type) {
    return InvalidArgument("{}: model_type '{}' contradicts architecture '{}' (expected '{}')",
                           source, c.model_type, c.architecture, info->model_type);
  }
  c.model_type = info->model_type;
  c.arch = info->arch;

  if (c.arch == ModelArch::kQwenV1) {
    QILIN_RETURN_IF_ERROR(ParseQwenV1(f, source, &c));
  } else {
    QILIN_RETURN_IF_ERROR(ParseHfDecoder(f, source, &c));
  }

  // dtype: transformers 5 writes "dtype", older versions "torch_dtype"; Qwen v1 configs carry
  // bf16/fp16/fp32 flags instead and its checkpoints are bf16.
  if (f.Has("dtype")) {
    QILIN_ASSIGN_OR_RETURN(c.dtype, ParseTorchDtype(f, "dtype"));
  } else if (f.Has("torch_dtype")) {
    QILIN_ASSIGN_OR_RETURN(c.dtype, ParseTorchDtype(f, "torch_dtype"));
  } else {
    QILIN_ASSIGN_OR_RETURN(bool fp16, f.BoolOr("fp16", false));
    QILIN_ASSIGN_OR_RETURN(bool fp32, f.BoolOr("fp32", false));
    c.dtype = fp16 ? DType::kF16 : fp32 ? DType::kF32 : DType::kBF16;
  }
  QILIN_RETURN_IF_ERROR(ParseTokenIds(f, &c));
  return c;
}

Result<ModelConfig> LoadModelConfig(const std::filesystem::path& model_dir) {
  const std::filesystem::path path = model_dir / "config.json";
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec)) {
    return NotFound("{}: no such file (a model directory needs a config.json)", path.string());
  }
  std::ifstream in(path, std::ios::binary);
  std::ostringstream text;
  text << in.rdbuf();
  if (!in.good() && !in.eof()) return DataLoss("{}: read failed", path.string());
  return ParseModelConfig(text.str(), path.string());
}

double QwenV1NtkAlpha(const ModelConfig& config, int64_t prompt_len) {
  if (!config.use_dynamic_ntk || config.seq_length <= 0 || prompt_len <= config.seq_length) {
    return 1.0;
  }
  // modeling_qwen.py get_ntk_alpha: 2^ceil(log2(len / seq_length) + 1) - 1, at least 1.
  double context_value =
      std::log2(static_cast<double>(prompt_len) / static_cast<double>(config.seq_length)) + 1.0;
  double alpha = std::exp2(std::ceil(context_value)) - 1.0;
  return std::max(alpha, 1.0);
}

double QwenV1LognScale(const ModelConfig& config, int64_t pos) {
  if (!config.use_logn_attn || config.seq_length < 2) return 1.0;
  const int64_t i = pos + 1;  // modeling_qwen.py indexes logn_list from 1
  if (i <= config.seq_length) return 1.0;
  return std::log(static_cast<double>(i)) / std::log(static_cast<double>(config.seq_length));
}

}  // namespace qilin
