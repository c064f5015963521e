#include "runtime/cuda_backend.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <spdlog/spdlog.h>

#include "common/dtype.h"
#include "kernels/cpu/rope.h"
#include "model/weight_checks.h"
#include "runtime/validate_batch.h"

namespace qilin {
namespace {

using cuda::bf16_t;

#define QILIN_CUDA_RETURN(expr, what) QILIN_RETURN_IF_ERROR(cuda::CudaStatus((expr), (what)))

constexpr int32_t kLogitsChunk = 256;  // lm_head rows per GEMM (logits buffer rows)
constexpr int32_t kDecodeChunk = 512;  // tokens per split-KV attention launch (partial buffer)
constexpr int32_t kGraphBuckets[] = {1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256};

size_t Align(size_t v) { return (v + 255) & ~size_t{255}; }

Status CheckConfig(const ModelConfig& c) {
  QILIN_RETURN_IF_ERROR(CheckBackendConfig(c));
  if (c.head_dim % 2 != 0 || c.head_dim < 4 || c.head_dim > 256) {
    return InvalidArgument(
        "model config: head_dim = {}; the CUDA backend needs an even head_dim in [4, 256]",
        c.head_dim);
  }
  if (c.num_heads / c.num_kv_heads > 16) {
    return InvalidArgument(
        "model config: {} query heads per KV head; the CUDA attention kernels take at most 16",
        c.num_heads / c.num_kv_heads);
  }
  if (c.vocab_size > INT32_MAX) {
    return InvalidArgument("model config: vocab_size = {} exceeds {}", c.vocab_size, INT32_MAX);
  }
  return Status::Ok();
}

// The tensor as bf16 bits (a copy unless it is bf16 already).
const uint16_t* AsBf16(const TensorView& t, std::vector<uint16_t>* tmp) {
  if (t.dtype == DType::kBF16) return static_cast<const uint16_t*>(t.data);
  const int64_t n = t.numel();
  tmp->resize(n);
  for (int64_t i = 0; i < n; ++i) {
    const float v = t.dtype == DType::kF32 ? static_cast<const float*>(t.data)[i]
                                           : F16ToF32(static_cast<const uint16_t*>(t.data)[i]);
    (*tmp)[i] = F32ToBf16(v);
  }
  return tmp->data();
}

}  // namespace

int CudaDeviceCount() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

CudaBackend::CudaBackend(const ModelConfig& config, CudaBackendOptions options)
    : config_(config), options_(options) {}

CudaBackend::~CudaBackend() {
  if (stream_) cudaStreamSynchronize(stream_);
  DropGraphs();
  for (void* p : act_allocations_) cudaFree(p);
  for (void* p : allocations_) cudaFree(p);
  if (dev_in_) cudaFree(dev_in_);
  for (int i = 0; i < 2; ++i) {
    Staging& s = staging_[i];
    if (s.in) cudaFreeHost(s.in);
    if (s.sample) cudaFreeHost(s.sample);
    for (cudaEvent_t e : {s.done, s.begin, s.end}) {
      if (e) cudaEventDestroy(e);
    }
    if (stage_[i]) cudaFreeHost(stage_[i]);
    if (stage_done_[i]) cudaEventDestroy(stage_done_[i]);
  }
  if (sample_dev_) cudaFree(sample_dev_);
  if (stream_) cudaStreamDestroy(stream_);
}

void CudaBackend::DropGraphs() {
  for (auto& [bucket, g] : graphs_) cudaGraphExecDestroy(g);
  graphs_.clear();
}

Status CudaBackend::Init() {
  QILIN_RETURN_IF_ERROR(CheckConfig(config_));
  if (CudaDeviceCount() == 0) {
    return Unavailable("device 'cuda': no CUDA device is visible (cudaGetDeviceCount found none)");
  }
  QILIN_CUDA_RETURN(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
  for (Staging& s : staging_) {
    QILIN_CUDA_RETURN(cudaEventCreateWithFlags(&s.done, cudaEventDisableTiming), "cudaEventCreate");
    QILIN_CUDA_RETURN(cudaEventCreate(&s.begin), "cudaEventCreate");
    QILIN_CUDA_RETURN(cudaEventCreate(&s.end), "cudaEventCreate");
  }
  QILIN_RETURN_IF_ERROR(gemm_.Init());
  if (options_.gemv_max_rows >= 0) {
    gemm_.set_gemv_max_rows(std::min(options_.gemv_max_rows, cuda::kGemvMaxRows));
  }
  if (options_.swiglu_bf16_min_rows >= 0) {
    gemm_.set_swiglu_bf16_min_rows(options_.swiglu_bf16_min_rows);
  }
  if (tp()) {
    const ShardPlan& p = options_.tp_plan;
    if (p.world_size != options_.tp_comm->world_size() || p.rank != options_.tp_comm->rank() ||
        p.num_heads != config_.num_heads || p.num_kv_heads != config_.num_kv_heads ||
        p.intermediate_size != config_.intermediate_size || p.vocab_per_rank <= 0) {
      return InvalidArgument(
          "CUDA tensor parallel rank {} of {}: the plan, the communicator (rank {} of {}) and the "
          "rank's config ({} heads, {} KV heads, intermediate {}) disagree",
          p.rank, p.world_size, options_.tp_comm->rank(), options_.tp_comm->world_size(),
          config_.num_heads, config_.num_kv_heads, config_.intermediate_size);
    }
  }
  const cpu::RopeFreqs f = cpu::ComputeRopeFreqs(config_, 0, 1.0);
  base_inv_freq_ = f.inv_freq;
  base_attn_scale_ = f.attention_scaling;
  return AllocWeights();
}

Result<bf16_t*> CudaBackend::Alloc(int64_t elems) {
  void* p = nullptr;
  const size_t bytes = static_cast<size_t>(elems) * sizeof(bf16_t);
  cudaError_t err = cudaMalloc(&p, bytes);
  if (err != cudaSuccess) {
    cudaGetLastError();
    size_t free_b = 0, total_b = 0;
    cudaMemGetInfo(&free_b, &total_b);
    return ResourceExhausted(
        "CUDA: cannot allocate {:.1f} MiB of weights ({:.1f} MiB free of {:.1f})",
        bytes / 1048576.0, free_b / 1048576.0, total_b / 1048576.0);
  }
  allocations_.push_back(p);
  weight_bytes_ += static_cast<int64_t>(bytes);
  return static_cast<bf16_t*>(p);
}

Status CudaBackend::AllocWeights() {
  const ModelConfig& c = config_;
  const int64_t h = c.hidden_size, qkv = c.q_size() + 2 * c.kv_size(), inter = c.intermediate_size;
  QILIN_ASSIGN_OR_RETURN(embed_, Alloc(c.vocab_size * h));
  QILIN_ASSIGN_OR_RETURN(final_norm_, Alloc(h));
  if (tp()) {
    // The rank's vocabulary rows, padded to vocab_per_rank with zero rows.
    const int64_t rows = options_.tp_plan.vocab_per_rank;
    QILIN_ASSIGN_OR_RETURN(lm_head_, Alloc(rows * h));
    QILIN_CUDA_RETURN(cudaMemset(lm_head_, 0, rows * h * sizeof(bf16_t)), "cudaMemset(lm_head)");
  } else if (c.tie_word_embeddings) {
    lm_head_ = embed_;
  } else {
    QILIN_ASSIGN_OR_RETURN(lm_head_, Alloc(c.vocab_size * h));
  }
  layers_.resize(c.num_layers);
  for (DevLayer& l : layers_) {
    QILIN_ASSIGN_OR_RETURN(l.input_norm, Alloc(h));
    QILIN_ASSIGN_OR_RETURN(l.qkv, Alloc(qkv * h));
    if (c.attention_bias) {
      QILIN_ASSIGN_OR_RETURN(bf16_t * qb, Alloc(2 * qkv));
      l.qkv_bias = reinterpret_cast<float*>(qb);
    }
    if (c.qk_norm) {
      QILIN_ASSIGN_OR_RETURN(l.q_norm, Alloc(c.head_dim));
      QILIN_ASSIGN_OR_RETURN(l.k_norm, Alloc(c.head_dim));
    }
    QILIN_ASSIGN_OR_RETURN(l.o, Alloc(h * c.q_size()));
    if (c.o_bias) {
      QILIN_ASSIGN_OR_RETURN(bf16_t * ob, Alloc(2 * h));
      l.o_bias = reinterpret_cast<float*>(ob);
    }
    QILIN_ASSIGN_OR_RETURN(l.post_norm, Alloc(h));
    QILIN_ASSIGN_OR_RETURN(l.gate_up, Alloc(2 * inter * h));
    QILIN_ASSIGN_OR_RETURN(l.down, Alloc(h * inter));
  }
  return Status::Ok();
}

Status CudaBackend::UploadWeights(const ModelWeights& w) {
  const ModelConfig& c = config_;
  const int64_t h = c.hidden_size, q = c.q_size(), kv = c.kv_size(), inter = c.intermediate_size;
  QILIN_RETURN_IF_ERROR(
      CheckWeightTensor(w.embed_tokens, "embed_tokens", {c.vocab_size, h}, "CUDA"));
  QILIN_RETURN_IF_ERROR(CheckWeightTensor(w.final_norm, "final_norm", {h}, "CUDA"));
  const int64_t lm_rows = tp() ? options_.tp_plan.vocab_rows() : c.vocab_size;
  if (lm_rows > 0 || !tp()) {
    QILIN_RETURN_IF_ERROR(CheckWeightTensor(w.lm_head, "lm_head", {lm_rows, h}, "CUDA"));
  }
  if (static_cast<int64_t>(w.layers.size()) != c.num_layers) {
    return InvalidArgument("weights: {} layers, but num_hidden_layers = {}", w.layers.size(),
                           c.num_layers);
  }
  std::vector<uint16_t> tmp;
  auto put = [&](const TensorView& t, bf16_t* dst) -> Status {
    const uint16_t* src = AsBf16(t, &tmp);
    return cuda::CudaStatus(cudaMemcpy(dst, src, t.numel() * 2, cudaMemcpyHostToDevice),
                            "cudaMemcpy(weights)");
  };
  std::vector<float> ftmp;
  auto put_f32 = [&](const TensorView& t, float* dst) -> Status {
    const uint16_t* src = AsBf16(t, &tmp);  // rounded to bf16 as the weights are
    ftmp.resize(t.numel());
    for (int64_t i = 0; i < t.numel(); ++i) ftmp[i] = Bf16ToF32(src[i]);
    return cuda::CudaStatus(cudaMemcpy(dst, ftmp.data(), t.numel() * 4, cudaMemcpyHostToDevice),
                            "cudaMemcpy(bias)");
  };
  QILIN_RETURN_IF_ERROR(put(w.embed_tokens, embed_));
  QILIN_RETURN_IF_ERROR(put(w.final_norm, final_norm_));
  if (tp()) {
    if (lm_rows > 0) QILIN_RETURN_IF_ERROR(put(w.lm_head, lm_head_));
  } else if (!c.tie_word_embeddings) {
    QILIN_RETURN_IF_ERROR(put(w.lm_head, lm_head_));
  }
  for (int64_t i = 0; i < c.num_layers; ++i) {
    const LayerWeights& l = w.layers[i];
    const DevLayer& d = layers_[i];
    auto check = [&](const TensorView& t, const char* name, std::vector<int64_t> shape) {
      return CheckWeightTensor(t, fmt::format("layers.{}.{}", i, name), shape, "CUDA");
    };
    QILIN_RETURN_IF_ERROR(check(l.input_norm, "input_norm", {h}));
    QILIN_RETURN_IF_ERROR(check(l.q_proj, "q_proj", {q, h}));
    QILIN_RETURN_IF_ERROR(check(l.k_proj, "k_proj", {kv, h}));
    QILIN_RETURN_IF_ERROR(check(l.v_proj, "v_proj", {kv, h}));
    QILIN_RETURN_IF_ERROR(check(l.o_proj, "o_proj", {h, q}));
    QILIN_RETURN_IF_ERROR(check(l.post_attention_norm, "post_attention_norm", {h}));
    QILIN_RETURN_IF_ERROR(check(l.gate_proj, "gate_proj", {inter, h}));
    QILIN_RETURN_IF_ERROR(check(l.up_proj, "up_proj", {inter, h}));
    QILIN_RETURN_IF_ERROR(check(l.down_proj, "down_proj", {h, inter}));
    QILIN_RETURN_IF_ERROR(put(l.input_norm, d.input_norm));
    QILIN_RETURN_IF_ERROR(put(l.q_proj, d.qkv));
    QILIN_RETURN_IF_ERROR(put(l.k_proj, d.qkv + q * h));
    QILIN_RETURN_IF_ERROR(put(l.v_proj, d.qkv + (q + kv) * h));
    if (c.attention_bias) {
      QILIN_RETURN_IF_ERROR(check(l.q_bias, "q_bias", {q}));
      QILIN_RETURN_IF_ERROR(check(l.k_bias, "k_bias", {kv}));
      QILIN_RETURN_IF_ERROR(check(l.v_bias, "v_bias", {kv}));
      QILIN_RETURN_IF_ERROR(put_f32(l.q_bias, d.qkv_bias));
      QILIN_RETURN_IF_ERROR(put_f32(l.k_bias, d.qkv_bias + q));
      QILIN_RETURN_IF_ERROR(put_f32(l.v_bias, d.qkv_bias + q + kv));
    }
    if (c.qk_norm) {
      QILIN_RETURN_IF_ERROR(check(l.q_norm, "q_norm", {c.head_dim}));
      QILIN_RETURN_IF_ERROR(check(l.k_norm, "k_norm", {c.head_dim}));
      QILIN_RETURN_IF_ERROR(put(l.q_norm, d.q_norm));
      QILIN_RETURN_IF_ERROR(put(l.k_norm, d.k_norm));
    }
    QILIN_RETURN_IF_ERROR(put(l.o_proj, d.o));
    if (c.o_bias) {
      QILIN_RETURN_IF_ERROR(check(l.o_bias, "o_bias", {h}));
      QILIN_RETURN_IF_ERROR(put_f32(l.o_bias, d.o_bias));
    }
    QILIN_RETURN_IF_ERROR(put(l.post_attention_norm, d.post_norm));
    QILIN_RETURN_IF_ERROR(put(l.gate_proj, d.gate_up));
    QILIN_RETURN_IF_ERROR(put(l.up_proj, d.gate_up + inter * h));
    QILIN_RETURN_IF_ERROR(put(l.down_proj, d.down));
  }
  return Status::Ok();
}

Status CudaBackend::FillDummyWeights(uint64_t seed, float matrix_std, float norm_std) {
  const ModelConfig& c = config_;
  const int64_t h = c.hidden_size, qkv = c.q_size() + 2 * c.kv_size(), inter = c.intermediate_size;
  uint64_t id = 0;
  auto fill = [&](bf16_t* p, int64_t n, bool norm) -> Status {
    ++id;
    if (!p) return Status::Ok();
    return cuda::CudaStatus(cuda::FillRandomBf16(p, n, seed * 1000003u + id, norm ? 1.0f : 0.0f,
                                                 norm ? norm_std : matrix_std, stream_),
                            "FillRandomBf16");
  };
  auto fill_f32 = [&](float* p, int64_t n) -> Status {
    ++id;
    if (!p) return Status::Ok();
    return cuda::CudaStatus(
        cuda::FillRandomF32(p, n, seed * 1000003u + id, 0.0f, matrix_std, stream_),
        "FillRandomF32");
  };
  QILIN_RETURN_IF_ERROR(fill(embed_, c.vocab_size * h, false));
  QILIN_RETURN_IF_ERROR(fill(final_norm_, h, true));
  if (!c.tie_word_embeddings) QILIN_RETURN_IF_ERROR(fill(lm_head_, c.vocab_size * h, false));
  for (const DevLayer& l : layers_) {
    QILIN_RETURN_IF_ERROR(fill(l.input_norm, h, true));
    QILIN_RETURN_IF_ERROR(fill(l.qkv, qkv * h, false));
    QILIN_RETURN_IF_ERROR(fill_f32(l.qkv_bias, qkv));
    QILIN_RETURN_IF_ERROR(fill(l.q_norm, c.head_dim, true));
    QILIN_RETURN_IF_ERROR(fill(l.k_norm, c.head_dim, true));
    QILIN_RETURN_IF_ERROR(fill(l.o, h * c.q_size(), false));
    QILIN_RETURN_IF_ERROR(fill_f32(l.o_bias, h));
    QILIN_RETURN_IF_ERROR(fill(l.post_norm, h, true));
    QILIN_RETURN_IF_ERROR(fill(l.gate_up, 2 * inter * h, false));
    QILIN_RETURN_IF_ERROR(fill(l.down, h * inter, false));
  }
  QILIN_CUDA_RETURN(cudaStreamSynchronize(stream_), "dummy weights");
  return Status::Ok();
}

Result<std::unique_ptr<CudaBackend>> CudaBackend::Create(const ModelConfig& config,
                                                         const ModelWeights& weights,
                                                         CudaBackendOptions options) {
  std::unique_ptr<CudaBackend> b(new CudaBackend(config, options));
  QILIN_RETURN_IF_ERROR(b->Init());
  QILIN_RETURN_IF_ERROR(b->UploadWeights(weights));
  return b;
}

Result<std::unique_ptr<CudaBackend>> CudaBackend::CreateDummy(const ModelConfig& config,
                                                              uint64_t seed, float matrix_std,
                                                              float norm_std,
                                                              CudaBackendOptions options) {
  if (options.tp_comm != nullptr) {
    return InvalidArgument("CudaBackend::CreateDummy: no tensor parallelism (shard host weights)");
  }
  std::unique_ptr<CudaBackend> b(new CudaBackend(config, options));
  QILIN_RETURN_IF_ERROR(b->Init());
  QILIN_RETURN_IF_ERROR(b->FillDummyWeights(seed, matrix_std, norm_std));
  return b;
}

int64_t CudaBackend::KvBytesPerToken() const {
  return config_.num_layers * 2 * config_.kv_size() * static_cast<int64_t>(sizeof(bf16_t));
}

int64_t CudaBackend::ActivationBytes(int32_t t) const {
  const ModelConfig& c = config_;
  const int64_t per_token = c.hidden_size * 4 + c.hidden_size * 2 + c.hidden_size * 4 +
                            (c.q_size() + 2 * c.kv_size()) * 4 + c.q_size() * 2 * 2 +
                            c.intermediate_size * (2 * 4 + 2);
  const int64_t fixed =
      cuda::DecodePartialFloats(std::min(t, kDecodeChunk), c.num_heads, c.head_dim) * 4 +
      static_cast<int64_t>(kLogitsChunk) * c.vocab_size * 4 +
      static_cast<int64_t>(kLogitsChunk) * c.hidden_size * 2 +
      (tp() ? static_cast<int64_t>(kLogitsChunk) * options_.tp_plan.vocab_per_rank *
                  (1 + options_.tp_plan.world_size) * 4
            : 0);
  return per_token * t + fixed;
}

Status CudaBackend::EnsureActivations(int32_t t) {
  if (t <= act_tokens_) return Status::Ok();
  QILIN_CUDA_RETURN(cudaStreamSynchronize(stream_), "sync before regrowing activations");
  DropGraphs();
  // A launched step's tokens may still be read by the next one: keep them.
  std::vector<int32_t> previous(previous_rows_);
  if (previous_rows_ > 0) {
    QILIN_CUDA_RETURN(cudaMemcpy(previous.data(), previous_ids_, previous_rows_ * sizeof(int32_t),
                                 cudaMemcpyDeviceToHost),
                      "cudaMemcpy(previous tokens)");
  }
  for (void* p : act_allocations_) cudaFree(p);
  act_allocations_.clear();
  act_tokens_ = 0;
  const ModelConfig& c = config_;
  auto alloc = [&](size_t bytes, auto** out) -> Status {
    void* p = nullptr;
    cudaError_t err = cudaMalloc(&p, bytes);
    if (err != cudaSuccess) {
      cudaGetLastError();
      return ResourceExhausted(
          "CUDA: cannot allocate {:.1f} MiB of activations for {} tokens per step",
          bytes / 1048576.0, t);
    }
    act_allocations_.push_back(p);
    *out = static_cast<std::remove_pointer_t<decltype(out)>>(p);
    return Status::Ok();
  };
  const size_t n = static_cast<size_t>(t);
  QILIN_RETURN_IF_ERROR(alloc(n * c.hidden_size * 4, &x_));
  QILIN_RETURN_IF_ERROR(alloc(n * c.hidden_size * 2, &h_));
  QILIN_RETURN_IF_ERROR(alloc(n * (c.q_size() + 2 * c.kv_size()) * 4, &qkv_));
  QILIN_RETURN_IF_ERROR(alloc(n * c.q_size() * 2, &q_));
  QILIN_RETURN_IF_ERROR(alloc(n * c.q_size() * 2, &attn_));
  QILIN_RETURN_IF_ERROR(alloc(n * c.hidden_size * 4, &y_));
  QILIN_RETURN_IF_ERROR(alloc(n * 2 * c.intermediate_size * 4, &gu_));
  QILIN_RETURN_IF_ERROR(alloc(n * c.intermediate_size * 2, &act_));
  QILIN_RETURN_IF_ERROR(
      alloc(cuda::DecodePartialFloats(std::min(t, kDecodeChunk), c.num_heads, c.head_dim) * 4,
            &partial_));
  QILIN_RETURN_IF_ERROR(alloc(static_cast<size_t>(kLogitsChunk) * c.vocab_size * 4, &logits_));
  QILIN_RETURN_IF_ERROR(alloc(static_cast<size_t>(kLogitsChunk) * c.hidden_size * 2, &rows_h_));
  QILIN_RETURN_IF_ERROR(alloc(n * sizeof(int32_t), &previous_ids_));
  if (previous_rows_ > 0) {
    QILIN_CUDA_RETURN(cudaMemcpy(previous_ids_, previous.data(), previous_rows_ * sizeof(int32_t),
                                 cudaMemcpyHostToDevice),
                      "cudaMemcpy(previous tokens)");
  }
  if (tp()) {
    const size_t vpr = static_cast<size_t>(options_.tp_plan.vocab_per_rank);
    QILIN_RETURN_IF_ERROR(alloc(kLogitsChunk * vpr * 4, &tp_logits_));
    QILIN_RETURN_IF_ERROR(
        alloc(kLogitsChunk * vpr * options_.tp_plan.world_size * 4, &tp_gathered_));
  }
  act_tokens_ = t;
  return Status::Ok();
}

Result<int32_t> CudaBackend::ProposeNumKvBlocks(int32_t block_size, double memory_fraction,
                                                int32_t max_num_tokens) const {
  QILIN_RETURN_IF_ERROR(ValidateKvProposal(block_size, memory_fraction, max_num_tokens));
  size_t free_b = 0, total_b = 0;
  QILIN_CUDA_RETURN(cudaMemGetInfo(&free_b, &total_b), "cudaMemGetInfo");
  // Activations still to be allocated, and a reserve for graphs, cuBLASLt and the input buffers.
  const int64_t activations = max_num_tokens > act_tokens_ ? ActivationBytes(max_num_tokens) : 0;
  const int64_t reserve = 256ll << 20;
  const double budget =
      static_cast<double>(free_b) * memory_fraction - static_cast<double>(activations + reserve);
  const double block_bytes = static_cast<double>(KvBytesPerToken()) * block_size;
  const double blocks = std::floor(budget / block_bytes) - 1;  // one scratch block
  if (blocks < 1) {
    return ResourceExhausted(
        "KV cache: {} of {:.2f} GiB free GPU memory leaves no room for one block of {} tokens "
        "({:.1f} MiB) after {:.2f} GiB of activations for {} tokens per step",
        memory_fraction, free_b / 1073741824.0, block_size, block_bytes / 1048576.0,
        activations / 1073741824.0, max_num_tokens);
  }
  planned_tokens_ = std::max(planned_tokens_, max_num_tokens);
  return static_cast<int32_t>(std::min<double>(blocks, INT32_MAX));
}

Status CudaBackend::AllocateKvCache(const KvCacheLayout& layout) {
  if (layout.block_size <= 0 || layout.num_blocks <= 0) {
    return InvalidArgument("KV cache layout: num_blocks = {} and block_size = {} must be positive",
                           layout.num_blocks, layout.block_size);
  }
  QILIN_CUDA_RETURN(cudaStreamSynchronize(stream_), "sync before allocating the KV cache");
  DropGraphs();
  // Activations first, so that the pool takes what the proposal left for it.
  if (planned_tokens_ > 0) QILIN_RETURN_IF_ERROR(EnsureActivations(planned_tokens_));
  if (kv_pool_) {
    allocations_.erase(std::find(allocations_.begin(), allocations_.end(), kv_pool_));
    cudaFree(kv_pool_);
    kv_pool_ = nullptr;
  }
  layout_ = KvCacheLayout{0, layout.block_size};
  layer_elems_ =
      (static_cast<int64_t>(layout.num_blocks) + 1) * layout.block_size * config_.kv_size();
  const size_t bytes = static_cast<size_t>(layer_elems_) * 2 * config_.num_layers * 2;
  void* p = nullptr;
  if (cudaMalloc(&p, bytes) != cudaSuccess) {
    cudaGetLastError();
    size_t free_b = 0, total_b = 0;
    cudaMemGetInfo(&free_b, &total_b);
    return ResourceExhausted(
        "KV cache: cannot allocate {} blocks of {} tokens ({:.2f} GiB; {:.2f} GiB free)",
        layout.num_blocks, layout.block_size, bytes / 1073741824.0, free_b / 1073741824.0);
  }
  // Zeroed so that a read of a never-written slot (scratch padding) gives finite values.
  QILIN_CUDA_RETURN(cudaMemsetAsync(p, 0, bytes, stream_), "cudaMemset(KV cache)");
  allocations_.push_back(p);
  kv_pool_ = static_cast<bf16_t*>(p);
  layout_ = layout;
  const int64_t max_len = std::max<int64_t>(config_.MaxModelLen(), 1);
  table_cap_ = static_cast<int32_t>(
      std::min<int64_t>((max_len + layout.block_size - 1) / layout.block_size, layout.num_blocks));
  return Status::Ok();
}

Status CudaBackend::SetStepTiming(bool on) {
  last_step_gpu_ms_ = 0;
  if (!launched_.empty()) {
    return FailedPrecondition("SetStepTiming: {} launched steps are not waited for",
                              launched_.size());
  }
  step_timing_ = on;
  return Status::Ok();
}

Status CudaBackend::SetGemvMaxRows(int rows) {
  if (rows < 0 || rows > cuda::kGemvMaxRows) {
    return InvalidArgument("gemv_max_rows = {} is outside [0, {}]", rows, cuda::kGemvMaxRows);
  }
  QILIN_CUDA_RETURN(cudaStreamSynchronize(stream_), "sync before switching GEMM paths");
  DropGraphs();
  gemm_.set_gemv_max_rows(rows);
  return Status::Ok();
}

Status CudaBackend::SetSwiGluBf16MinRows(int64_t rows) {
  if (rows < 0) return InvalidArgument("swiglu_bf16_min_rows = {} is negative", rows);
  QILIN_CUDA_RETURN(cudaStreamSynchronize(stream_), "sync before switching SwiGLU dtypes");
  DropGraphs();
  options_.swiglu_bf16_min_rows = rows;
  gemm_.set_swiglu_bf16_min_rows(rows);
  return Status::Ok();
}

Status CudaBackend::SetDecodeAttentionMma(bool on) {
  QILIN_CUDA_RETURN(cudaStreamSynchronize(stream_), "sync before switching attention kernels");
  DropGraphs();
  options_.decode_attention_mma = on;
  return Status::Ok();
}

std::vector<int32_t> CudaBackend::WarmUpBatchSizes(int32_t max_batch_size) const {
  std::vector<int32_t> sizes;
  for (int32_t b : kGraphBuckets) {
    if (b <= max_batch_size) sizes.push_back(b);
  }
  if (max_batch_size > 0 && max_batch_size < kGraphBuckets[std::size(kGraphBuckets) - 1] &&
      (sizes.empty() || sizes.back() != max_batch_size)) {
    sizes.push_back(max_batch_size);
  }
  return sizes;
}

// A step of n tokens times its GEMM candidates at the first n of its tuning bucket
// (Gemm::TuneBucket, eight per octave from 64 rows; ~0.2 s at 8192 rows, inside the step that
// met it): one step per bucket up to max_num_tokens (57 to 8192), each one layer deep
// (SetWarmUpSteps), moves that cost before serving.
std::vector<int32_t> CudaBackend::WarmUpPrefillTokens(int32_t max_num_tokens) const {
  std::vector<int32_t> sizes;
  for (int32_t n = 64; n < max_num_tokens; ++n) {
    if (cuda::Gemm::TuneBucket(n) == n) sizes.push_back(n);
  }
  if (max_num_tokens > 0) sizes.push_back(max_num_tokens);
  return sizes;
}

Status CudaBackend::CopyKvBlocks(const std::vector<std::pair<int32_t, int32_t>>& src_dst) {
  QILIN_RETURN_IF_ERROR(ValidateBlockPairs(src_dst, layout_));
  if (src_dst.empty()) return Status::Ok();
  const int64_t block_elems = static_cast<int64_t>(layout_.block_size) * config_.kv_size();
  for (const auto& [src, dst] : src_dst) {
    if (src == dst) continue;
    for (int64_t l = 0; l < 2 * config_.num_layers; ++l) {
      bf16_t* pool = kv_pool_ + l * layer_elems_;
      QILIN_CUDA_RETURN(cudaMemcpyAsync(pool + dst * block_elems, pool + src * block_elems,
                                        block_elems * 2, cudaMemcpyDeviceToDevice, stream_),
                        "CopyKvBlocks");
    }
  }
  QILIN_CUDA_RETURN(cudaStreamSynchronize(stream_), "CopyKvBlocks");
  return Status::Ok();
}

CudaBackend::InputLayout CudaBackend::MakeLayout(int32_t n, int32_t seqs, int32_t stride,
                                                 int32_t rows, int32_t tiles,
                                                 int32_t tables) const {
  InputLayout il{};
  size_t off = 0;
  auto take = [&](size_t bytes) {
    const size_t o = off;
    off = Align(off + bytes);
    return o;
  };
  il.token_ids = take(n * 4);
  il.positions = take(n * 4);
  il.seq_of = take(n * 4);
  il.table_of = take(n * 4);
  il.logn = take(n * 4);
  il.slot_mapping = take(n * 8);
  il.query_start = take((seqs + 1) * 4);
  il.block_tables = take(static_cast<size_t>(seqs) * stride * 4);
  il.logits_rows = take(rows * 4);
  il.decode_tokens = take(n * 4);
  il.tiles = take(std::max(tiles, 1) * 8);
  il.attn_scale = take(tables * 4);
  il.inv_freq = take(static_cast<size_t>(tables) * (config_.head_dim / 2) * 4);
  il.end = off;
  il.n = n;
  il.seqs = seqs;
  il.stride = stride;
  il.tiles_cap = tiles;
  il.tables_cap = tables;
  return il;
}

// Regrows one of a staging's pinned buffers to `want` bytes where `bytes` do not fit. The buffer
// is free: the step that used this staging last was waited for.
static Status GrowPinned(char** buf, size_t* cap, size_t bytes, size_t want, const char* what) {
  if (bytes <= *cap) return Status::Ok();
  if (*buf) cudaFreeHost(*buf);
  *buf = nullptr;
  *cap = 0;
  QILIN_CUDA_RETURN(cudaMallocHost(buf, want), what);
  *cap = want;
  return Status::Ok();
}

Status CudaBackend::EnsureInputBuffers(size_t bytes) {
  const size_t cap = std::max<size_t>(bytes * 2, 1 << 20);
  Staging& st = staging_[cur_];
  QILIN_RETURN_IF_ERROR(GrowPinned(&st.in, &st.in_cap, bytes, cap, "cudaMallocHost(step inputs)"));
  if (bytes <= dev_in_cap_) return Status::Ok();
  // The graphs and any launched step read dev_in_.
  QILIN_CUDA_RETURN(cudaStreamSynchronize(stream_), "sync before regrowing inputs");
  DropGraphs();
  if (dev_in_) cudaFree(dev_in_);
  dev_in_ = nullptr;
  dev_in_cap_ = 0;
  QILIN_CUDA_RETURN(cudaMalloc(&dev_in_, cap), "cudaMalloc(step inputs)");
  dev_in_cap_ = cap;
  return Status::Ok();
}

Status CudaBackend::RunStep(const InputLayout& il, const StepShape& s) {
  const ModelConfig& c = config_;
  const int64_t n = s.n, hid = c.hidden_size, qs = c.q_size(), kvs = c.kv_size();
  const int64_t qkv = qs + 2 * kvs, inter = c.intermediate_size;
  const float eps = static_cast<float>(c.rms_norm_eps);
  auto at = [&](size_t off) { return dev_in_ + off; };
  const auto* token_ids = reinterpret_cast<const int32_t*>(at(il.token_ids));
  cuda::RopeArgs rope;
  rope.inv_freq = reinterpret_cast<const float*>(at(il.inv_freq));
  rope.attn_scale = reinterpret_cast<const float*>(at(il.attn_scale));
  rope.table_of = reinterpret_cast<const int32_t*>(at(il.table_of));
  rope.positions = reinterpret_cast<const int32_t*>(at(il.positions));
  rope.logn = s.logn ? reinterpret_cast<const float*>(at(il.logn)) : nullptr;
  const auto* slots = reinterpret_cast<const int64_t*>(at(il.slot_mapping));
  cuda::AttnBatch ab;
  ab.query_start = reinterpret_cast<const int32_t*>(at(il.query_start));
  ab.seq_of = reinterpret_cast<const int32_t*>(at(il.seq_of));
  ab.positions = rope.positions;
  ab.block_tables = reinterpret_cast<const int32_t*>(at(il.block_tables));
  ab.table_stride = il.stride;
  ab.block_size = layout_.block_size;
  const auto* decode_tokens = reinterpret_cast<const int32_t*>(at(il.decode_tokens));
  const auto* tiles = reinterpret_cast<const int2*>(at(il.tiles));
  const auto* rows = reinterpret_cast<const int32_t*>(at(il.logits_rows));
  const float scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));

