// Every CPU op against a naive double-precision implementation, on random odd sizes.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "common/dtype.h"
#include "kernels/cpu/attention.h"
#include "kernels/cpu/elementwise.h"
#include "kernels/cpu/linear.h"
#include "kernels/cpu/rope.h"

namespace qilin::cpu {
namespace {

// A weight tensor stored in `dtype`, with its exactly representable values as doubles.
struct TestWeight {
  DType dtype;
  std::vector<uint16_t> half;
  std::vector<float> f32;
  std::vector<double> values;  // what the stored bits mean
  WeightRef ref() const {
    return WeightRef{dtype, dtype == DType::kF32 ? static_cast<const void*>(f32.data())
                                                 : static_cast<const void*>(half.data())};
  }
};

TestWeight RandomWeight(DType dtype, size_t n, std::mt19937& rng, double mean = 0.0,
                        double stddev = 1.0) {
  std::normal_distribution<float> dist(static_cast<float>(mean), static_cast<float>(stddev));
  TestWeight w{dtype, {}, {}, {}};
  for (size_t i = 0; i < n; ++i) {
    float v = dist(rng);
    if (dtype == DType::kF32) {
      w.f32.push_back(v);
      w.values.push_back(v);
    } else if (dtype == DType::kBF16) {
      w.half.push_back(F32ToBf16(v));
      w.values.push_back(Bf16ToF32(w.half.back()));
    } else {
      w.half.push_back(F32ToF16(v));
      w.values.push_back(F16ToF32(w.half.back()));
    }
  }
  return w;
}

std::vector<float> RandomVec(size_t n, std::mt19937& rng, float stddev = 1.0f) {
  std::normal_distribution<float> dist(0.0f, stddev);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

// Relative L2 error of `got` vs `want`; NaN never passes.
double RelL2(const std::vector<float>& got, const std::vector<double>& want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    if (!std::isfinite(got[i])) return INFINITY;
    num += (got[i] - want[i]) * (got[i] - want[i]);
    den += want[i] * want[i];
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

class DTypeTest : public ::testing::TestWithParam<DType> {};

std::vector<double> NaiveLinear(const std::vector<float>& x, int64_t n, int64_t in,
                                const TestWeight& w, int64_t out, const TestWeight* bias) {
  std::vector<double> y(n * out);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t o = 0; o < out; ++o) {
      double s = bias ? bias->values[o] : 0.0;
      for (int64_t k = 0; k < in; ++k)
        s += static_cast<double>(x[i * in + k]) * w.values[o * in + k];
      y[i * out + o] = s;
    }
  return y;
}

TEST_P(DTypeTest, LinearBothPathsMatchNaive) {
  std::mt19937 rng(1);
  struct Shape {
    int64_t n, in, out;
  };
  for (Shape s : {Shape{7, 45, 33}, Shape{1, 45, 33}, Shape{13, 300, 70}, Shape{3, 8, 4},
                  Shape{20, 513, 129}, Shape{6, 256, 64}}) {
    TestWeight w = RandomWeight(GetParam(), s.in * s.out, rng);
    TestWeight b = RandomWeight(GetParam(), s.out, rng);
    std::vector<float> x = RandomVec(s.n * s.in, rng);
    for (bool with_bias : {false, true}) {
      const std::vector<double> want =
          NaiveLinear(x, s.n, s.in, w, s.out, with_bias ? &b : nullptr);
      WeightRef bias_ref = with_bias ? b.ref() : WeightRef{};
      for (int path = 0; path < 3; ++path) {
        std::vector<float> y(s.n * s.out, NAN);
        if (path == 0) LinearGemv(x.data(), s.n, s.in, w.ref(), s.out, bias_ref, y.data());
        if (path == 1) LinearBlocked(x.data(), s.n, s.in, w.ref(), s.out, bias_ref, y.data());
        if (path == 2) Linear(x.data(), s.n, s.in, w.ref(), s.out, bias_ref, y.data());
        EXPECT_LT(RelL2(y, want), 1e-6) << "n=" << s.n << " in=" << s.in << " out=" << s.out
                                        << " bias=" << with_bias << " path=" << path;
      }
    }
  }
}

TEST_P(DTypeTest, EmbeddingGather) {
  std::mt19937 rng(2);
  const int64_t vocab = 37, dim = 45;
  TestWeight table = RandomWeight(GetParam(), vocab * dim, rng);
  std::vector<int32_t> ids = {36, 0, 5, 5, 17, 1, 35};
  std::vector<float> out(ids.size() * dim, NAN);
  EmbeddingGather(table.ref(), dim, ids.data(), ids.size(), out.data());
  for (size_t i = 0; i < ids.size(); ++i)
    for (int64_t j = 0; j < dim; ++j)
      ASSERT_EQ(out[i * dim + j], static_cast<float>(table.values[ids[i] * dim + j]));
}

TEST_P(DTypeTest, RmsNorm) {
  std::mt19937 rng(3);
  for (int64_t dim : {45, 10, 64, 3}) {
    const int64_t rows = 7;
    TestWeight w = RandomWeight(GetParam(), dim, rng, 1.0, 0.1);
    std::vector<float> x = RandomVec(rows * dim, rng, 3.0f);
    const float eps = 1e-5f;
    std::vector<double> want(rows * dim);
    for (int64_t i = 0; i < rows; ++i) {
      double ss = 0;
      for (int64_t j = 0; j < dim; ++j) ss += static_cast<double>(x[i * dim + j]) * x[i * dim + j];
      const double inv = 1.0 / std::sqrt(ss / dim + eps);
      for (int64_t j = 0; j < dim; ++j) want[i * dim + j] = x[i * dim + j] * inv * w.values[j];
    }
    std::vector<float> out(rows * dim, NAN);
    RmsNorm(x.data(), rows, dim, w.ref(), eps, out.data());
    EXPECT_LT(RelL2(out, want), 1e-6) << "dim=" << dim;
    RmsNorm(x.data(), rows, dim, w.ref(), eps, x.data());  // in place
    EXPECT_LT(RelL2(x, want), 1e-6) << "dim=" << dim << " in place";
  }
}

INSTANTIATE_TEST_SUITE_P(AllDTypes, DTypeTest,
                         ::testing::Values(DType::kBF16, DType::kF16, DType::kF32),
                         [](const auto& info) { return std::string(DTypeName(info.param)); });

// ExpF32 (Exp8) against double exp over the range softmax and SiLU use, and its edge cases.
TEST(CpuOps, ExpF32MatchesExp) {
  const int n = 200001;
  std::vector<float> x(n), y(n, NAN);
  for (int i = 0; i < n; ++i) x[i] = -87.0f + 175.0f * static_cast<float>(i) / (n - 1);
  ExpF32(x.data(), n, y.data());
  double worst = 0;
  for (int i = 0; i < n; ++i) {
    const double want = std::exp(static_cast<double>(x[i]));
    worst = std::max(worst, std::fabs(y[i] - want) / want);
  }
  EXPECT_LT(worst, 4e-7);
  const std::vector<float> edge = {
      -INFINITY, INFINITY, NAN,  -100.0f, 100.0f,
      0.0f,      -0.0f,    1.0f, -1.0f};  // 9 values: the last goes through the padded tail
  std::vector<float> out(edge.size(), 42.0f);
  ExpF32(edge.data(), edge.size(), out.data());
  EXPECT_EQ(out[0], 0.0f);
  EXPECT_EQ(out[1], INFINITY);
  EXPECT_TRUE(std::isnan(out[2]));
  EXPECT_EQ(out[3], 0.0f);
  EXPECT_EQ(out[4], INFINITY);
  EXPECT_EQ(out[5], 1.0f);
  EXPECT_EQ(out[6], 1.0f);
  EXPECT_NEAR(out[7], 2.718281828, 1e-6);
  EXPECT_NEAR(out[8], 0.367879441, 1e-7);
}

TEST(CpuOps, SiluMulAndAdd) {
  std::mt19937 rng(4);
  const int64_t n = 7 * 33;  // not a multiple of 8: the scalar tail runs too
  std::vector<float> g = RandomVec(n, rng, 4.0f), u = RandomVec(n, rng), out(n, NAN);
  SiluMul(g.data(), u.data(), 7, 33, out.data());
  std::vector<double> want(n);
  for (int64_t i = 0; i < n; ++i)
    want[i] = g[i] / (1.0 + std::exp(-static_cast<double>(g[i]))) * u[i];
  EXPECT_LT(RelL2(out, want), 1e-6);
  std::vector<float> a = RandomVec(n, rng), b = RandomVec(n, rng);
  std::vector<double> sum(n);
  for (int64_t i = 0; i < n; ++i) sum[i] = static_cast<double>(a[i]) + b[i];
  AddInPlace(a.data(), b.data(), n);
  EXPECT_LT(RelL2(a, sum), 1e-7);
}

// ---- RoPE: inverse frequencies as written in HF's modeling_rope_utils.py, in double. ----

ModelConfig RopeConfig(int64_t head_dim) {
  ModelConfig c;
  c.head_dim = head_dim;
  c.hidden_size = head_dim * 4;
  c.num_heads = 4;
  c.rope_theta = 10000.0;
  c.max_position_embeddings = 64;
  return c;
}

std::vector<double> NaiveInvFreq(double base, int64_t dim) {
  std::vector<double> f;
  for (int64_t i = 0; i < dim; i += 2)
    f.push_back(1.0 / std::pow(base, static_cast<double>(i) / dim));
  return f;
}

void ExpectFreqsNear(const RopeFreqs& got, const std::vector<double>& want, const char* what) {
  ASSERT_EQ(got.inv_freq.size(), want.size()) << what;
  for (size_t i = 0; i < want.size(); ++i)
    EXPECT_NEAR(got.inv_freq[i], want[i], 2e-6 * want[i] + 1e-12) << what << " i=" << i;
}

TEST(CpuOps, RopeInvFreqEachScalingType) {
  const int64_t dim = 10;
  ModelConfig c = RopeConfig(dim);
  ExpectFreqsNear(ComputeRopeFreqs(c, 0, 1.0), NaiveInvFreq(10000.0, dim), "default");

  c.rope_scaling.type = RopeScalingType::kLinear;
  c.rope_scaling.factor = 4.0;
  std::vector<double> lin = NaiveInvFreq(10000.0, dim);
  for (double& f : lin) f /= 4.0;
  ExpectFreqsNear(ComputeRopeFreqs(c, 0, 1.0), lin, "linear");

  c.rope_scaling.type = RopeScalingType::kDynamic;
  c.rope_scaling.factor = 2.0;
  ExpectFreqsNear(ComputeRopeFreqs(c, 50, 1.0), NaiveInvFreq(10000.0, dim), "dynamic short");
  {
    const double seq_len = 100, max_pos = 64;
    const double base = 10000.0 * std::pow(2.0 * seq_len / max_pos - 1.0, dim / (dim - 2.0));
    ExpectFreqsNear(ComputeRopeFreqs(c, 100, 1.0), NaiveInvFreq(base, dim), "dynamic long");
  }

  // Qwen v1 dynamic NTK: base * alpha^(dim / (dim - 2)).
  c.rope_scaling = RopeScaling{};
  ExpectFreqsNear(ComputeRopeFreqs(c, 0, 3.0),
                  NaiveInvFreq(10000.0 * std::pow(3.0, dim / (dim - 2.0)), dim), "qwen ntk");

  // Yarn with the ramp between interpolation and extrapolation, dim 64 so that the ramp is
  // interior, and HF's default attention factor.
  ModelConfig y = RopeConfig(64);
  y.rope_theta = 1e6;
  y.max_position_embeddings = 4096;
  y.rope_scaling.type = RopeScalingType::kYarn;
  y.rope_scaling.factor = 4.0;
  y.rope_scaling.original_max_position_embeddings = 4096;
  {
    const int64_t d = 64;
    auto corr = [&](double rot) {
      return d * std::log(4096.0 / (rot * 2 * M_PI)) / (2 * std::log(1e6));
    };
    double low = std::max(std::floor(corr(32.0)), 0.0);
    double high = std::min(std::ceil(corr(1.0)), d - 1.0);
    ASSERT_GT(high, low);
    ASSERT_GT(low, 0.0);  // the ramp is interior: both ends are exercised
    std::vector<double> want;
    for (int64_t i = 0; i < d / 2; ++i) {
      const double pos_freq = std::pow(1e6, 2.0 * i / d);
      const double ramp = std::clamp((i - low) / (high - low), 0.0, 1.0);
      const double extra = 1.0 - ramp;
      want.push_back(1.0 / (4.0 * pos_freq) * (1 - extra) + 1.0 / pos_freq * extra);
    }
    RopeFreqs got = ComputeRopeFreqs(y, 0, 1.0);
    ExpectFreqsNear(got, want, "yarn");
    EXPECT_NEAR(got.attention_scaling, 0.1 * std::log(4.0) + 1.0, 1e-6);
    y.rope_scaling.attention_factor = 0.75;
    EXPECT_FLOAT_EQ(ComputeRopeFreqs(y, 0, 1.0).attention_scaling, 0.75f);
  }
}

TEST(CpuOps, ApplyRopeRotateHalf) {
  std::mt19937 rng(5);
  const int64_t heads = 6, dim = 10, half = 5;
  ModelConfig c = RopeConfig(dim);
  RopeFreqs f = ComputeRopeFreqs(c, 0, 1.0);
  for (int64_t pos : {0, 1, 7, 1000}) {
    std::vector<float> x = RandomVec(heads * dim, rng);
    std::vector<double> want(heads * dim);
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t i = 0; i < dim; ++i) {
        const int64_t fi = i % half;
        // HF rounds the angle to f32 (inv_freq @ position_ids in float32); so does the reference.
        const double ang = static_cast<float>(static_cast<float>(pos) * f.inv_freq[fi]);
        const double rot = i < half ? -x[h * dim + i + half] : x[h * dim + i - half];
        want[h * dim + i] = x[h * dim + i] * std::cos(ang) + rot * std::sin(ang);
      }
    std::vector<float> cs(half), sn(half);
    RopeCosSin(f, pos, cs.data(), sn.data());
    ApplyRope(x.data(), heads, dim, cs.data(), sn.data());
    EXPECT_LT(RelL2(x, want), 1e-6) << "pos=" << pos;
  }
}

// ---- Paged attention vs dense causal attention per sequence. ----

TEST(CpuOps, PagedAttentionShuffledBlocks) {
  const int64_t heads = 6, kv_heads = 2, dim = 10, kv_size = kv_heads * dim, q_size = heads * dim;
  for (int32_t bs : {1, 3, 32}) {
    std::mt19937 rng(100 + bs);
    // Three sequences: (context, new tokens): a prefill, a chunk over a cached prefix, a decode.
    const std::vector<std::pair<int, int>> seqs = {{9, 9}, {40, 6}, {23, 1}};
    int32_t max_blocks = 0;
    for (auto [ctx, q] : seqs) max_blocks = std::max(max_blocks, (ctx + bs - 1) / bs);
    const int32_t num_blocks = max_blocks * 3 + 5;
    std::vector<int32_t> ids(num_blocks);
    std::iota(ids.begin(), ids.end(), 0);
    std::shuffle(ids.begin(), ids.end(), rng);
    std::vector<float> kc(static_cast<size_t>(num_blocks) * bs * kv_size, NAN);
    std::vector<float> vc(kc.size(), NAN);

    PagedAttentionBatch b;
    std::vector<int32_t> qstart = {0}, positions, tables(seqs.size() * max_blocks, -1);
    std::vector<int64_t> slots;
    std::vector<std::vector<float>> dense_k, dense_v;  // per sequence [ctx, kv_size]
    int next = 0;
    for (size_t s = 0; s < seqs.size(); ++s) {
      auto [ctx, q] = seqs[s];
      for (int j = 0; j < (ctx + bs - 1) / bs; ++j) tables[s * max_blocks + j] = ids[next++];
      dense_k.push_back(RandomVec(ctx * kv_size, rng));
      dense_v.push_back(RandomVec(ctx * kv_size, rng));
      // Cached prefix written directly; new tokens through WriteKvCache below.
      for (int p = 0; p < ctx; ++p) {
        const int64_t slot = static_cast<int64_t>(tables[s * max_blocks + p / bs]) * bs + p % bs;
        if (p < ctx - q) {
          std::copy_n(&dense_k[s][p * kv_size], kv_size, &kc[slot * kv_size]);
          std::copy_n(&dense_v[s][p * kv_size], kv_size, &vc[slot * kv_size]);
        } else {
          positions.push_back(p);
          slots.push_back(slot);
        }
      }
      qstart.push_back(qstart.back() + q);
    }
    const int64_t n = qstart.back();
    std::vector<float> newk, newv;
    for (size_t s = 0; s < seqs.size(); ++s) {
      auto [ctx, q] = seqs[s];
      for (int p = ctx - q; p < ctx; ++p) {
        newk.insert(newk.end(), &dense_k[s][p * kv_size], &dense_k[s][(p + 1) * kv_size]);
        newv.insert(newv.end(), &dense_v[s][p * kv_size], &dense_v[s][(p + 1) * kv_size]);
      }
    }
    WriteKvCache(newk.data(), newv.data(), n, kv_size, slots.data(), kc.data(), vc.data());

    b.num_seqs = static_cast<int32_t>(seqs.size());
    b.query_start = qstart.data();
    b.positions = positions.data();
    b.block_tables = tables.data();
    b.max_blocks_per_seq = max_blocks;
    b.block_size = bs;
    std::vector<float> q = RandomVec(n * q_size, rng);
    std::vector<float> out(n * q_size, NAN);
    const float scale = 1.0f / std::sqrt(static_cast<float>(dim));
    PagedAttention(q.data(), kc.data(), vc.data(), b, heads, kv_heads, dim, scale, out.data());

    std::vector<double> want(n * q_size);
    for (size_t s = 0; s < seqs.size(); ++s) {
      for (int32_t t = qstart[s]; t < qstart[s + 1]; ++t) {
        const int pos = positions[t];
        for (int64_t h = 0; h < heads; ++h) {
          const int64_t kvh = h / (heads / kv_heads);
          std::vector<double> sc(pos + 1);
          double mx = -INFINITY;
          for (int j = 0; j <= pos; ++j) {
            double d = 0;
            for (int64_t e = 0; e < dim; ++e)
              d += static_cast<double>(q[t * q_size + h * dim + e]) *
                   dense_k[s][j * kv_size + kvh * dim + e];
            sc[j] = d / std::sqrt(static_cast<double>(dim));
            mx = std::max(mx, sc[j]);
          }
          double sum = 0;
          for (double& v : sc) sum += (v = std::exp(v - mx));
          for (int64_t e = 0; e < dim; ++e) {
            double o = 0;
            for (int j = 0; j <= pos; ++j)
              o += sc[j] / sum * dense_v[s][j * kv_size + kvh * dim + e];
            want[t * q_size + h * dim + e] = o;
          }
        }
      }
    }
    EXPECT_LT(RelL2(out, want), 1e-6) << "block_size=" << bs;
  }
}

}  // namespace
}  // namespace qilin::cpu
