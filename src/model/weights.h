// Model weights as typed views into storage the ModelWeights owns (mmapped safetensors files,
// or buffers of random values for --dummy-weights). Names are normalised across architectures:
// every backend reads the same fields.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "common/status.h"
#include "model/config.h"

namespace qilin {

// A read-only, row-major tensor. `data` stays valid while the owning ModelWeights lives.
struct TensorView {
  DType dtype = DType::kBF16;
  std::vector<int64_t> shape;
  const void* data = nullptr;
  std::string name;  // name in the checkpoint, for error messages

  bool empty() const { return data == nullptr; }
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
  size_t nbytes() const { return static_cast<size_t>(numel()) * DTypeSize(dtype); }
};

struct LayerWeights {
  TensorView input_norm;              // [hidden]
  TensorView q_proj, k_proj, v_proj;  // [q_size, hidden], [kv_size, hidden] x2
  TensorView q_bias, k_bias, v_bias;  // [q_size], [kv_size]; empty unless attention_bias
  TensorView q_norm, k_norm;          // [head_dim]; empty unless qk_norm
  TensorView o_proj;                  // [hidden, q_size]
  TensorView o_bias;                  // [hidden]; empty unless config.o_bias
  TensorView post_attention_norm;     // [hidden]
  TensorView gate_proj, up_proj;      // [intermediate, hidden]; silu(gate) * up
  TensorView down_proj;               // [hidden, intermediate]
};

struct ModelWeights {
  TensorView embed_tokens;  // [vocab, hidden]
  std::vector<LayerWeights> layers;
  TensorView final_norm;  // [hidden]
  TensorView lm_head;     // [vocab, hidden]; the same data as embed_tokens when tied
  // Keeps the mmaps or buffers alive.
  std::vector<std::shared_ptr<const void>> storage;
};

// Loads weights from `model.safetensors` or the shards named by
// `model.safetensors.index.json` in `model_dir`, mapping the architecture's names and checking
// every tensor's presence, dtype and shape against `config`.
Result<ModelWeights> LoadModelWeights(const ModelConfig& config,
                                      const std::filesystem::path& model_dir);

// Random weights for any config (no checkpoint): normal(0, 0.02) for matrices and biases,
// 1 + normal(0, 0.1) for norm weights, in `dtype` (BF16, F16 or F32). Deterministic in `seed`;
// a tied lm_head shares embed_tokens.
Result<ModelWeights> MakeDummyWeights(const ModelConfig& config, DType dtype, uint64_t seed);
// The same with matrices and biases ~ N(0, matrix_std) and norm weights ~ 1 + N(0, norm_std)
// (tests use larger values than 0.02 so that attention is far from uniform).
Result<ModelWeights> MakeDummyWeights(const ModelConfig& config, DType dtype, uint64_t seed,
                                      float matrix_std, float norm_std);

}  // namespace qilin
