#include "engine/engine.h"

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <random>

#include <spdlog/spdlog.h>

namespace qilin {

const char* FinishReasonName(FinishReason reason) {
  switch (reason) {
    case FinishReason::kNone:
      return "";
    case FinishReason::kStop:
      return "stop";
    case FinishReason::kLength:
      return "length";
    case FinishReason::kAbort:
      return "abort";
  }
  return "";
}

namespace {

int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

Status ValidateParams(const SamplingParams& p, int32_t vocab) {
  if (!(p.temperature >= 0.0f) || !std::isfinite(p.temperature)) {
    return InvalidArgument("temperature {} must be a finite number >= 0", p.temperature);
  }
  if (p.top_k < 0) return InvalidArgument("top_k {} must be >= 0 (0: off)", p.top_k);
  if (!(p.top_p > 0.0f && p.top_p <= 1.0f)) {
    return InvalidArgument("top_p {} must be in (0, 1]", p.top_p);
  }
  if (!(p.min_p >= 0.0f && p.min_p <= 1.0f)) {
    return InvalidArgument("min_p {} must be in [0, 1]", p.min_p);
  }
  if (!(p.repetition_penalty > 0.0f) || !std::isfinite(p.repetition_penalty)) {
    return InvalidArgument("repetition_penalty {} must be > 0", p.repetition_penalty);
  }
  if (!std::isfinite(p.presence_penalty) || std::fabs(p.presence_penalty) > 2.0f) {
    return InvalidArgument("presence_penalty {} must be in [-2, 2]", p.presence_penalty);
  }
  if (!std::isfinite(p.frequency_penalty) || std::fabs(p.frequency_penalty) > 2.0f) {
    return InvalidArgument("frequency_penalty {} must be in [-2, 2]", p.frequency_penalty);
  }
  if (p.max_tokens < 1) return InvalidArgument("max_tokens {} must be >= 1", p.max_tokens);
  if (p.min_tokens < 0 || p.min_tokens > p.max_tokens) {
    return InvalidArgument("min_tokens {} must be in [0, max_tokens={}]", p.min_tokens,
                           p.max_tokens);
  }
  if (p.logprobs < -1 || p.logprobs > 20) {
    return InvalidArgument("logprobs {} must be in [0, 20] (or -1: none)", p.logprobs);
  }
  if (p.n < 1) return InvalidArgument("n {} must be >= 1", p.n);
  if (p.beam_width < 1) return InvalidArgument("beam_width {} must be >= 1", p.beam_width);
  if (p.beam_width > 1 && p.n > p.beam_width) {
    return InvalidArgument("n {} must be <= beam_width {} with beam search", p.n, p.beam_width);
  }
  if (!std::isfinite(p.length_penalty)) {
    return InvalidArgument("length_penalty {} must be finite", p.length_penalty);
  }
  for (int32_t t : p.stop_token_ids) {
    if (t < 0 || t >= vocab) {
      return InvalidArgument("stop_token_ids: token id {} is outside the vocabulary [0, {})", t,
                             vocab);
    }
  }
  for (const auto& w : p.bad_words) {
    if (w.empty()) return InvalidArgument("bad_words: an entry is empty");
    for (int32_t t : w) {
      if (t < 0 || t >= vocab) {
        return InvalidArgument("bad_words: token id {} is outside the vocabulary [0, {})", t,
                               vocab);
      }
    }
  }
  for (const auto& s : p.stop) {
    if (s.empty()) return InvalidArgument("stop: an empty stop string");
  }
  return Status::Ok();
}

// A row the device sampled, as the host sampler reports it (its top list moved out).
SampleResult FromDevice(DeviceSampleResult* d) {
  SampleResult r;
  r.token = d->token;
  r.logprob = d->logprob;
  r.top = std::move(d->top);
  return r;
}

// Leaves a valid UTF-8 prefix: moves `n` back off continuation bytes.
size_t Utf8Boundary(const std::string& s, size_t n) {
  while (n > 0 && n < s.size() && (static_cast<unsigned char>(s[n]) & 0xC0) == 0x80) --n;
  return n;
}

}  // namespace

Result<std::unique_ptr<Engine>> Engine::Create(Backend& backend, const EngineConfig& config) {
  EngineConfig c = config;
  const ModelConfig& mc = backend.config();
  if (c.block_size < 1 || c.block_size > 1024) {
    return InvalidArgument("block_size {} must be in [1, 1024]", c.block_size);
  }
  if (c.max_batch_size < 1) {
    return InvalidArgument("max_batch_size {} must be >= 1", c.max_batch_size);
  }
  if (c.max_num_tokens < 1) {
    return InvalidArgument("max_num_tokens {} must be >= 1", c.max_num_tokens);
  }
  if (c.max_seq_len <= 0) c.max_seq_len = static_cast<int32_t>(mc.MaxModelLen());
  if (c.max_seq_len <= 0) {
    return InvalidArgument("max_seq_len is unset and the model has no max_position_embeddings");
  }
  if (c.max_seq_len > mc.MaxModelLen()) {
    return InvalidArgument("max_seq_len {} is over the model's maximum length {}", c.max_seq_len,
                           mc.MaxModelLen());
  }
  if (mc.vocab_size <= 0) return InvalidArgument("model vocab_size {} is invalid", mc.vocab_size);
  if (c.eos_token_ids.empty()) {
    for (int64_t e : mc.eos_token_ids) c.eos_token_ids.push_back(static_cast<int32_t>(e));
  }
  for (int32_t e : c.eos_token_ids) {
    if (e < 0 || e >= mc.vocab_size) {
      return InvalidArgument("eos token id {} is outside the vocabulary [0, {})", e, mc.vocab_size);
    }
  }
  int64_t num_blocks = 0;
  if (c.kv_cache_tokens > 0) {
    num_blocks = c.kv_cache_tokens / c.block_size;
  } else {
    if (!(c.kv_cache_memory_fraction > 0.0 && c.kv_cache_memory_fraction <= 1.0)) {
      return InvalidArgument("kv_cache_memory_fraction {} must be in (0, 1]",
                             c.kv_cache_memory_fraction);
    }
    QILIN_ASSIGN_OR_RETURN(
        num_blocks,
        backend.ProposeNumKvBlocks(c.block_size, c.kv_cache_memory_fraction, c.max_num_tokens));
  }
  if (num_blocks < 1 || num_blocks > (int64_t{1} << 30) / c.block_size) {
    return InvalidArgument(
        "KV cache of {} blocks x {} tokens is out of range (kv_cache_tokens={}): need at least "
        "one block",
        num_blocks, c.block_size, c.kv_cache_tokens);
  }
  QILIN_RETURN_IF_ERROR(
      backend.AllocateKvCache(KvCacheLayout{static_cast<int32_t>(num_blocks), c.block_size}));
  return std::unique_ptr<Engine>(new Engine(backend, c, static_cast<int32_t>(num_blocks)));
}

Engine::Engine(Backend& backend, const EngineConfig& config, int32_t num_blocks)
    : backend_(backend),
      config_(config),
      vocab_(static_cast<int32_t>(backend.config().vocab_size)) {
  kv_ = std::make_unique<KvManager>(num_blocks, config_.block_size, config_.enable_prefix_caching);
  SchedulerConfig sc;
  sc.max_batch_size = config_.max_batch_size;
  sc.max_num_tokens = config_.max_num_tokens;
  sc.max_seq_len = config_.max_seq_len;
  sc.enable_chunked_prefill = config_.enable_chunked_prefill;
  sc.mode = config_.mode;
  sc.policy = config_.policy;
  scheduler_ = std::make_unique<Scheduler>(sc, kv_.get());
  int threads = config_.sampler_threads > 0 ? config_.sampler_threads : omp_get_max_threads();
  for (int i = 0; i < std::max(1, threads); ++i) {
    samplers_.push_back(std::make_unique<Sampler>(vocab_));
  }
  seed_base_ = std::random_device{}();
  seed_base_ = (seed_base_ << 32) ^ std::random_device{}();
  PublishStats();
}

Engine::~Engine() { Stop(); }

Result<std::shared_ptr<ResponseStream>> Engine::Submit(Request request) {
  for (size_t i = 0; i < request.prompt.size(); ++i) {
    const int32_t t = request.prompt[i];
    if (t < 0 || t >= vocab_) {
      return InvalidArgument("prompt token {} (at index {}) is outside the vocabulary [0, {})", t,
                             i, vocab_);
    }
  }
  const SamplingParams& p = request.sampling;
  QILIN_RETURN_IF_ERROR(ValidateParams(p, vocab_));
  if (!p.stop.empty() && !has_detokenizer()) {
    return InvalidArgument("stop strings need a detokenizer and none is attached to the engine");
  }
  QILIN_RETURN_IF_ERROR(scheduler_->CheckFits(request));

  auto g = std::make_unique<SequenceGroup>();
  g->id = next_id_.fetch_add(1);
  g->prompt_len = static_cast<int32_t>(request.prompt.size());
  g->seed = p.seed ? *p.seed : seed_base_ ^ (seed_counter_.fetch_add(1) * 0x9e3779b97f4a7c15ULL);
  const int32_t outputs = p.beam_width > 1 ? (p.n > 1 ? p.n : p.beam_width) : p.n;
  g->stream = std::make_shared<ResponseStream>(g->id, outputs);
  auto s = std::make_unique<Sequence>();
  s->tokens = request.prompt;
  s->detok = MakeDetokenizer(request);
  g->seqs.push_back(std::move(s));
  g->request = std::move(request);
  std::shared_ptr<ResponseStream> stream = g->stream;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_ || stopped_) return Unavailable("the engine is shutting down");
    inbox_.push_back({std::move(g), -1});
  }
  cv_.notify_one();
  return stream;
}

