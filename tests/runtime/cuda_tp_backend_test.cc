// Tensor parallelism on CUDA (label gpu): TP = 2 and 4 ranks sharing one GPU with the staged
// all-reduce (CudaTpBackend, CudaBackendOptions::tp_comm) against the unsharded CudaBackend on the
// golden fixtures and a small dummy model: every position's logits of a prefill, the logits of
// decode steps over the paged cache, greedy continuations and the engine's greedy outputs.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include <cuda_runtime.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "engine/engine.h"
#include "golden_util.h"
#include "model/config.h"
#include "model/shard.h"
#include "model/weights.h"
#include "runtime/cuda_backend.h"
#include "runtime/cuda_tp_backend.h"
#include "runtime/greedy_generate.h"
#include "runtime/socket_comm.h"
#include "runtime/tp_factory.h"
#include "socket_group.h"

namespace qilin {
namespace {

namespace fs = std::filesystem;
using namespace golden;

bool HaveGpu() { return CudaDeviceCount() > 0; }

// Sharded and unsharded runs differ only in the order of f32 sums (the all-reduce of partial
// o_proj / down_proj outputs) and the bf16 roundings that follow. Measured on an H100
// (2026-11-25): at most 4.1e-3 (qwen-v1, TP = 4), ~1e-7 mostly (docs/tensor-parallel.md); a
// broken shard gives O(1) errors.
constexpr double kMaxRelL2 = 1e-2;

// Prefill of ids[0, prompt) and then one decode step per further token (teacher forcing), two
// sequences of the same ids in one batch at different blocks; the logits of the prefill's last
// position and of every decode step, of both sequences: [2 * (1 + steps), vocab].
std::vector<float> PrefillThenDecode(Backend& backend, const std::vector<int32_t>& ids,
                                     int32_t prompt) {
  const int32_t block_size = 8;
  const int32_t n = static_cast<int32_t>(ids.size());
  const int32_t per_seq = (n + block_size - 1) / block_size;
  EXPECT_TRUE(backend.AllocateKvCache({2 * per_seq, block_size}).ok());
  auto slot = [&](int32_t s, int32_t pos) {
    // Sequence 0 on blocks 0..per_seq-1, sequence 1 on the others in reverse.
    const int32_t blk = s == 0 ? pos / block_size : 2 * per_seq - 1 - pos / block_size;
    return static_cast<int64_t>(blk) * block_size + pos % block_size;
  };
  auto tables = [&](ForwardBatch* b) {
    b->max_blocks_per_seq = per_seq;
    for (int32_t s = 0; s < 2; ++s)
      for (int32_t j = 0; j < per_seq; ++j)
        b->block_tables.push_back(s == 0 ? j : 2 * per_seq - 1 - j);
  };
  std::vector<float> out;
  ForwardBatch b;
  for (int32_t s = 0; s < 2; ++s) {
    for (int32_t i = 0; i < prompt; ++i) {
      b.token_ids.push_back(ids[i]);
      b.positions.push_back(i);
      b.slot_mapping.push_back(slot(s, i));
    }
    b.logits_indices.push_back((s + 1) * prompt - 1);
  }
  b.query_start = {0, prompt, 2 * prompt};
  b.context_lens = {prompt, prompt};
  b.prompt_lens = {prompt, prompt};
  tables(&b);
  std::vector<float> logits;
  Status st = backend.Forward(b, &logits);
  EXPECT_TRUE(st.ok()) << st.ToString();
  out.insert(out.end(), logits.begin(), logits.end());
  for (int32_t pos = prompt; pos < n; ++pos) {
    ForwardBatch d;
    for (int32_t s = 0; s < 2; ++s) {
      d.token_ids.push_back(ids[pos]);
      d.positions.push_back(pos);
      d.slot_mapping.push_back(slot(s, pos));
      d.logits_indices.push_back(s);
    }
    d.query_start = {0, 1, 2};
    d.context_lens = {pos + 1, pos + 1};
    d.prompt_lens = {prompt, prompt};
    tables(&d);
    st = backend.Forward(d, &logits);
    EXPECT_TRUE(st.ok()) << st.ToString();
    out.insert(out.end(), logits.begin(), logits.end());
  }
  return out;
}

// Worst per-row relative L2 of `a` against `ref`.
double WorstRelL2(const std::vector<float>& a, const std::vector<float>& ref, int64_t vocab) {
  EXPECT_EQ(a.size(), ref.size());
  if (a.size() != ref.size() || ref.empty()) return INFINITY;
  double worst = 0;
  for (size_t r = 0; r < ref.size() / vocab; ++r) {
    double diff2 = 0, ref2 = 0;
    for (int64_t v = 0; v < vocab; ++v) {
      const double x = a[r * vocab + v], y = ref[r * vocab + v];
      if (!std::isfinite(x)) return INFINITY;
      diff2 += (x - y) * (x - y);
      ref2 += y * y;
    }
    worst = std::max(worst, std::sqrt(diff2 / std::max(ref2, 1e-30)));
  }
  return worst;
}

std::unique_ptr<CudaTpBackend> MakeTp(const ModelConfig& c, const ModelWeights& w, int tp,
                                      bool graphs = true) {
  CudaTpOptions o;
  o.force_staged = true;
  o.cuda.cuda_graphs = graphs;
  auto b = CudaTpBackend::Create(c, w, tp, o);
  EXPECT_TRUE(b.ok()) << b.status().ToString();
  if (!b.ok()) return nullptr;
  EXPECT_EQ((*b)->collectives(), "staged");
  EXPECT_FALSE((*b)->SupportsDeviceSampling());
  return std::move(b).value();
}

// Prefill logits, decode logits and greedy tokens of `tp` ranks against the unsharded backend;
// returns the worst relative L2.
double CompareWithUnsharded(const std::string& label, const ModelConfig& c, const ModelWeights& w,
                            int tp, const std::vector<std::vector<int32_t>>& prompts,
                            int32_t gen_tokens) {
  auto one = CudaBackend::Create(c, w);
  EXPECT_TRUE(one.ok()) << one.status().ToString();
  if (!one.ok()) return INFINITY;
  auto sharded = MakeTp(c, w, tp);
  if (!sharded) return INFINITY;
  double worst = 0;
  int greedy_equal = 0, greedy_total = 0;
  for (const auto& ids : prompts) {
    const double pre = WorstRelL2(PrefillAllPositions(*sharded, ids, true),
                                  PrefillAllPositions(**one, ids, true), c.vocab_size);
    EXPECT_LT(pre, kMaxRelL2) << label << " tp " << tp << " prefill";
    // Greedy continuation on the unsharded backend; then both teacher-forced through it.
    GreedyRequest req{ids, gen_tokens, true};
    EXPECT_TRUE((*one)->AllocateKvCache({GreedyBlocksNeeded(req, 8), 8}).ok());
    auto ref_tokens = GenerateGreedy(**one, req);
    EXPECT_TRUE(ref_tokens.ok()) << ref_tokens.status().ToString();
    if (!ref_tokens.ok()) return INFINITY;
    std::vector<int32_t> full = ids;
    full.insert(full.end(), ref_tokens->begin(), ref_tokens->end() - 1);
    const int32_t prompt = static_cast<int32_t>(ids.size());
    const std::vector<float> ref_dec = PrefillThenDecode(**one, full, prompt);
    const double dec = WorstRelL2(PrefillThenDecode(*sharded, full, prompt), ref_dec, c.vocab_size);
    EXPECT_LT(dec, kMaxRelL2) << label << " tp " << tp << " decode";
    worst = std::max({worst, pre, dec});
    // Greedy on the ranks: equal tokens up to the first step whose unsharded margin (top-1
    // minus top-2 logit of the teacher-forced step) is within the sharding noise.
    EXPECT_TRUE(sharded->AllocateKvCache({GreedyBlocksNeeded(req, 8), 8}).ok());
    auto got = GenerateGreedy(*sharded, req);
    EXPECT_TRUE(got.ok()) << got.status().ToString();
    if (!got.ok()) return INFINITY;
    for (int32_t s = 0; s < gen_tokens; ++s) {
      const float* row = ref_dec.data() + static_cast<int64_t>(2 * s) * c.vocab_size;
      float top1 = -INFINITY, top2 = -INFINITY;
      for (int64_t v = 0; v < c.vocab_size; ++v) {
        if (row[v] > top1) {
          top2 = top1;
          top1 = row[v];
        } else if (row[v] > top2) {
          top2 = row[v];
        }
      }
      if (top1 - top2 < 0.02f) break;
      ++greedy_total;
      greedy_equal += (*got)[s] == (*ref_tokens)[s];
      EXPECT_EQ((*got)[s], (*ref_tokens)[s]) << label << " tp " << tp << " step " << s;
    }
  }
  std::printf("[cuda tp] %-16s tp %d: max relative L2 %.2e, greedy %d/%d equal\n", label.c_str(),
              tp, worst, greedy_equal, greedy_total);
  EXPECT_GT(greedy_total, 0);
  return worst;
}

class CudaTpGoldenTest : public ::testing::TestWithParam<std::string> {};

TEST_P(CudaTpGoldenTest, ShardedMatchesUnsharded) {
  if (!HaveGpu()) GTEST_SKIP() << "no CUDA device";
  const fs::path dir = GoldenDir() / GetParam();
  auto config = LoadModelConfig(dir);
  ASSERT_TRUE(config.ok()) << config.status().ToString();
  ModelConfig c = *config;
  c.max_model_len = 64;
  auto w = LoadModelWeights(c, dir);
  ASSERT_TRUE(w.ok()) << w.status().ToString();
  std::ifstream in(dir / "reference.json");
  const nlohmann::json ref = nlohmann::json::parse(in);
  std::vector<std::vector<int32_t>> prompts;
  for (const auto& p : ref["prompts"]) prompts.push_back(p.get<std::vector<int32_t>>());
  const int32_t gen = std::min(ref["gen_tokens"].get<int32_t>(), 8);
  int ran = 0;
  for (int tp : {2, 4}) {
    if (!CheckShardable(c, tp).ok()) continue;
    ++ran;
    CompareWithUnsharded(GetParam(), c, *w, tp, prompts, gen);
  }
  if (ran == 0) GTEST_SKIP() << GetParam() << " does not shard over 2 ranks";
}

INSTANTIATE_TEST_SUITE_P(Fixtures, CudaTpGoldenTest,
                         ::testing::Values("qwen2", "qwen2-yarn-tied", "qwen3", "llama-linear",
                                           "llama-dynamic", "qwen-v1", "qwen-v1-long"),
                         [](const auto& info) {
                           std::string n = info.param;
                           for (char& ch : n)
                             if (ch == '-') ch = '_';
                           return n;
                         });

// A vocabulary that does not divide (padding columns), o_proj bias (rank 0 only), GQA.
ModelConfig SmallModel() {
  ModelConfig c;
  c.arch = ModelArch::kQwen2;
  c.vocab_size = 1001;
  c.hidden_size = 64;
  c.intermediate_size = 128;
  c.num_layers = 2;
  c.num_heads = 8;
  c.num_kv_heads = 4;
  c.head_dim = 16;
  c.max_position_embeddings = 256;
  c.attention_bias = true;
  c.o_bias = true;
  c.eos_token_ids = {5};
  return c;
}

TEST(CudaTpBackendTest, DummyModelShardedMatchesUnsharded) {
  if (!HaveGpu()) GTEST_SKIP() << "no CUDA device";
  const ModelConfig c = SmallModel();
  auto w = MakeDummyWeights(c, DType::kBF16, 11, 0.3f, 0.1f);
  ASSERT_TRUE(w.ok()) << w.status().ToString();
  std::vector<std::vector<int32_t>> prompts;
  for (int i = 0; i < 3; ++i) {
    std::vector<int32_t> p;
    for (int j = 0; j < 7 + 13 * i; ++j) p.push_back((37 * i + 11 * j + 3) % c.vocab_size);
    prompts.push_back(p);
  }
  for (int tp : {2, 4, 8}) {
    ASSERT_TRUE(CheckShardable(c, tp).ok());
    CompareWithUnsharded("dummy", c, *w, tp, prompts, 12);
  }
}

// Staged collectives synchronize the stream, so the ranks must never capture a CUDA graph, and
// the GPU sampler is off.
TEST(CudaTpBackendTest, StagedRanksCaptureNoGraphs) {
  if (!HaveGpu()) GTEST_SKIP() << "no CUDA device";
  const ModelConfig c = SmallModel();
  auto w = MakeDummyWeights(c, DType::kBF16, 11, 0.3f, 0.1f);
  ASSERT_TRUE(w.ok());
  auto tp = MakeTp(c, *w, 2);
  ASSERT_TRUE(tp);
  std::vector<int32_t> ids = {1, 2, 3, 4, 5, 6, 7, 8, 9};
  (void)PrefillThenDecode(*tp, ids, 4);
  for (int r = 0; r < 2; ++r) EXPECT_EQ(tp->rank_backend(r).NumGraphs(), 0);
  EXPECT_FALSE(tp->rank_backend(0).SupportsDeviceSampling());
}

// Ranks as processes (CreateLeader / Follow over a TCP group; here threads of this process on
// one GPU, staged collectives) against ranks as threads: the same logits (the same sums in rank
// order; only cuBLASLt's algorithm choice may differ between backend instances).
TEST(CudaTpBackendTest, ProcessGroupRanksMatchThreadRanks) {
  if (!HaveGpu()) GTEST_SKIP() << "no CUDA device";
  const ModelConfig c = SmallModel();
  auto w = MakeDummyWeights(c, DType::kBF16, 11, 0.3f, 0.1f);
  ASSERT_TRUE(w.ok());
  auto threads = MakeTp(c, *w, 2);
  ASSERT_TRUE(threads);
  CudaTpOptions o;
  o.force_staged = true;
  auto comms = SocketGroup(2);
  ASSERT_EQ(comms.size(), 2u);
  Status followed;
  std::thread follower([&] { followed = CudaTpBackend::Follow(c, *w, std::move(comms[1]), 0, o); });
  auto leader = CudaTpBackend::CreateLeader(c, *w, std::move(comms[0]), 0, o);
  ASSERT_TRUE(leader.ok()) << leader.status().ToString();
  EXPECT_EQ((*leader)->tp(), 2);
  EXPECT_EQ((*leader)->collectives(), "staged");
  EXPECT_EQ((*leader)->KvBytesPerToken(), threads->KvBytesPerToken());
  const std::vector<int32_t> ids = {3, 17, 101, 5, 77, 2, 9, 64, 31, 8, 150, 42, 11};
  const std::vector<float> a = PrefillAllPositions(**leader, ids, true);
  const std::vector<float> b = PrefillAllPositions(*threads, ids, true);
  ASSERT_EQ(a.size(), b.size());
  EXPECT_LT(WorstRelL2(a, b, c.vocab_size), 1e-5);
  leader->reset();
  follower.join();
  EXPECT_TRUE(followed.ok()) << followed.ToString();
}

// Errors in Create come back as errors (and the half-made backend is destroyed without hanging
// on follower threads that never started).
TEST(CudaTpBackendTest, CreateErrors) {
  if (!HaveGpu()) GTEST_SKIP() << "no CUDA device";
  const ModelConfig c = SmallModel();
  auto w = MakeDummyWeights(c, DType::kBF16, 11, 0.3f, 0.1f);
  ASSERT_TRUE(w.ok());
  auto odd = CudaTpBackend::Create(c, *w, 3);
  ASSERT_FALSE(odd.ok());
  EXPECT_EQ(odd.status().code(), StatusCode::kInvalidArgument) << odd.status().ToString();
  ModelConfig other = c;
  other.hidden_size = 32;  // weights of another shape
  auto bad = CudaTpBackend::Create(other, *w, 2);
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), StatusCode::kInvalidArgument) << bad.status().ToString();
}