  QILIN_CUDA_RETURN(cuda::EmbeddingGather(embed_, hid, token_ids, n, x_, stream_, previous_ids_),
                    "embedding");
  // Warm-up steps (SetWarmUpSteps) meet every GEMM shape in the first layer.
  const int64_t layers = warm_up_steps_ ? std::min<int64_t>(1, c.num_layers) : c.num_layers;
  for (int64_t l = 0; l < layers; ++l) {
    const DevLayer& w = layers_[l];
    bf16_t* k_cache = kv_pool_ + 2 * l * layer_elems_;
    bf16_t* v_cache = k_cache + layer_elems_;
    QILIN_CUDA_RETURN(cuda::AddRmsNorm(x_, l == 0 ? nullptr : y_, nullptr, n, hid, w.input_norm,
                                       eps, h_, stream_),
                      "input norm");
    QILIN_RETURN_IF_ERROR(gemm_.Linear(h_, n, hid, w.qkv, qkv, w.qkv_bias, qkv_, true, stream_));
    QILIN_CUDA_RETURN(cuda::RopeWriteKv(qkv_, n, c.num_heads, c.num_kv_heads, c.head_dim, w.q_norm,
                                        w.k_norm, eps, rope, slots, q_, k_cache, v_cache, stream_),
                      "rope + KV write");
    for (int32_t d0 = 0; d0 < s.decode; d0 += kDecodeChunk) {
      const bool mma = options_.decode_attention_mma &&
                       cuda::DecodeMmaSupported(c.head_dim, c.num_heads, c.num_kv_heads);
      auto* attend = mma ? cuda::PagedAttentionDecodeMma : cuda::PagedAttentionDecode;
      QILIN_CUDA_RETURN(attend(q_, k_cache, v_cache, ab, decode_tokens + d0,
                               std::min(kDecodeChunk, s.decode - d0), s.max_splits, c.num_heads,
                               c.num_kv_heads, c.head_dim, scale, partial_, attn_, stream_),
                        "decode attention");
    }
    QILIN_CUDA_RETURN(
        cuda::PagedAttentionPrefill(q_, k_cache, v_cache, ab, tiles, s.tiles, c.num_heads,
                                    c.num_kv_heads, c.head_dim, scale, attn_, stream_),
        "prefill attention");
    // With tensor parallelism the partial sums of every rank's heads, o_proj's bias once.
    const float* o_bias = tp() && options_.tp_plan.rank != 0 ? nullptr : w.o_bias;
    QILIN_RETURN_IF_ERROR(gemm_.Linear(attn_, n, qs, w.o, hid, o_bias, y_, true, stream_));
    QILIN_RETURN_IF_ERROR(TpAllReduce(y_, n));
    QILIN_CUDA_RETURN(cuda::AddRmsNorm(x_, y_, nullptr, n, hid, w.post_norm, eps, h_, stream_),
                      "post norm");
    QILIN_RETURN_IF_ERROR(gemm_.LinearSwiGlu(h_, n, hid, w.gate_up, inter, gu_, act_, stream_));
    QILIN_RETURN_IF_ERROR(gemm_.Linear(act_, n, inter, w.down, hid, nullptr, y_, true, stream_));
    QILIN_RETURN_IF_ERROR(TpAllReduce(y_, n));
  }
  // Last residual add (the norm output is not used); then final norm + lm_head on sampled rows.
  QILIN_CUDA_RETURN(cuda::AddRmsNorm(x_, y_, nullptr, n, hid, final_norm_, eps, h_, stream_),
                    "final add");
  if (s.rows > kLogitsChunk) return Internal("RunStep: {} logits rows in one chunk", s.rows);
  QILIN_CUDA_RETURN(
      cuda::AddRmsNorm(x_, nullptr, rows, s.rows, hid, final_norm_, eps, rows_h_, stream_),
      "final norm");
  return LmHead(s.rows);
}

