// CpuBackend on tiny random models of each architecture: against an independent dense (unpaged)
// double-precision implementation written here, and batch / chunk invariance.
#include "runtime/cpu_backend.h"

#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>

#include "model/weights.h"
#include "runtime/backend_factory.h"
#include "runtime/validate_batch.h"

namespace qilin {
namespace {

ModelConfig TinyConfig(ModelArch arch) {
  ModelConfig c;
  c.arch = arch;
  c.vocab_size = 61;
  c.hidden_size = 60;
  c.intermediate_size = 45;
  c.num_layers = 2;
  c.num_heads = 6;
  c.num_kv_heads = 2;
  c.head_dim = 10;
  c.max_position_embeddings = 256;
  c.rms_norm_eps = 1e-6;
  c.rope_theta = 10000.0;
  switch (arch) {
    case ModelArch::kLlama:
      // Dynamic NTK scaling that triggers past 12 tokens.
      c.rope_scaling.type = RopeScalingType::kDynamic;
      c.rope_scaling.factor = 2.0;
      c.max_position_embeddings = 12;
      c.tie_word_embeddings = true;
      break;
    case ModelArch::kQwen2:
      c.attention_bias = true;
      c.rope_theta = 1e6;
      break;
    case ModelArch::kQwen3:
      c.qk_norm = true;
      c.head_dim = 16;  // explicit: q_size 96 != hidden 60
      c.num_kv_heads = 3;
      c.o_bias = true;
      break;
    case ModelArch::kQwenV1:
      c.num_kv_heads = c.num_heads;  // MHA
      c.attention_bias = true;
      c.use_dynamic_ntk = true;
      c.use_logn_attn = true;
      c.seq_length = 8;
      break;
  }
  return c;
}

const char* ArchName(ModelArch a) {
  switch (a) {
    case ModelArch::kLlama:
      return "Llama";
    case ModelArch::kQwen2:
      return "Qwen2";
    case ModelArch::kQwen3:
      return "Qwen3";
    case ModelArch::kQwenV1:
      return "QwenV1";
  }
  return "?";
}

double W(const TensorView& t, int64_t i) {
  const auto* h = static_cast<const uint16_t*>(t.data);
  switch (t.dtype) {
    case DType::kF32:
      return static_cast<const float*>(t.data)[i];
    case DType::kF16:
      return F16ToF32(h[i]);
    default:
      return Bf16ToF32(h[i]);
  }
}

using Vec = std::vector<double>;

Vec MatVec(const TensorView& w, const Vec& x, const TensorView* bias) {
  const int64_t out = w.shape[0], in = w.shape[1];
  Vec y(out);
  for (int64_t o = 0; o < out; ++o) {
    double s = (bias && !bias->empty()) ? W(*bias, o) : 0.0;
    for (int64_t k = 0; k < in; ++k) s += W(w, o * in + k) * x[k];
    y[o] = s;
  }
  return y;
}

void RmsNormRows(Vec& x, int64_t dim, const TensorView& w, double eps) {
  for (size_t r = 0; r < x.size() / dim; ++r) {
    double ss = 0;
    for (int64_t j = 0; j < dim; ++j) ss += x[r * dim + j] * x[r * dim + j];
    const double inv = 1.0 / std::sqrt(ss / dim + eps);
    for (int64_t j = 0; j < dim; ++j) x[r * dim + j] = x[r * dim + j] * inv * W(w, j);
  }
}

// The rope base for a token, written from the model definitions: HF dynamic NTK
// (_compute_dynamic_ntk_parameters with seq_len = max(prompt_len, pos + 1)) and Qwen v1's
// get_ntk_alpha on the prompt length.
double RopeBase(const ModelConfig& c, int64_t prompt_len, int64_t pos) {
  const double d = static_cast<double>(c.head_dim);
  double base = c.rope_theta;
  if (c.use_dynamic_ntk && prompt_len > c.seq_length) {
    const double alpha = std::max(
        std::pow(2.0, std::ceil(std::log2(double(prompt_len) / c.seq_length) + 1)) - 1, 1.0);
    base *= std::pow(alpha, d / (d - 2));
  }
  if (c.rope_scaling.type == RopeScalingType::kDynamic) {
    const double seq_len = std::max<double>(prompt_len, pos + 1);
    const double max_pos = c.max_position_embeddings;
    if (seq_len > max_pos) {
      const double f = c.rope_scaling.factor;
      base *= std::pow(f * seq_len / max_pos - (f - 1), d / (d - 2));
    }
  }
  return base;
}

void Rope(double* x, int64_t heads, int64_t d, double base, int64_t pos) {
  const int64_t half = d / 2;
  for (int64_t h = 0; h < heads; ++h) {
    double* xh = x + h * d;
    for (int64_t i = 0; i < half; ++i) {
      const double ang = pos / std::pow(base, 2.0 * i / d);
      const double a = xh[i], b = xh[i + half];
      xh[i] = a * std::cos(ang) - b * std::sin(ang);
      xh[i + half] = b * std::cos(ang) + a * std::sin(ang);
    }
  }
}

// Dense causal forward over the whole sequence; logits of every position.
std::vector<Vec> DenseLogits(const ModelConfig& c, const ModelWeights& w,
                             const std::vector<int32_t>& tokens, int64_t prompt_len) {
  const int64_t n = tokens.size(), hid = c.hidden_size, d = c.head_dim;
  const int64_t group = c.num_heads / c.num_kv_heads;
  std::vector<Vec> x(n, Vec(hid));
  for (int64_t t = 0; t < n; ++t)
    for (int64_t j = 0; j < hid; ++j) x[t][j] = W(w.embed_tokens, tokens[t] * hid + j);
  for (const LayerWeights& l : w.layers) {
    std::vector<Vec> q(n), k(n), v(n);
    for (int64_t t = 0; t < n; ++t) {
      Vec h = x[t];
      RmsNormRows(h, hid, l.input_norm, c.rms_norm_eps);
      q[t] = MatVec(l.q_proj, h, &l.q_bias);
      k[t] = MatVec(l.k_proj, h, &l.k_bias);
      v[t] = MatVec(l.v_proj, h, &l.v_bias);
      if (c.qk_norm) {
        RmsNormRows(q[t], d, l.q_norm, c.rms_norm_eps);
        RmsNormRows(k[t], d, l.k_norm, c.rms_norm_eps);
      }
      const double base = RopeBase(c, prompt_len, t);
      Rope(q[t].data(), c.num_heads, d, base, t);
      Rope(k[t].data(), c.num_kv_heads, d, base, t);
      if (c.use_logn_attn && t + 1 > c.seq_length) {
        for (double& e : q[t]) e *= std::log(double(t + 1)) / std::log(double(c.seq_length));
      }
    }
    for (int64_t t = 0; t < n; ++t) {
      Vec attn(c.q_size());
      for (int64_t hh = 0; hh < c.num_heads; ++hh) {
        const int64_t kvh = hh / group;
        Vec sc(t + 1);
        double mx = -INFINITY;
        for (int64_t j = 0; j <= t; ++j) {
          double s = 0;
          for (int64_t e = 0; e < d; ++e) s += q[t][hh * d + e] * k[j][kvh * d + e];
          sc[j] = s / std::sqrt(double(d));
          mx = std::max(mx, sc[j]);
        }
        double sum = 0;
        for (double& s : sc) sum += (s = std::exp(s - mx));
        for (int64_t j = 0; j <= t; ++j)
          for (int64_t e = 0; e < d; ++e) attn[hh * d + e] += sc[j] / sum * v[j][kvh * d + e];
      }
      Vec o = MatVec(l.o_proj, attn, &l.o_bias);
      for (int64_t j = 0; j < hid; ++j) x[t][j] += o[j];
      Vec h = x[t];
      RmsNormRows(h, hid, l.post_attention_norm, c.rms_norm_eps);
      Vec g = MatVec(l.gate_proj, h, nullptr), u = MatVec(l.up_proj, h, nullptr);
      for (size_t j = 0; j < g.size(); ++j) g[j] = g[j] / (1 + std::exp(-g[j])) * u[j];
      Vec dn = MatVec(l.down_proj, g, nullptr);
      for (int64_t j = 0; j < hid; ++j) x[t][j] += dn[j];
    }
  }
  std::vector<Vec> logits(n);
  for (int64_t t = 0; t < n; ++t) {
    RmsNormRows(x[t], hid, w.final_norm, c.rms_norm_eps);
    logits[t] = MatVec(w.lm_head, x[t], nullptr);
  }
  return logits;
}

double RelL2(const float* got, const Vec& want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    if (!std::isfinite(got[i])) return INFINITY;
    num += (got[i] - want[i]) * (got[i] - want[i]);
    den += want[i] * want[i];
  }
  return std::sqrt(num / den);
}

// Drives a CpuBackend like an engine would: sequences, shuffled block ids, packed steps.
class Harness {
 public:
  struct Seq {
    std::vector<int32_t> tokens;  // all tokens known so far (prompt, then appended)
    int32_t prompt_len = 0;
    int32_t cached = 0;
    std::vector<int32_t> blocks;
  };

