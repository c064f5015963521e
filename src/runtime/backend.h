// The backend interface: run one packed batch, produce logits. Implemented by the CPU backend
// (the reference) and the CUDA backend; the engine uses nothing else.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "common/status.h"
#include "model/config.h"
#include "runtime/device_sampling.h"
#include "runtime/forward_batch.h"

namespace qilin {

struct KvCacheLayout {
  int32_t num_blocks = 0;
  int32_t block_size = 32;  // tokens per block
};

class Backend {
 public:
  virtual ~Backend() = default;

  virtual std::string name() const = 0;  // "cpu", "cuda"
  virtual const ModelConfig& config() const = 0;

  // Bytes of KV cache one token takes over all layers (K and V).
  virtual int64_t KvBytesPerToken() const = 0;
  // How many KV blocks fit in what is free: `memory_fraction` of free device memory (host memory
  // for the CPU backend) after weights and activations for `max_num_tokens` per step.
  virtual Result<int32_t> ProposeNumKvBlocks(int32_t block_size, double memory_fraction,
                                             int32_t max_num_tokens) const = 0;
  // (Re)allocates the paged KV pool. Must be called before Forward.
  virtual Status AllocateKvCache(const KvCacheLayout& layout) = 0;
  virtual const KvCacheLayout& kv_layout() const = 0;

  // Runs the batch: writes new K/V into their slots, attends over each sequence's cached
  // context, and fills `logits` with [batch.logits_indices.size(), vocab_size] floats.
  virtual Status Forward(const ForwardBatch& batch, std::vector<float>* logits) = 0;

  // Optional: Forward, then the sampling of every logits row on the device (specs[i] for row i),
  // so that only token ids and logprobs come back. Backends without it return false / an error.
  virtual bool SupportsDeviceSampling() const { return false; }
  virtual Status ForwardSample(const ForwardBatch& batch, std::span<const DeviceSampleSpec> specs,
                               std::vector<DeviceSampleResult>* results) {
    return Unimplemented("backend {} does not sample on its device", name());
  }

  // Optional: overlapped steps, so that the host prepares step N+1 while the device runs step N.
  // LaunchForwardSample enqueues ForwardSample's work and returns without waiting for it;
  // WaitForwardSample waits for the oldest launched step and returns its results. At most
  // kMaxLaunchedSteps steps are launched and not yet waited. A token id PreviousRowToken(r) in a
  // launched batch stands for the token sampled for row r of the step launched just before it
  // (resolved on the device: the host never needs it). Rows launched this way never hand their
  // logits back (DeviceSampleResult::on_host): greedy or top_p == 1 only.
  static constexpr int kMaxLaunchedSteps = 2;
  static constexpr int32_t PreviousRowToken(int32_t row) { return -1 - row; }
  static constexpr int32_t PreviousRowOf(int32_t token) { return -1 - token; }
  virtual bool SupportsLaunchedSteps() const { return false; }
  virtual Status LaunchForwardSample(const ForwardBatch& batch,
                                     std::span<const DeviceSampleSpec> specs) {
    return Unimplemented("backend {} does not launch steps asynchronously", name());
  }
  virtual Status WaitForwardSample(std::vector<DeviceSampleResult>* results) {
    return Unimplemented("backend {} does not launch steps asynchronously", name());
  }

  // Batch sizes whose first step costs more than later ones (CUDA: the decode graph of that size
  // is captured and the GEMM plans of that row count tuned at first use), for Engine::WarmUp to
  // run before serving; empty: nothing to warm up (the default).
  virtual std::vector<int32_t> WarmUpBatchSizes(int32_t max_batch_size) const { return {}; }
  // Prefill step sizes (prompt tokens) for the same warm-up, after the batch sizes; the default
  // is the largest step alone.
  virtual std::vector<int32_t> WarmUpPrefillTokens(int32_t max_num_tokens) const {
    return {max_num_tokens};
  }
  // While on, steps need only pay their first costs, not compute the model (CUDA: eager, first
  // layer and lm_head only): their outputs are meaningless. For Engine::WarmUp's prefill sizes,
  // whose KV blocks and outputs it throws away.
  virtual void SetWarmUpSteps(bool on) {}

  // Copies whole KV blocks (src -> dst), for copy-on-write when sequences fork.
  virtual Status CopyKvBlocks(const std::vector<std::pair<int32_t, int32_t>>& src_dst) = 0;

  // OK while the backend can run steps; once it never can again (a tensor-parallel rank lost),
  // why not. Any thread may call it.
  virtual Status Health() const { return Status::Ok(); }
};

}  // namespace qilin