Status CudaBackend::TpAllReduce(float* y, int64_t n) {
  if (!tp()) return Status::Ok();
  return options_.tp_comm->AllReduceSum(y, n * config_.hidden_size, stream_);
}

Status CudaBackend::LmHead(int32_t rows) {
  const ModelConfig& c = config_;
  if (!tp()) {
    return gemm_.Linear(rows_h_, rows, c.hidden_size, lm_head_, c.vocab_size, nullptr, logits_,
                        true, stream_);
  }
  const ShardPlan& p = options_.tp_plan;
  const int64_t vpr = p.vocab_per_rank, V = c.vocab_size;
  if (rows <= 0) return Status::Ok();  // the same on every rank: no collective
  QILIN_RETURN_IF_ERROR(gemm_.Linear(rows_h_, rows, c.hidden_size, lm_head_, vpr, nullptr,
                                     tp_logits_, true, stream_));
  QILIN_RETURN_IF_ERROR(options_.tp_comm->AllGather(tp_logits_, rows * vpr, tp_gathered_, stream_));
  if (p.rank != 0) return Status::Ok();
  // [world, rows, vpr] -> [rows, V]: rank r's real columns land at [r * vpr, ...).
  for (int64_t r = 0; r < p.world_size; ++r) {
    const int64_t v0 = r * vpr, v1 = std::min(V, v0 + vpr);
    if (v1 <= v0) continue;
    QILIN_CUDA_RETURN(
        cudaMemcpy2DAsync(logits_ + v0, V * sizeof(float), tp_gathered_ + r * rows * vpr,
                          vpr * sizeof(float), (v1 - v0) * sizeof(float), rows,
                          cudaMemcpyDeviceToDevice, stream_),
        "logits gather");
  }
  return Status::Ok();
}

