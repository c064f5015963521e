#include "runtime/cpu_backend.h"

#include <algorithm>
#include <cmath>
#include <map>

#include <omp.h>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "common/meminfo.h"
#include "kernels/cpu/attention.h"
#include "kernels/cpu/elementwise.h"
#include "kernels/cpu/linear.h"
#include "kernels/cpu/simd.h"
#include "model/weight_checks.h"
#include "runtime/rope_tables.h"
#include "runtime/validate_batch.h"

namespace qilin {
namespace {

using cpu::WeightRef;

WeightRef Ref(const TensorView& t) { return WeightRef{t.dtype, t.data}; }

}  // namespace

CpuBackend::CpuBackend(const ModelConfig& config, ModelWeights weights)
    : config_(config), weights_(std::move(weights)) {
  base_freqs_ = cpu::ComputeRopeFreqs(config_, 0, 1.0);
}

Result<std::unique_ptr<CpuBackend>> CpuBackend::Create(const ModelConfig& config,
                                                       ModelWeights weights) {
  QILIN_RETURN_IF_ERROR(CheckBackendConfig(config));
  const int64_t h = config.hidden_size, q = config.q_size(), kv = config.kv_size();
  const int64_t inter = config.intermediate_size, d = config.head_dim;
  QILIN_RETURN_IF_ERROR(
      CheckWeightTensor(weights.embed_tokens, "embed_tokens", {config.vocab_size, h}, "CPU"));
  QILIN_RETURN_IF_ERROR(CheckWeightTensor(weights.final_norm, "final_norm", {h}, "CPU"));
  QILIN_RETURN_IF_ERROR(
      CheckWeightTensor(weights.lm_head, "lm_head", {config.vocab_size, h}, "CPU"));
  if (static_cast<int64_t>(weights.layers.size()) != config.num_layers) {
    return InvalidArgument("weights: {} layers, but num_hidden_layers = {}", weights.layers.size(),
                           config.num_layers);
  }
  for (int64_t i = 0; i < config.num_layers; ++i) {
    const LayerWeights& l = weights.layers[i];
    auto check = [&](const TensorView& t, const char* name, std::vector<int64_t> shape) {
      return CheckWeightTensor(t, fmt::format("layers.{}.{}", i, name), shape, "CPU");
    };
    QILIN_RETURN_IF_ERROR(check(l.input_norm, "input_norm", {h}));
    QILIN_RETURN_IF_ERROR(check(l.q_proj, "q_proj", {q, h}));
    QILIN_RETURN_IF_ERROR(check(l.k_proj, "k_proj", {kv, h}));
    QILIN_RETURN_IF_ERROR(check(l.v_proj, "v_proj", {kv, h}));
    if (config.attention_bias) {
      QILIN_RETURN_IF_ERROR(check(l.q_bias, "q_bias", {q}));
      QILIN_RETURN_IF_ERROR(check(l.k_bias, "k_bias", {kv}));
      QILIN_RETURN_IF_ERROR(check(l.v_bias, "v_bias", {kv}));
    }
    if (config.qk_norm) {
      QILIN_RETURN_IF_ERROR(check(l.q_norm, "q_norm", {d}));
      QILIN_RETURN_IF_ERROR(check(l.k_norm, "k_norm", {d}));
    }
    QILIN_RETURN_IF_ERROR(check(l.o_proj, "o_proj", {h, q}));
    if (config.o_bias) QILIN_RETURN_IF_ERROR(check(l.o_bias, "o_bias", {h}));
    QILIN_RETURN_IF_ERROR(check(l.post_attention_norm, "post_attention_norm", {h}));
    QILIN_RETURN_IF_ERROR(check(l.gate_proj, "gate_proj", {inter, h}));
    QILIN_RETURN_IF_ERROR(check(l.up_proj, "up_proj", {inter, h}));
    QILIN_RETURN_IF_ERROR(check(l.down_proj, "down_proj", {h, inter}));
  }
  return std::unique_ptr<CpuBackend>(new CpuBackend(config, std::move(weights)));
}

int64_t CpuBackend::KvBytesPerToken() const {
  return config_.num_layers * 2 * config_.kv_size() * static_cast<int64_t>(sizeof(float));
}

Result<int32_t> CpuBackend::ProposeNumKvBlocks(int32_t block_size, double memory_fraction,
                                               int32_t max_num_tokens) const {
  QILIN_RETURN_IF_ERROR(ValidateKvProposal(block_size, memory_fraction, max_num_tokens));
  QILIN_ASSIGN_OR_RETURN(int64_t avail, MemAvailableBytes());
  const ModelConfig& c = config_;
  // Activations of one step: per thread x, h and two partial sums; shared q, k, v, attn, gate, up;
  // logits for every row.
  const int64_t per_token = 4 * c.hidden_size * omp_get_max_threads() + 2 * c.q_size() +
                            2 * c.kv_size() + 2 * c.intermediate_size + c.vocab_size;
  const int64_t activations = static_cast<int64_t>(max_num_tokens) * per_token * 4;
  const double budget = static_cast<double>(avail) * memory_fraction - activations;
  const double block_bytes = static_cast<double>(KvBytesPerToken()) * block_size;
  const double blocks = std::floor(budget / block_bytes);
  if (blocks < 1) {
    return ResourceExhausted(
        "KV cache: {} of {:.2f} GiB available host memory leaves no room for one block of {} "
        "tokens ({:.1f} MiB) after {:.2f} GiB of activations",
        memory_fraction, avail / 1073741824.0, block_size, block_bytes / 1048576.0,
        activations / 1073741824.0);
  }
  return static_cast<int32_t>(std::min<double>(blocks, INT32_MAX));
}

Status CpuBackend::AllocateKvCache(const KvCacheLayout& layout) {
  if (layout.block_size <= 0 || layout.num_blocks <= 0) {
    return InvalidArgument("KV cache layout: num_blocks = {} and block_size = {} must be positive",
                           layout.num_blocks, layout.block_size);
  }
  const int64_t slots = static_cast<int64_t>(layout.num_blocks) * layout.block_size;
  const double bytes = static_cast<double>(slots) * KvBytesPerToken();
  layout_ = KvCacheLayout{0, layout.block_size};
  if (!kv_.Allocate(config_.num_layers, slots, config_.kv_size())) {
    return ResourceExhausted("KV cache: cannot allocate {} blocks of {} tokens ({:.2f} GiB)",
                             layout.num_blocks, layout.block_size, bytes / 1073741824.0);
  }
  layout_ = layout;
  return Status::Ok();
}

Status CpuBackend::CopyKvBlocks(const std::vector<std::pair<int32_t, int32_t>>& src_dst) {
  QILIN_RETURN_IF_ERROR(ValidateBlockPairs(src_dst, layout_));
  kv_.CopyBlocks(src_dst, layout_.block_size);
  return Status::Ok();
}

Status CpuBackend::ValidateBatch(const ForwardBatch& b) const {
  return ValidateForwardBatch(b, config_, layout_);
}

void CpuBackend::ComputeRope(const ForwardBatch& b) {
  BatchRopeTables(config_, base_freqs_, b, &rope_cos_, &rope_sin_);
}

namespace {

// [begin, end) of part `i` of `parts` when `total` units are split as evenly as possible.
std::pair<int64_t, int64_t> Share(int64_t total, int64_t parts, int64_t i) {
  return {total * i / parts, total * (i + 1) / parts};
}

// Multiply-adds per token of one layer's matrices.
int64_t LayerMacsPerToken(const ModelConfig& c) {
  return c.hidden_size * (2 * c.q_size() + 2 * c.kv_size() + 3 * c.intermediate_size);
}

}  // namespace

int CpuBackend::ThreadsFor(int64_t macs_per_barrier) const {
  const int64_t max_threads = omp_get_max_threads();
  if (min_macs_per_thread_ <= 0) return static_cast<int>(max_threads);
  return static_cast<int>(
      std::clamp<int64_t>(macs_per_barrier / min_macs_per_thread_, 1, max_threads));
}

int CpuBackend::LayerThreads(int64_t num_tokens) const {
  return ThreadsFor(num_tokens * LayerMacsPerToken(config_) / 2);  // two barriers per layer
}

// One step runs in one OpenMP region: the layers split as tensor parallelism does across GPUs.
// Thread t owns a contiguous range of query heads (and the KV heads they read when the split
// allows it), a range of MLP rows, and a range of lm_head rows; it runs q/k/v, rope, the cache
// write and attention for its heads, then o_proj over its heads' columns (a partial sum); after a
// barrier every thread adds all partials to its own copy of the residual in the same order, so the
// copies stay identical. The MLP is the same with gate/up rows and down_proj columns. Two
// barriers per layer (three when KV heads cannot follow the query-head split), each thread
// streams only its own weight rows/columns: decode is bound by weight bytes / bandwidth.
Status CpuBackend::Forward(const ForwardBatch& batch, std::vector<float>* logits) {
  QILIN_RETURN_IF_ERROR(ValidateBatch(batch));
  const ModelConfig& c = config_;
  const int64_t n = batch.num_tokens();
  const int64_t hid = c.hidden_size, qs = c.q_size(), kvs = c.kv_size(), hd = c.head_dim;
  const int64_t inter = c.intermediate_size, heads = c.num_heads, kv_heads = c.num_kv_heads;
  const float eps = static_cast<float>(c.rms_norm_eps);
  const int64_t m = static_cast<int64_t>(batch.logits_indices.size());
  const int layer_threads = LayerThreads(n);
  const int head_threads = ThreadsFor(m * c.vocab_size * hid);
  const int max_threads = std::max(layer_threads, head_threads);

  q_.resize(n * qs);
  k_.resize(n * kvs);
  v_.resize(n * kvs);
  attn_.resize(n * qs);
  gate_.resize(n * inter);
  up_.resize(n * inter);
  for (auto* per_thread : {&x_, &h_, &partial_[0], &partial_[1]}) {
    if (static_cast<int>(per_thread->size()) < max_threads) per_thread->resize(max_threads);
  }
  for (int t = 0; t < layer_threads; ++t) {
    x_[t].resize(n * hid);
    h_[t].resize(std::max(n, m) * hid);  // h_[0] also holds the m rows for lm_head
    if (layer_threads > 1) {
      partial_[0][t].resize(n * hid);
      partial_[1][t].resize(n * hid);
    }
  }
  logits->resize(m * c.vocab_size);

  ComputeRope(batch);
  const int64_t half = hd / 2;
  logn_.assign(c.use_logn_attn ? n : 0, 1.0f);
  for (int64_t t = 0; t < static_cast<int64_t>(logn_.size()); ++t)
    logn_[t] = static_cast<float>(QwenV1LognScale(c, batch.positions[t]));
  cpu::PagedAttentionBatch pab;
  pab.num_seqs = batch.num_seqs();
  pab.query_start = batch.query_start.data();
  pab.positions = batch.positions.data();
  pab.block_tables = batch.block_tables.data();
  pab.max_blocks_per_seq = batch.max_blocks_per_seq;
  pab.block_size = layout_.block_size;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));

