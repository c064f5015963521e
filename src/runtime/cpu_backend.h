// The CPU backend: the reference implementation of Backend. fp32 activations and KV cache,
// bf16/f16/f32 weights, OpenMP + AVX2 kernels from kernels/cpu.
#pragma once

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "kernels/cpu/rope.h"
#include "model/config.h"
#include "model/weights.h"
#include "runtime/backend.h"
#include "runtime/host_kv_cache.h"

namespace qilin {

class CpuBackend : public Backend {
 public:
  // Checks that `weights` match `config` (presence, dtype, shape) and that the config is one the
  // CPU kernels support.
  static Result<std::unique_ptr<CpuBackend>> Create(const ModelConfig& config,
                                                    ModelWeights weights);

  std::string name() const override { return "cpu"; }
  const ModelConfig& config() const override { return config_; }
  int64_t KvBytesPerToken() const override;
  Result<int32_t> ProposeNumKvBlocks(int32_t block_size, double memory_fraction,
                                     int32_t max_num_tokens) const override;
  Status AllocateKvCache(const KvCacheLayout& layout) override;
  const KvCacheLayout& kv_layout() const override { return layout_; }
  Status Forward(const ForwardBatch& batch, std::vector<float>* logits) override;
  Status CopyKvBlocks(const std::vector<std::pair<int32_t, int32_t>>& src_dst) override;

  // Checks a batch against the model and the KV pool; InvalidArgument names the field and value.
  Status ValidateBatch(const ForwardBatch& batch) const;

  // A step's layers use min(OpenMP max threads, work / this) threads, where work is the
  // multiply-adds between two barriers; the lm_head likewise. Default 128K (a barrier costs about
  // a microsecond on idle cores, much more on shared ones). 0 always uses every thread (tests use
  // it to run the multi-thread splits on tiny models).
  static constexpr int64_t kDefaultMinMacsPerThread = 1 << 17;
  void set_min_macs_per_thread(int64_t macs) { min_macs_per_thread_ = macs; }

 private:
  CpuBackend(const ModelConfig& config, ModelWeights weights);
  // cos/sin [num_tokens, head_dim / 2] for the batch's positions.
  void ComputeRope(const ForwardBatch& batch);

  ModelConfig config_;
  ModelWeights weights_;
  KvCacheLayout layout_;
  HostKvCache kv_;
  cpu::RopeFreqs base_freqs_;  // frequencies when they do not depend on the sequence
  int64_t min_macs_per_thread_ = kDefaultMinMacsPerThread;

  // Threads for the layers of a step of `num_tokens` tokens (1 when the work is too small to
  // pay for the barriers).
  int LayerThreads(int64_t num_tokens) const;
  int ThreadsFor(int64_t macs_per_barrier) const;

  // Activations, reused across steps. Shared: q, k, v, attn, gate, up (each thread writes its own
  // columns). Per thread: x (the residual stream, replicated), h (normed input) and the partial
  // sums of o_proj and down_proj (two buffers, alternating, so one barrier per reduction).
  std::vector<float> q_, k_, v_, attn_, gate_, up_, rope_cos_, rope_sin_, logn_;
  std::vector<std::vector<float>> x_, h_, partial_[2];
};

}  // namespace qilin
