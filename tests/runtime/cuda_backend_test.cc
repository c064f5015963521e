// The CUDA backend against the CPU backend (the reference) on the same random weights: packed
// batches that mix prefill, chunked prefill over a cached prefix and decode, then decode steps
// that run through CUDA graphs; plus KV sizing and input errors.
#include "runtime/cuda_backend.h"

#include <cuda_runtime.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <random>

#include <gtest/gtest.h>

#include "kernels/cuda/pdl.cuh"
#include "runtime/cpu_backend.h"

namespace qilin {
namespace {

#define SKIP_WITHOUT_GPU() \
  if (CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device"

ModelConfig SmallConfig(int64_t head_dim, bool qk_norm) {
  ModelConfig c;
  c.arch = qk_norm ? ModelArch::kQwen3 : ModelArch::kQwen2;
  c.vocab_size = 1003;
  c.hidden_size = 256;
  c.intermediate_size = 384;
  c.num_layers = 2;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.head_dim = head_dim;
  c.max_position_embeddings = 512;
  c.rope_theta = 10000;
  c.attention_bias = !qk_norm;
  c.qk_norm = qk_norm;
  c.rms_norm_eps = 1e-6;
  return c;
}

// A sequence's state shared by both backends: its tokens and its blocks.
struct Seq {
  std::vector<int32_t> tokens;  // all tokens so far (cached + new)
  int32_t cached = 0;           // tokens already in the KV cache
  std::vector<int32_t> blocks;
};

// Packs `take[i]` new tokens of each sequence (from tokens[cached..]); logits at each last token.
ForwardBatch Pack(std::vector<Seq*> seqs, std::vector<int32_t> take, int32_t block_size,
                  int32_t* next_block) {
  ForwardBatch b;
  b.query_start = {0};
  int32_t max_blocks = 0;
  for (size_t i = 0; i < seqs.size(); ++i) {
    Seq& s = *seqs[i];
    const int32_t ctx = s.cached + take[i];
    while (static_cast<int32_t>(s.blocks.size()) * block_size < ctx)
      s.blocks.push_back((*next_block)++);
    max_blocks = std::max<int32_t>(max_blocks, s.blocks.size());
  }
  b.max_blocks_per_seq = max_blocks;
  for (size_t i = 0; i < seqs.size(); ++i) {
    Seq& s = *seqs[i];
    for (int32_t p = s.cached; p < s.cached + take[i]; ++p) {
      b.token_ids.push_back(s.tokens[p]);
      b.positions.push_back(p);
      b.slot_mapping.push_back(int64_t{s.blocks[p / block_size]} * block_size + p % block_size);
    }
    b.query_start.push_back(b.num_tokens());
    b.logits_indices.push_back(b.num_tokens() - 1);
    s.cached += take[i];
    b.context_lens.push_back(s.cached);
    b.prompt_lens.push_back(s.cached);
    for (int32_t j = 0; j < max_blocks; ++j)
      b.block_tables.push_back(j < static_cast<int32_t>(s.blocks.size()) ? s.blocks[j] : -1);
  }
  return b;
}

double RelErr(const std::vector<float>& a, const std::vector<float>& b) {
  EXPECT_EQ(a.size(), b.size());
  double d = 0, r = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::isnan(a[i])) return INFINITY;
    d += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    r += double(b[i]) * b[i];
  }
  return std::sqrt(d / r);
}

void RunMixedBatches(const ModelConfig& config) {
  auto weights = MakeDummyWeights(config, DType::kBF16, 42, 0.05f, 0.1f);
  ASSERT_TRUE(weights.ok()) << weights.status().ToString();
  auto cuda = CudaBackend::Create(config, *weights);
  ASSERT_TRUE(cuda.ok()) << cuda.status().ToString();
  auto cpu = CpuBackend::Create(config, std::move(weights).value());
  ASSERT_TRUE(cpu.ok()) << cpu.status().ToString();
  const int32_t bs = 16, blocks = 64;
  ASSERT_TRUE((*cuda)->AllocateKvCache({blocks, bs}).ok());
  ASSERT_TRUE((*cpu)->AllocateKvCache({blocks, bs}).ok());
  std::mt19937 rng(7);
  auto prompt = [&](int n) {
    Seq s;
    for (int i = 0; i < n; ++i) s.tokens.push_back(static_cast<int32_t>(rng() % config.vocab_size));
    return s;
  };
  Seq a = prompt(70), b = prompt(100), c = prompt(5);
  int32_t next = 0;
  auto step = [&](std::vector<Seq*> seqs, std::vector<int32_t> take, const char* what) {
    ForwardBatch batch = Pack(seqs, take, bs, &next);
    std::vector<float> lc, lg;
    Status s1 = (*cpu)->Forward(batch, &lc);
    Status s2 = (*cuda)->Forward(batch, &lg);
    ASSERT_TRUE(s1.ok()) << s1.ToString();
    ASSERT_TRUE(s2.ok()) << s2.ToString();
    EXPECT_LT(RelErr(lg, lc), 2e-2) << what;
    // Greedy next token from the reference logits, the same for both backends.
    for (size_t i = 0; i < seqs.size(); ++i) {
      const float* row = lc.data() + i * config.vocab_size;
      seqs[i]->tokens.push_back(
          static_cast<int32_t>(std::max_element(row, row + config.vocab_size) - row));
    }
  };
  step({&a, &b}, {70, 63}, "prefill + first chunk");
  b.tokens.pop_back();  // b's prefill is not finished: drop the token sampled mid-prompt
  step({&a, &b, &c}, {1, 37, 5}, "decode + chunked prefill + prefill");
  for (int i = 0; i < 6; ++i) step({&a, &b, &c}, {1, 1, 1}, "decode (graph)");
  EXPECT_GE((*cuda)->NumGraphs(), 1);
}

TEST(CudaBackend, MatchesCpuHeadDim64WithBias) {
  SKIP_WITHOUT_GPU();
  RunMixedBatches(SmallConfig(64, false));
}

TEST(CudaBackend, MatchesCpuHeadDim128QkNorm) {
  SKIP_WITHOUT_GPU();
  RunMixedBatches(SmallConfig(128, true));
}

TEST(CudaBackend, MatchesCpuHeadDim24DecodeKernelOnly) {
  SKIP_WITHOUT_GPU();
  RunMixedBatches(SmallConfig(24, false));
}

// Programmatic dependent launch lets each kernel start before the previous one ends; the results
// must not change. Two backends on the same weights, one launching with PDL and one without,
// step for step through prefill, eager decode and graph decode: bit-identical logits. The shape
// is large enough that the skinny GEMMs run several waves of blocks per kernel.
TEST(CudaBackend, PdlLaunchesGiveIdenticalLogits) {
  SKIP_WITHOUT_GPU();
  ModelConfig config = SmallConfig(128, false);
  config.hidden_size = 1024;
  config.intermediate_size = 2816;
  config.num_layers = 4;
  config.num_heads = 8;
  config.num_kv_heads = 2;
  config.vocab_size = 5003;
  auto weights = MakeDummyWeights(config, DType::kBF16, 11, 0.05f, 0.1f);
  ASSERT_TRUE(weights.ok()) << weights.status().ToString();
  auto on = CudaBackend::Create(config, *weights);
  auto off = CudaBackend::Create(config, std::move(weights).value());
  ASSERT_TRUE(on.ok() && off.ok());
  const int32_t bs = 16;
  ASSERT_TRUE((*on)->AllocateKvCache({64, bs}).ok());
  ASSERT_TRUE((*off)->AllocateKvCache({64, bs}).ok());
  std::mt19937 rng(3);
  std::vector<Seq> seqs(3);
  for (size_t i = 0; i < seqs.size(); ++i)
    for (size_t j = 0; j < 20 + 37 * i; ++j)
      seqs[i].tokens.push_back(static_cast<int32_t>(rng() % config.vocab_size));
  int32_t next = 0;
  std::vector<int32_t> take;
  for (const Seq& q : seqs) take.push_back(static_cast<int32_t>(q.tokens.size()));
  for (int step = 0; step < 8; ++step) {
    ForwardBatch batch = Pack({&seqs[0], &seqs[1], &seqs[2]}, take, bs, &next);
    std::vector<float> lon, loff;
    cuda::SetPdlOverride(1);
    Status s1 = (*on)->Forward(batch, &lon);
    cuda::SetPdlOverride(0);
    Status s2 = (*off)->Forward(batch, &loff);
    cuda::SetPdlOverride(-1);
    ASSERT_TRUE(s1.ok()) << s1.ToString();
    ASSERT_TRUE(s2.ok()) << s2.ToString();
    ASSERT_EQ(lon.size(), loff.size());
    EXPECT_EQ(std::memcmp(lon.data(), loff.data(), lon.size() * sizeof(float)), 0)
        << "step " << step << " (max |diff| " <<
        [&] {
          float d = 0;
          for (size_t i = 0; i < lon.size(); ++i) d = std::max(d, std::fabs(lon[i] - loff[i]));
          return d;
        }()
        << ")";
    for (size_t i = 0; i < seqs.size(); ++i) {
      const float* row = loff.data() + i * config.vocab_size;
      seqs[i].tokens.push_back(
          static_cast<int32_t>(std::max_element(row, row + config.vocab_size) - row));
    }
    take.assign(seqs.size(), 1);
  }
  EXPECT_GE((*on)->NumGraphs(), 1);
}

// Graph steps launch decode attention over a grid of kMaxSplits splits (the blocks past a token's
// splits return at once), eager steps over the step's most splits: three sequences decoded from
// 9, 40 and 150 tokens to past 300 keys go through 1 .. 16 splits (32 keys per split up to 512),
// every step's logits equal with and without graphs.
TEST(CudaBackend, GraphStepsMatchEagerStepsThroughEverySplitCount) {
  SKIP_WITHOUT_GPU();
  ModelConfig config = SmallConfig(128, false);
  config.num_layers = 2;
  auto weights = MakeDummyWeights(config, DType::kBF16, 17, 0.05f, 0.1f);
  ASSERT_TRUE(weights.ok()) << weights.status().ToString();
  CudaBackendOptions eager_opts;
  eager_opts.cuda_graphs = false;
  auto graph = CudaBackend::Create(config, *weights);
  auto eager = CudaBackend::Create(config, std::move(weights).value(), eager_opts);
  ASSERT_TRUE(graph.ok() && eager.ok());
  const int32_t bs = 16;
  ASSERT_TRUE((*graph)->AllocateKvCache({96, bs}).ok());
  ASSERT_TRUE((*eager)->AllocateKvCache({96, bs}).ok());
  std::mt19937 rng(9);
  std::vector<Seq> seqs(3);
  const int32_t prompt[3] = {9, 40, 150};
  for (size_t i = 0; i < seqs.size(); ++i)
    for (int32_t j = 0; j < prompt[i]; ++j)
      seqs[i].tokens.push_back(static_cast<int32_t>(rng() % config.vocab_size));
  int32_t next = 0;
  std::vector<int32_t> take(prompt, prompt + 3);
  for (int step = 0; step < 170; ++step) {
    ForwardBatch batch = Pack({&seqs[0], &seqs[1], &seqs[2]}, take, bs, &next);
    std::vector<float> lg, le;
    ASSERT_TRUE((*graph)->Forward(batch, &lg).ok());
    ASSERT_TRUE((*eager)->Forward(batch, &le).ok());
    ASSERT_EQ(lg.size(), le.size());
    ASSERT_EQ(std::memcmp(lg.data(), le.data(), lg.size() * sizeof(float)), 0)
        << "step " << step << ", contexts " << seqs[0].cached << " " << seqs[1].cached << " "
        << seqs[2].cached;
    for (size_t i = 0; i < seqs.size(); ++i) {
      const float* row = le.data() + i * config.vocab_size;
      seqs[i].tokens.push_back(
          static_cast<int32_t>(std::max_element(row, row + config.vocab_size) - row));
    }
    take.assign(seqs.size(), 1);
  }
  EXPECT_GE((*graph)->NumGraphs(), 1);
  EXPECT_EQ((*eager)->NumGraphs(), 0);
}

// Step timing reports the GPU time of an eager prefill and of graph decode steps, no more than
// the wall time of the call; switched off it reports 0.
TEST(CudaBackend, StepTimingReportsGpuTime) {
  SKIP_WITHOUT_GPU();
  const ModelConfig config = SmallConfig(64, false);
  auto be = CudaBackend::CreateDummy(config, 5);
  ASSERT_TRUE(be.ok()) << be.status().ToString();
  ASSERT_TRUE((*be)->AllocateKvCache({16, 16}).ok());
  ASSERT_TRUE((*be)->SetStepTiming(true).ok());
  Seq seq;
  for (int32_t i = 0; i < 21; ++i) seq.tokens.push_back(i % config.vocab_size);
  int32_t next = 0;
  std::vector<float> logits;
  for (int step = 0; step < 4; ++step) {
    const int32_t take = step == 0 ? 21 : 1;
    ForwardBatch batch = Pack({&seq}, {take}, 16, &next);
    const auto t0 = std::chrono::steady_clock::now();
    ASSERT_TRUE((*be)->Forward(batch, &logits).ok());
    const double wall_ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    EXPECT_GT((*be)->LastStepGpuMs(), 0.0) << "step " << step;
    EXPECT_LE((*be)->LastStepGpuMs(), wall_ms) << "step " << step;
    seq.tokens.push_back(0);
  }
  EXPECT_GE((*be)->NumGraphs(), 1);
  ASSERT_TRUE((*be)->SetStepTiming(false).ok());
  ForwardBatch batch = Pack({&seq}, {1}, 16, &next);
  ASSERT_TRUE((*be)->Forward(batch, &logits).ok());
  EXPECT_EQ((*be)->LastStepGpuMs(), 0.0);
}

// Launched steps (LaunchForwardSample / WaitForwardSample) with the decode tokens given as
// PreviousRowToken placeholders, each step launched before the previous one is waited for,
// sample exactly what ForwardSample steps with the real tokens sample: the same tokens and
// logprobs bit for bit, through an eager prefill, graph decode steps, a sequence joining with a
// prefill mid-way (eager again) and seeded top-k sampling. Then the misuse errors.
TEST(CudaBackend, LaunchedStepsWithPlaceholdersEqualForwardSample) {
  SKIP_WITHOUT_GPU();
  const ModelConfig config = SmallConfig(64, false);
  auto weights = MakeDummyWeights(config, DType::kBF16, 31, 0.05f, 0.1f);
  ASSERT_TRUE(weights.ok()) << weights.status().ToString();
  auto ref = CudaBackend::Create(config, *weights);
  auto run = CudaBackend::Create(config, std::move(weights).value());
  ASSERT_TRUE(ref.ok() && run.ok());
  ASSERT_TRUE((*run)->SupportsLaunchedSteps());
  const int32_t bs = 16;
  ASSERT_TRUE((*ref)->AllocateKvCache({64, bs}).ok());
  ASSERT_TRUE((*run)->AllocateKvCache({64, bs}).ok());
  std::mt19937 rng(13);
  auto prompt = [&](int n) {
    Seq s;
    for (int i = 0; i < n; ++i) s.tokens.push_back(static_cast<int32_t>(rng() % config.vocab_size));
    return s;
  };
  Seq a = prompt(23), b = prompt(40), c = prompt(57);
  auto spec_for = [&](const std::vector<int32_t>& tokens, int row) {
    DeviceSampleSpec d;
    d.greedy = row != 1;  // row 1: seeded top-k sampling
    d.temperature = 0.8f;
    d.top_k = 12;
    d.logprobs = 2;
    d.tokens = tokens;
    d.prompt_len = 10;
    d.seed = 99;
    d.counter = tokens.size();
    return d;
  };
  // The reference trajectory: real tokens, ForwardSample.
  int32_t next_block = 0;
  std::vector<ForwardBatch> batches;
  std::vector<std::vector<DeviceSampleSpec>> specs;
  std::vector<std::vector<DeviceSampleResult>> want;
  std::vector<std::vector<Seq*>> rows;        // each step's sequences, in row order
  std::vector<std::vector<int32_t>> history;  // specs' token spans point here
  history.reserve(200);
  for (int step = 0; step < 40; ++step) {
    std::vector<Seq*> seqs = {&a, &b};
    std::vector<int32_t> take = {step == 0 ? 23 : 1, step == 0 ? 40 : 1};
    if (step >= 12) {
      seqs.push_back(&c);
      take.push_back(step == 12 ? 57 : 1);
    }
    std::vector<DeviceSampleSpec> sp;
    for (size_t i = 0; i < seqs.size(); ++i) {
      history.push_back(seqs[i]->tokens);
      sp.push_back(spec_for(history.back(), static_cast<int>(i)));
    }
    batches.push_back(Pack(seqs, take, bs, &next_block));
    want.emplace_back();
    Status st = (*ref)->ForwardSample(batches.back(), sp, &want.back());
    ASSERT_TRUE(st.ok()) << "step " << step << ": " << st.ToString();
    for (size_t i = 0; i < seqs.size(); ++i) seqs[i]->tokens.push_back(want.back()[i].token);
    specs.push_back(std::move(sp));
    rows.push_back(seqs);
  }
  // Replayed launched: a decode row's token is the previous step's row of its sequence.
  std::vector<DeviceSampleResult> got;
  auto check = [&](size_t k) {
    ASSERT_TRUE((*run)->WaitForwardSample(&got).ok());
    ASSERT_EQ(got.size(), want[k].size());
    for (size_t r = 0; r < got.size(); ++r) {
      EXPECT_EQ(got[r].token, want[k][r].token) << "step " << k << " row " << r;
      EXPECT_EQ(got[r].logprob, want[k][r].logprob) << "step " << k << " row " << r;
      EXPECT_EQ(got[r].top, want[k][r].top) << "step " << k << " row " << r;
      EXPECT_FALSE(got[r].on_host);
    }
  };
  int placeholders = 0;
  for (size_t k = 0; k < batches.size(); ++k) {
    ForwardBatch lb = batches[k];
    for (size_t i = 0; k > 0 && i < rows[k].size(); ++i) {
      if (lb.query_start[i + 1] - lb.query_start[i] != 1) continue;  // a prefill
      for (size_t r = 0; r < rows[k - 1].size(); ++r) {
        if (rows[k - 1][r] != rows[k][i]) continue;
        lb.token_ids[lb.query_start[i]] = Backend::PreviousRowToken(static_cast<int32_t>(r));
        ++placeholders;
      }
    }
    Status st = (*run)->LaunchForwardSample(lb, specs[k]);
    ASSERT_TRUE(st.ok()) << "step " << k << ": " << st.ToString();
    if (k > 0) check(k - 1);
  }
  check(batches.size() - 1);
  EXPECT_GT(placeholders, 80);
  EXPECT_GE((*run)->NumGraphs(), 1);
  // Misuse: a third launch, a synchronous step or a timing switch while launched steps wait.
  ForwardBatch one = Pack({&a}, {1}, bs, &next_block);
  const DeviceSampleSpec sa = spec_for(a.tokens, 0);
  ASSERT_TRUE((*run)->LaunchForwardSample(one, {&sa, 1}).ok());
  ASSERT_TRUE((*run)->LaunchForwardSample(one, {&sa, 1}).ok());
  EXPECT_EQ((*run)->LaunchForwardSample(one, {&sa, 1}).code(), StatusCode::kFailedPrecondition);
  std::vector<float> logits;
  EXPECT_EQ((*run)->Forward(one, &logits).code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ((*run)->SetStepTiming(true).code(), StatusCode::kFailedPrecondition);
  ASSERT_TRUE((*run)->WaitForwardSample(&got).ok());
  ASSERT_TRUE((*run)->WaitForwardSample(&got).ok());
  EXPECT_EQ((*run)->WaitForwardSample(&got).code(), StatusCode::kFailedPrecondition);
  // A placeholder past the previous step's rows (it sampled one), and top-p sampling.
  ForwardBatch bad = one;
  bad.token_ids[0] = Backend::PreviousRowToken(1);
  Status st = (*run)->LaunchForwardSample(bad, {&sa, 1});
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("row 1 of the previous step"), std::string::npos) << st.ToString();
  DeviceSampleSpec nucleus = sa;
  nucleus.greedy = false;
  nucleus.top_p = 0.9f;
  EXPECT_EQ((*run)->LaunchForwardSample(one, {&nucleus, 1}).code(), StatusCode::kInvalidArgument);
  // Synchronous steps still run once nothing is launched.
  EXPECT_TRUE((*run)->ForwardSample(one, {&sa, 1}, &got).ok());
}

TEST(CudaBackend, KvSizingAndErrors) {
  SKIP_WITHOUT_GPU();
  const ModelConfig config = SmallConfig(64, false);
  auto be = CudaBackend::CreateDummy(config, 3);
  ASSERT_TRUE(be.ok()) << be.status().ToString();
  auto blocks = (*be)->ProposeNumKvBlocks(32, 0.5, 512);
  ASSERT_TRUE(blocks.ok()) << blocks.status().ToString();
  EXPECT_GT(*blocks, 100);
  // Activations for two billion tokens per step cannot fit: a clear error, not a crash.
  auto too_many = (*be)->ProposeNumKvBlocks(32, 0.9, 2000000000);
  EXPECT_EQ(too_many.status().code(), StatusCode::kResourceExhausted)
      << too_many.status().ToString();
  EXPECT_FALSE((*be)->ProposeNumKvBlocks(0, 0.5, 16).ok());
  EXPECT_FALSE((*be)->ProposeNumKvBlocks(32, 1.5, 16).ok());
  ForwardBatch b;
  b.token_ids = {1};
  b.positions = {0};
  b.slot_mapping = {0};
  b.query_start = {0, 1};
  b.context_lens = {1};
  b.prompt_lens = {1};
  b.block_tables = {0};
  b.max_blocks_per_seq = 1;
  b.logits_indices = {0};
  std::vector<float> logits;
  EXPECT_EQ((*be)->Forward(b, &logits).code(), StatusCode::kFailedPrecondition);
  ASSERT_TRUE((*be)->AllocateKvCache({std::min(*blocks, 64), 32}).ok());
  ASSERT_TRUE((*be)->Forward(b, &logits).ok());
  ASSERT_EQ(logits.size(), static_cast<size_t>(config.vocab_size));
  for (float v : logits) ASSERT_TRUE(std::isfinite(v));
  b.token_ids = {static_cast<int32_t>(config.vocab_size)};
  Status st = (*be)->Forward(b, &logits);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.ToString().find("vocabulary"), std::string::npos) << st.ToString();
  EXPECT_FALSE((*be)->CopyKvBlocks({{0, 9999}}).ok());
  EXPECT_TRUE((*be)->CopyKvBlocks({{0, 1}}).ok());
}

}  // namespace
}  // namespace qilin
