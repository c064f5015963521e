// CUDA kernels of the forward pass, as host launchers over device pointers. Activations: the
// residual stream in f32, everything a GEMM reads or writes in bf16; the KV cache in bf16; sums,
// norms and softmax in f32. Each launcher enqueues on `stream` and returns the launch error.
// Every op has a CPU reference in kernels/cpu and a test in tests/kernels/cuda_ops_test.cc.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace qilin::cuda {

using bf16_t = uint16_t;  // raw bf16 bits on the host side of the interface

// x[i, :] = float(table[ids[i], :]); table [vocab, dim] bf16. Reads n * dim * 2 bytes. With
// `previous` (may be null), an id < 0 stands for previous[-1 - id] (the token a launched step
// sampled for that row, Backend::PreviousRowToken); one still < 0 there (no token) reads row 0.
cudaError_t EmbeddingGather(const bf16_t* table, int64_t dim, const int32_t* ids, int64_t n,
                            float* x, cudaStream_t stream, const int32_t* previous = nullptr);

// Fused residual add + RMSNorm, one block per row: if `y` is not null, x[i, :] += y[i, :] (y f32,
// the GEMM output),
// then out[i, :] = bf16(x / sqrt(mean(x^2) + eps) * w). `rows` (may be null) picks the rows of x:
// row r of out comes from x[rows[r]] (lm_head on sampled rows); then y must be null.
cudaError_t AddRmsNorm(float* x, const float* y, const int32_t* rows, int64_t n, int64_t dim,
                       const bf16_t* w, float eps, bf16_t* out, cudaStream_t stream);

// out[i, j] = bf16(silu(gu[i, j]) * gu[i, inter + j]); gu is the fused gate|up GEMM output
// [n, 2 * inter] in f32 (reads 8 and writes 2 bytes per output) or in bf16 (reads 4, writes 2).
cudaError_t SiluMul(const float* gu, int64_t n, int64_t inter, bf16_t* out, cudaStream_t stream);
cudaError_t SiluMul(const bf16_t* gu, int64_t n, int64_t inter, bf16_t* out, cudaStream_t stream);

// Rope tables: `inv_freq` [num_tables, head_dim / 2] f32 and `attn_scale` [num_tables] (yarn's
// cos/sin factor); token t uses table `table_of[t]`. Filled by the host from cpu::ComputeRopeFreqs
// so that every scaling type (and Qwen v1 NTK / dynamic per sequence) equals the CPU reference.
struct RopeArgs {
  const float* inv_freq = nullptr;
  const float* attn_scale = nullptr;
  const int32_t* table_of = nullptr;
  const int32_t* positions = nullptr;
  const float* logn = nullptr;  // [n] query scale (Qwen v1 logn attention) or null
};

// Per token t of the fused qkv GEMM output [n, (H + 2 * KV) * D] (f32): optional per-head RMSNorm
// of q and k (Qwen3; q_norm/k_norm may be null), rotary embedding in neox order on q and k, logn
// scale on q; writes q to `q_out` [n, H * D] and k, v to the bf16 caches at slot_mapping[t]
// ([slots, KV * D]). One warp per head.
cudaError_t RopeWriteKv(const float* qkv, int64_t n, int64_t num_heads, int64_t num_kv_heads,
                        int64_t head_dim, const bf16_t* q_norm, const bf16_t* k_norm, float eps,
                        const RopeArgs& rope, const int64_t* slot_mapping, bf16_t* q_out,
                        bf16_t* k_cache, bf16_t* v_cache, cudaStream_t stream);

// The batch as attention sees it, all device pointers.
struct AttnBatch {
  const int32_t* query_start = nullptr;   // [num_seqs + 1]
  const int32_t* seq_of = nullptr;        // [num_tokens] token -> sequence
  const int32_t* positions = nullptr;     // [num_tokens]
  const int32_t* block_tables = nullptr;  // [num_seqs, table_stride]
  int32_t table_stride = 0;
  int32_t block_size = 0;
};

// Split-KV decode attention for the tokens listed in `tokens` [count] (any query length works;
// used for decode tokens and head dims without a tensor-core path). Each block serves one
// (token, kv head, split): the K/V tile is loaded once into shared memory for the `group` query
// heads that share it. A token of context c gets ceil(c / DecodePartition(c)) splits (at most
// kMaxSplits); `partial` holds [max_tokens, num_heads, kMaxSplits, head_dim + 2] floats.
inline constexpr int kMaxSplits = 16;
int32_t DecodePartition(int32_t context_len);
int64_t DecodePartialFloats(int64_t max_tokens, int64_t num_heads, int64_t head_dim);
cudaError_t PagedAttentionDecode(const bf16_t* q, const bf16_t* k_cache, const bf16_t* v_cache,
                                 const AttnBatch& batch, const int32_t* tokens, int32_t count,
                                 int32_t max_splits, int64_t num_heads, int64_t num_kv_heads,
                                 int64_t head_dim, float scale, float* partial, bf16_t* out,
                                 cudaStream_t stream);

