// CPU kernel micro-benchmark: LinearSlice as GEMV (decode) against the read bandwidth measured in
// the same run, and as blocked GEMM (prefill) against the f32 FMA peak; one thread, so that a
// shared machine disturbs it least. Times are this thread's CPU time (CLOCK_THREAD_CPUTIME_ID), not
// wall time, so that time the thread spends descheduled by other processes does not count; medians
// of repeated runs.
//   qilin_bench_cpu_kernels [--rows N] [--reps R]
#include <immintrin.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <random>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "kernels/cpu/linear.h"

namespace {

// Thread CPU time in seconds.
struct Clock {
  using time_point = double;
  static double now() {
    timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
  }
};
double Seconds(double a, double b) { return b - a; }

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Read-only bandwidth of one thread over `bytes` (sum of 32-byte loads, 4 independent chains).
double ReadGBs(const std::vector<uint16_t>& buf, int reps) {
  std::vector<double> t;
  volatile float sink = 0;
  for (int r = 0; r < reps; ++r) {
    auto t0 = Clock::now();
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    const float* p = reinterpret_cast<const float*>(buf.data());
    const size_t n = buf.size() / 2;
    for (size_t i = 0; i + 32 <= n; i += 32) {
      a0 = _mm256_add_ps(a0, _mm256_loadu_ps(p + i));
      a1 = _mm256_add_ps(a1, _mm256_loadu_ps(p + i + 8));
      a2 = _mm256_add_ps(a2, _mm256_loadu_ps(p + i + 16));
      a3 = _mm256_add_ps(a3, _mm256_loadu_ps(p + i + 24));
    }
    sink = sink + _mm256_cvtss_f32(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    t.push_back(Seconds(t0, Clock::now()));
  }
  return buf.size() * 2.0 / Median(t) / 1e9;
}

double FmaGflops() {
  const int64_t iters = 10'000'000;
  std::vector<double> t;
  for (int rep = 0; rep < 5; ++rep) {
    auto t0 = Clock::now();
    __m256 acc[12];
    for (int i = 0; i < 12; ++i) acc[i] = _mm256_set1_ps(static_cast<float>(i));
    const __m256 a = _mm256_set1_ps(0.999999f), b = _mm256_set1_ps(1e-7f);
    for (int64_t it = 0; it < iters; ++it)
      for (int i = 0; i < 12; ++i) acc[i] = _mm256_fmadd_ps(acc[i], a, b);
    float s = 0;
    for (int i = 0; i < 12; ++i) s += _mm256_cvtss_f32(acc[i]);
    if (s == 12345.f) std::printf(" ");
    t.push_back(Seconds(t0, Clock::now()));
  }
  return 2.0 * 8 * 12 * iters / Median(t) / 1e9;
}

}  // namespace

int main(int argc, char** argv) {
  int64_t rows = 512;
  int reps = 7;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--rows" && i + 1 < argc) {
      rows = std::stoll(argv[++i]);
    } else if (a == "--reps" && i + 1 < argc) {
      reps = std::stoi(argv[++i]);
    } else {
      std::fprintf(stderr, "usage: %s [--rows N] [--reps R]\n", argv[0]);
      return 2;
    }
  }
  // Qwen2.5-0.5B's MLP: gate/up [4864, 896], down [896, 4864]; 12 matrices of 8.7 MB = 105 MB of
  // bf16, far beyond the caches, cycled through as a decode step does.
  const int64_t in = 896, out = 4864, mats = 12;
  std::mt19937 rng(1);
  std::normal_distribution<float> nd(0.0f, 0.02f);
  std::vector<uint16_t> w(mats * in * out);
  for (auto& v : w) v = qilin::F32ToBf16(nd(rng));
  std::vector<float> x(std::max<int64_t>(rows, 1) * in), y(std::max<int64_t>(rows, 1) * out);
  for (auto& v : x) v = nd(rng);

  const double read_gbs = ReadGBs(w, reps);
  const double fma = FmaGflops();
  auto run = [&](int64_t n, int64_t m) {
    qilin::cpu::LinearSliceArgs s;
    s.x = x.data();
    s.ldx = in;
    s.n = n;
    s.in = in;
    s.w = {qilin::DType::kBF16, w.data() + m * in * out};
    s.ldw = in;
    s.o_begin = 0;
    s.o_end = out;
    s.y = y.data();
    s.ldy = out;
    qilin::cpu::LinearSlice(s);
  };
  std::vector<double> t1;
  for (int r = 0; r < reps; ++r) {
    auto t0 = Clock::now();
    for (int64_t m = 0; m < mats; ++m) run(1, m);
    t1.push_back(Seconds(t0, Clock::now()));
  }
  const double gemv_gbs = w.size() * 2.0 / Median(t1) / 1e9;
  // The same GEMV on 256 rows (448 KB, L2-resident): the kernel's own speed without DRAM.
  std::vector<double> t3;
  for (int r = 0; r < reps; ++r) {
    auto t0 = Clock::now();
    for (int64_t it = 0; it < 100; ++it) {
      qilin::cpu::LinearSliceArgs s;
      s.x = x.data();
      s.ldx = in;
      s.n = 1;
      s.in = in;
      s.w = {qilin::DType::kBF16, w.data()};
      s.ldw = in;
      s.o_begin = 0;
      s.o_end = 256;
      s.y = y.data();
      s.ldy = out;
      qilin::cpu::LinearSlice(s);
    }
    t3.push_back(Seconds(t0, Clock::now()));
  }
  const double gemv_l2_gbs = 100 * 256 * in * 2.0 / Median(t3) / 1e9;
  std::vector<double> t2;
  for (int r = 0; r < std::max(3, reps / 2); ++r) {
    auto t0 = Clock::now();
    run(rows, r % mats);
    t2.push_back(Seconds(t0, Clock::now()));
  }
  const double gemm = 2.0 * rows * in * out / Median(t2) / 1e9;
  std::printf("one thread, bf16 W [%ld x %ld]\n", static_cast<long>(out), static_cast<long>(in));
  std::printf("  read bandwidth     %7.2f GB/s\n", read_gbs);
  std::printf("  GEMV (1 row)       %7.2f GB/s  %3.0f%% of read bandwidth\n", gemv_gbs,
              100 * gemv_gbs / read_gbs);
  std::printf("  GEMV, L2-resident  %7.2f GB/s\n", gemv_l2_gbs);
  std::printf("  FMA peak           %7.1f GFLOP/s\n", fma);
  std::printf("  GEMM (%ld rows)    %7.1f GFLOP/s %3.0f%% of FMA peak\n", static_cast<long>(rows),
              gemm, 100 * gemm / fma);
  return 0;
}