void Engine::Cancel(int64_t request_id) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    inbox_.push_back({nullptr, request_id});
  }
  cv_.notify_one();
}

void Engine::DrainInbox() {
  std::vector<InboxItem> items;
  {
    std::lock_guard<std::mutex> lock(mu_);
    items.swap(inbox_);
  }
  for (InboxItem& it : items) {
    if (it.add) {
      it.add->arrival = arrival_counter_++;
      for (const auto& st : it.add->request.sampling.stop) {
        max_stop_len_ = std::max<int32_t>(max_stop_len_, static_cast<int32_t>(st.size()));
      }
      it.add->overlap_ok = OverlapOk(it.add->request.sampling);
      if (!it.add->overlap_ok) ++non_overlap_groups_;
      scheduler_->Add(std::move(it.add));
    } else if (auto g = scheduler_->Abort(it.cancel_id)) {
      AbortGroup(std::move(g), Status::Ok());
    }
  }
}

void Engine::AbortGroup(std::unique_ptr<SequenceGroup> g, const Status& status) {
  if (!g->overlap_ok) --non_overlap_groups_;
  // Every output not yet finished gets an abort response (beams: all outputs).
  if (g->beam()) {
    const int32_t outputs =
        g->request.sampling.n > 1 ? g->request.sampling.n : g->request.sampling.beam_width;
    for (int32_t i = 0; i < outputs; ++i) {
      Response r;
      r.request_id = g->id;
      r.seq_index = i;
      r.finish_reason = FinishReason::kAbort;
      r.error = status;
      g->stream->Push(std::move(r));
    }
  } else {
    // Unforked n > 1 requests answer for the samples not yet created, too.
    const int32_t outputs =
        g->forked ? static_cast<int32_t>(g->seqs.size()) : g->request.sampling.n;
    for (int32_t i = 0; i < outputs; ++i) {
      if (i < static_cast<int32_t>(g->seqs.size()) && g->seqs[i]->finished) continue;
      Response r;
      r.request_id = g->id;
      r.seq_index = i;
      r.finish_reason = FinishReason::kAbort;
      r.error = status;
      g->stream->Push(std::move(r));
    }
  }
  ++requests_finished_;
}

