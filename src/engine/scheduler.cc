#include "engine/scheduler.h"

#include <algorithm>
#include <cassert>

namespace qilin {
namespace {

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

Result<CapacityPolicy> ParseCapacityPolicy(const std::string& name) {
  if (name == "max_utilization") return CapacityPolicy::kMaxUtilization;
  if (name == "guaranteed_no_evict") return CapacityPolicy::kGuaranteedNoEvict;
  return InvalidArgument("unknown capacity policy '{}' (max_utilization, guaranteed_no_evict)",
                         name);
}

Result<BatchingMode> ParseBatchingMode(const std::string& name) {
  if (name == "inflight" || name == "inflight_fused_batching") return BatchingMode::kInflight;
  if (name == "v1" || name == "V1" || name == "static") return BatchingMode::kStaticV1;
  return InvalidArgument("unknown batching mode '{}' (inflight, v1)", name);
}

int32_t SequenceGroup::num_live() const {
  int32_t n = 0;
  for (const auto& s : seqs) n += s->finished ? 0 : 1;
  return n;
}

Scheduler::Scheduler(const SchedulerConfig& config, KvManager* kv) : config_(config), kv_(kv) {}

Status Scheduler::CheckFits(const Request& r) const {
  const int64_t prompt = static_cast<int64_t>(r.prompt.size());
  const SamplingParams& p = r.sampling;
  if (prompt == 0) return InvalidArgument("the prompt is empty (need at least one token)");
  const int64_t total = prompt + p.max_tokens;
  if (total > config_.max_seq_len) {
    return InvalidArgument(
        "prompt ({} tokens) + max_tokens ({}) = {} is over the model length max_seq_len={}", prompt,
        p.max_tokens, total, config_.max_seq_len);
  }
  const int64_t width = std::max(p.n, p.beam_width);
  if (width > config_.max_batch_size) {
    return InvalidArgument("n/beam_width {} is over max_batch_size={}", width,
                           config_.max_batch_size);
  }
  const int64_t blocks = width * CeilDiv(total, kv_->block_size());
  if (blocks > kv_->num_blocks()) {
    return InvalidArgument(
        "request needs {} KV blocks ({} sequence(s) x {} tokens, block size {}) but the whole "
        "KV pool has {} blocks ({} tokens); raise the KV cache size or lower max_tokens",
        blocks, width, total, kv_->block_size(), kv_->num_blocks(),
        static_cast<int64_t>(kv_->num_blocks()) * kv_->block_size());
  }
  if (!config_.enable_chunked_prefill && total > config_.max_num_tokens) {
    return InvalidArgument(
        "prompt + max_tokens = {} is over max_num_tokens={} and chunked prefill is off", total,
        config_.max_num_tokens);
  }
  return Status::Ok();
}

void Scheduler::Add(std::unique_ptr<SequenceGroup> group) {
  SequenceGroup* g = group.get();
  groups_[g->id] = std::move(group);
  waiting_.insert(g);
}

std::unique_ptr<SequenceGroup> Scheduler::Abort(int64_t id) {
  auto it = groups_.find(id);
  if (it == groups_.end()) return nullptr;
  std::unique_ptr<SequenceGroup> g = std::move(it->second);
  groups_.erase(it);
  waiting_.erase(g.get());
  running_.erase(std::remove(running_.begin(), running_.end(), g.get()), running_.end());
  for (auto& s : g->seqs) kv_->Free(&s->kv);
  return g;
}

std::unique_ptr<SequenceGroup> Scheduler::Release(SequenceGroup* group) { return Abort(group->id); }

Sequence* Scheduler::Fork(SequenceGroup* group, const Sequence& parent) {
  auto s = std::make_unique<Sequence>();
  s->index = static_cast<int32_t>(group->seqs.size());
  s->tokens = parent.tokens;
  s->num_computed = parent.num_computed;
  s->cumulative_logprob = parent.cumulative_logprob;
  kv_->Fork(parent.kv, &s->kv);
  group->seqs.push_back(std::move(s));
  return group->seqs.back().get();
}

std::vector<const KvSequence*> Scheduler::AllKvSequences() const {
  std::vector<const KvSequence*> out;
  for (const auto& [id, g] : groups_) {
    for (const auto& s : g->seqs) out.push_back(&s->kv);
  }
  return out;
}

std::vector<int64_t> Scheduler::AllRequestIds() const {
  std::vector<int64_t> out;
  for (const auto& [id, g] : groups_) out.push_back(id);
  return out;
}

int32_t Scheduler::LiveSeqsRunning() const {
  int32_t n = 0;
  for (const SequenceGroup* g : running_) n += g->forked ? g->num_live() : g->width();
  return n;
}

int64_t Scheduler::FutureBlocks(const SequenceGroup& g) const {
  const int64_t bs = kv_->block_size();
  const int64_t final_len =
      std::min<int64_t>(g.prompt_len + g.request.sampling.max_tokens, config_.max_seq_len);
  const int64_t final_blocks = CeilDiv(final_len, bs);
  int64_t need = 0;
  for (const auto& s : g.seqs) {
    if (s->finished) continue;
    const int64_t have = static_cast<int64_t>(s->kv.block_table.size());
    need += std::max<int64_t>(0, final_blocks - have) + (g.forked ? 1 : 0);  // + a CoW copy
  }
  if (!g.forked && g.width() > 1) {
    need += (g.width() - 1) * (final_blocks - g.prompt_len / bs + 1);
  }
  return need;
}

bool Scheduler::ScheduleGroup(SequenceGroup* g, int32_t* budget, SchedulerOutput* out) {
  struct Plan {
    Sequence* seq;
    int32_t n;
    bool sample;
  };
  std::vector<Plan> plan;
  int32_t left = *budget;
  bool beam_ready = g->beam();
  for (const auto& s : g->seqs) {
    if (!s->finished && s->num_computed + 1 != static_cast<int32_t>(s->tokens.size())) {
      beam_ready = false;
    }
  }
  for (const auto& sp : g->seqs) {
    Sequence* s = sp.get();
    if (s->finished || s->final_pending) continue;
    const int32_t len = static_cast<int32_t>(s->tokens.size());
    if (beam_ready) {
      // Beams advance together: their last tokens run (and are sampled) in the same step.
      if (left < g->num_live()) return true;
      plan.push_back({s, 1, true});
      --left;
      continue;
    }
    // Beams prefill up to their last token, which then runs with the other beams'.
    const int32_t target = g->beam() ? len - 1 : len;
    const int32_t rem = target - s->num_computed;
    if (rem <= 0) continue;
    int32_t n = std::min(rem, left);
    if (!config_.enable_chunked_prefill && n < rem) n = 0;
    if (n <= 0) continue;
    plan.push_back({s, n, !g->beam() && s->num_computed + n == len});
    left -= n;
  }
  int64_t need = 0;
  for (const Plan& p : plan) {
    need += kv_->BlocksNeeded(p.seq->kv, p.seq->num_computed, p.seq->num_computed + p.n);
  }
  if (need > kv_->num_free_blocks()) return false;
  for (const Plan& p : plan) {
    const bool ok =
        kv_->Grow(&p.seq->kv, p.seq->num_computed, p.seq->num_computed + p.n, &out->copies);
    assert(ok);
    (void)ok;
    out->seqs.push_back({g, p.seq, p.n, p.sample});
    out->num_tokens += p.n;
    if (p.n > 1 || !p.sample) out->num_prefill_tokens += p.n;
  }
  *budget = left;
  return true;
}

void Scheduler::Preempt(SequenceGroup* g, SchedulerOutput* out) {
  for (auto& s : g->seqs) {
    if (s->finished) continue;
    kv_->Free(&s->kv);
    s->num_computed = 0;
  }
  running_.erase(std::remove(running_.begin(), running_.end(), g), running_.end());
  waiting_.insert(g);
  ++g->num_preemptions;
  ++stats_.num_preemptions;
  out->preempted.push_back(g);
}

SchedulerOutput Scheduler::Schedule() {
  SchedulerOutput out;
  ++stats_.num_steps;
  int32_t budget = config_.max_num_tokens;

  // 1. Running requests, oldest first; preempt the newest when blocks run out.
  size_t i = 0;
  while (i < running_.size() && budget > 0) {
    SequenceGroup* g = running_[i];
    if (ScheduleGroup(g, &budget, &out)) {
      ++i;
      continue;
    }
    SequenceGroup* victim = running_.back();
    Preempt(victim, &out);
    if (victim == g) break;
  }

  // 2. Waiting requests, by priority then arrival; none while preempting (memory is short).
  const bool static_batch = config_.mode == BatchingMode::kStaticV1;
  if (!out.preempted.empty() || (static_batch && !running_.empty())) return out;
  const bool reserve = static_batch || config_.policy == CapacityPolicy::kGuaranteedNoEvict;
  int64_t reserved = 0;
  if (reserve) {
    for (const SequenceGroup* g : running_) reserved += FutureBlocks(*g);
  }
  int32_t batch_seqs = LiveSeqsRunning();
  // A little headroom so that admitting does not immediately force a preemption.
  const int32_t watermark = running_.empty() ? 0 : kv_->num_blocks() / 100;
  const int32_t bs = kv_->block_size();
  while (!waiting_.empty() && budget > 0) {
    SequenceGroup* g = *waiting_.begin();
    const int32_t w = g->forked ? g->num_live() : g->width();
    if (batch_seqs + w > config_.max_batch_size) break;
    std::vector<KvManager::PrefixMatch> matches;
    int64_t need = 0;
    int32_t left = budget;
    bool fits_budget = true;
    for (const auto& s : g->seqs) {
      if (s->finished) {
        matches.emplace_back();
        continue;
      }
      matches.push_back(kv_->FindPrefix(s->tokens));
      const KvManager::PrefixMatch& m = matches.back();
      const int32_t hit = static_cast<int32_t>(m.blocks.size()) * bs;
      const int32_t len = static_cast<int32_t>(s->tokens.size());
      int32_t rem = (g->beam() ? std::max(len - 1, hit) : len) - hit;
      if (rem == 0) rem = 1;  // a beam's last token (runs with the other beams')
      int32_t n = std::min(rem, left);
      if (!config_.enable_chunked_prefill && n < rem) fits_budget = false;
      left -= n;
      need += m.num_revived +
              std::max<int64_t>(0, CeilDiv(hit + n, bs) - static_cast<int64_t>(m.blocks.size()));
    }
    if (!fits_budget) break;
    if (reserve) {
      const int64_t final_len =
          std::min<int64_t>(g->prompt_len + g->request.sampling.max_tokens, config_.max_seq_len);
      const int64_t future = static_cast<int64_t>(w) * CeilDiv(final_len, bs);
      if (reserved + future > kv_->num_free_blocks()) break;
    } else if (need > kv_->num_free_blocks() - watermark) {
      break;
    }
    waiting_.erase(waiting_.begin());
    for (size_t k = 0; k < g->seqs.size(); ++k) {
      Sequence* s = g->seqs[k].get();
      if (s->finished) continue;
      const int32_t full = (static_cast<int32_t>(s->tokens.size()) - 1) / bs;
      s->num_computed = kv_->AcquirePrefix(&s->kv, matches[k], full);
    }
    running_.push_back(g);
    batch_seqs += w;
    if (reserve) reserved += FutureBlocks(*g);
    const bool ok = ScheduleGroup(g, &budget, &out);
    if (!ok) {  // cannot happen (checked above); stay safe: back to waiting
      Preempt(g, &out);
      break;
    }
  }
  return out;
}

}  // namespace qilin
