#include "runtime/tp_cpu_backend.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>

#include "common/meminfo.h"
#include "kernels/cpu/attention.h"
#include "kernels/cpu/elementwise.h"
#include "kernels/cpu/linear.h"
#include "kernels/cpu/rope.h"
#include "kernels/cpu/simd.h"
#include "runtime/comm_batch.h"
#include "runtime/cpu_backend.h"
#include "runtime/host_kv_cache.h"
#include "runtime/rope_tables.h"
#include "runtime/tp_driver.h"
#include "runtime/validate_batch.h"

namespace qilin {

namespace {

using cpu::WeightRef;

WeightRef Ref(const TensorView& t) { return WeightRef{t.dtype, t.data}; }

}  // namespace

struct TpCpuBackend::Rank : TpRankWorker {
  const ModelConfig* full = nullptr;  // the whole model's config (the backend's)
  ShardPlan plan;
  ModelConfig local;  // the rank's heads, KV heads and MLP width
  ModelWeights w;
  std::unique_ptr<Communicator> comm;
  cpu::RopeFreqs base_freqs;

  int32_t block_size = 0;
  HostKvCache kv;  // this rank's KV heads

  // Activations, reused across steps.
  std::vector<float> x, h, q, k, v, attn, gate, up, partial, rope_cos, rope_sin, logn, rows,
      local_logits, gathered;

