// The model description: what a Hugging Face config.json says, normalised across the
// architectures qilin runs (Llama, Qwen2/2.5, Qwen3, Qwen v1 "QWenLMHeadModel").
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "common/status.h"

namespace qilin {

enum class ModelArch { kLlama, kQwen2, kQwen3, kQwenV1 };
const char* ModelArchName(ModelArch arch);

enum class RopeScalingType { kNone, kLinear, kDynamic, kYarn };

struct RopeScaling {
  RopeScalingType type = RopeScalingType::kNone;
  double factor = 1.0;
  // Trained context; yarn and dynamic scale relative to it. Defaults to max_position_embeddings.
  int64_t original_max_position_embeddings = 0;
  double beta_fast = 32.0;  // yarn
  double beta_slow = 1.0;   // yarn
  // yarn: multiplies cos/sin; 0 means "derive as HF does" (0.1 * ln(factor) + 1).
  double attention_factor = 0.0;
};

struct ModelConfig {
  ModelArch arch = ModelArch::kLlama;
  std::string architecture;  // as written in config.json, e.g. "Qwen2ForCausalLM"
  std::string model_type;    // e.g. "qwen2"

  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  // Width of one MLP branch (gate and up each). Qwen v1's config.json stores twice this.
  int64_t intermediate_size = 0;
  int64_t num_layers = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;  // GQA; equals num_heads for MHA (Qwen v1)
  int64_t head_dim = 0;      // explicit (Qwen3) or hidden_size / num_heads
  int64_t max_position_embeddings = 0;

  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;

  bool tie_word_embeddings = false;
  bool attention_bias = false;  // bias on q/k/v projections (Qwen2, Qwen v1)
  // Bias on o_proj too: Llama and Qwen3 with attention_bias = true (transformers puts that flag
  // on all four projections there). False for every published Qwen checkpoint.
  bool o_bias = false;
  bool qk_norm = false;  // RMSNorm over each head of q and k (Qwen3)

  // Qwen v1 long-context features, as modeling_qwen.py defines them.
  bool use_dynamic_ntk = false;  // NTK-aware rope base, chosen from the prompt length
  bool use_logn_attn = false;    // queries past seq_length scaled by log(pos)/log(seq_length)
  int64_t seq_length = 0;        // Qwen v1 trained length

  DType dtype = DType::kBF16;  // torch_dtype
  int64_t bos_token_id = -1;
  std::vector<int64_t> eos_token_ids;

  int64_t q_size() const { return num_heads * head_dim; }
  int64_t kv_size() const { return num_kv_heads * head_dim; }
  // Number of parameters (embedding, layers with biases and norms, final norm, lm_head unless
  // tied), as the checkpoint holds them: multiply by the bytes per weight for the weight size.
  int64_t NumParameters() const;
};

// Parses config.json text. `source` names the file in error messages.
Result<ModelConfig> ParseModelConfig(const std::string& json_text, const std::string& source);
// Reads `<dir>/config.json`.
Result<ModelConfig> LoadModelConfig(const std::filesystem::path& model_dir);

// Qwen v1 dynamic NTK: the rope-base multiplier chosen from the prompt length, as
// QWenModel.get_ntk_alpha does; 1 when the feature is off or the prompt fits.
double QwenV1NtkAlpha(const ModelConfig& config, int64_t prompt_len);
// Qwen v1 logn attention: the factor on the query at 0-based position `pos`.
double QwenV1LognScale(const ModelConfig& config, int64_t pos);

}  // namespace qilin
