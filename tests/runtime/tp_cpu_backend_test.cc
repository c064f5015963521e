// The tensor-parallel CPU backend on the golden fixtures: TP=2 and TP=4 logits equal the
// unsharded CPU backend's within f32 accumulation-order tolerance and Hugging Face's reference as
// tightly as the unsharded backend does; greedy decoding (paged KV cache, decode steps) gives the
// same tokens; the engine on TP=2/TP=4 gives the tokens of the one-request loop on the unsharded
// backend; shapes that do not divide and bad batches are refused without hanging the ranks.
#include <cmath>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "engine/engine.h"
#include "golden_util.h"
#include "model/config.h"
#include "model/safetensors.h"
#include "model/shard.h"
#include "model/weights.h"
#include "runtime/cpu_backend.h"
#include "runtime/greedy_generate.h"
#include "runtime/socket_comm.h"
#include "runtime/tp_cpu_backend.h"
#include "runtime/tp_driver.h"
#include "runtime/tp_factory.h"
#include "socket_group.h"

namespace qilin {
namespace {

namespace fs = std::filesystem;
using namespace golden;

struct Diff {
  double rel_l2 = 0;  // worst over positions
  double max_abs = 0;
};

Diff Compare(const std::vector<float>& a, const float* b, int64_t rows, int64_t vocab) {
  Diff d;
  for (int64_t t = 0; t < rows; ++t) {
    double diff2 = 0, ref2 = 0;
    for (int64_t v = 0; v < vocab; ++v) {
      const double x = a[t * vocab + v], y = b[t * vocab + v];
      if (std::isnan(x)) return {INFINITY, INFINITY};
      diff2 += (x - y) * (x - y);
      ref2 += y * y;
      d.max_abs = std::max(d.max_abs, std::abs(x - y));
    }
    d.rel_l2 = std::max(d.rel_l2, std::sqrt(diff2 / ref2));
  }
  return d;
}

struct Case {
  std::string fixture;
  int tp;
};

class TpGoldenTest : public ::testing::TestWithParam<Case> {};

TEST_P(TpGoldenTest, LogitsEqualTheUnshardedBackendAndTransformers) {
  const auto [name, tp] = GetParam();
  const ModelConfig c = GoldenConfig(name);
  auto full = LoadModelWeights(c, GoldenDir() / name);
  ASSERT_TRUE(full.ok()) << full.status().ToString();
  auto ref_backend = CpuBackend::Create(c, *full);
  ASSERT_TRUE(ref_backend.ok()) << ref_backend.status().ToString();
  auto tp_backend = TpCpuBackend::Load(c, GoldenDir() / name, tp);
  ASSERT_TRUE(tp_backend.ok()) << tp_backend.status().ToString();
  ASSERT_EQ((*tp_backend)->tp(), tp);

  std::ifstream in(GoldenDir() / name / "reference.json");
  const nlohmann::json reference = nlohmann::json::parse(in);
  auto hf = SafetensorsFile::Open(GoldenDir() / name / "reference.safetensors");
  ASSERT_TRUE(hf.ok()) << hf.status().ToString();
  Diff worst_cpu, worst_hf;
  for (size_t p = 0; p < reference["prompts"].size(); ++p) {
    const auto ids = reference["prompts"][p].get<std::vector<int32_t>>();
    const int64_t n = static_cast<int64_t>(ids.size());
    const std::vector<float> want = PrefillAllPositions(**ref_backend, ids, true);
    const std::vector<float> got = PrefillAllPositions(**tp_backend, ids, true);
    ASSERT_EQ(got.size(), n * c.vocab_size);
    const Diff vs_cpu = Compare(got, want.data(), n, c.vocab_size);
    auto hf_logits = (*hf)->Find("logits_" + std::to_string(p));
    ASSERT_TRUE(hf_logits.ok());
    const Diff vs_hf = Compare(got, static_cast<const float*>(hf_logits->data), n, c.vocab_size);
    // f32 sums in another order (partials summed across ranks before the residual add).
    EXPECT_LT(vs_cpu.rel_l2, 5e-6) << name << " prompt " << p;
    EXPECT_LT(vs_hf.rel_l2, 1e-4) << name << " prompt " << p;  // golden_test's bound
    worst_cpu.rel_l2 = std::max(worst_cpu.rel_l2, vs_cpu.rel_l2);
    worst_cpu.max_abs = std::max(worst_cpu.max_abs, vs_cpu.max_abs);
    worst_hf.rel_l2 = std::max(worst_hf.rel_l2, vs_hf.rel_l2);
  }
  std::printf("[tp] %-14s tp=%d vs unsharded: rel L2 %.2e, max abs %.2e; vs transformers: %.2e\n",
              name.c_str(), tp, worst_cpu.rel_l2, worst_cpu.max_abs, worst_hf.rel_l2);
}

TEST_P(TpGoldenTest, GreedyDecodingEqualsTheUnshardedBackend) {
  const auto [name, tp] = GetParam();
  const ModelConfig c = GoldenConfig(name);
  auto full = LoadModelWeights(c, GoldenDir() / name);
  ASSERT_TRUE(full.ok());
  auto ref_backend = CpuBackend::Create(c, *full);
  ASSERT_TRUE(ref_backend.ok());
  auto tp_backend = TpCpuBackend::Create(c, *full, tp);
  ASSERT_TRUE(tp_backend.ok()) << tp_backend.status().ToString();
  std::ifstream in(GoldenDir() / name / "reference.json");
  const nlohmann::json reference = nlohmann::json::parse(in);
  for (size_t p = 0; p < reference["prompts"].size(); ++p) {
    GreedyRequest req;
    req.prompt_ids = reference["prompts"][p].get<std::vector<int32_t>>();
    req.max_tokens = reference["gen_tokens"].get<int32_t>();
    req.ignore_eos = true;
    std::vector<std::vector<int32_t>> outs;
    for (Backend* b :
         {static_cast<Backend*>(ref_backend->get()), static_cast<Backend*>(tp_backend->get())}) {
      ASSERT_TRUE(b->AllocateKvCache({GreedyBlocksNeeded(req, 4), 4}).ok());
      auto out = GenerateGreedy(*b, req);
      ASSERT_TRUE(out.ok()) << out.status().ToString();
      outs.push_back(*out);
    }
    EXPECT_EQ(outs[1], outs[0]) << name << " tp " << tp << " prompt " << p;
  }
}

std::vector<Case> Cases() {
  // GQA (qwen2, qwen3, llama-dynamic; KV heads replicated at tp=4 for llama-dynamic), Qwen v1's
  // fused c_attn and dynamic NTK + logn (qwen-v1, qwen-v1-long), Qwen3 qk-norm with tied
  // embeddings (qwen3), rope scaling (llama-linear, llama-dynamic).
  std::vector<Case> out;
  for (const char* f :
       {"qwen2", "qwen3", "llama-linear", "llama-dynamic", "qwen-v1", "qwen-v1-long"}) {
    out.push_back({f, 2});
  }
  for (const char* f : {"llama-linear", "llama-dynamic", "qwen-v1", "qwen-v1-long"}) {
    out.push_back({f, 4});
  }
  return out;
}

INSTANTIATE_TEST_SUITE_P(Golden, TpGoldenTest, ::testing::ValuesIn(Cases()), [](const auto& info) {
  std::string n = info.param.fixture + "_tp" + std::to_string(info.param.tp);
  for (char& ch : n)
    if (ch == '-') ch = '_';
  return n;
});

TEST(TpCpuBackendTest, ShapesThatDoNotDivideAreRefusedWithTheKeyAndValue) {
  for (const auto& [name, tp, key] : std::vector<std::tuple<std::string, int, std::string>>{
           {"qwen2-yarn-tied", 2, "num_attention_heads = 5"},
           {"qwen2", 4, "num_attention_heads = 6"},
           {"qwen3", 4, "num_attention_heads = 6"},
           {"llama-linear", 3, "num_attention_heads = 4"}}) {
    const ModelConfig c = GoldenConfig(name);
    auto b = TpCpuBackend::Load(c, GoldenDir() / name, tp);
    ASSERT_FALSE(b.ok()) << name;
    EXPECT_EQ(b.status().code(), StatusCode::kInvalidArgument);
    EXPECT_NE(b.status().message().find(key), std::string::npos) << b.status().message();
    EXPECT_NE(b.status().message().find("size " + std::to_string(tp)), std::string::npos)
        << b.status().message();
    auto w = LoadModelWeights(c, GoldenDir() / name);
    ASSERT_TRUE(w.ok());
    auto f = MakeTpBackend("cpu", c, std::move(*w), tp);
    ASSERT_FALSE(f.ok());
    EXPECT_NE(f.status().message().find(key), std::string::npos) << f.status().message();
  }
}

TEST(TpCpuBackendTest, KvBytesCountReplicatedHeadsOnEveryRank) {
  const ModelConfig c = GoldenConfig("llama-dynamic");  // 2 KV heads
  auto w = LoadModelWeights(c, GoldenDir() / "llama-dynamic");
  ASSERT_TRUE(w.ok());
  auto one = CpuBackend::Create(c, *w);
  auto two = TpCpuBackend::Create(c, *w, 2);
  auto four = TpCpuBackend::Create(c, *w, 4);
  ASSERT_TRUE(one.ok() && two.ok() && four.ok());
  EXPECT_EQ((*two)->KvBytesPerToken(), (*one)->KvBytesPerToken());
  EXPECT_EQ((*four)->KvBytesPerToken(), 2 * (*one)->KvBytesPerToken());
  EXPECT_TRUE((*four)->plan(3).kv_replicated);
  EXPECT_EQ((*four)->plan(3).kv_head_begin, 1);
  auto blocks = (*two)->ProposeNumKvBlocks(16, 0.01, 64);
  ASSERT_TRUE(blocks.ok()) << blocks.status().ToString();
  EXPECT_GT(*blocks, 0);
}

TEST(TpCpuBackendTest, BadCallsAreRefusedAndTheRanksKeepWorking) {
  const ModelConfig c = GoldenConfig("qwen2");
  auto w = LoadModelWeights(c, GoldenDir() / "qwen2");
  ASSERT_TRUE(w.ok());
  auto b = TpCpuBackend::Create(c, *w, 2);
  ASSERT_TRUE(b.ok());
  TpCpuBackend& tp = **b;
  std::vector<float> logits;
  ForwardBatch batch;
  batch.token_ids = {1, 2};
  batch.positions = {0, 1};
  batch.slot_mapping = {0, 1};
  batch.query_start = {0, 2};
  batch.context_lens = {2};
  batch.prompt_lens = {2};
  batch.max_blocks_per_seq = 1;
  batch.block_tables = {0};
  batch.logits_indices = {1};
  EXPECT_EQ(tp.Forward(batch, &logits).code(), StatusCode::kFailedPrecondition);  // no KV cache
  EXPECT_EQ(tp.AllocateKvCache({0, 16}).code(), StatusCode::kInvalidArgument);
  ASSERT_TRUE(tp.AllocateKvCache({4, 16}).ok());
  ForwardBatch bad = batch;
  bad.token_ids[1] = static_cast<int32_t>(c.vocab_size);
  Status st = tp.Forward(bad, &logits);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("token_ids[1]"), std::string::npos) << st.message();
  EXPECT_EQ(tp.CopyKvBlocks({{0, 9}}).code(), StatusCode::kInvalidArgument);
  // Still in step: a good batch runs, and a block copy moves the K/V of every rank.
  ASSERT_TRUE(tp.Forward(batch, &logits).ok());
  const std::vector<float> first = logits;
  ASSERT_TRUE(tp.CopyKvBlocks({{0, 3}}).ok());
  ForwardBatch next = batch;  // the same two tokens read through block 3
  next.slot_mapping = {48, 49};
  next.block_tables = {3};
  ASSERT_TRUE(tp.Forward(next, &logits).ok());
  EXPECT_EQ(logits, first);
  // One decode step on top of the copied block: equal to the step on the original block.
  ForwardBatch step;
  step.token_ids = {7};
  step.positions = {2};
  step.query_start = {0, 1};
  step.context_lens = {3};
  step.prompt_lens = {2};
  step.max_blocks_per_seq = 1;
  step.logits_indices = {0};
  step.slot_mapping = {2};
  step.block_tables = {0};
  ASSERT_TRUE(tp.Forward(step, &logits).ok());
  const std::vector<float> on_original = logits;
  step.slot_mapping = {50};
  step.block_tables = {3};
  ASSERT_TRUE(tp.Forward(step, &logits).ok());
  EXPECT_EQ(logits, on_original);
}

// Ranks as processes (each a TpCpuBackend::Follow over a TCP group, here on threads): the
// logits of a prefill and greedy decoding are bit-identical to ranks as threads, since both
// groups sum in rank order; destroying the leader shuts every follower down.
TEST(TpCpuBackendTest, RanksOverSocketsEqualRanksAsThreadsBitForBit) {
  for (const auto& [name, tp] :
       std::vector<std::pair<std::string, int>>{{"qwen2", 2}, {"llama-dynamic", 4}}) {
    const ModelConfig c = GoldenConfig(name);
    auto w = LoadModelWeights(c, GoldenDir() / name);
    ASSERT_TRUE(w.ok());
    auto threads = TpCpuBackend::Create(c, *w, tp);
    ASSERT_TRUE(threads.ok()) << threads.status().ToString();

    auto comms = SocketGroup(tp);
    ASSERT_EQ(static_cast<int>(comms.size()), tp);
    std::vector<Status> followed(tp);
    std::vector<std::thread> followers;
    for (int r = 1; r < tp; ++r) {
      followers.emplace_back(
          [&, r] { followed[r] = TpCpuBackend::Follow(c, *w, std::move(comms[r])); });
    }
    auto leader = TpCpuBackend::CreateLeader(c, *w, std::move(comms[0]));
    ASSERT_TRUE(leader.ok()) << leader.status().ToString();
    EXPECT_EQ((*leader)->tp(), tp);
    EXPECT_EQ((*leader)->KvBytesPerToken(), (*threads)->KvBytesPerToken());

    const std::vector<int32_t> ids = {3, 17, 101, 5, 77, 2, 9, 64, 31, 8, 150, 42, 11};
    EXPECT_EQ(PrefillAllPositions(**leader, ids, true), PrefillAllPositions(**threads, ids, true))
        << name;
    GreedyRequest req;
    req.prompt_ids = ids;
    req.max_tokens = 12;
    req.ignore_eos = true;
    ASSERT_TRUE((*leader)->AllocateKvCache({GreedyBlocksNeeded(req, 4), 4}).ok());
    ASSERT_TRUE((*threads)->AllocateKvCache({GreedyBlocksNeeded(req, 4), 4}).ok());
    auto a = GenerateGreedy(**leader, req);
    auto b = GenerateGreedy(**threads, req);
    ASSERT_TRUE(a.ok() && b.ok());
    EXPECT_EQ(*a, *b) << name;
    leader->reset();
    for (auto& t : followers) t.join();
    for (int r = 1; r < tp; ++r) EXPECT_TRUE(followed[r].ok()) << r << followed[r].ToString();
  }
}

// A following rank that cannot make its shard fails rank 0's start with that rank's error.
TEST(TpCpuBackendTest, AFollowerThatCannotMakeItsShardFailsTheLeaderWithItsError) {
  const ModelConfig c = GoldenConfig("qwen2");
  auto w = LoadModelWeights(c, GoldenDir() / "qwen2");
  ASSERT_TRUE(w.ok());
  auto comms = SocketGroup(2);
  ASSERT_EQ(comms.size(), 2u);
  Status followed;
  std::thread follower([&] {
    ModelWeights missing = *w;
    missing.layers[1].down_proj = TensorView{};  // as a checkpoint without the tensor
    followed = TpCpuBackend::Follow(c, missing, std::move(comms[1]));
  });
  auto leader = TpCpuBackend::CreateLeader(c, *w, std::move(comms[0]));
  follower.join();
  ASSERT_FALSE(leader.ok());
  EXPECT_NE(leader.status().message().find("tensor parallel rank 1"), std::string::npos)
      << leader.status().message();
  EXPECT_FALSE(followed.ok());
}

// A following process that loaded another model (mpirun's nodes with different checkpoints) is
// refused on every rank, naming the rank and the field.
TEST(TpCpuBackendTest, AFollowerWithAnotherModelIsRefused) {
  const ModelConfig c = GoldenConfig("qwen2");
  auto w = LoadModelWeights(c, GoldenDir() / "qwen2");
  ASSERT_TRUE(w.ok());
  auto comms = SocketGroup(2);
  ASSERT_EQ(comms.size(), 2u);
  Status followed;
  std::thread follower([&] {
    ModelConfig other = c;
    other.num_layers += 1;
    followed = TpCpuBackend::Follow(other, *w, std::move(comms[1]));
  });
  auto leader = TpCpuBackend::CreateLeader(c, *w, std::move(comms[0]));
  follower.join();
  ASSERT_FALSE(leader.ok());
  EXPECT_NE(leader.status().message().find(
                "rank 1 loaded another model than rank 0: its num_layers differs"),
            std::string::npos)
      << leader.status().message();
  EXPECT_EQ(followed.code(), StatusCode::kInvalidArgument) << followed.ToString();
}

// A following process that dies: rank 0's next call fails (no hang) and Health() says why from
// then on, which is what turns `serve` unready and stops it.
TEST(TpCpuBackendTest, ALostFollowerFailsTheNextCallAndHealth) {
  const ModelConfig c = GoldenConfig("qwen2");
  auto w = LoadModelWeights(c, GoldenDir() / "qwen2");
  ASSERT_TRUE(w.ok());
  auto comms = SocketGroup(2);
  ASSERT_EQ(comms.size(), 2u);
  std::thread follower([&] {
    std::unique_ptr<Communicator> comm = std::move(comms[1]);
    // As Follow does once its shard is made; then the process is gone.
    EXPECT_TRUE(TpCheckSameModel(*comm, c).ok());
    EXPECT_TRUE(TpExchangeStatus(*comm, Status::Ok()).ok());
  });
  auto leader = TpCpuBackend::CreateLeader(c, *w, std::move(comms[0]));
  follower.join();
  ASSERT_TRUE(leader.ok()) << leader.status().ToString();
  EXPECT_TRUE((*leader)->Health().ok());
  Status st = (*leader)->AllocateKvCache({4, 16});
  EXPECT_EQ(st.code(), StatusCode::kCancelled) << st.ToString();
  EXPECT_NE(st.message().find("rank 1 closed the connection"), std::string::npos) << st.message();
  EXPECT_EQ((*leader)->Health().code(), StatusCode::kCancelled);
  EXPECT_NE((*leader)->Health().message().find("rank 1"), std::string::npos);
}

ModelConfig TinyModel() {
  ModelConfig c;
  c.arch = ModelArch::kQwen2;
  c.vocab_size = 83;
  c.hidden_size = 32;
  c.intermediate_size = 48;
  c.num_layers = 2;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.head_dim = 8;
  c.max_position_embeddings = 160;
  c.attention_bias = true;
  c.eos_token_ids = {5};
  return c;
}

// The engine (inflight batching, chunked prefill, prefix caching) on TP ranks: every request's
// greedy tokens equal the one-request loop on the unsharded backend.
TEST(TpCpuBackendTest, EngineGreedyEqualsTheUnshardedLoop) {
  const ModelConfig c = TinyModel();
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
  std::vector<std::vector<int32_t>> want;
  auto alone = CpuBackend::Create(c, *w);
  ASSERT_TRUE(alone.ok());
  for (const Request& r : reqs) {
    GreedyRequest g{r.prompt, r.sampling.max_tokens, true};
    ASSERT_TRUE((*alone)->AllocateKvCache({GreedyBlocksNeeded(g, 8), 8}).ok());
    auto out = GenerateGreedy(**alone, g);
    ASSERT_TRUE(out.ok());
    want.push_back(*out);
  }
  for (int tp : {1, 2, 4}) {
    auto backend = MakeTpBackend("cpu", c, *w, tp);
    ASSERT_TRUE(backend.ok()) << backend.status().ToString();
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
    for (size_t i = 0; i < reqs.size(); ++i) {
      std::vector<int32_t> got;
      while (auto resp = streams[i]->TryPop()) {
        ASSERT_TRUE(resp->error.ok()) << resp->error.ToString();
        got.insert(got.end(), resp->token_ids.begin(), resp->token_ids.end());
      }
      EXPECT_EQ(got, want[i]) << "tp " << tp << " request " << i;
    }
  }
}

// `--tp 2 --device cuda` where no GPU is visible (or the build has no CUDA): a clear Unavailable
// naming the flag and the device, for real and dummy weights; shapes that do not divide are
// reported first, as on the CPU.
TEST(TpFactoryTest, CudaWithoutAGpuIsAClearError) {
  const ModelConfig c = TinyModel();
  auto w = MakeDummyWeights(c, DType::kBF16, 7, 0.3f, 0.1f);
  ASSERT_TRUE(w.ok());
  auto odd = MakeTpBackend("cuda", c, *w, 3);
  ASSERT_FALSE(odd.ok());
  EXPECT_EQ(odd.status().code(), StatusCode::kInvalidArgument) << odd.status().ToString();
  auto b = MakeTpBackend("cuda", c, *w, 2);
  if (b.ok()) GTEST_SKIP() << "a CUDA device is visible (tests/runtime/cuda_tp_backend_test.cc)";
  EXPECT_EQ(b.status().code(), StatusCode::kUnavailable) << b.status().ToString();
  EXPECT_NE(b.status().message().find("--tp 2 on device 'cuda'"), std::string::npos)
      << b.status().message();
  auto d = MakeDummyTpBackend("cuda", c, DType::kBF16, 1, 2);
  ASSERT_FALSE(d.ok());
  EXPECT_EQ(d.status().code(), StatusCode::kUnavailable) << d.status().ToString();
}

}  // namespace
}  // namespace qilin