bool Engine::HasWork() const {
  std::lock_guard<std::mutex> lock(mu_);
  return !inbox_.empty() || scheduler_->has_work() || launched_pending_.load();
}

void Engine::BuildBatch(const SchedulerOutput& out) {
  ForwardBatch& b = batch_;
  b.token_ids.clear();
  b.positions.clear();
  b.slot_mapping.clear();
  b.query_start.assign(1, 0);
  b.context_lens.clear();
  b.prompt_lens.clear();
  b.logits_indices.clear();
  int32_t max_blocks = 0;
  for (const ScheduledSeq& e : out.seqs) {
    max_blocks = std::max<int32_t>(max_blocks, static_cast<int32_t>(e.seq->kv.block_table.size()));
  }
  b.max_blocks_per_seq = max_blocks;
  b.block_tables.assign(out.seqs.size() * static_cast<size_t>(max_blocks), -1);
  for (size_t i = 0; i < out.seqs.size(); ++i) {
    const ScheduledSeq& e = out.seqs[i];
    const Sequence& s = *e.seq;
    const int32_t start = s.num_computed, end = s.num_computed + e.num_new_tokens;
    for (int32_t pos = start; pos < end; ++pos) {
      b.token_ids.push_back(s.tokens[pos]);
      b.positions.push_back(pos);
      b.slot_mapping.push_back(kv_->Slot(s.kv, pos));
    }
    b.query_start.push_back(static_cast<int32_t>(b.token_ids.size()));
    b.context_lens.push_back(end);
    b.prompt_lens.push_back(e.group->prompt_len);
    std::copy(s.kv.block_table.begin(), s.kv.block_table.end(),
              b.block_tables.begin() + i * static_cast<size_t>(max_blocks));
    if (e.sample) b.logits_indices.push_back(static_cast<int32_t>(b.token_ids.size()) - 1);
  }
}

bool Engine::OverlapOk(const SamplingParams& p) const {
  if (p.beam_width > 1 || p.n > 1 || p.repetition_penalty != 1.0f || p.presence_penalty != 0.0f ||
      p.frequency_penalty != 0.0f || !p.bad_words.empty()) {
    return false;  // the host acts between steps, or the penalties read the pending token
  }
  if (!p.greedy() && p.top_p < 1.0f) return false;  // the device may hand the row back
  return DeviceSamplingSupports(DeviceSpecOf(p), vocab_);
}

bool Engine::OverlapAllowed() const {
  return config_.overlap_steps && config_.device_sampling && backend_.SupportsDeviceSampling() &&
         backend_.SupportsLaunchedSteps() && non_overlap_groups_ == 0;
}

Status Engine::Step() {
  const int64_t t0 = NowNs();
  DrainInbox();
  const bool overlap = OverlapAllowed();
  if (!overlap && !launched_.empty()) {
    // A request that needs the host between steps arrived: answer the launched step first.
    Status st = FinishLaunched();
    if (!st.ok()) {
      PublishStats();
      return st;
    }
  }
  SchedulerOutput out = scheduler_->Schedule();
  if (out.empty()) {
    Status st = launched_.empty() ? Status::Ok() : FinishLaunched();
    PublishStats();
    return st;
  }
  BuildBatch(out);
  schedule_ns_ += NowNs() - t0;
  if (overlap) return LaunchStep(std::move(out));
  const int64_t t1 = NowNs();
  Status st;
  const bool device = config_.device_sampling && backend_.SupportsDeviceSampling() &&
                      !batch_.logits_indices.empty() && BuildDeviceSpecs(out);
  if (!out.copies.empty()) st = backend_.CopyKvBlocks(out.copies);
  if (st.ok()) {
    st = device ? backend_.ForwardSample(batch_, device_specs_, &device_results_)
                : backend_.Forward(batch_, &logits_);
  }
  forward_ns_ += NowNs() - t1;
  if (st.ok() && device && device_results_.size() != batch_.logits_indices.size()) {
    st = Internal("backend {} returned {} sampled rows, expected {}", backend_.name(),
                  device_results_.size(), batch_.logits_indices.size());
  }
  if (st.ok() && !device &&
      logits_.size() != batch_.logits_indices.size() * static_cast<size_t>(vocab_)) {
    st = Internal("backend {} returned {} logits, expected {} rows x vocab {}", backend_.name(),
                  logits_.size(), batch_.logits_indices.size(), vocab_);
  }
  if (!st.ok()) {
    spdlog::error("engine step failed: {}", st.ToString());
    FailAll(out, st);
    PublishStats();
    return st;
  }
  ProcessOutputs(out, device);
  PublishStats();
  return Status::Ok();
}