#pragma omp parallel num_threads(layer_threads)
  {
    const int nt = omp_get_num_threads(), tid = omp_get_thread_num();
    // Query heads [h0, h1); KV heads [g0, g1) written by this thread; the KV heads its query
    // heads read are [h0 / group, ceil(h1 / group)). When those are its own for every thread,
    // attention needs no barrier after the cache write.
    const auto [h0, h1] = Share(heads, nt, tid);
    const auto [g0, g1] = Share(kv_heads, nt, tid);
    const bool kv_aligned = kv_heads % nt == 0;
    const auto [i0u, i1u] = Share((inter + 7) / 8, nt, tid);  // MLP rows in units of 8
    const int64_t i0 = std::min(inter, i0u * 8), i1 = std::min(inter, i1u * 8);
    float* x = x_[tid].data();
    float* h = h_[tid].data();
    // Residual add: x += sum over threads of their partials, in thread order on every thread.
    auto reduce = [&](int which, WeightRef bias) {
      for (int s = 0; s < nt; ++s) {
        const float* p = partial_[which][s].data();
        cpu::AddInPlace(x, p, n * hid);
      }
      if (bias.data != nullptr) {
        for (int64_t t = 0; t < n; ++t)
          for (int64_t j = 0; j < hid; ++j)
            x[t * hid + j] += cpu::LoadScalar(bias.dtype, bias.data, j);
      }
    };
    cpu::EmbeddingGather(Ref(weights_.embed_tokens), hid, batch.token_ids.data(), n, x);
    for (int64_t l = 0; l < c.num_layers; ++l) {
      const LayerWeights& w = weights_.layers[l];
      cpu::RmsNormSerial(x, n, hid, Ref(w.input_norm), eps, h);
      auto slice = [&](WeightRef wt, int64_t in, int64_t ldw, int64_t k0, int64_t o0, int64_t o1,
                       WeightRef bias, const float* xin, int64_t ldx, float* y, int64_t ldy) {
        cpu::LinearSlice({xin, ldx, n, in, wt, ldw, k0, o0, o1, bias, y, ldy});
      };
      slice(Ref(w.q_proj), hid, hid, 0, h0 * hd, h1 * hd, Ref(w.q_bias), h, hid, &q_[h0 * hd], qs);
      slice(Ref(w.k_proj), hid, hid, 0, g0 * hd, g1 * hd, Ref(w.k_bias), h, hid, &k_[g0 * hd], kvs);
      slice(Ref(w.v_proj), hid, hid, 0, g0 * hd, g1 * hd, Ref(w.v_bias), h, hid, &v_[g0 * hd], kvs);
      for (int64_t t = 0; t < n; ++t) {
        float* qt = &q_[t * qs + h0 * hd];
        float* kt = &k_[t * kvs + g0 * hd];
        if (c.qk_norm) {
          cpu::RmsNormSerial(qt, h1 - h0, hd, Ref(w.q_norm), eps, qt);
          cpu::RmsNormSerial(kt, g1 - g0, hd, Ref(w.k_norm), eps, kt);
        }
        const float* cs = &rope_cos_[t * half];
        const float* sn = &rope_sin_[t * half];
        cpu::ApplyRope(qt, h1 - h0, hd, cs, sn);
        cpu::ApplyRope(kt, g1 - g0, hd, cs, sn);
        if (!logn_.empty() && logn_[t] != 1.0f) {
          for (int64_t i = 0; i < (h1 - h0) * hd; ++i) qt[i] *= logn_[t];
        }
        const int64_t slot = batch.slot_mapping[t];
        std::copy_n(kt, (g1 - g0) * hd, &kv_.k[l][slot * kvs + g0 * hd]);
        std::copy_n(&v_[t * kvs + g0 * hd], (g1 - g0) * hd, &kv_.v[l][slot * kvs + g0 * hd]);
      }
      if (!kv_aligned) {
#pragma omp barrier
      }
      cpu::PagedAttentionHeads(q_.data(), kv_.k[l].data(), kv_.v[l].data(), pab, heads, kv_heads,
                               hd, scale, h0, h1, attn_.data());
      if (nt == 1) {
        // One thread: o_proj straight into h, then the residual add (no partials).
        slice(Ref(w.o_proj), qs, qs, 0, 0, hid, Ref(w.o_bias), attn_.data(), qs, h, hid);
        cpu::AddInPlace(x, h, n * hid);
      } else {
        float* p = partial_[0][tid].data();
        if (h1 > h0) {
          slice(Ref(w.o_proj), (h1 - h0) * hd, qs, h0 * hd, 0, hid, {}, &attn_[h0 * hd], qs, p,
                hid);
        } else {
          std::fill_n(p, n * hid, 0.0f);
        }
#pragma omp barrier
        reduce(0, Ref(w.o_bias));
      }
      cpu::RmsNormSerial(x, n, hid, Ref(w.post_attention_norm), eps, h);
      slice(Ref(w.gate_proj), hid, hid, 0, i0, i1, {}, h, hid, &gate_[i0], inter);
      slice(Ref(w.up_proj), hid, hid, 0, i0, i1, {}, h, hid, &up_[i0], inter);
      for (int64_t t = 0; t < n; ++t)
        cpu::SiluMulSerial(&gate_[t * inter + i0], &up_[t * inter + i0], i1 - i0,
                           &gate_[t * inter + i0]);
      if (nt == 1) {
        slice(Ref(w.down_proj), inter, inter, 0, 0, hid, {}, gate_.data(), inter, h, hid);
        cpu::AddInPlace(x, h, n * hid);
      } else {
        float* p = partial_[1][tid].data();
        if (i1 > i0) {
          slice(Ref(w.down_proj), i1 - i0, inter, i0, 0, hid, {}, &gate_[i0], inter, p, hid);
        } else {
          std::fill_n(p, n * hid, 0.0f);
        }
#pragma omp barrier
        reduce(1, {});
      }
    }
  }

  // Final norm and lm_head on the sampled rows only, lm_head rows split over the threads.
  float* rows = h_[0].data();  // n >= m rows of room; thread 0's x holds the final residual
  for (int64_t i = 0; i < m; ++i) {
    std::copy_n(&x_[0][static_cast<int64_t>(batch.logits_indices[i]) * hid], hid, &rows[i * hid]);
  }
  cpu::RmsNormSerial(rows, m, hid, Ref(weights_.final_norm), eps, rows);
#pragma omp parallel num_threads(head_threads)
  {
    const int nt = omp_get_num_threads(), tid = omp_get_thread_num();
    const auto [u0, u1] = Share((c.vocab_size + 15) / 16, nt, tid);
    const int64_t o0 = std::min(c.vocab_size, u0 * 16), o1 = std::min(c.vocab_size, u1 * 16);
    cpu::LinearSlice({rows,
                      hid,
                      m,
                      hid,
                      Ref(weights_.lm_head),
                      hid,
                      0,
                      o0,
                      o1,
                      {},
                      logits->data() + o0,
                      c.vocab_size});
  }
  return Status::Ok();
}

}  // namespace qilin
