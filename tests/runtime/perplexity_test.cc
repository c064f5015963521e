// Perplexity windows against train.py's windows() (expected lists written from the Python), the
// batched computation against a naive one-window-at-a-time double log-softmax, bad input, and the
// issue's acceptance check: the demo model's held-out perplexity equals transformers' 78.53.
#include "runtime/perplexity.h"

#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <random>
#include <sstream>

#include "model/weights.h"
#include "runtime/backend_factory.h"
#include "runtime/cpu_backend.h"
#include "tokenizer/tokenizer.h"

namespace qilin {
namespace {

std::vector<std::tuple<int64_t, int64_t, int64_t>> Triples(int64_t n, int64_t context) {
  std::vector<std::tuple<int64_t, int64_t, int64_t>> out;
  for (const auto& w : PerplexityWindows(n, context))
    out.emplace_back(w.begin, w.end, w.first_scored);
  return out;
}

TEST(Perplexity, WindowsAsTrainPy) {
  using T = std::vector<std::tuple<int64_t, int64_t, int64_t>>;
  // list(windows(10, 4)), list(windows(11, 5)), list(windows(3, 8)), list(windows(2, 2)).
  EXPECT_EQ(Triples(10, 4), (T{{0, 4, 1}, {2, 6, 4}, {4, 8, 6}, {6, 10, 8}}));
  EXPECT_EQ(Triples(11, 5), (T{{0, 5, 1}, {2, 7, 5}, {4, 9, 7}, {6, 11, 9}}));
  EXPECT_EQ(Triples(3, 8), (T{{0, 3, 1}}));
  EXPECT_EQ(Triples(2, 2), (T{{0, 2, 1}}));
  EXPECT_TRUE(Triples(1, 4).empty());
  // Every position 1..n-1 scored exactly once, windows within the context, for many shapes.
  for (int64_t n : {2, 3, 17, 100, 513}) {
    for (int64_t ctx : {2, 3, 7, 16, 512}) {
      std::vector<int> scored(n, 0);
      for (const auto& w : PerplexityWindows(n, ctx)) {
        ASSERT_LE(w.end - w.begin, ctx);
        ASSERT_GT(w.first_scored, w.begin);
        for (int64_t p = w.first_scored; p < w.end; ++p) ++scored[p];
      }
      EXPECT_EQ(scored[0], 0);
      for (int64_t p = 1; p < n; ++p) ASSERT_EQ(scored[p], 1) << "n=" << n << " ctx=" << ctx;
    }
  }
}

TEST(Perplexity, LogSoftmaxAtMatchesDouble) {
  std::mt19937 rng(3);
  std::normal_distribution<float> nd(0.0f, 6.0f);
  for (int64_t vocab : {1, 7, 8, 61, 1029}) {
    std::vector<float> row(vocab);
    for (auto& v : row) v = nd(rng);
    double mx = -INFINITY, sum = 0;
    for (float v : row) mx = std::max<double>(mx, v);
    for (float v : row) sum += std::exp(static_cast<double>(v) - mx);
    for (int64_t t : {int64_t{0}, vocab / 2, vocab - 1}) {
      const double want = row[t] - mx - std::log(sum);
      EXPECT_NEAR(LogSoftmaxAt(row.data(), vocab, t), want, 1e-6) << "vocab " << vocab;
    }
  }
}

ModelConfig TinyQwen2() {
  ModelConfig c;
  c.arch = ModelArch::kQwen2;
  c.vocab_size = 97;
  c.hidden_size = 32;
  c.intermediate_size = 48;
  c.num_layers = 2;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.head_dim = 8;
  c.max_position_embeddings = 64;
  c.rms_norm_eps = 1e-6;
  c.rope_theta = 10000.0;
  c.attention_bias = true;
  return c;
}

// The batched computation vs windows run one at a time with every row's logits and a double
// log-softmax written here.
TEST(Perplexity, BatchedWindowsMatchNaive) {
  const ModelConfig c = TinyQwen2();
  auto w = MakeDummyWeights(c, DType::kBF16, 5, 0.3f, 0.1f);
  ASSERT_TRUE(w.ok());
  auto backend = CpuBackend::Create(c, std::move(w).value());
  ASSERT_TRUE(backend.ok());
  std::mt19937 rng(9);
  std::vector<int32_t> ids(203);
  for (auto& id : ids) id = static_cast<int32_t>(rng() % c.vocab_size);
  for (int64_t context : {2, 9, 16, 64}) {
    // Naive: each window alone, block size 1, all logits.
    double nll = 0;
    int64_t count = 0;
    for (const auto& win : PerplexityWindows(ids.size(), context)) {
      const int64_t len = win.end - win.begin;
      ASSERT_TRUE((*backend)->AllocateKvCache({static_cast<int32_t>(len), 1}).ok());
      ForwardBatch b;
      b.query_start = {0, static_cast<int32_t>(len)};
      b.context_lens = {static_cast<int32_t>(len)};
      b.prompt_lens = {static_cast<int32_t>(len)};
      b.max_blocks_per_seq = static_cast<int32_t>(len);
      for (int64_t i = 0; i < len; ++i) {
        b.token_ids.push_back(ids[win.begin + i]);
        b.positions.push_back(static_cast<int32_t>(i));
        b.slot_mapping.push_back(i);
        b.block_tables.push_back(static_cast<int32_t>(i));
        b.logits_indices.push_back(static_cast<int32_t>(i));
      }
      std::vector<float> logits;
      ASSERT_TRUE((*backend)->Forward(b, &logits).ok());
      for (int64_t p = win.first_scored; p < win.end; ++p) {
        const float* row = &logits[(p - 1 - win.begin) * c.vocab_size];
        double mx = -INFINITY, sum = 0;
        for (int64_t v = 0; v < c.vocab_size; ++v) mx = std::max<double>(mx, row[v]);
        for (int64_t v = 0; v < c.vocab_size; ++v) sum += std::exp(row[v] - mx);
        nll -= row[ids[p]] - mx - std::log(sum);
        ++count;
      }
    }
    for (int32_t batch_windows : {1, 3, 100}) {
      PerplexityOptions o;
      o.context = context;
      o.batch_windows = batch_windows;
      o.block_size = 4;
      auto r = ComputePerplexity(**backend, ids, o);
      ASSERT_TRUE(r.ok()) << r.status().ToString();
      EXPECT_EQ(r->tokens, static_cast<int64_t>(ids.size()) - 1);
      EXPECT_EQ(r->tokens, count);
      EXPECT_NEAR(r->nll, nll, 1e-6 * nll) << "context " << context << " batch " << batch_windows;
      EXPECT_NEAR(r->ppl, std::exp(nll / count), 1e-6 * r->ppl);
    }
  }
}

TEST(Perplexity, BadInput) {
  const ModelConfig c = TinyQwen2();
  auto backend = CpuBackend::Create(c, MakeDummyWeights(c, DType::kBF16, 5).value());
  ASSERT_TRUE(backend.ok());
  std::vector<int32_t> ids = {1, 2, 3, 4};
  PerplexityOptions o;
  o.context = 8;
  auto expect_error = [&](std::vector<int32_t> v, PerplexityOptions opt, const std::string& what) {
    auto r = ComputePerplexity(**backend, v, opt);
    ASSERT_FALSE(r.ok()) << what;
    EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument) << what;
    EXPECT_NE(r.status().message().find(what), std::string::npos) << r.status().message();
  };
  expect_error({5}, o, "1 token(s)");
  expect_error({}, o, "0 token(s)");
  PerplexityOptions small = o;
  small.context = 1;
  expect_error(ids, small, "context = 1 must be in [2, 64]");
  PerplexityOptions big = o;
  big.context = 65;
  expect_error(ids, big, "context = 65 must be in [2, 64]");
  PerplexityOptions zero = o;
  zero.batch_windows = 0;
  expect_error(ids, zero, "batch_windows = 0");
  expect_error({1, 97, 2}, o, "token 1 = 97 is outside the vocabulary [0, 97)");
  expect_error({1, -1}, o, "token 1 = -1");
}

// The acceptance check: models/demo's held-out perplexity is transformers' 78.52876
// (models/demo/train_report.json, float32 on CPU) to 3 significant digits, over 24676 tokens.
TEST(Perplexity, DemoModelHeldOutMatchesTransformers) {
  const std::string dir = std::string(QILIN_SOURCE_DIR) + "/models/demo";
  auto config = LoadModelConfig(dir);
  ASSERT_TRUE(config.ok()) << config.status().ToString();
  auto weights = LoadModelWeights(*config, dir);
  ASSERT_TRUE(weights.ok()) << weights.status().ToString();
  auto backend = MakeBackend("cpu", *config, std::move(weights).value());
  ASSERT_TRUE(backend.ok());
  auto tok = tokenizer::Tokenizer::Load(dir);
  ASSERT_TRUE(tok.ok()) << tok.status().ToString();
  std::ifstream f(dir + "/heldout.txt", std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  auto ids = (*tok)->Encode(ss.str());
  ASSERT_TRUE(ids.ok());
  EXPECT_EQ(ids->size(), 24677u);
  PerplexityOptions o;
  o.context = 512;
  o.batch_windows = 4;
  auto r = ComputePerplexity(**backend, *ids, o);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->tokens, 24676);
  EXPECT_NEAR(r->ppl, 78.52876, 0.05);  // 78.5 to 3 significant digits
}

}  // namespace
}  // namespace qilin