  Harness(CpuBackend* backend, int32_t block_size, int32_t num_blocks, uint32_t seed)
      : backend_(backend), block_size_(block_size) {
    EXPECT_TRUE(backend->AllocateKvCache({num_blocks, block_size}).ok());
    free_.resize(num_blocks);
    std::iota(free_.begin(), free_.end(), 0);
    std::mt19937 rng(seed);
    std::shuffle(free_.begin(), free_.end(), rng);
  }

  ForwardBatch MakeBatch(const std::vector<std::pair<Seq*, int32_t>>& parts) {
    ForwardBatch b;
    b.query_start = {0};
    int32_t max_blocks = 1;
    for (auto& [s, k] : parts) {
      const int32_t ctx = s->cached + k;
      while (static_cast<int32_t>(s->blocks.size()) * block_size_ < ctx) {
        s->blocks.push_back(free_.back());
        free_.pop_back();
      }
      max_blocks = std::max<int32_t>(max_blocks, s->blocks.size());
    }
    b.max_blocks_per_seq = max_blocks;
    for (auto& [s, k] : parts) {
      const int32_t ctx = s->cached + k;
      for (int32_t p = s->cached; p < ctx; ++p) {
        b.logits_indices.push_back(b.num_tokens());
        b.token_ids.push_back(s->tokens[p]);
        b.positions.push_back(p);
        b.slot_mapping.push_back(static_cast<int64_t>(s->blocks[p / block_size_]) * block_size_ +
                                 p % block_size_);
      }
      b.query_start.push_back(b.num_tokens());
      b.context_lens.push_back(ctx);
      b.prompt_lens.push_back(s->prompt_len);
      for (int32_t j = 0; j < max_blocks; ++j)
        b.block_tables.push_back(j < static_cast<int32_t>(s->blocks.size()) ? s->blocks[j] : -1);
    }
    return b;
  }