  Status AllocateKv(int32_t num_blocks, int32_t block_size) override;
  Status CopyKv(const std::vector<std::pair<int32_t, int32_t>>& src_dst) override;
  Status Forward(const ForwardBatch& batch, std::vector<float>* logits) override;
  void ComputeRope(const ModelConfig& c, const ForwardBatch& b);
};

Status TpCpuBackend::Rank::AllocateKv(int32_t num_blocks, int32_t bs) {
  const ModelConfig& c = *full;
  const int64_t slots = static_cast<int64_t>(num_blocks) * bs;
  const int64_t kvs = local.kv_size();
  block_size = bs;
  if (!kv.Allocate(c.num_layers, slots, kvs)) {
    return ResourceExhausted(
        "KV cache of tensor parallel rank {}: cannot allocate {} blocks of {} tokens ({:.2f} GiB)",
        plan.rank, num_blocks, bs, 2.0 * c.num_layers * slots * kvs * 4 / 1073741824.0);
  }
  return Status::Ok();
}

// Followers get the pairs over the wire: checked here against this rank's own pool.
Status TpCpuBackend::Rank::CopyKv(const std::vector<std::pair<int32_t, int32_t>>& src_dst) {
  const int32_t blocks = block_size > 0 ? static_cast<int32_t>(kv.slots / block_size) : 0;
  QILIN_RETURN_IF_ERROR(ValidateBlockPairs(src_dst, KvCacheLayout{blocks, block_size}));
  kv.CopyBlocks(src_dst, block_size);
  return Status::Ok();
}

void TpCpuBackend::Rank::ComputeRope(const ModelConfig& c, const ForwardBatch& b) {
  BatchRopeTables(c, base_freqs, b, &rope_cos, &rope_sin);
}

// One rank's share of a step. Collectives per step: 1 (embedding) + 2 per layer + 1 gather.
Status TpCpuBackend::Rank::Forward(const ForwardBatch& batch, std::vector<float>* logits) {
  const ModelConfig& c = *full;
  const int64_t n = batch.num_tokens();
  const int64_t m = static_cast<int64_t>(batch.logits_indices.size());
  const int64_t H = c.hidden_size, hd = c.head_dim, half = hd / 2;
  const int64_t nq = plan.num_heads, nkv = plan.num_kv_heads;
  const int64_t qs = nq * hd, kvs = nkv * hd, I = plan.intermediate_size;
  const int64_t vpr = plan.vocab_per_rank, vrows = plan.vocab_rows();
  const float eps = static_cast<float>(c.rms_norm_eps);
  x.resize(n * H);
  h.resize(n * H);
  partial.resize(n * H);
  q.resize(n * qs);
  k.resize(n * kvs);
  v.resize(n * kvs);
  attn.resize(n * qs);
  gate.resize(n * I);
  up.resize(n * I);
  rows.resize(m * H);
  local_logits.resize(m * vpr);
  gathered.resize(plan.world_size * m * vpr);

  // Vocab-parallel embedding: the rank owning a token's row writes it, the others zeros.
  for (int64_t t = 0; t < n; ++t) {
    const int32_t id = batch.token_ids[t];
    if (id >= plan.vocab_begin && id < plan.vocab_end) {
      const int32_t local_id = static_cast<int32_t>(id - plan.vocab_begin);
      cpu::EmbeddingGather(Ref(w.embed_tokens), H, &local_id, 1, &x[t * H]);
    } else {
      std::fill_n(&x[t * H], H, 0.0f);
    }
  }
  QILIN_RETURN_IF_ERROR(comm->AllReduceSum(x.data(), n * H));

  ComputeRope(c, batch);
  logn.assign(c.use_logn_attn ? n : 0, 1.0f);
  for (int64_t t = 0; t < static_cast<int64_t>(logn.size()); ++t)
    logn[t] = static_cast<float>(QwenV1LognScale(c, batch.positions[t]));
  cpu::PagedAttentionBatch pab;
  pab.num_seqs = batch.num_seqs();
  pab.query_start = batch.query_start.data();
  pab.positions = batch.positions.data();
  pab.block_tables = batch.block_tables.data();
  pab.max_blocks_per_seq = batch.max_blocks_per_seq;
  pab.block_size = block_size;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));

  auto linear = [&](const float* in_rows, int64_t in, const TensorView& wt, int64_t out,
                    const TensorView& bias, float* y) {
    cpu::LinearSlice({in_rows, in, n, in, Ref(wt), in, 0, 0, out, Ref(bias), y, out});
  };
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const LayerWeights& lw = w.layers[l];
    cpu::RmsNormSerial(x.data(), n, H, Ref(lw.input_norm), eps, h.data());
    linear(h.data(), H, lw.q_proj, qs, lw.q_bias, q.data());
    linear(h.data(), H, lw.k_proj, kvs, lw.k_bias, k.data());
    linear(h.data(), H, lw.v_proj, kvs, lw.v_bias, v.data());
    for (int64_t t = 0; t < n; ++t) {
      float* qt = &q[t * qs];
      float* kt = &k[t * kvs];
      if (c.qk_norm) {
        cpu::RmsNormSerial(qt, nq, hd, Ref(lw.q_norm), eps, qt);
        cpu::RmsNormSerial(kt, nkv, hd, Ref(lw.k_norm), eps, kt);
      }
      cpu::ApplyRope(qt, nq, hd, &rope_cos[t * half], &rope_sin[t * half]);
      cpu::ApplyRope(kt, nkv, hd, &rope_cos[t * half], &rope_sin[t * half]);
      if (!logn.empty() && logn[t] != 1.0f) {
        for (int64_t i = 0; i < qs; ++i) qt[i] *= logn[t];
      }
    }
    cpu::WriteKvCache(k.data(), v.data(), n, kvs, batch.slot_mapping.data(), kv.k[l].data(),
                      kv.v[l].data());
    cpu::PagedAttentionHeads(q.data(), kv.k[l].data(), kv.v[l].data(), pab, nq, nkv, hd, scale, 0,
                             nq, attn.data());
    // o_proj over this rank's heads: a partial sum of the full output.
    linear(attn.data(), qs, lw.o_proj, H, TensorView{}, partial.data());
    QILIN_RETURN_IF_ERROR(comm->AllReduceSum(partial.data(), n * H));
    cpu::AddInPlace(x.data(), partial.data(), n * H);
    if (!lw.o_bias.empty()) {
      for (int64_t t = 0; t < n; ++t)
        for (int64_t j = 0; j < H; ++j)
          x[t * H + j] += cpu::LoadScalar(lw.o_bias.dtype, lw.o_bias.data, j);
    }

    cpu::RmsNormSerial(x.data(), n, H, Ref(lw.post_attention_norm), eps, h.data());
    linear(h.data(), H, lw.gate_proj, I, TensorView{}, gate.data());
    linear(h.data(), H, lw.up_proj, I, TensorView{}, up.data());
    cpu::SiluMulSerial(gate.data(), up.data(), n * I, gate.data());
    linear(gate.data(), I, lw.down_proj, H, TensorView{}, partial.data());
    QILIN_RETURN_IF_ERROR(comm->AllReduceSum(partial.data(), n * H));
    cpu::AddInPlace(x.data(), partial.data(), n * H);
  }

  // Final norm on the sampled rows; this rank's vocabulary columns; padding columns -inf.
  for (int64_t i = 0; i < m; ++i) {
    std::copy_n(&x[static_cast<int64_t>(batch.logits_indices[i]) * H], H, &rows[i * H]);
  }
  cpu::RmsNormSerial(rows.data(), m, H, Ref(w.final_norm), eps, rows.data());
  if (vrows > 0 && m > 0) {
    cpu::LinearSlice(
        {rows.data(), H, m, H, Ref(w.lm_head), H, 0, 0, vrows, {}, local_logits.data(), vpr});
  }
  for (int64_t i = 0; i < m; ++i) {
    std::fill(local_logits.data() + i * vpr + vrows, local_logits.data() + (i + 1) * vpr,
              -std::numeric_limits<float>::infinity());
  }
  // Only rank 0 returns logits: the other ranks send theirs and get nothing back.
  QILIN_RETURN_IF_ERROR(comm->GatherTo0(local_logits.data(), m * vpr, gathered.data()));
  if (logits != nullptr) {
    const int64_t V = c.vocab_size;
    logits->resize(m * V);
    for (int64_t r = 0; r < plan.world_size; ++r) {
      const int64_t v0 = r * vpr, v1 = std::min(V, v0 + vpr);
      for (int64_t i = 0; i < m && v1 > v0; ++i) {
        std::copy_n(&gathered[(r * m + i) * vpr], v1 - v0, &(*logits)[i * V + v0]);
      }
    }
  }
  return Status::Ok();
}

