// The CUDA backend: the same function as CpuBackend on one GPU. bf16 weights and KV cache,
// f32 residual stream, cuBLASLt GEMMs, kernels from kernels/cuda, CUDA graphs for decode steps.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <deque>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "kernels/cuda/gemm.h"
#include "kernels/cuda/ops.h"
#include "kernels/cuda/sampling.h"
#include "model/config.h"
#include "model/shard.h"
#include "model/weights.h"
#include "runtime/backend.h"
#include "runtime/cuda_device_comm.h"

namespace qilin {

// Number of CUDA devices, 0 when there is no driver or device (never an error).
int CudaDeviceCount();

struct CudaBackendOptions {
  bool cuda_graphs = true;  // capture decode-only steps per batch-size bucket
  // Steps of at most this many tokens use the skinny GEMM kernel (gemv.cu) instead of cuBLASLt;
  // 0 turns it off, -1 keeps cuda::Gemm's default.
  int gemv_max_rows = -1;
  // Decode attention on tensor cores where the shape allows (cuda::DecodeMmaSupported).
  bool decode_attention_mma = true;
  // Steps of at least this many tokens keep SwiGLU's gate|up GEMM output in bf16 instead of f32;
  // -1 keeps cuda::Gemm's default (kSwiGluBf16MinRows).
  int64_t swiglu_bf16_min_rows = -1;
  // Logits to the host (Forward): 0 copies straight into the caller's (pageable) vector; N > 0
  // goes through two pinned staging pieces, N host threads copying each out while the next one
  // is in flight. H100 machine, batch-64 step with 64 x 152064 logits: 0: 11.1 ms, 1: 13.4,
  // 2: 11.5, 4: 10.3, 8: 10.6, all 16 cores: 21.9 (the host copy-out is the limit, not the DMA).
  int host_copy_threads = 4;
  // Tensor parallelism (cuda_tp_backend.h). Non-null makes this backend rank tp_plan.rank of a
  // group: its config is then the rank's (ShardedLayerConfig: its heads, KV heads and MLP rows)
  // and its weights the rank's shard (ShardWeights), except embed_tokens, which stays whole (the
  // embedding is replicated: no collective); lm_head holds the rank's vocabulary rows. The
  // o_proj and down_proj outputs are all-reduced before their residual adds (o_proj's bias on
  // rank 0 only), the logits all-gathered. CUDA graphs only with a capturable tp_comm; no device
  // sampling. Not owned; outlives the backend.
  DeviceComm* tp_comm = nullptr;
  ShardPlan tp_plan;
};

class CudaBackend : public Backend {
 public:
  // Uploads `weights` (bf16, f16 or f32 on the host; stored as bf16 on the device).
  static Result<std::unique_ptr<CudaBackend>> Create(const ModelConfig& config,
                                                     const ModelWeights& weights,
                                                     CudaBackendOptions options = {});
  // Random weights made on the device (matrices N(0, matrix_std), norms 1 + N(0, norm_std)):
  // no host memory, seconds for a 7B config.
  static Result<std::unique_ptr<CudaBackend>> CreateDummy(const ModelConfig& config, uint64_t seed,
                                                          float matrix_std = 0.02f,
                                                          float norm_std = 0.1f,
                                                          CudaBackendOptions options = {});
  ~CudaBackend() override;

  std::string name() const override { return "cuda"; }
  const ModelConfig& config() const override { return config_; }
  int64_t KvBytesPerToken() const override;
  Result<int32_t> ProposeNumKvBlocks(int32_t block_size, double memory_fraction,
                                     int32_t max_num_tokens) const override;
  Status AllocateKvCache(const KvCacheLayout& layout) override;
  const KvCacheLayout& kv_layout() const override { return layout_; }
  Status Forward(const ForwardBatch& batch, std::vector<float>* logits) override;
  bool SupportsDeviceSampling() const override { return !tp(); }
  Status ForwardSample(const ForwardBatch& batch, std::span<const DeviceSampleSpec> specs,
                       std::vector<DeviceSampleResult>* results) override;
  bool SupportsLaunchedSteps() const override { return !tp(); }
  Status LaunchForwardSample(const ForwardBatch& batch,
                             std::span<const DeviceSampleSpec> specs) override;
  Status WaitForwardSample(std::vector<DeviceSampleResult>* results) override;
  Status CopyKvBlocks(const std::vector<std::pair<int32_t, int32_t>>& src_dst) override;
  // The decode graph buckets up to max_batch_size (and max_batch_size itself, whose steps run in
  // the next bucket): each is captured, and its GEMM plans tuned, by the first step of that size.
  std::vector<int32_t> WarmUpBatchSizes(int32_t max_batch_size) const override;
  std::vector<int32_t> WarmUpPrefillTokens(int32_t max_num_tokens) const override;
  void SetWarmUpSteps(bool on) override { warm_up_steps_ = on; }