Status CudaBackend::UploadSampleInputs(std::span<const DeviceSampleSpec> specs) {
  const int64_t vocab = config_.vocab_size;
  const int32_t m = static_cast<int32_t>(specs.size());
  entry_flags_.resize(vocab, 0);
  entry_out_.resize(vocab, 0);
  std::vector<cuda::SampleRowParams> params(m);
  std::vector<cuda::SampleEntry> entries;
  for (int32_t r = 0; r < m; ++r) {
    const DeviceSampleSpec& s = specs[r];
    if (!DeviceSamplingSupports(s, vocab)) {
      return InvalidArgument("row {}: top_k {} / logprobs {} beyond device sampling's limits", r,
                             s.top_k, s.logprobs);
    }
    cuda::SampleRowParams& p = params[r];
    p.greedy = s.greedy ? 1 : 0;
    p.temperature = s.temperature;
    p.top_k = s.top_k >= vocab ? 0 : s.top_k;
    p.top_p = s.top_p;
    p.min_p = s.min_p;
    p.repetition_penalty = s.repetition_penalty;
    p.presence_penalty = s.presence_penalty;
    p.frequency_penalty = s.frequency_penalty;
    p.logprobs = s.logprobs;
    p.seed = s.seed;
    p.stream = s.stream;
    p.counter = s.counter;
    p.entry_begin = static_cast<int32_t>(entries.size());
    // Distinct tokens the processors touch (each once: the kernel changes them in place).
    entry_tokens_.clear();
    auto touch = [&](int32_t t) {
      if (entry_flags_[t] == 0 && entry_out_[t] == 0) entry_tokens_.push_back(t);
    };
    auto valid = [&](int32_t t) { return t >= 0 && t < vocab; };
    if (s.repetition_penalty != 1.0f) {
      for (int32_t t : s.tokens) {
        if (!valid(t)) continue;
        touch(t);
        entry_flags_[t] |= cuda::kSampleInSequence;
      }
    }
    if (s.presence_penalty != 0.0f || s.frequency_penalty != 0.0f) {
      for (size_t i = s.prompt_len; i < s.tokens.size(); ++i) {
        const int32_t t = s.tokens[i];
        if (!valid(t)) continue;
        touch(t);
        ++entry_out_[t];
      }
    }
    for (int32_t t : s.masked) {
      if (!valid(t)) continue;
      touch(t);
      entry_flags_[t] |= cuda::kSampleMasked;
    }
    for (int32_t t : entry_tokens_) {
      cuda::SampleEntry e;
      e.token = t;
      e.out_count = entry_out_[t];
      e.flags = entry_flags_[t];
      entries.push_back(e);
      entry_flags_[t] = 0;
      entry_out_[t] = 0;
    }
    p.entry_count = static_cast<int32_t>(entries.size()) - p.entry_begin;
  }
  const size_t e = std::max<size_t>(entries.size(), 1);
  const size_t params_b = Align(m * sizeof(cuda::SampleRowParams));
  const size_t entries_b = Align(e * sizeof(cuda::SampleEntry));
  const size_t saved_b = Align(e * sizeof(float));
  const size_t bytes = params_b + entries_b + saved_b + m * sizeof(cuda::SampleRowOut);
  const size_t cap = std::max<size_t>(bytes * 2, 1 << 16);
  Staging& st = staging_[cur_];
  QILIN_RETURN_IF_ERROR(
      GrowPinned(&st.sample, &st.sample_cap, bytes, cap, "cudaMallocHost(sampling inputs)"));
  if (bytes > sample_dev_cap_) {
    // A launched step's outputs are copied out of sample_dev_ before this sync returns.
    QILIN_CUDA_RETURN(cudaStreamSynchronize(stream_), "sync before regrowing sampling inputs");
    if (sample_dev_) cudaFree(sample_dev_);
    sample_dev_ = nullptr;
    sample_dev_cap_ = 0;
    QILIN_CUDA_RETURN(cudaMalloc(&sample_dev_, cap), "cudaMalloc(sampling inputs)");
    sample_dev_cap_ = cap;
  }
  sample_entries_off_ = params_b;
  sample_saved_off_ = params_b + entries_b;
  sample_out_off_ = params_b + entries_b + saved_b;
  st.out_off = sample_out_off_;
  std::memcpy(st.sample, params.data(), m * sizeof(cuda::SampleRowParams));
  std::memcpy(st.sample + sample_entries_off_, entries.data(),
              entries.size() * sizeof(cuda::SampleEntry));
  QILIN_CUDA_RETURN(
      cudaMemcpyAsync(sample_dev_, st.sample, sample_saved_off_, cudaMemcpyHostToDevice, stream_),
      "cudaMemcpy(sampling inputs)");
  return Status::Ok();
}