// The engine (inflight batching, chunked prefill, prefix caching) on CUDA ranks through the
// factory: greedy tokens equal the unsharded engine's, or differ first at a near-tie.
TEST(CudaTpBackendTest, EngineGreedyEqualsUnsharded) {
  if (!HaveGpu()) GTEST_SKIP() << "no CUDA device";
  const ModelConfig c = SmallModel();
  auto w = MakeDummyWeights(c, DType::kBF16, 7, 0.3f, 0.1f);
  ASSERT_TRUE(w.ok());
  std::vector<Request> reqs;
  for (int i = 0; i < 6; ++i) {
    Request r;
    for (int j = 0; j < 5 + 7 * i; ++j) r.prompt.push_back((11 * i + 3 * j + 1) % c.vocab_size);
    if (i == 5) r.prompt = reqs[1].prompt;  // a prefix-cache hit
    r.sampling.temperature = 0.0f;
    r.sampling.max_tokens = 12;
    r.sampling.ignore_eos = true;
    reqs.push_back(r);
  }
  std::vector<std::vector<std::vector<int32_t>>> outs;
  for (int tp : {1, 2}) {
    auto backend = MakeTpBackend("cuda", c, *w, tp);
    ASSERT_TRUE(backend.ok()) << backend.status().ToString();
    EXPECT_EQ((*backend)->SupportsDeviceSampling(), tp == 1);
    EngineConfig ec;
    ec.block_size = 8;
    ec.max_num_tokens = 24;  // chunked prefill of the longer prompts
    ec.kv_cache_tokens = 8 * 40;
    auto engine = Engine::Create(**backend, ec);
    ASSERT_TRUE(engine.ok()) << engine.status().ToString();
    std::vector<std::shared_ptr<ResponseStream>> streams;
    for (const Request& r : reqs) {
      auto s = (*engine)->Submit(r);
      ASSERT_TRUE(s.ok()) << s.status().ToString();
      streams.push_back(*s);
    }
    while ((*engine)->HasWork()) ASSERT_TRUE((*engine)->Step().ok());
    outs.emplace_back();
    for (size_t i = 0; i < reqs.size(); ++i) {
      std::vector<int32_t> got;
      while (auto resp = streams[i]->TryPop()) {
        ASSERT_TRUE(resp->error.ok()) << resp->error.ToString();
        got.insert(got.end(), resp->token_ids.begin(), resp->token_ids.end());
      }
      EXPECT_EQ(got.size(), 12u);
      outs.back().push_back(got);
    }
  }
  // Where the two differ, the first differing step must be a near-tie of the unsharded model
  // (TP = 1 also runs CUDA graphs and the GPU sampler, TP = 2 neither): the two tokens' logits
  // after the common prefix, on the unsharded backend, within 0.05.
  auto one = CudaBackend::Create(c, *w);
  ASSERT_TRUE(one.ok()) << one.status().ToString();
  int equal = 0;
  for (size_t i = 0; i < reqs.size(); ++i) {
    const auto& a = outs[0][i];
    const auto& b = outs[1][i];
    ASSERT_EQ(a.size(), b.size());
    size_t s = 0;
    while (s < a.size() && a[s] == b[s]) ++s;
    if (s == a.size()) {
      ++equal;
      continue;
    }
    std::vector<int32_t> ids = reqs[i].prompt;
    ids.insert(ids.end(), a.begin(), a.begin() + s);
    const std::vector<float> logits = PrefillAllPositions(**one, ids, true);
    const float* last = logits.data() + (ids.size() - 1) * c.vocab_size;
    const float gap = std::abs(last[a[s]] - last[b[s]]);
    std::printf("[cuda tp] engine request %zu: tp 2 differs from step %zu on, logit gap %.4f\n", i,
                s, gap);
    EXPECT_LT(gap, 0.05f) << "request " << i << " step " << s;
  }
  std::printf("[cuda tp] engine greedy tp 2 vs tp 1: %d/%zu requests equal\n", equal, reqs.size());
}

}  // namespace
}  // namespace qilin