  // Rank of a tensor-parallel group (CudaBackendOptions::tp_comm).
  bool tp() const { return options_.tp_comm != nullptr; }
  // Bytes of weights on the device.
  int64_t WeightBytes() const { return weight_bytes_; }
  // Graphs captured so far (for tests and benchmarks).
  int NumGraphs() const { return static_cast<int>(graphs_.size()); }
  cudaStream_t stream() const { return stream_; }
  // Switches the skinny GEMM threshold (CudaBackendOptions::gemv_max_rows) and drops the graphs
  // captured with the old one; for benchmarks comparing the two paths.
  Status SetGemvMaxRows(int rows);
  // Samples host-given logits rows [specs.size(), vocab] on the device as ForwardSample does
  // after its lm_head (for tests against the CPU sampler).
  Status SampleLogits(const float* logits, std::span<const DeviceSampleSpec> specs,
                      std::vector<DeviceSampleResult>* results);
  // Switches CudaBackendOptions::host_copy_threads (for benchmarks).
  void SetHostCopyThreads(int threads) { options_.host_copy_threads = std::max(0, threads); }
  // Step timing (for benchmarks): events around each step's layers and lm_head (the graph
  // launch, or the eager launches of the first logits chunk), so that a caller can set the GPU's
  // part of a step beside its wall time (inputs built and uploaded, sampling, the host's share).
  Status SetStepTiming(bool on);
  // GPU milliseconds of the last step's layers + lm_head (launched steps: the last one waited
  // for); 0 without step timing.
  double LastStepGpuMs() const { return last_step_gpu_ms_; }
  // Switches CudaBackendOptions::decode_attention_mma (drops the captured graphs).
  Status SetDecodeAttentionMma(bool on);
  // Switches CudaBackendOptions::swiglu_bf16_min_rows (drops the captured graphs).
  Status SetSwiGluBf16MinRows(int64_t rows);

 private:
  struct DevLayer {
    cuda::bf16_t *input_norm = nullptr, *qkv = nullptr, *q_norm = nullptr, *k_norm = nullptr,
                 *o = nullptr, *post_norm = nullptr, *gate_up = nullptr, *down = nullptr;
    float *qkv_bias = nullptr, *o_bias = nullptr;  // f32, the type of the GEMM outputs
  };
  // Offsets (bytes) of one step's inputs in the host/device input buffers.
  struct InputLayout {
    size_t token_ids, positions, seq_of, table_of, logn, slot_mapping, query_start, block_tables,
        logits_rows, decode_tokens, tiles, inv_freq, attn_scale, end;
    int32_t n, seqs, stride, tiles_cap, tables_cap;
  };
  struct StepShape {
    int32_t n = 0, seqs = 0, rows = 0, decode = 0, tiles = 0, max_splits = 1;
    bool logn = false;
  };

  CudaBackend(const ModelConfig& config, CudaBackendOptions options);
  Status Init();
  Result<cuda::bf16_t*> Alloc(int64_t elems);
  Status AllocWeights();
  Status UploadWeights(const ModelWeights& w);
  Status FillDummyWeights(uint64_t seed, float matrix_std, float norm_std);
  Status EnsureActivations(int32_t max_tokens);
  int64_t ActivationBytes(int32_t max_tokens) const;
  InputLayout MakeLayout(int32_t n, int32_t seqs, int32_t stride, int32_t rows, int32_t tiles,
                         int32_t tables) const;
  // Room for `bytes` of step inputs on the device and in the current staging.
  Status EnsureInputBuffers(size_t bytes);
  // Runs embedding .. lm_head for the inputs already on the device at `il`.
  bool warm_up_steps_ = false;  // SetWarmUpSteps: eager steps of the first layer only
  Status RunStep(const InputLayout& il, const StepShape& shape);
  // logits_ rows [0, rows) from rows_h_ (the final-normed rows): the lm_head GEMM; with tensor
  // parallelism this rank's vocabulary rows, all-gathered and laid out as the full vocabulary
  // (on rank 0; the other ranks' logits_ are not filled).
  Status LmHead(int32_t rows);
  // The sum over ranks of y_ rows [0, n) (tensor parallelism; nothing otherwise).
  Status TpAllReduce(float* y, int64_t n);
  void DropGraphs();
  // Forward (logits), ForwardSample (results) or, with `launch`, LaunchForwardSample (results
  // null, filled by WaitForwardSample).
  Status ForwardImpl(const ForwardBatch& batch, std::vector<float>* logits,
                     std::span<const DeviceSampleSpec> specs,
                     std::vector<DeviceSampleResult>* results, bool launch);
  // Sampling inputs of a step: per-row parameters and processor entries, to the device (through
  // the current staging).
  Status UploadSampleInputs(std::span<const DeviceSampleSpec> specs);
  // Copies logits_ rows [0, rows) to `dst` through two pinned staging pieces: the DMA of one
  // (pinned: ~50 GB/s; straight into pageable memory: ~9 GB/s on the H100) overlaps the host
  // threads copying the previous one out. Returns when `dst` is filled.
  Status CopyLogitsToHost(float* dst, int32_t rows);
  // Samples logits_ rows [0, rows) as specs rows [r0, r0 + rows): the kernel, its tokens into
  // previous_ids_ and its outputs to the current staging, all enqueued.
  Status EnqueueSample(int32_t r0, int32_t rows);
  // Fills results rows [r0, r0 + rows) from staging `slot` (its outputs must be on the host);
  // with `logits_ready` (logits_ still holds these rows) a row handed back gets its raw logits.
  Status CollectSamples(int slot, int32_t r0, int32_t rows, bool logits_ready,
                        std::vector<DeviceSampleResult>* results);
  // EnqueueSample, wait, CollectSamples.
  Status SampleChunk(int32_t r0, int32_t rows, std::vector<DeviceSampleResult>* results);
  // Refuses a synchronous step while launched steps are not waited for.
  Status CheckNoLaunchedSteps(const char* what) const;