Status CudaBackend::CopyLogitsToHost(float* dst, int32_t rows) {
  const size_t row_bytes = static_cast<size_t>(config_.vocab_size) * sizeof(float);
  const int threads = options_.host_copy_threads;
  if (threads <= 0) {
    QILIN_CUDA_RETURN(
        cudaMemcpyAsync(dst, logits_, rows * row_bytes, cudaMemcpyDeviceToHost, stream_),
        "cudaMemcpy(logits)");
    return Status::Ok();
  }
  const int32_t piece = static_cast<int32_t>(std::max<size_t>(1, kStageBytes / row_bytes));
  if (!stage_[0]) {
    for (int i = 0; i < 2; ++i) {
      QILIN_CUDA_RETURN(cudaMallocHost(&stage_[i], piece * row_bytes), "cudaMallocHost(logits)");
      QILIN_CUDA_RETURN(cudaEventCreateWithFlags(&stage_done_[i], cudaEventDisableTiming),
                        "cudaEventCreate");
    }
  }
  const int32_t pieces = (rows + piece - 1) / piece;
  auto issue = [&](int32_t i) -> Status {
    const int32_t r0 = i * piece, rn = std::min(piece, rows - r0);
    QILIN_CUDA_RETURN(
        cudaMemcpyAsync(stage_[i % 2], logits_ + static_cast<size_t>(r0) * config_.vocab_size,
                        rn * row_bytes, cudaMemcpyDeviceToHost, stream_),
        "cudaMemcpy(logits)");
    QILIN_CUDA_RETURN(cudaEventRecord(stage_done_[i % 2], stream_), "cudaEventRecord");
    return Status::Ok();
  };
  if (pieces > 0) QILIN_RETURN_IF_ERROR(issue(0));
  for (int32_t i = 0; i < pieces; ++i) {
    // Stage (i + 1) % 2 was emptied by the previous iteration: its DMA overlaps this copy-out.
    if (i + 1 < pieces) QILIN_RETURN_IF_ERROR(issue(i + 1));
    QILIN_CUDA_RETURN(cudaEventSynchronize(stage_done_[i % 2]), "logits to host");
    const int32_t r0 = i * piece, rn = std::min(piece, rows - r0);
    const char* src = reinterpret_cast<const char*>(stage_[i % 2]);
    char* out = reinterpret_cast<char*>(dst + static_cast<size_t>(r0) * config_.vocab_size);
    const size_t bytes = rn * row_bytes;
    constexpr size_t kBlock = size_t{256} << 10;
    const int64_t blocks = static_cast<int64_t>((bytes + kBlock - 1) / kBlock);
#pragma omp parallel for schedule(static) num_threads(threads) if (blocks > 1 && threads > 1)
    for (int64_t b = 0; b < blocks; ++b) {
      const size_t o = static_cast<size_t>(b) * kBlock;
      std::memcpy(out + o, src + o, std::min(kBlock, bytes - o));
    }
  }
  return Status::Ok();
}