void Engine::FailAll(const SchedulerOutput& out, const Status& status) {
  std::vector<int64_t> ids;
  for (const ScheduledSeq& e : out.seqs) ids.push_back(e.group->id);
  FailIds(std::move(ids), status);
}

void Engine::FailIds(std::vector<int64_t> ids, const Status& status) {
  std::sort(ids.begin(), ids.end());
  ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
  for (int64_t id : ids) {
    if (auto g = scheduler_->Abort(id)) AbortGroup(std::move(g), status);
  }
}

Status Engine::LaunchStep(SchedulerOutput out) {
  const int64_t t0 = NowNs();
  Status st;
  if (batch_.logits_indices.empty()) {
    device_specs_.clear();
  } else if (!BuildDeviceSpecs(out)) {
    st =
        Internal("engine: a request admitted for overlapped steps cannot be sampled on the device");
  }
  if (st.ok() && !out.copies.empty()) st = backend_.CopyKvBlocks(out.copies);
  if (st.ok()) st = backend_.LaunchForwardSample(batch_, device_specs_);
  forward_ns_ += NowNs() - t0;
  if (!st.ok()) {
    spdlog::error("engine step failed: {}", st.ToString());
    FailAll(out, st);
    // The step launched before this one is answered (or failed) as usual.
    if (!launched_.empty()) (void)FinishLaunched();
    PublishStats();
    return st;
  }
  if (!launched_.empty()) ++overlapped_steps_;
  // The step's tokens count as computed now; each sampled row's token is a placeholder, which
  // the next step may already read (the device resolves it) and FinishLaunched replaces.
  LaunchedStep ls;
  int32_t row = 0;
  for (const ScheduledSeq& e : out.seqs) {
    Sequence* s = e.seq;
    s->num_computed += e.num_new_tokens;
    ls.group_ids.push_back(e.group->id);
    ls.context_end.push_back(s->num_computed);
    if (!e.sample) continue;
    s->tokens.push_back(Backend::PreviousRowToken(row++));
    if (AtLength(*e.group, static_cast<int32_t>(s->tokens.size()))) s->final_pending = true;
  }
  ls.out = std::move(out);
  launched_.push_back(std::move(ls));
  launched_pending_ = true;
  st = launched_.size() > 1 ? FinishLaunched() : Status::Ok();
  PublishStats();
  return st;
}

Status Engine::FinishLaunched() {
  LaunchedStep ls = std::move(launched_.front());
  launched_.pop_front();
  launched_pending_ = !launched_.empty();
  const int64_t t0 = NowNs();
  Status st = backend_.WaitForwardSample(&device_results_);
  const int64_t t1 = NowNs();
  forward_ns_ += t1 - t0;
  size_t rows = 0;
  for (const ScheduledSeq& e : ls.out.seqs) rows += e.sample ? 1 : 0;
  if (st.ok() && device_results_.size() != rows) {
    st = Internal("backend {} returned {} sampled rows, expected {}", backend_.name(),
                  device_results_.size(), rows);
  }
  if (!st.ok()) {
    spdlog::error("engine step failed: {}", st.ToString());
    FailIds(std::move(ls.group_ids), st);
    return st;
  }
  int32_t row = 0;
  for (size_t i = 0; i < ls.out.seqs.size(); ++i) {
    const ScheduledSeq& e = ls.out.seqs[i];
    const int32_t r = e.sample ? row++ : -1;
    // Gone (finished, cancelled or failed since the launch): its row is dropped.
    if (scheduler_->Find(ls.group_ids[i]) != e.group || e.seq->finished) continue;
    SequenceGroup* g = e.group;
    Sequence* s = e.seq;
    const int32_t end = ls.context_end[i];
    kv_->CommitFullBlocks(&s->kv, s->tokens, std::min(end, s->num_computed));
    prefill_tokens_ += e.num_new_tokens - (e.sample ? 1 : 0);
    if (!e.sample) continue;
    DeviceSampleResult& d = device_results_[r];
    if (d.on_host || d.token < 0 || d.token >= vocab_) {
      FailIds({g->id}, Internal("backend {} sampled no valid token for request {} (token {})",
                                backend_.name(), g->id, d.token));
      continue;
    }
    Accept(g, s, FromDevice(&d), end);
  }
  ReleaseFinished();
  output_ns_ += NowNs() - t1;
  return Status::Ok();
}