  // Runs k new tokens of each sequence; returns the logits rows of every new token in order.
  std::vector<std::vector<float>> Step(const std::vector<std::pair<Seq*, int32_t>>& parts) {
    ForwardBatch b = MakeBatch(parts);
    std::vector<float> logits;
    Status st = backend_->Forward(b, &logits);
    EXPECT_TRUE(st.ok()) << st.ToString();
    for (auto& [s, k] : parts) s->cached += k;
    const int64_t v = backend_->config().vocab_size;
    std::vector<std::vector<float>> rows;
    for (size_t i = 0; i < b.logits_indices.size(); ++i)
      rows.emplace_back(logits.begin() + i * v, logits.begin() + (i + 1) * v);
    return rows;
  }

 private:
  CpuBackend* backend_;
  int32_t block_size_;
  std::vector<int32_t> free_;
};

std::vector<int32_t> RandomTokens(int n, int vocab, std::mt19937& rng) {
  std::uniform_int_distribution<int> dist(0, vocab - 1);
  std::vector<int32_t> t(n);
  for (int32_t& x : t) x = dist(rng);
  return t;
}

std::unique_ptr<CpuBackend> MakeTiny(const ModelConfig& c, DType dtype, ModelWeights* copy) {
  auto w = MakeDummyWeights(c, dtype, 7, 0.15f, 0.1f);
  EXPECT_TRUE(w.ok()) << w.status().ToString();
  *copy = *w;  // views share the storage
  auto b = CpuBackend::Create(c, std::move(w).value());
  EXPECT_TRUE(b.ok()) << b.status().ToString();
  return std::move(b).value();
}

class CpuBackendArch : public ::testing::TestWithParam<ModelArch> {};

constexpr double kTol = 1e-4;  // relative L2 per position vs the double reference

// (a) alone, (b) packed with other sequences of different lengths: every position matches the
// dense reference, and alone == packed up to f32 accumulation order.
TEST_P(CpuBackendArch, AloneAndPackedMatchDenseReference) {
  const ModelConfig c = TinyConfig(GetParam());
  for (DType dtype : {DType::kBF16, DType::kF16, DType::kF32}) {
    ModelWeights w;
    auto backend = MakeTiny(c, dtype, &w);
    std::mt19937 rng(11);
    const std::vector<int> lens = {13, 1, 7, 20};
    std::vector<std::vector<int32_t>> prompts;
    for (int n : lens) prompts.push_back(RandomTokens(n, c.vocab_size, rng));

    std::vector<std::vector<std::vector<float>>> alone;
    {
      Harness h(backend.get(), 3, 64, 1);
      for (auto& p : prompts) {
        Harness::Seq s{p, static_cast<int32_t>(p.size()), 0, {}};
        alone.push_back(h.Step({{&s, static_cast<int32_t>(p.size())}}));
      }
    }
    for (size_t i = 0; i < prompts.size(); ++i) {
      std::vector<Vec> want = DenseLogits(c, w, prompts[i], prompts[i].size());
      for (size_t t = 0; t < want.size(); ++t)
        EXPECT_LT(RelL2(alone[i][t].data(), want[t]), kTol)
            << DTypeName(dtype) << " prompt " << i << " position " << t;
    }
    Harness h(backend.get(), 3, 64, 2);
    std::vector<Harness::Seq> seqs;
    for (auto& p : prompts) seqs.push_back({p, static_cast<int32_t>(p.size()), 0, {}});
    std::vector<std::pair<Harness::Seq*, int32_t>> parts;
    for (auto& s : seqs) parts.push_back({&s, static_cast<int32_t>(s.tokens.size())});
    auto packed = h.Step(parts);
    size_t row = 0;
    for (size_t i = 0; i < prompts.size(); ++i)
      for (size_t t = 0; t < prompts[i].size(); ++t, ++row) {
        Vec a(alone[i][t].begin(), alone[i][t].end());
        EXPECT_LT(RelL2(packed[row].data(), a), 1e-5) << "prompt " << i << " position " << t;
      }
  }
}

// (c) chunked prefill of any chunk size, then token-by-token decode, packed with another
// sequence, over block sizes 1, 3 and 32: matches the dense reference of the whole sequence.
TEST_P(CpuBackendArch, ChunkedPrefillThenDecodeMatchesDense) {
  const ModelConfig c = TinyConfig(GetParam());
  ModelWeights w;
  auto backend = MakeTiny(c, DType::kBF16, &w);
  std::mt19937 rng(21);
  const int prompt_len = 14, decode = 6;
  std::vector<int32_t> full = RandomTokens(prompt_len + decode, c.vocab_size, rng);
  std::vector<int32_t> other = RandomTokens(5 + decode, c.vocab_size, rng);
  const std::vector<Vec> want = DenseLogits(c, w, full, prompt_len);
  const std::vector<Vec> want_other = DenseLogits(c, w, other, 5);
  for (int32_t bs : {1, 3, 32}) {
    for (int chunk : {1, 2, 5, prompt_len}) {
      Harness h(backend.get(), bs, 64, 3 + chunk);
      Harness::Seq s{{full.begin(), full.begin() + prompt_len}, prompt_len, 0, {}};
      Harness::Seq o{{other.begin(), other.begin() + 5}, 5, 0, {}};
      std::vector<std::vector<float>> got;
      auto first = h.Step({{&o, 5}});  // the other sequence is cached before s starts
      while (s.cached < prompt_len) {
        const int32_t k = std::min(chunk, prompt_len - s.cached);
        for (auto& r : h.Step({{&s, k}})) got.push_back(r);
      }
      for (int i = 0; i < decode; ++i) {
        s.tokens.push_back(full[prompt_len + i]);
        o.tokens.push_back(other[5 + i]);
        auto rows = h.Step({{&o, 1}, {&s, 1}});
        got.push_back(rows[1]);
        EXPECT_LT(RelL2(rows[0].data(), want_other[5 + i]), kTol) << "other, decode " << i;
      }
      // Logits at the last prompt position and at every decode step; also every chunk position.
      ASSERT_EQ(got.size(), full.size() - 1 + 1);
      for (size_t t = 0; t < got.size(); ++t) {
        EXPECT_LT(RelL2(got[t].data(), want[t]), kTol)
            << "block_size " << bs << " chunk " << chunk << " position " << t;
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Archs, CpuBackendArch,
                         ::testing::Values(ModelArch::kLlama, ModelArch::kQwen2, ModelArch::kQwen3,
                                           ModelArch::kQwenV1),
                         [](const auto& info) { return std::string(ArchName(info.param)); });

TEST(CpuBackend, QwenV1FeaturesTrigger) {
  // The tiny Qwen v1 config must actually use dynamic NTK and logn for the prompts above.
  const ModelConfig c = TinyConfig(ModelArch::kQwenV1);
  EXPECT_GT(QwenV1NtkAlpha(c, 14), 1.0);
  EXPECT_GT(QwenV1LognScale(c, 13), 1.0);
}

TEST(CpuBackend, TiedLmHeadSharesEmbedding) {
  ModelConfig c = TinyConfig(ModelArch::kLlama);
  auto w = MakeDummyWeights(c, DType::kBF16, 1);
  ASSERT_TRUE(w.ok());
  EXPECT_EQ(w->lm_head.data, w->embed_tokens.data);
  c.tie_word_embeddings = false;
  auto u = MakeDummyWeights(c, DType::kBF16, 1);
  ASSERT_TRUE(u.ok());
  EXPECT_NE(u->lm_head.data, u->embed_tokens.data);
}

TEST(CpuBackend, DummyWeightsDeterministicAndDistributed) {
  ModelConfig c = TinyConfig(ModelArch::kQwen2);
  c.vocab_size = 5000;
  auto a = MakeDummyWeights(c, DType::kF32, 42);
  auto b = MakeDummyWeights(c, DType::kF32, 42);
  auto d = MakeDummyWeights(c, DType::kF32, 43);
  ASSERT_TRUE(a.ok() && b.ok() && d.ok());
  const size_t bytes = a->embed_tokens.nbytes();
  EXPECT_EQ(0, std::memcmp(a->embed_tokens.data, b->embed_tokens.data, bytes));
  EXPECT_NE(0, std::memcmp(a->embed_tokens.data, d->embed_tokens.data, bytes));
  // Moments of the embedding (300K values) and of a norm weight.
  const float* e = static_cast<const float*>(a->embed_tokens.data);
  const int64_t n = a->embed_tokens.numel();
  double s = 0, ss = 0;
  for (int64_t i = 0; i < n; ++i) s += e[i], ss += double(e[i]) * e[i];
  EXPECT_NEAR(s / n, 0.0, 2e-4);
  EXPECT_NEAR(std::sqrt(ss / n), 0.02, 2e-4);
  const float* g = static_cast<const float*>(a->layers[0].input_norm.data);
  double gm = 0;
  for (int64_t i = 0; i < c.hidden_size; ++i) gm += g[i];
  EXPECT_NEAR(gm / c.hidden_size, 1.0, 0.05);
  EXPECT_FALSE(MakeDummyWeights(c, DType::kI8, 1).ok());
}

// ---- Bad batches: a clear InvalidArgument naming the field, never a crash. ----

TEST(CpuBackend, BadBatchesAreRejected) {
  const ModelConfig c = TinyConfig(ModelArch::kQwen2);
  ModelWeights w;
  auto backend = MakeTiny(c, DType::kBF16, &w);
  std::vector<float> logits;
  {
    ForwardBatch b;
    EXPECT_EQ(backend->Forward(b, &logits).code(), StatusCode::kFailedPrecondition);
  }
  Harness h(backend.get(), 4, 8, 5);
  Harness::Seq s{{1, 2, 3, 4, 5, 6}, 6, 0, {}};
  const ForwardBatch good = h.MakeBatch({{&s, 6}});
  ASSERT_TRUE(backend->Forward(good, &logits).ok());
  ASSERT_EQ(logits.size(), 6u * c.vocab_size);

  struct Case {
    const char* expect;  // substring of the message
    std::function<void(ForwardBatch&)> mutate;
  };
  const std::vector<Case> cases = {
      {"token_ids is empty", [](ForwardBatch& b) { b.token_ids.clear(); }},
      {"token_ids[2] = 61", [](ForwardBatch& b) { b.token_ids[2] = 61; }},
      {"token_ids[0] = -1", [](ForwardBatch& b) { b.token_ids[0] = -1; }},
      {"positions has 5", [](ForwardBatch& b) { b.positions.pop_back(); }},
      {"positions[3] = 9", [](ForwardBatch& b) { b.positions[3] = 9; }},
      {"slot_mapping has", [](ForwardBatch& b) { b.slot_mapping.push_back(0); }},
      {"slot_mapping[1] = 1000", [](ForwardBatch& b) { b.slot_mapping[1] = 1000; }},
      {"query_start has 1", [](ForwardBatch& b) { b.query_start = {0}; }},
      {"query_start[1] = 4", [](ForwardBatch& b) { b.query_start[1] = 4; }},
      {"query_start[0] = 1", [](ForwardBatch& b) { b.query_start[0] = 1; }},
      {"context_lens[0] = 3", [](ForwardBatch& b) { b.context_lens[0] = 3; }},
      {"context_lens[0] = 100", [](ForwardBatch& b) { b.context_lens[0] = 100; }},
      {"context_lens has 0", [](ForwardBatch& b) { b.context_lens.clear(); }},
      {"prompt_lens has 0", [](ForwardBatch& b) { b.prompt_lens.clear(); }},
      {"prompt_lens[0] = 0", [](ForwardBatch& b) { b.prompt_lens[0] = 0; }},
      {"block_tables[0][1] = 8", [](ForwardBatch& b) { b.block_tables[1] = 8; }},
      {"block_tables[0][0] = -1", [](ForwardBatch& b) { b.block_tables[0] = -1; }},
      {"block_tables has", [](ForwardBatch& b) { b.block_tables.push_back(0); }},
      {"max_blocks_per_seq = 0", [](ForwardBatch& b) { b.max_blocks_per_seq = 0; }},
      {"logits_indices[0] = 6", [](ForwardBatch& b) { b.logits_indices[0] = 6; }},
      {"logits_indices[1] = -2", [](ForwardBatch& b) { b.logits_indices[1] = -2; }},
  };
  for (const Case& cs : cases) {
    ForwardBatch b = good;
    cs.mutate(b);
    Status st = backend->Forward(b, &logits);
    EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << cs.expect;
    EXPECT_NE(st.message().find(cs.expect), std::string::npos)
        << "want '" << cs.expect << "' in: " << st.message();
  }
  // Launched steps' placeholders (Backend::PreviousRowToken) pass only for a row the previous
  // step sampled; the CPU backend launches no steps, so to it they are ids outside the vocabulary.
  ForwardBatch ph = good;
  ph.token_ids[5] = Backend::PreviousRowToken(2);
  EXPECT_TRUE(ValidateForwardBatch(ph, c, backend->kv_layout(), 3).ok());
  Status st = ValidateForwardBatch(ph, c, backend->kv_layout(), 2);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("token_ids[5] = -3 stands for row 2 of the previous step, which "
                              "sampled 2 rows"),
            std::string::npos)
      << st.message();
  st = ValidateForwardBatch(ph, c, backend->kv_layout());
  EXPECT_NE(st.message().find("token_ids[5] = -3 is outside the vocabulary"), std::string::npos)
      << st.message();
  EXPECT_FALSE(backend->SupportsLaunchedSteps());
  EXPECT_EQ(backend->Forward(ph, &logits).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(backend->LaunchForwardSample(good, {}).code(), StatusCode::kUnimplemented);
  std::vector<DeviceSampleResult> results;
  EXPECT_EQ(backend->WaitForwardSample(&results).code(), StatusCode::kUnimplemented);
}

TEST(CpuBackend, KvPoolSizingAndCopy) {
  const ModelConfig c = TinyConfig(ModelArch::kQwen2);
  ModelWeights w;
  auto backend = MakeTiny(c, DType::kBF16, &w);
  EXPECT_EQ(backend->KvBytesPerToken(), 2 * 2 * 20 * 4);
  auto blocks = backend->ProposeNumKvBlocks(32, 0.01, 256);
  ASSERT_TRUE(blocks.ok()) << blocks.status().ToString();
  EXPECT_GT(*blocks, 0);
  EXPECT_FALSE(backend->ProposeNumKvBlocks(0, 0.5, 256).ok());
  EXPECT_FALSE(backend->ProposeNumKvBlocks(32, 1.5, 256).ok());
  EXPECT_FALSE(backend->AllocateKvCache({0, 32}).ok());

  // Copy-on-write: a sequence forked into copied blocks continues exactly like the original.
  Harness h(backend.get(), 4, 16, 9);
  Harness::Seq s{{3, 1, 4, 1, 5, 9}, 6, 0, {}};
  h.Step({{&s, 6}});
  Harness::Seq fork = s;
  std::vector<std::pair<int32_t, int32_t>> copies;
  fork.blocks.clear();
  for (size_t i = 0; i < s.blocks.size(); ++i) {
    const int32_t dst = 15 - static_cast<int32_t>(i);
    copies.push_back({s.blocks[i], dst});
    fork.blocks.push_back(dst);
  }
  ASSERT_TRUE(backend->CopyKvBlocks(copies).ok());
  EXPECT_FALSE(backend->CopyKvBlocks({{0, 16}}).ok());
  s.tokens.push_back(2);
  fork.tokens.push_back(2);
  auto a = h.Step({{&s, 1}});
  auto b = h.Step({{&fork, 1}});
  EXPECT_EQ(a[0], b[0]);
}

TEST(CpuBackend, FactoryAndBadWeights) {
  const ModelConfig c = TinyConfig(ModelArch::kQwen2);
  auto w = MakeDummyWeights(c, DType::kBF16, 1);
  ASSERT_TRUE(w.ok());
  EXPECT_EQ(MakeBackend("cuda", c, *w).status().code(), StatusCode::kUnavailable);
  EXPECT_EQ(MakeBackend("tpu", c, *w).status().code(), StatusCode::kInvalidArgument);
  auto cpu = MakeBackend("cpu", c, *w);
  ASSERT_TRUE(cpu.ok());
  EXPECT_EQ((*cpu)->name(), "cpu");
  ModelWeights bad = *w;
  bad.layers[1].k_proj.shape = {21, 60};
  auto r = CpuBackend::Create(c, bad);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("layers.1.k_proj"), std::string::npos)
      << r.status().ToString();
  bad = *w;
  bad.layers[0].q_bias = TensorView{};
  EXPECT_EQ(CpuBackend::Create(c, bad).status().code(), StatusCode::kNotFound);
  ModelConfig odd = c;
  odd.num_kv_heads = 4;
  EXPECT_FALSE(CpuBackend::Create(odd, *w).ok());
}

// The multi-thread splits of a step (query heads, KV heads, MLP rows, lm_head rows per thread;
// partial sums reduced after a barrier) on the tiny models, forced on with min work 0: 2 threads
// (KV heads follow the query heads), 3 (they do not, except Qwen3's 3 KV heads: extra barrier),
// 7 (more threads than heads and than MLP row units: some threads own nothing). Chunked prefill
// and decode packed with another sequence must match the dense reference and the 1-thread run.
TEST_P(CpuBackendArch, MultiThreadSplitsMatchDenseAndOneThread) {
  const ModelConfig c = TinyConfig(GetParam());
  ModelWeights w;
  auto backend = MakeTiny(c, DType::kBF16, &w);
  backend->set_min_macs_per_thread(0);
  std::mt19937 rng(31);
  const int prompt_len = 14, decode = 4;
  std::vector<int32_t> full = RandomTokens(prompt_len + decode, c.vocab_size, rng);
  std::vector<int32_t> other = RandomTokens(6 + decode, c.vocab_size, rng);
  const std::vector<Vec> want = DenseLogits(c, w, full, prompt_len);
  const int saved_threads = omp_get_max_threads();
  auto run = [&](int threads) {
    omp_set_num_threads(threads);
    Harness h(backend.get(), 3, 64, 4);
    Harness::Seq s{{full.begin(), full.begin() + prompt_len}, prompt_len, 0, {}};
    Harness::Seq o{{other.begin(), other.begin() + 5}, 5, 0, {}};
    std::vector<std::vector<float>> got;
    h.Step({{&o, 5}});
    for (auto& r : h.Step({{&s, 9}})) got.push_back(r);
    o.tokens.push_back(other[5]);
    for (auto& r : h.Step({{&o, 1}, {&s, prompt_len - 9}})) got.push_back(r);
    got.erase(got.begin() + 9);  // the other sequence's row
    for (int i = 0; i < decode; ++i) {
      s.tokens.push_back(full[prompt_len + i]);
      o.tokens.push_back(other[6 + i]);
      got.push_back(h.Step({{&o, 1}, {&s, 1}})[1]);
    }
    return got;
  };
  const auto one = run(1);
  for (int threads : {2, 3, 7}) {
    const auto got = run(threads);
    ASSERT_EQ(got.size(), want.size());
    for (size_t t = 0; t < got.size(); ++t) {
      EXPECT_LT(RelL2(got[t].data(), want[t]), kTol) << threads << " threads, position " << t;
      Vec a(one[t].begin(), one[t].end());
      EXPECT_LT(RelL2(got[t].data(), a), 1e-5) << threads << " threads vs 1, position " << t;
    }
  }
  omp_set_num_threads(saved_threads);
}

}  // namespace
}  // namespace qilin