Status CudaBackend::EnqueueSample(int32_t r0, int32_t rows) {
  const int64_t vocab = config_.vocab_size;
  auto* params = reinterpret_cast<const cuda::SampleRowParams*>(sample_dev_) + r0;
  auto* entries = reinterpret_cast<const cuda::SampleEntry*>(sample_dev_ + sample_entries_off_);
  auto* saved = reinterpret_cast<float*>(sample_dev_ + sample_saved_off_);
  auto* out_dev = reinterpret_cast<cuda::SampleRowOut*>(sample_dev_ + sample_out_off_) + r0;
  const Staging& st = staging_[cur_];
  auto* out_host = reinterpret_cast<cuda::SampleRowOut*>(st.sample + st.out_off) + r0;
  QILIN_CUDA_RETURN(
      cuda::SampleRows(logits_, static_cast<int32_t>(vocab), rows, params, entries, saved, out_dev,
                       stream_, r0 + rows <= act_tokens_ ? previous_ids_ + r0 : nullptr),
      "sampling");
  QILIN_CUDA_RETURN(cudaMemcpyAsync(out_host, out_dev, rows * sizeof(cuda::SampleRowOut),
                                    cudaMemcpyDeviceToHost, stream_),
                    "cudaMemcpy(sampled tokens)");
  return Status::Ok();
}

Status CudaBackend::CollectSamples(int slot, int32_t r0, int32_t rows, bool logits_ready,
                                   std::vector<DeviceSampleResult>* results) {
  const int64_t vocab = config_.vocab_size;
  const Staging& st = staging_[slot];
  const auto* out_host = reinterpret_cast<const cuda::SampleRowOut*>(st.sample + st.out_off) + r0;
  for (int32_t r = 0; r < rows; ++r) {
    const cuda::SampleRowOut& o = out_host[r];
    DeviceSampleResult& res = (*results)[r0 + r];
    res.token = o.token;
    res.logprob = o.logprob;
    res.top.clear();
    for (int32_t j = 0; j < o.num_top; ++j) res.top.emplace_back(o.top_id[j], o.top_logprob[j]);
    res.on_host = o.status == cuda::kSampleNeedsHost;
    res.logits.clear();
    if (res.on_host && !logits_ready) {
      return Internal("sampled row {} needs the host sampler, but its logits are gone", r0 + r);
    }
    if (res.on_host) {
      res.logits.resize(vocab);
      QILIN_CUDA_RETURN(cudaMemcpy(res.logits.data(), logits_ + static_cast<int64_t>(r) * vocab,
                                   vocab * sizeof(float), cudaMemcpyDeviceToHost),
                        "cudaMemcpy(logits row)");
    }
  }
  return Status::Ok();
}

Status CudaBackend::SampleChunk(int32_t r0, int32_t rows,
                                std::vector<DeviceSampleResult>* results) {
  QILIN_RETURN_IF_ERROR(EnqueueSample(r0, rows));
  QILIN_CUDA_RETURN(cudaStreamSynchronize(stream_), "sampling");
  return CollectSamples(cur_, r0, rows, /*logits_ready=*/true, results);
}