Result<int64_t> Engine::WarmUp() {
  if (loop_running_.load()) return FailedPrecondition("WarmUp runs before Start()");
  if (HasWork()) return FailedPrecondition("WarmUp runs before the first request");
  const std::vector<int32_t> sizes = backend_.WarmUpBatchSizes(config_.max_batch_size);
  if (sizes.empty()) return int64_t{0};
  const int64_t id0 = next_id_.load();
  const uint64_t seed0 = seed_counter_.load();
  const int32_t blocks = kv_->num_blocks(), bs = kv_->block_size();
  uint32_t salt = 0;
  // `count` greedy requests of `len` prompt tokens (distinct per request: no prefix sharing).
  auto wave = [&](int32_t count, int32_t len, int32_t max_tokens) -> Status {
    for (int32_t i = 0; i < count; ++i) {
      Request r;
      r.prompt.resize(len);
      for (int32_t j = 0; j < len; ++j) {
        r.prompt[j] = static_cast<int32_t>((uint64_t{++salt} * 2654435761u) % vocab_);
      }
      r.sampling.temperature = 0.0f;
      r.sampling.max_tokens = max_tokens;
      r.sampling.ignore_eos = true;
      QILIN_RETURN_IF_ERROR(Submit(std::move(r)).status());
    }
    return RunUntilIdle();
  };
  const int64_t steps0 = scheduler_->stats().num_steps;
  for (int32_t b : sizes) {
    // Each request holds one block (a one-token prompt and two outputs, whatever the block size).
    if (b <= 0 || b > config_.max_batch_size || b > blocks) continue;
    QILIN_RETURN_IF_ERROR(wave(b, 1, 2));
  }
  // The backend's prefill sizes (the largest: max_num_tokens), each as few requests as
  // max_seq_len allows, as warm-up steps (Backend::SetWarmUpSteps: outputs not computed).
  const int64_t room = int64_t{blocks} * bs;
  int32_t done = 0;
  Status prefills = Status::Ok();
  backend_.SetWarmUpSteps(true);
  for (int32_t t : backend_.WarmUpPrefillTokens(config_.max_num_tokens)) {
    const int32_t total =
        static_cast<int32_t>(std::min<int64_t>({t, config_.max_num_tokens, room / 2}));
    const int32_t len = std::min(total, config_.max_seq_len - 1);
    if (len <= 0 || total <= done) continue;
    prefills = wave(std::max(1, total / len), len, 1);
    if (!prefills.ok()) break;
    done = total;
  }
  backend_.SetWarmUpSteps(false);
  QILIN_RETURN_IF_ERROR(prefills);
  const int64_t steps = scheduler_->stats().num_steps - steps0;
  // Nothing of the dummy requests stays behind: no cached prefixes, no counts.
  kv_->ResetCacheAndStats();
  scheduler_->ResetStats();
  overlapped_steps_ = prefill_tokens_ = generated_tokens_ = requests_finished_ = 0;
  schedule_ns_ = forward_ns_ = sample_ns_ = output_ns_ = 0;
  next_id_.store(id0);
  seed_counter_.store(seed0);
  PublishStats();
  return steps;
}

Status Engine::RunUntilIdle() {
  while (HasWork()) QILIN_RETURN_IF_ERROR(Step());
  return Status::Ok();
}

bool Engine::AtLength(const SequenceGroup& g, int32_t len) const {
  return len - g.prompt_len >= g.request.sampling.max_tokens || len >= config_.max_seq_len;
}

bool Engine::IsEos(const SequenceGroup& g, int32_t token) const {
  const SamplingParams& p = g.request.sampling;
  if (!p.ignore_eos && std::find(config_.eos_token_ids.begin(), config_.eos_token_ids.end(),
                                 token) != config_.eos_token_ids.end()) {
    return true;
  }
  return std::find(p.stop_token_ids.begin(), p.stop_token_ids.end(), token) !=
         p.stop_token_ids.end();
}

void Engine::MaskedFor(const SequenceGroup& g, const Sequence& s, std::vector<int32_t>* out) const {
  out->clear();
  const SamplingParams& p = g.request.sampling;
  const int32_t generated = static_cast<int32_t>(s.tokens.size()) - g.prompt_len;
  if (generated >= p.min_tokens) return;
  out->insert(out->end(), config_.eos_token_ids.begin(), config_.eos_token_ids.end());
  out->insert(out->end(), p.stop_token_ids.begin(), p.stop_token_ids.end());
}

bool Engine::BuildDeviceSpecs(const SchedulerOutput& out) {
  device_specs_.clear();
  size_t r = 0;
  for (const ScheduledSeq& e : out.seqs) {
    if (!e.sample) continue;
    const SequenceGroup& g = *e.group;
    const Sequence& s = *e.seq;
    const SamplingParams& p = g.request.sampling;
    if (g.beam() || !(g.forked || p.n == 1)) return false;  // beams and forks: host
    if (device_masked_.size() <= r) device_masked_.resize(r + 1);
    std::vector<int32_t>& masked = device_masked_[r++];
    MaskedFor(g, s, &masked);
    Sampler::FiredBadWords(p, s.tokens, &masked);
    DeviceSampleSpec d = DeviceSpecOf(p);
    d.tokens = s.tokens;
    d.prompt_len = g.prompt_len;
    d.masked = masked;
    d.seed = g.seed;
    d.stream = static_cast<uint64_t>(s.index);
    d.counter = static_cast<uint64_t>(s.tokens.size()) - g.prompt_len;
    if (!DeviceSamplingSupports(d, vocab_)) return false;
    device_specs_.push_back(d);
  }
  return true;
}

