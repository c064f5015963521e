// Each CUDA kernel against its CPU reference op on random odd-sized inputs: relative L2 error
// bounded by the dtype's rounding, NaN never passes, outputs poisoned (all-ones bits = NaN) first.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include <gtest/gtest.h>

#include "common/dtype.h"
#include "kernels/cpu/attention.h"
#include "kernels/cpu/elementwise.h"
#include "kernels/cpu/linear.h"
#include "kernels/cpu/rope.h"
#include "kernels/cuda/gemm.h"
#include "kernels/cuda/ops.h"
#include "model/config.h"

namespace qilin {
namespace {

using cuda::bf16_t;

#define SKIP_WITHOUT_GPU()                                 \
  do {                                                     \
    int n = 0;                                             \
    if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) { \
      cudaGetLastError();                                  \
      GTEST_SKIP() << "no CUDA device";                    \
    }                                                      \
  } while (0)

#define CUDA_OK(expr) ASSERT_EQ((expr), cudaSuccess) << #expr

// A device buffer that frees itself; poisoned with 0xff bytes (NaN in f32 and bf16).
template <typename T>
struct Dev {
  T* p = nullptr;
  size_t n = 0;
  explicit Dev(size_t count) : n(count) {
    EXPECT_EQ(cudaMalloc(&p, std::max<size_t>(count, 1) * sizeof(T)), cudaSuccess);
    EXPECT_EQ(cudaMemset(p, 0xff, std::max<size_t>(count, 1) * sizeof(T)), cudaSuccess);
  }
  explicit Dev(const std::vector<T>& v) : Dev(v.size()) {
    EXPECT_EQ(cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
  }
  ~Dev() { cudaFree(p); }
  std::vector<T> Get() const {
    std::vector<T> v(n);
    EXPECT_EQ(cudaMemcpy(v.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
    return v;
  }
};

std::mt19937 rng(1234);

std::vector<uint16_t> RandBf16(size_t n, float stdev = 1.0f, float mean = 0.0f) {
  std::normal_distribution<float> d(mean, stdev);
  std::vector<uint16_t> v(n);
  for (auto& x : v) x = F32ToBf16(d(rng));
  return v;
}
std::vector<float> RandF32(size_t n, float stdev = 1.0f) {
  std::normal_distribution<float> d(0.0f, stdev);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}
std::vector<float> ToF32(const std::vector<uint16_t>& v) {
  std::vector<float> f(v.size());
  for (size_t i = 0; i < v.size(); ++i) f[i] = Bf16ToF32(v[i]);
  return f;
}

// ||a - b|| / ||b||; +inf when a holds a NaN.
double RelErr(const std::vector<float>& a, const std::vector<float>& b) {
  EXPECT_EQ(a.size(), b.size());
  double d = 0, r = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::isnan(a[i])) return INFINITY;
    d += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    r += double(b[i]) * b[i];
  }
  return std::sqrt(d / std::max(r, 1e-30));
}

constexpr double kBf16Tol = 1e-2;  // bf16 outputs: 8 mantissa bits (~4e-3 per element)

TEST(CudaOps, EmbeddingGather) {
  SKIP_WITHOUT_GPU();
  const int64_t vocab = 37, dim = 131, n = 19;
  auto table = RandBf16(vocab * dim);
  std::vector<int32_t> ids(n);
  for (auto& i : ids) i = static_cast<int32_t>(rng() % vocab);
  Dev<uint16_t> dt(table);
  Dev<int32_t> di(ids);
  Dev<float> dx(n * dim);
  CUDA_OK(cuda::EmbeddingGather(dt.p, dim, di.p, n, dx.p, nullptr));
  std::vector<float> ref(n * dim);
  cpu::EmbeddingGather({DType::kBF16, table.data()}, dim, ids.data(), n, ref.data());
  EXPECT_EQ(RelErr(dx.Get(), ref), 0.0);
}

TEST(CudaOps, AddRmsNormAndRows) {
  SKIP_WITHOUT_GPU();
  // 33, 1031, 4099: the scalar kernel; 36, 1028, 3584, 16384: the float4 kernel with 1..4 float4
  // per thread.
  for (int64_t dim : {33, 1031, 4099, 36, 1028, 3584, 16384}) {
    const int64_t n = 7;
    auto x = RandF32(n * dim, 2.0f);
    auto y = RandF32(n * dim);
    auto w = RandBf16(dim, 0.1f, 1.0f);
    Dev<float> dx(x), dy(y);
    Dev<uint16_t> dw(w), dout(n * dim);
    CUDA_OK(cuda::AddRmsNorm(dx.p, dy.p, nullptr, n, dim, dw.p, 1e-6f, dout.p, nullptr));
    std::vector<float> xr = x, yf = y, ref(n * dim);
    for (int64_t i = 0; i < n * dim; ++i) xr[i] += yf[i];
    cpu::RmsNorm(xr.data(), n, dim, {DType::kBF16, w.data()}, 1e-6f, ref.data());
    EXPECT_LT(RelErr(dx.Get(), xr), 1e-6) << dim;
    EXPECT_LT(RelErr(ToF32(dout.Get()), ref), kBf16Tol) << dim;
    // Row selection (lm_head on sampled rows), no residual.
    std::vector<int32_t> rows = {6, 0, 3, 3};
    Dev<int32_t> drows(rows);
    Dev<uint16_t> dsel(rows.size() * dim);
    CUDA_OK(
        cuda::AddRmsNorm(dx.p, nullptr, drows.p, rows.size(), dim, dw.p, 1e-6f, dsel.p, nullptr));
    std::vector<float> sel;
    for (int32_t r : rows)
      sel.insert(sel.end(), ref.begin() + r * dim, ref.begin() + (r + 1) * dim);
    EXPECT_LT(RelErr(ToF32(dsel.Get()), sel), kBf16Tol) << dim;
  }
}

TEST(CudaOps, SiluMul) {
  SKIP_WITHOUT_GPU();
  for (int64_t inter : {333, 332}) {  // scalar kernel; 4-wide kernel
    const int64_t n = 5;
    auto gu = RandF32(n * 2 * inter, 2.0f);
    Dev<float> dgu(gu);
    Dev<uint16_t> dout(n * inter);
    CUDA_OK(cuda::SiluMul(dgu.p, n, inter, dout.p, nullptr));
    std::vector<float> g(n * inter), u(n * inter), ref(n * inter);
    for (int64_t r = 0; r < n; ++r) {
      for (int64_t j = 0; j < inter; ++j) {
        g[r * inter + j] = gu[r * 2 * inter + j];
        u[r * inter + j] = gu[r * 2 * inter + inter + j];
      }
    }
    cpu::SiluMul(g.data(), u.data(), n, inter, ref.data());
    EXPECT_LT(RelErr(ToF32(dout.Get()), ref), kBf16Tol) << inter;
  }
}

TEST(CudaOps, SiluMulBf16) {
  SKIP_WITHOUT_GPU();
  for (int64_t inter : {333, 332, 336}) {  // scalar kernel twice; 8-wide kernel
    const int64_t n = 7;
    auto gu = RandBf16(n * 2 * inter, 2.0f);
    Dev<uint16_t> dgu(gu), dout(n * inter);
    CUDA_OK(cuda::SiluMul(dgu.p, n, inter, dout.p, nullptr));
    auto guf = ToF32(gu);
    std::vector<float> g(n * inter), u(n * inter), ref(n * inter);
    for (int64_t r = 0; r < n; ++r) {
      for (int64_t j = 0; j < inter; ++j) {
        g[r * inter + j] = guf[r * 2 * inter + j];
        u[r * inter + j] = guf[r * 2 * inter + inter + j];
      }
    }
    cpu::SiluMul(g.data(), u.data(), n, inter, ref.data());
    EXPECT_LT(RelErr(ToF32(dout.Get()), ref), kBf16Tol) << inter;
  }
}

// Gemm::LinearSwiGlu through cuBLASLt with f32 and with bf16 gate|up against the CPU reference
// (f32 from the bf16 weights).
TEST(CudaOps, LinearSwiGluBothDtypes) {
  SKIP_WITHOUT_GPU();
  cuda::Gemm gemm;
  ASSERT_TRUE(gemm.Init().ok());
  gemm.set_gemv_max_rows(0);
  const int64_t in = 264, inter = 344;
  for (int64_t n : {37, 300}) {
    auto x = RandBf16(n * in), w = RandBf16(2 * inter * in, 0.1f);
    std::vector<float> xf = ToF32(x), gu(n * 2 * inter), g(n * inter), u(n * inter), ref(n * inter);
    cpu::Linear(xf.data(), n, in, {DType::kBF16, w.data()}, 2 * inter, {DType::kBF16, nullptr},
                gu.data());
    for (int64_t r = 0; r < n; ++r) {
      for (int64_t j = 0; j < inter; ++j) {
        g[r * inter + j] = gu[r * 2 * inter + j];
        u[r * inter + j] = gu[r * 2 * inter + inter + j];
      }
    }
    cpu::SiluMul(g.data(), u.data(), n, inter, ref.data());
    for (int64_t min_rows : {int64_t{0}, int64_t{1} << 40}) {
      gemm.set_swiglu_bf16_min_rows(min_rows);
      Dev<uint16_t> dx(x), dw(w), dout(n * inter);
      Dev<float> dgu(n * 2 * inter);
      ASSERT_TRUE(gemm.LinearSwiGlu(dx.p, n, in, dw.p, inter, dgu.p, dout.p, nullptr).ok());
      CUDA_OK(cudaDeviceSynchronize());
      EXPECT_LT(RelErr(ToF32(dout.Get()), ref), kBf16Tol) << n << " bf16 " << (min_rows == 0);
    }
  }
}

// Row counts share a tuned algorithm in buckets of eight per octave (no GPU needed).
TEST(CudaGemm, TuneBucketsEightPerOctave) {
  EXPECT_EQ(cuda::Gemm::TuneBucket(1), 1);
  EXPECT_EQ(cuda::Gemm::TuneBucket(63), 63);
  EXPECT_EQ(cuda::Gemm::TuneBucket(64), 64);
  EXPECT_EQ(cuda::Gemm::TuneBucket(97), 104);
  EXPECT_EQ(cuda::Gemm::TuneBucket(104), 104);
  EXPECT_EQ(cuda::Gemm::TuneBucket(300), 320);
  EXPECT_EQ(cuda::Gemm::TuneBucket(321), 352);
  EXPECT_EQ(cuda::Gemm::TuneBucket(8192), 8192);
  EXPECT_EQ(cuda::Gemm::TuneBucket(8193), 9216);
  EXPECT_EQ(cuda::Gemm::TuneBucket(16383), 16384);
  int64_t buckets = 0;
  for (int64_t n = 1024; n < 2048; ++n) buckets += cuda::Gemm::TuneBucket(n) == n;
  EXPECT_EQ(buckets, 8);
  for (int64_t n = 64; n < 20000; ++n) {
    const int64_t b = cuda::Gemm::TuneBucket(n);
    ASSERT_GE(b, n);
    ASSERT_LE(b * 8, n * 9) << n;  // at most 1/8 above
  }
}

// A row count in a tuned bucket reuses the bucket's algorithm; one in another bucket is timed
// anew (none is taken across buckets); results still match the reference.
TEST(CudaOps, LinearReusesATunedBucketAcrossRowCounts) {
  SKIP_WITHOUT_GPU();
  cuda::Gemm gemm;
  ASSERT_TRUE(gemm.Init().ok());
  const int64_t in = 264, out = 136;
  // n, shapes tuned after it: 300 is timed (bucket 320: 289-320 share it); 297, 301 and 320
  // reuse it; 321 (bucket 352) and 100 (bucket 104) are timed; 99 shares 100's bucket.
  const std::pair<int64_t, int64_t> steps[] = {{300, 1}, {297, 1}, {301, 1}, {320, 1},
                                               {321, 2}, {100, 3}, {99, 3}};
  for (auto [n, tuned] : steps) {
    auto x = RandBf16(n * in), w = RandBf16(out * in, 0.1f);
    Dev<uint16_t> dx(x), dw(w);
    Dev<float> dy(n * out);
    ASSERT_TRUE(gemm.Linear(dx.p, n, in, dw.p, out, nullptr, dy.p, true, nullptr).ok());
    std::vector<float> xf = ToF32(x), ref(n * out);
    cpu::Linear(xf.data(), n, in, {DType::kBF16, w.data()}, out, {DType::kBF16, nullptr},
                ref.data());
    EXPECT_LT(RelErr(dy.Get(), ref), 1e-4) << n;
    EXPECT_EQ(gemm.tunings(), tuned) << n;
  }
}

TEST(CudaOps, LinearThroughCublasLt) {
  SKIP_WITHOUT_GPU();
  cuda::Gemm gemm;
  ASSERT_TRUE(gemm.Init().ok());
  gemm.set_gemv_max_rows(0);  // every n through cuBLASLt
  for (int64_t n : {1, 3, 37, 300}) {
    for (bool with_bias : {false, true}) {
      for (bool f32 : {false, true}) {
        // bf16 outputs need rows of whole 16-byte vectors (every model dimension is); f32 any.
        const int64_t in = 136, out = f32 ? 203 : 208;
        auto x = RandBf16(n * in), w = RandBf16(out * in, 0.1f), b = RandBf16(out);
        std::vector<float> bf = ToF32(b);
        Dev<uint16_t> dx(x), dw(w), db(b);
        Dev<float> dbf(bf);
        Dev<uint16_t> dy16(n * out);
        Dev<float> dy32(n * out);
        const void* bias = !with_bias ? nullptr : f32 ? static_cast<const void*>(dbf.p) : db.p;
        Status st = gemm.Linear(dx.p, n, in, dw.p, out, bias,
                                f32 ? static_cast<void*>(dy32.p) : dy16.p, f32, nullptr);
        ASSERT_TRUE(st.ok()) << st.ToString();
        std::vector<float> xf = ToF32(x), ref(n * out);
        cpu::Linear(xf.data(), n, in, {DType::kBF16, w.data()}, out,
                    {DType::kBF16, with_bias ? b.data() : nullptr}, ref.data());
        const double err = RelErr(f32 ? dy32.Get() : ToF32(dy16.Get()), ref);
        EXPECT_LT(err, f32 ? 1e-4 : kBf16Tol) << n << " " << with_bias << " " << f32;
      }
    }
  }
}

// The skinny decode GEMM against cpu::Linear for every token count it takes, odd row counts, a
// long reduction (the unrolled loop and its remainder), bias and both output types.
TEST(CudaOps, GemvEveryTokenCount) {
  SKIP_WITHOUT_GPU();
  for (int64_t n = 1; n <= cuda::kGemvMaxRows; ++n) {
    for (int64_t in : {8, 296, 2056, 8200}) {
      for (bool with_bias : {false, true}) {
        for (bool f32 : {false, true}) {
          const int64_t out = 203;
          auto x = RandBf16(n * in), w = RandBf16(out * in, 0.1f), b = RandBf16(out);
          std::vector<float> bf = ToF32(b);
          Dev<uint16_t> dx(x), dw(w), db(b);
          Dev<float> dbf(bf);
          Dev<uint16_t> dy16(n * out);
          Dev<float> dy32(n * out);
          const void* bias = !with_bias ? nullptr : f32 ? static_cast<const void*>(dbf.p) : db.p;
          CUDA_OK(cuda::Gemv(dx.p, n, in, dw.p, out, bias,
                             f32 ? static_cast<void*>(dy32.p) : dy16.p, f32, nullptr));
          CUDA_OK(cudaDeviceSynchronize());
          std::vector<float> xf = ToF32(x), ref(n * out);
          cpu::Linear(xf.data(), n, in, {DType::kBF16, w.data()}, out,
                      {DType::kBF16, with_bias ? b.data() : nullptr}, ref.data());
          const double err = RelErr(f32 ? dy32.Get() : ToF32(dy16.Get()), ref);
          EXPECT_LT(err, f32 ? 1e-5 : kBf16Tol) << n << " " << in << " " << with_bias << " " << f32;
        }
      }
    }
  }
}

TEST(CudaOps, GemvSwiGluAgainstLinearAndSiluMul) {
  SKIP_WITHOUT_GPU();
  for (int64_t n : {1, 2, 5, 8}) {
    const int64_t in = 1032, inter = 77;
    auto x = RandBf16(n * in), w = RandBf16(2 * inter * in, 0.05f);
    Dev<uint16_t> dx(x), dw(w), dout(n * inter);
    CUDA_OK(cuda::GemvSwiGlu(dx.p, n, in, dw.p, inter, dout.p, nullptr));
    CUDA_OK(cudaDeviceSynchronize());
    std::vector<float> xf = ToF32(x), gu(n * 2 * inter), g(n * inter), u(n * inter), ref(n * inter);
    cpu::Linear(xf.data(), n, in, {DType::kBF16, w.data()}, 2 * inter, {DType::kBF16, nullptr},
                gu.data());
    for (int64_t r = 0; r < n; ++r) {
      for (int64_t j = 0; j < inter; ++j) {
        g[r * inter + j] = gu[r * 2 * inter + j];
        u[r * inter + j] = gu[r * 2 * inter + inter + j];
      }
    }
    cpu::SiluMul(g.data(), u.data(), n, inter, ref.data());
    EXPECT_LT(RelErr(ToF32(dout.Get()), ref), kBf16Tol) << n;
  }
}

// Shapes the skinny kernel cannot take are refused, and Gemm sends them to cuBLASLt instead.
TEST(CudaOps, GemvRefusesUnsupportedShapes) {
  SKIP_WITHOUT_GPU();
  Dev<uint16_t> dx(9 * 20), dw(20 * 20), dy(9 * 20);
  EXPECT_EQ(cuda::Gemv(dx.p, 1, 20 - 3, dw.p, 20, nullptr, dy.p, false, nullptr),
            cudaErrorInvalidValue);  // in not a multiple of 8
  EXPECT_EQ(cuda::Gemv(dx.p, cuda::kGemvMaxRows + 1, 16, dw.p, 20, nullptr, dy.p, false, nullptr),
            cudaErrorInvalidValue);
  EXPECT_EQ(cuda::Gemv(dx.p + 1, 1, 16, dw.p, 20, nullptr, dy.p, false, nullptr),
            cudaErrorInvalidValue);  // x not 16-byte aligned
  cudaGetLastError();
  cuda::Gemm gemm;
  ASSERT_TRUE(gemm.Init().ok());
  gemm.set_gemv_max_rows(cuda::kGemvMaxRows);
  const int64_t n = 3, in = 21, out = 19;  // odd in: cuBLASLt path
  auto x = RandBf16(n * in), w = RandBf16(out * in, 0.1f);
  Dev<uint16_t> ex(x), ew(w);
  Dev<float> ey(n * out);
  ASSERT_TRUE(gemm.Linear(ex.p, n, in, ew.p, out, nullptr, ey.p, true, nullptr).ok());
  std::vector<float> xf = ToF32(x), ref(n * out);
  cpu::Linear(xf.data(), n, in, {DType::kBF16, w.data()}, out, {DType::kBF16, nullptr}, ref.data());
  EXPECT_LT(RelErr(ey.Get(), ref), 1e-4);
}

// Rope + qk-norm + logn + KV write for every scaling type, with two rope tables in one batch.
TEST(CudaOps, RopeWriteKvAllScalingTypes) {
  SKIP_WITHOUT_GPU();
  for (RopeScalingType type : {RopeScalingType::kNone, RopeScalingType::kLinear,
                               RopeScalingType::kDynamic, RopeScalingType::kYarn}) {
    for (int64_t hd : {10, 64, 128}) {
      for (bool qk_norm : {false, true}) {
        ModelConfig c;
        c.num_heads = 6;
        c.num_kv_heads = 2;
        c.head_dim = hd;
        c.max_position_embeddings = 64;
        c.rope_theta = 1e6;
        c.rope_scaling.type = type;
        c.rope_scaling.factor = 4.0;
        const int64_t n = 13, H = c.num_heads, KV = c.num_kv_heads, row = (H + 2 * KV) * hd;
        const int64_t half = hd / 2, slots = 40;
        auto qkv = RandF32(n * row);
        auto qn = RandBf16(hd, 0.1f, 1.0f), kn = RandBf16(hd, 0.1f, 1.0f);
        std::vector<int32_t> pos(n), table_of(n);
        std::vector<int64_t> slot(n);
        std::vector<float> logn(n);
        for (int64_t t = 0; t < n; ++t) {
          pos[t] = static_cast<int32_t>(rng() % 300);
          table_of[t] = static_cast<int32_t>(t % 2);
          slot[t] = (t * 7 + 3) % slots;
          logn[t] = 1.0f + 0.05f * static_cast<float>(t % 3);
        }
        const cpu::RopeFreqs f0 = cpu::ComputeRopeFreqs(c, 0, 1.0);
        const cpu::RopeFreqs f1 = cpu::ComputeRopeFreqs(c, 200, 1.7);  // NTK alpha / dynamic len
        std::vector<float> inv = f0.inv_freq;
        inv.insert(inv.end(), f1.inv_freq.begin(), f1.inv_freq.end());
        std::vector<float> scales = {f0.attention_scaling, f1.attention_scaling};
        Dev<uint16_t> dqn(qn), dkn(kn), dq(n * H * hd), dk(slots * KV * hd), dv(slots * KV * hd);
        Dev<float> dqkv(qkv), dinv(inv), dscales(scales), dlogn(logn);
        Dev<int32_t> dpos(pos), dtab(table_of);
        Dev<int64_t> dslot(slot);
        cuda::RopeArgs ra{dinv.p, dscales.p, dtab.p, dpos.p, dlogn.p};
        CUDA_OK(cuda::RopeWriteKv(dqkv.p, n, H, KV, hd, qk_norm ? dqn.p : nullptr,
                                  qk_norm ? dkn.p : nullptr, 1e-6f, ra, dslot.p, dq.p, dk.p, dv.p,
                                  nullptr));
        CUDA_OK(cudaDeviceSynchronize());
        // Reference.
        std::vector<float> qref(n * H * hd), kref, vref, kgot, vgot;
        auto q_out = ToF32(dq.Get()), k_out = ToF32(dk.Get()), v_out = ToF32(dv.Get());
        std::vector<float> cs(half), sn(half);
        for (int64_t t = 0; t < n; ++t) {
          std::vector<float> x(qkv.begin() + t * row, qkv.begin() + (t + 1) * row);
          if (qk_norm) {
            cpu::RmsNorm(x.data(), H, hd, {DType::kBF16, qn.data()}, 1e-6f, x.data());
            cpu::RmsNorm(x.data() + H * hd, KV, hd, {DType::kBF16, kn.data()}, 1e-6f,
                         x.data() + H * hd);
          }
          cpu::RopeCosSin(table_of[t] ? f1 : f0, pos[t], cs.data(), sn.data());
          cpu::ApplyRope(x.data(), H, hd, cs.data(), sn.data());
          cpu::ApplyRope(x.data() + H * hd, KV, hd, cs.data(), sn.data());
          for (int64_t i = 0; i < H * hd; ++i) qref[t * H * hd + i] = x[i] * logn[t];
          kref.insert(kref.end(), x.begin() + H * hd, x.begin() + (H + KV) * hd);
          vref.insert(vref.end(), x.begin() + (H + KV) * hd, x.end());
          kgot.insert(kgot.end(), k_out.begin() + slot[t] * KV * hd,
                      k_out.begin() + (slot[t] + 1) * KV * hd);
          vgot.insert(vgot.end(), v_out.begin() + slot[t] * KV * hd,
                      v_out.begin() + (slot[t] + 1) * KV * hd);
        }
        const std::string what = "type " + std::to_string(static_cast<int>(type)) + " hd " +
                                 std::to_string(hd) + " qk_norm " + std::to_string(qk_norm);
        EXPECT_LT(RelErr(q_out, qref), kBf16Tol) << what;
        EXPECT_LT(RelErr(kgot, kref), kBf16Tol) << what;
        EXPECT_LT(RelErr(vgot, vref), kBf16Tol) << what;
      }
    }
  }
}

// Paged attention (decode split-KV and tensor-core prefill) vs cpu::PagedAttention on a batch of
// fresh prefills (one, two and three query tiles, partial last tiles), chunked prefills over a
// cached prefix (a 700-token prefix under three tiles; a 1-token one), and long and short decodes.
// `batch`: (new tokens, context) per sequence instead of those.
void CheckAttention(int64_t hd, int64_t H, int64_t KV, bool use_prefill, bool decode_mma = false,
                    std::vector<std::pair<int32_t, int32_t>> batch = {}) {
  const int32_t bs = 16;
  const int64_t kv_size = KV * hd, q_size = H * hd;
  // (new tokens, context) per sequence.
  std::vector<std::pair<int32_t, int32_t>> seqs = {{77, 77},   {45, 150},   {1, 1000}, {1, 3},
                                                   {130, 131}, {300, 1000}, {257, 257}};
  if (!batch.empty()) seqs = batch;
  const int32_t S = static_cast<int32_t>(seqs.size());
  int32_t max_blocks = 0, num_blocks = 0;
  for (auto& s : seqs) {
    max_blocks = std::max(max_blocks, (s.second + bs - 1) / bs);
    num_blocks += (s.second + bs - 1) / bs;
  }
  std::vector<int32_t> perm(num_blocks);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), rng);
  std::vector<int32_t> tables(S * max_blocks, -1), qstart = {0}, positions, seq_of;
  int32_t next = 0;
  for (int32_t s = 0; s < S; ++s) {
    for (int32_t j = 0; j < (seqs[s].second + bs - 1) / bs; ++j)
      tables[s * max_blocks + j] = perm[next++];
    for (int32_t i = 0; i < seqs[s].first; ++i) {
      positions.push_back(seqs[s].second - seqs[s].first + i);
      seq_of.push_back(s);
    }
    qstart.push_back(qstart.back() + seqs[s].first);
  }
  ASSERT_LE(next, num_blocks);
  const int32_t n = qstart.back();
  auto kc = RandBf16(int64_t{num_blocks} * bs * kv_size), vc = RandBf16(kc.size());
  auto q = RandBf16(n * q_size);
  Dev<uint16_t> dk(kc), dv(vc), dq(q), dout(n * q_size);
  Dev<int32_t> dqs(qstart), dpos(positions), dseq(seq_of), dtab(tables);
  cuda::AttnBatch ab{dqs.p, dseq.p, dpos.p, dtab.p, max_blocks, bs};
  std::vector<int32_t> decode;
  std::vector<int2> tiles;
  for (int32_t s = 0; s < S; ++s) {
    if (use_prefill && seqs[s].first > 1) {
      for (int32_t t = qstart[s]; t < qstart[s + 1]; t += cuda::kPrefillTileQ)
        tiles.push_back(make_int2(s, t));
    } else {
      for (int32_t t = qstart[s]; t < qstart[s + 1]; ++t) decode.push_back(t);
    }
  }
  Dev<int32_t> ddec(decode);
  Dev<int2> dtiles(tiles);
  Dev<float> partial(cuda::DecodePartialFloats(decode.size(), H, hd));
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  if (decode_mma) {
    CUDA_OK(cuda::PagedAttentionDecodeMma(dq.p, dk.p, dv.p, ab, ddec.p, decode.size(),
                                          cuda::kMaxSplits, H, KV, hd, scale, partial.p, dout.p,
                                          nullptr));
  } else {
    CUDA_OK(cuda::PagedAttentionDecode(dq.p, dk.p, dv.p, ab, ddec.p, decode.size(),
                                       cuda::kMaxSplits, H, KV, hd, scale, partial.p, dout.p,
                                       nullptr));
  }
  CUDA_OK(cuda::PagedAttentionPrefill(dq.p, dk.p, dv.p, ab, dtiles.p, tiles.size(), H, KV, hd,
                                      scale, dout.p, nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  std::vector<float> ref(n * q_size);
  cpu::PagedAttentionBatch pab{S, qstart.data(), positions.data(), tables.data(), max_blocks, bs};
  auto qf = ToF32(q), kf = ToF32(kc), vf = ToF32(vc);
  cpu::PagedAttention(qf.data(), kf.data(), vf.data(), pab, H, KV, hd, scale, ref.data());
  EXPECT_LT(RelErr(ToF32(dout.Get()), ref), kBf16Tol)
      << "hd " << hd << " H " << H << " KV " << KV << " prefill " << use_prefill << " mma "
      << decode_mma;
}

TEST(CudaOps, PagedAttentionDecodeAnyHeadDim) {
  SKIP_WITHOUT_GPU();
  CheckAttention(12, 6, 2, false);
  CheckAttention(10, 4, 4, false);
  CheckAttention(128, 28, 4, false);
  CheckAttention(64, 8, 1, false);  // 16-byte staging path, group of 8
  CheckAttention(24, 6, 3, false);
}

// Every token through the tensor-core decode kernel (long, short and prefill-sized query runs
// alike); group sizes 1, 7, 8 and 16.
TEST(CudaOps, PagedAttentionDecodeTensorCores) {
  SKIP_WITHOUT_GPU();
  ASSERT_TRUE(cuda::DecodeMmaSupported(128, 28, 4) && !cuda::DecodeMmaSupported(96, 4, 4) &&
              !cuda::DecodeMmaSupported(64, 34, 2));
  CheckAttention(128, 28, 4, false, true);
  CheckAttention(64, 14, 2, false, true);
  CheckAttention(128, 8, 8, false, true);
  CheckAttention(64, 16, 1, false, true);
  CheckAttention(128, 16, 2, false, true);
  // Decode batches whose (token, KV head) pairs ask for fewer, longer splits than
  // DecodePartition's (DecodeTargetSplits: about 4 blocks per SM), contexts 1 .. 2100; from 40
  // tokens on (160+ pairs, a block per SM of 132) contexts of at most 256 keys are one split.
  for (int tokens : {9, 24, 40, 64, 150}) {
    std::vector<std::pair<int32_t, int32_t>> batch;
    for (int i = 0; i < tokens; ++i) batch.push_back({1, 1 + static_cast<int32_t>(rng() % 2100)});
    batch[0].second = 64;
    batch[1].second = 65;
    CheckAttention(128, 28, 4, false, true, batch);
    CheckAttention(64, 14, 2, false, true, batch);
  }
}

TEST(CudaOps, PagedAttentionPrefillTensorCores) {
  SKIP_WITHOUT_GPU();
  ASSERT_TRUE(cuda::PrefillSupported(64) && cuda::PrefillSupported(128));
  CheckAttention(64, 14, 2, true);
  CheckAttention(128, 28, 4, true);
  CheckAttention(128, 8, 8, true);
}

TEST(CudaOps, FillRandomIsNormal) {
  SKIP_WITHOUT_GPU();
  const int64_t n = 1 << 20;
  Dev<uint16_t> d(n);
  CUDA_OK(cuda::FillRandomBf16(d.p, n, 7, 1.0f, 0.5f, nullptr));
  auto v = ToF32(d.Get());
  double s = 0, s2 = 0;
  for (float x : v) {
    ASSERT_TRUE(std::isfinite(x));
    s += x;
    s2 += x * x;
  }
  const double mean = s / n, var = s2 / n - mean * mean;
  EXPECT_NEAR(mean, 1.0, 0.01);
  EXPECT_NEAR(std::sqrt(var), 0.5, 0.01);
  Dev<uint16_t> d2(n);
  CUDA_OK(cuda::FillRandomBf16(d2.p, n, 8, 1.0f, 0.5f, nullptr));
  EXPECT_NE(d2.Get(), d.Get());  // seeds differ
}

}  // namespace
}  // namespace qilin