Status CudaBackend::CheckNoLaunchedSteps(const char* what) const {
  if (launched_.empty()) return Status::Ok();
  return FailedPrecondition("{}: {} launched steps are not waited for (WaitForwardSample first)",
                            what, launched_.size());
}

Status CudaBackend::SampleLogits(const float* logits, std::span<const DeviceSampleSpec> specs,
                                 std::vector<DeviceSampleResult>* results) {
  QILIN_RETURN_IF_ERROR(CheckNoLaunchedSteps("SampleLogits"));
  const int32_t m = static_cast<int32_t>(specs.size());
  QILIN_RETURN_IF_ERROR(EnsureActivations(std::max<int32_t>(1, planned_tokens_)));
  results->assign(m, DeviceSampleResult{});
  QILIN_RETURN_IF_ERROR(UploadSampleInputs(specs));
  for (int32_t r0 = 0; r0 < m; r0 += kLogitsChunk) {
    const int32_t rc = std::min(kLogitsChunk, m - r0);
    QILIN_CUDA_RETURN(
        cudaMemcpyAsync(logits_, logits + static_cast<int64_t>(r0) * config_.vocab_size,
                        static_cast<size_t>(rc) * config_.vocab_size * 4, cudaMemcpyHostToDevice,
                        stream_),
        "cudaMemcpy(logits)");
    QILIN_RETURN_IF_ERROR(SampleChunk(r0, rc, results));
  }
  previous_rows_ = 0;
  return Status::Ok();
}

Status CudaBackend::Forward(const ForwardBatch& batch, std::vector<float>* logits) {
  return ForwardImpl(batch, logits, {}, nullptr, false);
}

Status CudaBackend::ForwardSample(const ForwardBatch& batch,
                                  std::span<const DeviceSampleSpec> specs,
                                  std::vector<DeviceSampleResult>* results) {
  if (tp()) return Unimplemented("ForwardSample: no device sampling with tensor parallelism");
  if (specs.size() != batch.logits_indices.size()) {
    return InvalidArgument("ForwardSample: {} sampling specs for {} logits rows", specs.size(),
                           batch.logits_indices.size());
  }
  return ForwardImpl(batch, nullptr, specs, results, false);
}

Status CudaBackend::LaunchForwardSample(const ForwardBatch& batch,
                                        std::span<const DeviceSampleSpec> specs) {
  if (tp()) return Unimplemented("LaunchForwardSample: not with tensor parallelism");
  if (specs.size() != batch.logits_indices.size()) {
    return InvalidArgument("LaunchForwardSample: {} sampling specs for {} logits rows",
                           specs.size(), batch.logits_indices.size());
  }
  if (static_cast<int>(launched_.size()) >= kMaxLaunchedSteps) {
    return FailedPrecondition("LaunchForwardSample: {} steps are launched and not waited for",
                              launched_.size());
  }
  for (size_t r = 0; r < specs.size(); ++r) {
    if (!specs[r].greedy && specs[r].top_p < 1.0f) {
      return InvalidArgument(
          "LaunchForwardSample: row {} has top_p {} (a launched step cannot hand its logits to "
          "the host sampler; use ForwardSample)",
          r, specs[r].top_p);
    }
  }
  return ForwardImpl(batch, nullptr, specs, nullptr, true);
}

Status CudaBackend::WaitForwardSample(std::vector<DeviceSampleResult>* results) {
  if (launched_.empty()) return FailedPrecondition("WaitForwardSample: no launched step");
  const int slot = launched_.front();
  launched_.pop_front();
  Staging& st = staging_[slot];
  QILIN_CUDA_RETURN(cudaEventSynchronize(st.done), "launched step");
  results->assign(st.rows, DeviceSampleResult{});
  QILIN_RETURN_IF_ERROR(CollectSamples(slot, 0, st.rows, /*logits_ready=*/false, results));
  if (step_timing_) {
    float ms = 0;
    QILIN_CUDA_RETURN(cudaEventElapsedTime(&ms, st.begin, st.end), "step timing");
    last_step_gpu_ms_ = ms;
  }
  return Status::Ok();
}