void Engine::ProcessOutputs(const SchedulerOutput& out, bool device) {
  const int64_t t_start = NowNs();
  // 1. Cache state: the computed tokens' K/V are now in their blocks.
  struct Row {
    SequenceGroup* g;
    Sequence* s;
    float* logits;
  };
  std::vector<Row> rows;
  for (const ScheduledSeq& e : out.seqs) {
    e.seq->num_computed += e.num_new_tokens;
    kv_->CommitFullBlocks(&e.seq->kv, e.seq->tokens, e.seq->num_computed);
    prefill_tokens_ += e.num_new_tokens - (e.sample ? 1 : 0);  // the sampled token is generated
    if (e.sample) {
      rows.push_back(
          {e.group, e.seq,
           device ? nullptr : logits_.data() + rows.size() * static_cast<size_t>(vocab_)});
    }
  }

  // 2. Sample the plain rows in parallel (each row's draws depend only on its own sequence).
  std::vector<SampleResult> results(rows.size());
  std::vector<char> plain(rows.size(), 0);
  for (size_t i = 0; i < rows.size(); ++i) {
    plain[i] = !rows[i].g->beam() && (rows[i].g->forked || rows[i].g->request.sampling.n == 1);
  }
  const int nthreads = static_cast<int>(samplers_.size());
#pragma omp parallel for schedule(dynamic, 4) num_threads(nthreads) if (rows.size() >= 16)
  for (size_t i = 0; i < rows.size(); ++i) {
    if (!plain[i]) continue;
    const Row& row = rows[i];
    float* logits = row.logits;
    if (device) {
      DeviceSampleResult& d = device_results_[i];
      if (!d.on_host) {
        results[i] = FromDevice(&d);
        continue;
      }
      logits = d.logits.data();  // the device handed this row back: sample it here
    }
    std::vector<int32_t> masked;
    MaskedFor(*row.g, *row.s, &masked);
    SampleContext ctx{&row.g->request.sampling,
                      row.s->tokens,
                      row.g->prompt_len,
                      masked,
                      row.g->seed,
                      row.s->index};
    results[i] = samplers_[omp_get_thread_num()]->Sample(logits, ctx);
  }

  const int64_t t_sampled = NowNs();
  sample_ns_ += t_sampled - t_start;

  // 3. Accept tokens in order; forks and beams here too.
  Sampler& sampler = *samplers_[0];
  std::vector<int32_t> masked;
  std::vector<std::pair<Sequence*, float*>> beam_rows;
  for (size_t i = 0; i < rows.size(); ++i) {
    SequenceGroup* g = rows[i].g;
    Sequence* s = rows[i].s;
    if (plain[i]) {
      Accept(g, s, results[i]);
    } else if (g->beam()) {
      beam_rows.emplace_back(s, rows[i].logits);
      // All of a group's beams are sampled in one step; act after the last one.
      if (i + 1 == rows.size() || rows[i + 1].g != g) {
        BeamStep(g, beam_rows);
        beam_rows.clear();
      }
    } else {
      // First sample of an n > 1 request: n samples from the prompt's row, the children sharing
      // the parent's blocks (copy-on-write).
      const int32_t n = g->request.sampling.n;
      std::vector<float> raw(rows[i].logits, rows[i].logits + vocab_);
      std::vector<Sequence*> seqs{s};
      for (int32_t k = 1; k < n; ++k) {
        Sequence* child = scheduler_->Fork(g, *s);
        child->detok = MakeDetokenizer(g->request);
        seqs.push_back(child);
      }
      g->forked = true;
      for (int32_t k = 0; k < n; ++k) {
        std::vector<float> row = raw;
        MaskedFor(*g, *seqs[k], &masked);
        SampleContext ctx{&g->request.sampling, seqs[k]->tokens, g->prompt_len, masked, g->seed,
                          seqs[k]->index};
        SampleResult r = sampler.Sample(row.data(), ctx);
        Accept(g, seqs[k], r);
      }
    }
  }
  ReleaseFinished();
  output_ns_ += NowNs() - t_sampled;
}

void Engine::ReleaseFinished() {
  for (SequenceGroup* g : finished_groups_) {
    if (!g->overlap_ok) --non_overlap_groups_;
    std::unique_ptr<SequenceGroup> done = scheduler_->Abort(g->id);  // frees any rest
    ++requests_finished_;
  }
  finished_groups_.clear();
}