TpCpuBackend::TpCpuBackend(const ModelConfig& config) : TpLeaderBackend(config) {}

Result<std::unique_ptr<TpCpuBackend::Rank>> TpCpuBackend::MakeRank(const ModelConfig* config,
                                                                   const ModelWeights& weights,
                                                                   int tp, int r) {
  auto rank = std::make_unique<Rank>();
  rank->full = config;
  QILIN_ASSIGN_OR_RETURN(rank->plan, MakeShardPlan(*config, tp, r));
  rank->local = ShardedLayerConfig(*config, rank->plan);
  QILIN_ASSIGN_OR_RETURN(rank->w, ShardWeights(weights, *config, rank->plan));
  rank->base_freqs = cpu::ComputeRopeFreqs(*config, 0, 1.0);
  return rank;
}

Status TpCpuBackend::CheckModel(const ModelConfig& config, const ModelWeights& weights, int tp) {
  QILIN_RETURN_IF_ERROR(CheckShardable(config, tp));
  // The unsharded CPU backend's checks of the config and of every tensor (views only).
  return CpuBackend::Create(config, weights).status();
}

Status TpCpuBackend::SetPlans(int tp) {
  for (int r = 0; r < tp; ++r) {
    QILIN_ASSIGN_OR_RETURN(ShardPlan plan, MakeShardPlan(config_, tp, r));
    plans_.push_back(plan);
  }
  return Status::Ok();
}

Result<std::unique_ptr<TpCpuBackend>> TpCpuBackend::Create(const ModelConfig& config,
                                                           const ModelWeights& weights, int tp) {
  QILIN_RETURN_IF_ERROR(CheckModel(config, weights, tp));
  QILIN_ASSIGN_OR_RETURN(std::shared_ptr<InProcessCommGroup> group, InProcessCommGroup::Create(tp));
  std::unique_ptr<TpCpuBackend> b(new TpCpuBackend(config));
  QILIN_RETURN_IF_ERROR(b->SetPlans(tp));
  for (int r = 0; r < tp; ++r) {
    QILIN_ASSIGN_OR_RETURN(std::unique_ptr<Rank> rank, MakeRank(&b->config_, weights, tp, r));
    QILIN_ASSIGN_OR_RETURN(rank->comm, group->Rank(r));
    b->ranks_.push_back(std::move(rank));
  }
  b->group_ = group;
  // Ranks 1..N-1 follow rank 0's broadcasts until it shuts them down or the group fails.
  for (int r = 1; r < tp; ++r) {
    b->threads_.emplace_back([rank = b->ranks_[r].get()] { (void)TpFollow(*rank->comm, *rank); });
  }
  b->lead_comm_ = b->ranks_[0]->comm.get();
  b->lead_worker_ = b->ranks_[0].get();
  return b;
}