  ModelConfig config_;
  CudaBackendOptions options_;
  cudaStream_t stream_ = nullptr;
  bool step_timing_ = false;
  double last_step_gpu_ms_ = 0;
  cuda::Gemm gemm_;
  std::vector<void*> allocations_;      // weights and the KV pool
  std::vector<void*> act_allocations_;  // activations (regrown when a batch is larger)
  int64_t weight_bytes_ = 0;

  cuda::bf16_t *embed_ = nullptr, *final_norm_ = nullptr, *lm_head_ = nullptr;
  std::vector<DevLayer> layers_;

  KvCacheLayout layout_;
  cuda::bf16_t* kv_pool_ = nullptr;  // [layers][K, V][num_blocks + 1 scratch][block][kv_size]
  int64_t layer_elems_ = 0;          // elements of one layer's K (or V) pool
  int32_t table_cap_ = 0;            // block-table stride of graph steps
  mutable int32_t planned_tokens_ = 0;

  // Activations for act_tokens_ tokens.
  int32_t act_tokens_ = 0;
  float* x_ = nullptr;
  // GEMM inputs in bf16, GEMM outputs in f32 (residual adds, rope and SwiGLU read f32).
  cuda::bf16_t *h_ = nullptr, *q_ = nullptr, *attn_ = nullptr, *act_ = nullptr, *rows_h_ = nullptr;
  float *qkv_ = nullptr, *y_ = nullptr, *gu_ = nullptr;
  float* partial_ = nullptr;
  float* logits_ = nullptr;  // [kLogitsChunk, vocab]
  // Tensor parallelism: this rank's logits [kLogitsChunk, vocab_per_rank] and every rank's
  // [world_size, kLogitsChunk rows, vocab_per_rank].
  float *tp_logits_ = nullptr, *tp_gathered_ = nullptr;

  // The host side of a step (pinned): its inputs, its sampling inputs and outputs ([rows]
  // SampleRowParams, [entries] SampleEntry, [entries] saved floats, [rows] SampleRowOut, as on
  // the device), the event its outputs are on the host at, and its timing events. Two, used in
  // turn, so that a launched step's staging is untouched while the host fills the next step's.
  struct Staging {
    char* in = nullptr;
    size_t in_cap = 0;
    char* sample = nullptr;
    size_t sample_cap = 0;
    size_t out_off = 0;
    int32_t rows = 0;
    cudaEvent_t done = nullptr, begin = nullptr, end = nullptr;
  };
  Staging staging_[2];
  int cur_ = 0;               // the staging of the step being built
  std::deque<int> launched_;  // stagings of launched steps not yet waited for, oldest first
  // Tokens the last step sampled, per row (PreviousRowToken); previous_rows_ of them are valid.
  int32_t* previous_ids_ = nullptr;
  int32_t previous_rows_ = 0;

  // Step inputs on the device.
  char* dev_in_ = nullptr;
  size_t dev_in_cap_ = 0;
  // Device sampling inputs and outputs (Staging's layout).
  char* sample_dev_ = nullptr;
  size_t sample_dev_cap_ = 0;
  size_t sample_entries_off_ = 0, sample_saved_off_ = 0, sample_out_off_ = 0;
  std::vector<int32_t> entry_flags_, entry_out_;
  // Pinned staging of the logits copied to the host, two pieces of about kStageBytes.
  static constexpr size_t kStageBytes = size_t{8} << 20;
  float* stage_[2] = {nullptr, nullptr};
  cudaEvent_t stage_done_[2] = {nullptr, nullptr};  // [vocab] scratch, zero between rows
  std::vector<int32_t> entry_tokens_;

  std::vector<float> base_inv_freq_;
  float base_attn_scale_ = 1.0f;

  std::map<int32_t, cudaGraphExec_t> graphs_;  // by bucket size
};

}  // namespace qilin