Status CudaBackend::ForwardImpl(const ForwardBatch& batch, std::vector<float>* logits,
                                std::span<const DeviceSampleSpec> specs,
                                std::vector<DeviceSampleResult>* results, bool launch) {
  if (!launch) QILIN_RETURN_IF_ERROR(CheckNoLaunchedSteps("Forward"));
  QILIN_RETURN_IF_ERROR(ValidateForwardBatch(batch, config_, layout_, launch ? previous_rows_ : 0));
  const ModelConfig& c = config_;
  const int32_t n = batch.num_tokens(), seqs = batch.num_seqs();
  const int32_t bs = layout_.block_size;
  const int32_t m = static_cast<int32_t>(batch.logits_indices.size());
  const bool prefill_tc = cuda::PrefillSupported(c.head_dim);
  bool decode_only = true;
  int32_t used_blocks = 1;
  for (int32_t s = 0; s < seqs; ++s) {
    if (batch.query_start[s + 1] - batch.query_start[s] != 1) decode_only = false;
    used_blocks = std::max(used_blocks, (batch.context_lens[s] + bs - 1) / bs);
  }
  // A graph step: decode-only, padded to a bucket, block tables at the fixed stride.
  int32_t bucket = 0;
  const bool graphs = options_.cuda_graphs && (!tp() || options_.tp_comm->capturable());
  if (graphs && decode_only && !warm_up_steps_ && used_blocks <= table_cap_ && m <= n) {
    for (int32_t b : kGraphBuckets) {
      if (b >= n) {
        bucket = b;
        break;
      }
    }
  }
  const int32_t n_pad = bucket > 0 ? bucket : n;
  const int32_t seqs_pad = bucket > 0 ? bucket : seqs;
  const int32_t stride = bucket > 0 ? table_cap_ : used_blocks;
  QILIN_RETURN_IF_ERROR(EnsureActivations(std::max(n_pad, planned_tokens_)));

  // Prefill tiles (longest-first) and the decode-token list.
  std::vector<int2> tile_list;
  std::vector<int32_t> decode_list;
  int32_t max_splits = 1;
  for (int32_t s = 0; s < seqs; ++s) {
    const int32_t q0 = batch.query_start[s], q1 = batch.query_start[s + 1];
    if (q1 - q0 > 1 && prefill_tc) {
      for (int32_t t = q0; t < q1; t += cuda::kPrefillTileQ) tile_list.push_back(make_int2(s, t));
    }
  }
  // Longest key ranges first, so that the last wave of blocks is short.
  std::sort(tile_list.begin(), tile_list.end(), [&](const int2& a, const int2& b) {
    return batch.positions[a.y] > batch.positions[b.y];
  });
  for (int32_t s = 0; s < seqs; ++s) {
    const int32_t q0 = batch.query_start[s], q1 = batch.query_start[s + 1];
    if (q1 - q0 == 1 || !prefill_tc) {
      for (int32_t t = q0; t < q1; ++t) {
        decode_list.push_back(t);
        const int32_t ctx = batch.positions[t] + 1;
        const int32_t part = cuda::DecodePartition(ctx);
        max_splits = std::max(max_splits, (ctx + part - 1) / part);
      }
    }
  }
  if (bucket > 0) {
    for (int32_t t = n; t < n_pad; ++t) decode_list.push_back(t);
    max_splits = cuda::kMaxSplits;
  }

  // Rope tables: 0 is the base; sequence-dependent ones (Qwen v1 NTK, dynamic) follow.
  std::vector<float> tables = base_inv_freq_;
  std::vector<float> scales = {base_attn_scale_};
  std::vector<int32_t> table_of(n_pad, 0);
  {
    const int64_t half = c.head_dim / 2;
    const bool dynamic = cpu::RopeDependsOnSeqLen(c);
    const int64_t dyn_max = c.rope_scaling.original_max_position_embeddings > 0
                                ? c.rope_scaling.original_max_position_embeddings
                                : c.max_position_embeddings;
    std::map<std::pair<int, double>, int32_t> index;
    auto table_for = [&](int kind, double key, const cpu::RopeFreqs& f) {
      auto it = index.find({kind, key});
      if (it != index.end()) return it->second;
      const int32_t id = static_cast<int32_t>(scales.size());
      tables.insert(tables.end(), f.inv_freq.begin(), f.inv_freq.begin() + half);
      scales.push_back(f.attention_scaling);
      index.emplace(std::pair{kind, key}, id);
      return id;
    };
    for (int32_t s = 0; s < seqs; ++s) {
      int32_t seq_table = 0;
      if (c.use_dynamic_ntk) {
        const double alpha = QwenV1NtkAlpha(c, batch.prompt_lens[s]);
        if (alpha != 1.0) seq_table = table_for(0, alpha, cpu::ComputeRopeFreqs(c, 0, alpha));
      }
      for (int32_t t = batch.query_start[s]; t < batch.query_start[s + 1]; ++t) {
        const int64_t seq_len = std::max<int64_t>(batch.prompt_lens[s], batch.positions[t] + 1);
        table_of[t] =
            dynamic && seq_len > dyn_max
                ? table_for(1, static_cast<double>(seq_len), cpu::ComputeRopeFreqs(c, seq_len, 1.0))
                : seq_table;
      }
    }
  }
  const int32_t num_tables = static_cast<int32_t>(scales.size());
  // Graph steps keep one layout per bucket: room for a table per token.
  const InputLayout il =
      MakeLayout(n_pad, seqs_pad, stride, std::max(n_pad, m),
                 static_cast<int32_t>(tile_list.size()), bucket > 0 ? n_pad + 1 : num_tables);
  QILIN_RETURN_IF_ERROR(EnsureInputBuffers(il.end));

  // Fill the pinned staging buffer.
  char* h = staging_[cur_].in;
  auto i32 = [&](size_t off) { return reinterpret_cast<int32_t*>(h + off); };
  for (int32_t t = 0; t < n_pad; ++t) {
    const bool real = t < n;
    i32(il.token_ids)[t] = real ? batch.token_ids[t] : 0;
    i32(il.positions)[t] = real ? batch.positions[t] : 0;
    i32(il.table_of)[t] = table_of[t];
    reinterpret_cast<int64_t*>(h + il.slot_mapping)[t] =
        real ? batch.slot_mapping[t]
             : static_cast<int64_t>(layout_.num_blocks) * bs;  // scratch block
    reinterpret_cast<float*>(h + il.logn)[t] =
        real && c.use_logn_attn ? static_cast<float>(QwenV1LognScale(c, batch.positions[t])) : 1.0f;
  }
  for (int32_t s = 0; s <= seqs_pad; ++s) {
    i32(il.query_start)[s] = s <= seqs ? batch.query_start[s] : n + (s - seqs);
  }
  for (int32_t s = 0; s < seqs_pad; ++s) {
    int32_t* row = i32(il.block_tables) + static_cast<int64_t>(s) * stride;
    const int32_t blocks = s < seqs ? (batch.context_lens[s] + bs - 1) / bs : 0;
    for (int32_t j = 0; j < stride; ++j) {
      row[j] = j < blocks
                   ? batch.block_tables[static_cast<int64_t>(s) * batch.max_blocks_per_seq + j]
                   : layout_.num_blocks;
    }
    const int32_t q0 = s < seqs ? batch.query_start[s] : n + (s - seqs);
    const int32_t q1 = s < seqs ? batch.query_start[s + 1] : q0 + 1;
    for (int32_t t = q0; t < q1; ++t) i32(il.seq_of)[t] = s;
  }
  for (int32_t r = 0; r < std::max(n_pad, m); ++r) {
    i32(il.logits_rows)[r] = r < m ? batch.logits_indices[r] : 0;
  }
  std::copy(decode_list.begin(), decode_list.end(), i32(il.decode_tokens));
  std::copy(tile_list.begin(), tile_list.end(), reinterpret_cast<int2*>(h + il.tiles));
  std::copy(scales.begin(), scales.end(), reinterpret_cast<float*>(h + il.attn_scale));
  std::copy(tables.begin(), tables.end(), reinterpret_cast<float*>(h + il.inv_freq));
  const size_t used = il.inv_freq + tables.size() * sizeof(float);
  QILIN_CUDA_RETURN(cudaMemcpyAsync(dev_in_, h, used, cudaMemcpyHostToDevice, stream_),
                    "cudaMemcpy(step inputs)");

  StepShape shape;
  shape.n = n_pad;
  shape.seqs = seqs_pad;
  shape.decode = static_cast<int32_t>(decode_list.size());
  shape.tiles = static_cast<int32_t>(tile_list.size());
  shape.max_splits = max_splits;
  shape.logn = c.use_logn_attn;
  const bool sample = results != nullptr || launch;
  if (sample) {
    if (results) results->assign(m, DeviceSampleResult{});
    QILIN_RETURN_IF_ERROR(UploadSampleInputs(specs));
  } else if (logits != nullptr) {
    logits->resize(static_cast<size_t>(m) * c.vocab_size);
  }
  // Step timing: events outside any capture, around the layers and lm_head.
  Staging& stage = staging_[cur_];
  auto timed = [&](bool end) -> Status {
    if (!step_timing_) return Status::Ok();
    return cuda::CudaStatus(cudaEventRecord(end ? stage.end : stage.begin, stream_), "step timing");
  };
  // Sampling: now (waiting for the rows), or enqueued for WaitForwardSample.
  auto sample_rows = [&](int32_t r0, int32_t rows) {
    return launch ? EnqueueSample(r0, rows) : SampleChunk(r0, rows, results);
  };
  if (bucket > 0) {
    shape.rows = bucket;
    auto it = graphs_.find(bucket);
    QILIN_RETURN_IF_ERROR(timed(false));
    if (it == graphs_.end()) {
      // First step of this bucket: run it eagerly (creates the GEMM plans), then capture.
      QILIN_RETURN_IF_ERROR(RunStep(il, shape));
      QILIN_RETURN_IF_ERROR(timed(true));
      cudaGraph_t graph = nullptr;
      QILIN_CUDA_RETURN(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal),
                        "cudaStreamBeginCapture");
      Status st = RunStep(il, shape);
      cudaError_t end = cudaStreamEndCapture(stream_, &graph);
      QILIN_RETURN_IF_ERROR(st);
      QILIN_CUDA_RETURN(end, "cudaStreamEndCapture");
      cudaGraphExec_t exec = nullptr;
      cudaError_t inst = cudaGraphInstantiate(&exec, graph, 0);
      cudaGraphDestroy(graph);
      QILIN_CUDA_RETURN(inst, "cudaGraphInstantiate");
      graphs_[bucket] = exec;
    } else {
      QILIN_CUDA_RETURN(cudaGraphLaunch(it->second, stream_), "cudaGraphLaunch");
      QILIN_RETURN_IF_ERROR(timed(true));
    }
    if (m > 0 && sample) {
      QILIN_RETURN_IF_ERROR(sample_rows(0, m));
    } else if (m > 0 && logits != nullptr) {
      QILIN_RETURN_IF_ERROR(CopyLogitsToHost(logits->data(), m));
    }
  } else {
    // Layers once; lm_head in chunks of kLogitsChunk rows (the rows are already on the device).
    shape.rows = std::min(m, kLogitsChunk);
    QILIN_RETURN_IF_ERROR(timed(false));
    QILIN_RETURN_IF_ERROR(RunStep(il, shape));
    QILIN_RETURN_IF_ERROR(timed(true));
    for (int32_t r0 = 0; r0 < m; r0 += kLogitsChunk) {
      const int32_t rc = std::min(kLogitsChunk, m - r0);
      if (r0 > 0) {
        const auto* rows = reinterpret_cast<const int32_t*>(dev_in_ + il.logits_rows) + r0;
        QILIN_CUDA_RETURN(cuda::AddRmsNorm(x_, nullptr, rows, rc, c.hidden_size, final_norm_,
                                           static_cast<float>(c.rms_norm_eps), rows_h_, stream_),
                          "final norm");
        QILIN_RETURN_IF_ERROR(LmHead(rc));
      }
      if (sample) {
        QILIN_RETURN_IF_ERROR(sample_rows(r0, rc));
        continue;
      }
      if (logits == nullptr) continue;  // a tensor-parallel rank other than 0
      QILIN_RETURN_IF_ERROR(
          CopyLogitsToHost(logits->data() + static_cast<size_t>(r0) * c.vocab_size, rc));
    }
  }
  previous_rows_ = sample && m <= act_tokens_ ? m : 0;
  if (launch) {
    QILIN_CUDA_RETURN(cudaEventRecord(stage.done, stream_), "cudaEventRecord");
    stage.rows = m;
    launched_.push_back(cur_);
    cur_ ^= 1;
    return Status::Ok();
  }
  QILIN_CUDA_RETURN(cudaStreamSynchronize(stream_), "Forward");
  if (step_timing_) {
    float ms = 0;
    QILIN_CUDA_RETURN(cudaEventElapsedTime(&ms, stage.begin, stage.end), "step timing");
    last_step_gpu_ms_ = ms;
  }
  return Status::Ok();
}

}  // namespace qilin