Result<std::unique_ptr<TpCpuBackend>> TpCpuBackend::CreateLeader(
    const ModelConfig& config, const ModelWeights& weights, std::unique_ptr<Communicator> comm) {
  if (comm->rank() != 0) {
    return InvalidArgument("tensor parallel: the leader must be rank 0, not {}", comm->rank());
  }
  const int tp = comm->world_size();
  QILIN_RETURN_IF_ERROR(TpCheckSameModel(*comm, config));
  std::unique_ptr<TpCpuBackend> b(new TpCpuBackend(config));
  Status made = CheckModel(config, weights, tp);
  if (made.ok()) made = b->SetPlans(tp);
  Result<std::unique_ptr<Rank>> rank =
      made.ok() ? MakeRank(&b->config_, weights, tp, 0) : Result<std::unique_ptr<Rank>>(made);
  // Every rank has made its shard (or says why not) before the first call.
  QILIN_RETURN_IF_ERROR(TpExchangeStatus(*comm, rank.status()));
  (*rank)->comm = std::move(comm);
  b->ranks_.push_back(std::move(rank).value());
  b->followers_elsewhere_ = true;
  b->lead_comm_ = b->ranks_[0]->comm.get();
  b->lead_worker_ = b->ranks_[0].get();
  return b;
}

Status TpCpuBackend::Follow(const ModelConfig& config, const ModelWeights& weights,
                            std::unique_ptr<Communicator> comm) {
  QILIN_RETURN_IF_ERROR(TpCheckSameModel(*comm, config));
  Status made = CheckModel(config, weights, comm->world_size());
  Result<std::unique_ptr<Rank>> rank =
      made.ok() ? MakeRank(&config, weights, comm->world_size(), comm->rank())
                : Result<std::unique_ptr<Rank>>(made);
  QILIN_RETURN_IF_ERROR(TpExchangeStatus(*comm, rank.status()));
  (*rank)->comm = std::move(comm);
  return TpFollow(*(*rank)->comm, **rank);
}

Result<std::unique_ptr<TpCpuBackend>> TpCpuBackend::Load(const ModelConfig& config,
                                                         const std::filesystem::path& model_dir,
                                                         int tp) {
  QILIN_RETURN_IF_ERROR(CheckShardable(config, tp));
  // Maps the files and checks the headers; each rank's shard then reads only its slices.
  QILIN_ASSIGN_OR_RETURN(ModelWeights full, LoadModelWeights(config, model_dir));
  return Create(config, full, tp);
}

TpCpuBackend::~TpCpuBackend() { StopFollowers(); }

const ModelWeights& TpCpuBackend::shard(int rank) const { return ranks_.at(rank)->w; }

int64_t TpCpuBackend::KvBytesPerToken() const {
  int64_t total = 0;
  for (const ShardPlan& p : plans_) {
    total += config_.num_layers * 2 * ShardedLayerConfig(config_, p).kv_size() * 4;
  }
  return total;
}

Result<int32_t> TpCpuBackend::ProposeNumKvBlocks(int32_t block_size, double memory_fraction,
                                                 int32_t max_num_tokens) const {
  QILIN_RETURN_IF_ERROR(ValidateKvProposal(block_size, memory_fraction, max_num_tokens));
  QILIN_ASSIGN_OR_RETURN(int64_t avail, MemAvailableBytes());
  // Activations of one step on every rank: x, h, partial, q, k, v, attn, gate, up per token, the
  // rank's logits and the gathered ones per row.
  int64_t per_token = 0;
  for (const ShardPlan& p : plans_) {
    const ModelConfig l = ShardedLayerConfig(config_, p);
    per_token += 4 * config_.hidden_size + 2 * l.q_size() + 2 * l.kv_size() +
                 2 * l.intermediate_size + (tp() + 1) * p.vocab_per_rank;
  }
  const int64_t activations = static_cast<int64_t>(max_num_tokens) * per_token * 4;
  const double budget = static_cast<double>(avail) * memory_fraction - activations;
  const double block_bytes = static_cast<double>(KvBytesPerToken()) * block_size;
  const double blocks = std::floor(budget / block_bytes);
  if (blocks < 1) {
    return ResourceExhausted(
        "KV cache: {} of {:.2f} GiB available host memory leaves no room for one block of {} "
        "tokens ({:.1f} MiB over {} ranks) after {:.2f} GiB of activations",
        memory_fraction, avail / 1073741824.0, block_size, block_bytes / 1048576.0, tp(),
        activations / 1073741824.0);
  }
  return static_cast<int32_t>(std::min<double>(blocks, INT32_MAX));
}

}  // namespace qilin
