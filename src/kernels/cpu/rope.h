// Rotary position embedding in neox (rotate-half) order, with the inverse frequencies of each
// scaling type computed as Hugging Face transformers' modeling_rope_utils.py does (in f32), plus
// Qwen v1's dynamic NTK base.
#pragma once

#include <cstdint>
#include <vector>

#include "model/config.h"

namespace qilin::cpu {

struct RopeFreqs {
  std::vector<float> inv_freq;     // [head_dim / 2]
  float attention_scaling = 1.0f;  // multiplies cos and sin (yarn)
};

// The inverse frequencies for `config` (rope_theta, rope_scaling, head_dim).
// `seq_len` matters only for dynamic NTK scaling: when it exceeds the original maximum, the base
// grows as HF's _compute_dynamic_ntk_parameters does. `ntk_alpha` (Qwen v1 dynamic NTK; 1 = off)
// multiplies the base by alpha^(dim / (dim - 2)), as QWen's RotaryEmbedding does.
RopeFreqs ComputeRopeFreqs(const ModelConfig& config, int64_t seq_len, double ntk_alpha);

// True when the frequencies depend on the sequence length (dynamic NTK scaling).
bool RopeDependsOnSeqLen(const ModelConfig& config);

// cos/sin of one position: cos[i] = cos(pos * inv_freq[i]) * attention_scaling, i < dim / 2,
// with the angle rounded to f32 as HF does.
void RopeCosSin(const RopeFreqs& freqs, int64_t pos, float* cos, float* sin);

// x[h, :] = x * cos + rotate_half(x) * sin for each of `heads` rows of `head_dim` (cos/sin hold
// head_dim / 2 values; the two halves share them).
void ApplyRope(float* x, int64_t heads, int64_t head_dim, const float* cos, const float* sin);

}  // namespace qilin::cpu