void Engine::Accept(SequenceGroup* g, Sequence* s, const SampleResult& r, int32_t at) {
  const SamplingParams& p = g->request.sampling;
  if (at < 0) {
    s->tokens.push_back(r.token);
    at = static_cast<int32_t>(s->tokens.size()) - 1;
  } else {
    s->tokens[at] = r.token;  // a launched step's placeholder
  }
  const int32_t len = at + 1;  // the sequence up to this token (an overlapped step may follow)
  s->cumulative_logprob += r.logprob;
  ++generated_tokens_;
  Response resp;
  resp.request_id = g->id;
  resp.seq_index = s->index;
  resp.token_ids.push_back(r.token);
  if (p.logprobs >= 0) resp.logprobs.push_back({r.token, r.logprob, r.top});
  const int32_t generated = len - g->prompt_len;
  const bool at_length = AtLength(*g, len);
  FinishReason reason = FinishReason::kNone;
  if (IsEos(*g, r.token) && generated >= p.min_tokens) reason = FinishReason::kStop;
  if (s->detok) {
    s->text += s->detok->Push(r.token);
    if (reason != FinishReason::kNone || at_length) s->text += s->detok->Flush();
    // Stop strings: search the text not yet sent (plus an overlap for matches across it).
    size_t cut = std::string::npos;
    if (!p.stop.empty()) {
      const size_t from = s->emitted_text;
      for (const auto& stop : p.stop) {
        size_t begin = from >= stop.size() ? from - stop.size() + 1 : 0;
        size_t pos = s->text.find(stop, begin);
        if (pos != std::string::npos && pos + stop.size() > from) cut = std::min(cut, pos);
      }
    }
    size_t send_to;
    if (cut != std::string::npos) {
      s->text.resize(std::max(cut, s->emitted_text));
      send_to = s->text.size();
      reason = FinishReason::kStop;
    } else if (reason != FinishReason::kNone || at_length) {
      send_to = s->text.size();
    } else {
      // Hold back what could still be the start of a stop string.
      const size_t hold = p.stop.empty() ? 0 : static_cast<size_t>(max_stop_len_ - 1);
      send_to = s->text.size() > hold ? Utf8Boundary(s->text, s->text.size() - hold) : 0;
      send_to = std::max(send_to, s->emitted_text);
    }
    resp.text = s->text.substr(s->emitted_text, send_to - s->emitted_text);
    s->emitted_text = send_to;
  }
  if (reason == FinishReason::kNone && at_length) reason = FinishReason::kLength;
  if (reason != FinishReason::kNone) {
    s->tokens.resize(len);  // drops an overlapped step's placeholder after it
    s->finished = true;
    s->finish_reason = reason;
    resp.finish_reason = reason;
    scheduler_->FreeSequence(s);
  }
  g->stream->Push(std::move(resp));
  if (reason != FinishReason::kNone) FinishIfDone(g);
}

void Engine::FinishIfDone(SequenceGroup* g) {
  if (g->all_finished() && (g->forked || g->request.sampling.n == 1)) {
    finished_groups_.push_back(g);
  }
}

void Engine::BeamStep(SequenceGroup* g, const std::vector<std::pair<Sequence*, float*>>& rows) {
  const SamplingParams& p = g->request.sampling;
  const int32_t width = p.beam_width;
  Sampler& sampler = *samplers_[0];
  struct Cand {
    float score;  // cumulative logprob after the token
    float logprob;
    int32_t parent;  // index into rows
    int32_t token;
  };
  std::vector<Cand> cands;
  std::vector<int32_t> masked;
  std::vector<std::pair<int32_t, float>> top;
  for (size_t b = 0; b < rows.size(); ++b) {
    Sequence* s = rows[b].first;
    MaskedFor(*g, *s, &masked);
    SampleContext ctx{&p, s->tokens, g->prompt_len, masked, g->seed, s->index};
    sampler.ApplyProcessors(rows[b].second, ctx);
    sampler.TopLogprobs(rows[b].second, 2 * width, &top);
    for (const auto& [tok, lp] : top) {
      if (!std::isfinite(lp)) continue;
      cands.push_back({s->cumulative_logprob + lp, lp, static_cast<int32_t>(b), tok});
    }
  }
  std::stable_sort(cands.begin(), cands.end(),
                   [](const Cand& a, const Cand& b) { return a.score > b.score; });
  const int32_t generated = static_cast<int32_t>(rows[0].first->tokens.size()) - g->prompt_len;
  auto hyp_score = [&](float cum, int32_t len) {
    return cum / std::pow(static_cast<float>(std::max(len, 1)), p.length_penalty);
  };
  std::vector<Cand> next;
  for (size_t rank = 0; rank < cands.size() && static_cast<int32_t>(next.size()) < width; ++rank) {
    const Cand& c = cands[rank];
    if (IsEos(*g, c.token) && generated + 1 >= p.min_tokens) {
      if (static_cast<int32_t>(rank) < width) {
        const Sequence* parent = rows[c.parent].first;
        SequenceGroup::Hypothesis h;
        h.tokens.assign(parent->tokens.begin() + g->prompt_len, parent->tokens.end());
        h.tokens.push_back(c.token);
        h.cumulative_logprob = c.score;
        h.score = hyp_score(c.score, generated + 1);
        h.reason = FinishReason::kStop;
        g->hypotheses.push_back(std::move(h));
      }
      continue;
    }
    next.push_back(c);
  }
  g->forked = true;
  generated_tokens_ += static_cast<int64_t>(next.size());
  // New beams: a parent's first child continues it in place, later children fork from it
  // (before the parent's own token is appended).
  std::vector<int32_t> uses(rows.size(), 0);
  std::vector<Sequence*> forks(next.size(), nullptr);
  for (size_t k = 0; k < next.size(); ++k) {
    if (uses[next[k].parent]++ > 0) forks[k] = scheduler_->Fork(g, *rows[next[k].parent].first);
  }
  std::fill(uses.begin(), uses.end(), 0);
  for (size_t k = 0; k < next.size(); ++k) {
    Sequence* s = forks[k] ? forks[k] : rows[next[k].parent].first;
    uses[next[k].parent]++;
    s->tokens.push_back(next[k].token);
    s->cumulative_logprob = next[k].score;
  }
  for (size_t b = 0; b < rows.size(); ++b) {
    if (uses[b] == 0) {
      scheduler_->FreeSequence(rows[b].first);
      rows[b].first->finished = true;
    }
  }
  // Drop dead beams; renumber.
  auto& seqs = g->seqs;
  seqs.erase(std::remove_if(seqs.begin(), seqs.end(), [](const auto& s) { return s->finished; }),
             seqs.end());
  for (size_t k = 0; k < seqs.size(); ++k) seqs[k]->index = static_cast<int32_t>(k);

  const bool at_length = AtLength(*g, g->prompt_len + generated + 1);
  const bool enough = static_cast<int32_t>(g->hypotheses.size()) >= width;
  if (at_length || enough || seqs.empty()) {
    if (!enough || seqs.empty()) {
      for (const auto& s : seqs) {
        SequenceGroup::Hypothesis h;
        h.tokens.assign(s->tokens.begin() + g->prompt_len, s->tokens.end());
        h.cumulative_logprob = s->cumulative_logprob;
        h.score = hyp_score(s->cumulative_logprob, static_cast<int32_t>(h.tokens.size()));
        h.reason = FinishReason::kLength;
        g->hypotheses.push_back(std::move(h));
      }
    }
    FinishBeams(g);
  }
}