// The same function as PagedAttentionDecode on tensor cores (mma.sync): the query heads of one KV
// head are the rows of the MMA, K/V tiles of 64 keys stream through cp.async stages. Same
// `partial` layout; the same splits where count * num_kv_heads is small, fewer and longer ones
// (at most ceil(c / splits) keys each, whole 32-key tiles) where the (token, KV head) pairs alone
// give about 4 blocks per SM (QILIN_DECODE_SPLIT_FACTOR sets the 4; 0 keeps DecodePartition's
// splits), and one split for a context of at most 256 keys once the pairs alone give a block per
// SM (QILIN_DECODE_SINGLE_SPLIT_KEYS sets the 256; 0: off); head_dim 64 or 128 and at most 16
// heads per KV head
// (DecodeMmaSupported), else cudaErrorInvalidValue. Launched with PDL, it fetches its first K/V
// tile before waiting for the previous kernel, all but each token's own key (its position): the
// other keys must not be written by that kernel (decode steps: one new token per sequence).
bool DecodeMmaSupported(int64_t head_dim, int64_t num_heads, int64_t num_kv_heads);
cudaError_t PagedAttentionDecodeMma(const bf16_t* q, const bf16_t* k_cache, const bf16_t* v_cache,
                                    const AttnBatch& batch, const int32_t* tokens, int32_t count,
                                    int32_t max_splits, int64_t num_heads, int64_t num_kv_heads,
                                    int64_t head_dim, float scale, float* partial, bf16_t* out,
                                    cudaStream_t stream);

// Tensor-core (mma.sync bf16) flash attention for prefill and chunked prefill: `tiles` [count]
// lists (sequence, first query token) pairs as int2, each a tile of up to kPrefillTileQ query
// tokens of one sequence (at most 65535 tiles); keys come from the paged cache (cached prefix and
// the new tokens, written before). Causal by positions; online softmax in f32. head_dim 64 or 128
// only (PrefillSupported).
bool PrefillSupported(int64_t head_dim);
inline constexpr int kPrefillTileQ = 128;
cudaError_t PagedAttentionPrefill(const bf16_t* q, const bf16_t* k_cache, const bf16_t* v_cache,
                                  const AttnBatch& batch, const int2* tiles, int32_t count,
                                  int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                                  float scale, bf16_t* out, cudaStream_t stream);

// Skinny GEMM for decode (gemv.cu): y[n, out] = x[n, in] * W[out, in]^T (+ bias[out]) for
// 1 <= n <= kGemvMaxRows, x and W bf16 and 16-byte aligned, in a multiple of 8; y (and bias) f32 or
// bf16. Streams W once; f32 accumulation whose order does not depend on n.
inline constexpr int kGemvMaxRows = 8;
bool GemvSupported(int64_t n, int64_t in, const void* x, const void* w);
cudaError_t Gemv(const bf16_t* x, int64_t n, int64_t in, const bf16_t* w, int64_t out,
                 const void* bias, void* y, bool y_f32, cudaStream_t stream);
// The fused gate|up projection of SwiGLU: w_gate_up [2 * inter, in] (gate rows, then up rows);
// out[i, j] = bf16(silu(x_i . gate_j) * (x_i . up_j)).
cudaError_t GemvSwiGlu(const bf16_t* x, int64_t n, int64_t in, const bf16_t* w_gate_up,
                       int64_t inter, bf16_t* out, cudaStream_t stream);

// dst[i] = bf16(hash_normal(seed, i) * stdev + mean), i < n: random weights made on the device.
cudaError_t FillRandomBf16(bf16_t* dst, int64_t n, uint64_t seed, float mean, float stdev,
                           cudaStream_t stream);

cudaError_t FillRandomF32(float* dst, int64_t n, uint64_t seed, float mean, float stdev,
                          cudaStream_t stream);

// Copies whole KV blocks: for each pair (src, dst) in `pairs` [count], `block_elems` bf16 values.
cudaError_t CopyBlocks(bf16_t* cache, const int2* pairs, int32_t count, int64_t block_elems,
                       cudaStream_t stream);

}  // namespace qilin::cuda