void Engine::FinishBeams(SequenceGroup* g) {
  const SamplingParams& p = g->request.sampling;
  const int32_t outputs = p.n > 1 ? p.n : p.beam_width;
  auto& h = g->hypotheses;
  std::stable_sort(h.begin(), h.end(),
                   [](const auto& a, const auto& b) { return a.score > b.score; });
  for (int32_t i = 0; i < outputs; ++i) {
    Response r;
    r.request_id = g->id;
    r.seq_index = i;
    if (i < static_cast<int32_t>(h.size())) {
      r.token_ids = h[i].tokens;
      r.cumulative_logprob = h[i].cumulative_logprob;
      r.finish_reason = h[i].reason;
      if (detok_factory_) {
        std::unique_ptr<IncrementalDetokenizer> d = detok_factory_(g->request.prompt);
        for (int32_t t : r.token_ids) r.text += d->Push(t);
        r.text += d->Flush();
      }
    } else {
      r.finish_reason = FinishReason::kLength;  // fewer hypotheses than outputs
    }
    g->stream->Push(std::move(r));
  }
  for (auto& s : g->seqs) {
    scheduler_->FreeSequence(s.get());
    s->finished = true;
  }
  finished_groups_.push_back(g);
}

void Engine::PublishStats() {
  EngineStats st;
  st.running = scheduler_->num_running();
  st.waiting = scheduler_->num_waiting();
  st.kv_blocks_total = kv_->num_blocks();
  st.kv_blocks_used = kv_->num_used_blocks();
  st.kv_blocks_free = kv_->num_free_blocks();
  st.kv_blocks_cached = kv_->num_cached_blocks();
  st.prefix_cache_queries = kv_->stats().prefix_queries;
  st.prefix_cache_hits = kv_->stats().prefix_hits;
  st.prefix_cache_hit_tokens = kv_->stats().prefix_hit_tokens;
  st.prefill_tokens = prefill_tokens_;
  st.generated_tokens = generated_tokens_;
  st.steps = scheduler_->stats().num_steps;
  st.overlapped_steps = overlapped_steps_;
  st.preemptions = scheduler_->stats().num_preemptions;
  st.requests_finished = requests_finished_;
  st.schedule_ns = schedule_ns_;
  st.forward_ns = forward_ns_;
  st.sample_ns = sample_ns_;
  st.output_ns = output_ns_;
  has_work_.store(scheduler_->has_work() || !launched_.empty());
  std::lock_guard<std::mutex> lock(stats_mu_);
  stats_ = st;
}

EngineStats Engine::stats() const {
  std::lock_guard<std::mutex> lock(stats_mu_);
  return stats_;
}

bool Engine::CheckKvInvariants() const {
  return kv_->CheckInvariants(scheduler_->AllKvSequences());
}

void Engine::Start() {
  if (loop_running_.exchange(true)) return;
  loop_ = std::thread([this] { Loop(); });
}

void Engine::Loop() {
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] {
        return stopping_ || !inbox_.empty() || scheduler_->has_work() || launched_pending_.load();
      });
      if (stopping_) return;
    }
    Status st = Step();
    if (!st.ok()) spdlog::warn("engine: {}", st.ToString());
  }
}

void Engine::Stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopped_) return;
    stopping_ = true;
  }
  cv_.notify_all();
  if (loop_.joinable()) loop_.join();
  loop_running_ = false;
  // Nobody steps any more: answer the launched steps' tokens, then everything still queued or
  // running with abort.
  while (!launched_.empty()) (void)FinishLaunched();
  DrainInbox();
  for (int64_t id : scheduler_->AllRequestIds()) {
    if (auto g = scheduler_->Abort(id)) AbortGroup(std::move(g), Unavailable("engine stopped"));
  }
  PublishStats();
  std::lock_guard<std::mutex> lock(mu_);
  stopped_ = true;
}

}  // namespace qilin
