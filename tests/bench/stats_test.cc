// bench statistics against naive computations written here: percentiles by numpy's definition
// (values numpy prints for small arrays, and a brute-force rank count for random ones), and
// TTFT / ITL / TPOT / throughput from hand-made request timelines.
#include "bench/stats.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <random>
#include <thread>

#include "bench/workload.h"

namespace qilin::bench {
namespace {

TEST(Percentile, MatchesNumpyLinear) {
  // numpy.percentile([1, 2, 3, 4], [50, 90, 99]) = [2.5, 3.7, 3.97]
  const std::vector<double> v = {1, 2, 3, 4};
  EXPECT_DOUBLE_EQ(Percentile(v, 50), 2.5);
  EXPECT_NEAR(Percentile(v, 90), 3.7, 1e-12);
  EXPECT_NEAR(Percentile(v, 99), 3.97, 1e-12);
  EXPECT_DOUBLE_EQ(Percentile(v, 0), 1);
  EXPECT_DOUBLE_EQ(Percentile(v, 100), 4);
  // numpy.percentile([7], 99) = 7; numpy.percentile([10, 20], 90) = 19
  EXPECT_DOUBLE_EQ(Percentile({7}, 99), 7);
  EXPECT_NEAR(Percentile({10, 20}, 90), 19, 1e-12);
  EXPECT_TRUE(std::isnan(Percentile({}, 50)));
}

// Naive: the p-th percentile is the value v such that the interpolated rank of v among the
// sorted values is p/100*(n-1); found by scanning every adjacent pair.
double NaivePercentile(std::vector<double> v, double p) {
  std::sort(v.begin(), v.end());
  const double want = p / 100.0 * (v.size() - 1);
  for (size_t i = 0; i + 1 < v.size(); ++i) {
    if (want >= i && want <= i + 1) return v[i] * (i + 1 - want) + v[i + 1] * (want - i);
  }
  return v.back();
}

TEST(Percentile, RandomAgainstNaive) {
  std::mt19937 rng(7);
  for (int trial = 0; trial < 50; ++trial) {
    std::vector<double> v(1 + rng() % 300);
    for (auto& x : v) x = std::uniform_real_distribution<double>(0, 5)(rng);
    const Distribution d = Summarize(v);
    double sum = 0;
    for (double x : v) sum += x;
    EXPECT_NEAR(d.mean, sum / v.size(), 1e-12);
    EXPECT_EQ(d.min, *std::min_element(v.begin(), v.end()));
    EXPECT_EQ(d.max, *std::max_element(v.begin(), v.end()));
    EXPECT_NEAR(d.p50, NaivePercentile(v, 50), 1e-12);
    EXPECT_NEAR(d.p90, NaivePercentile(v, 90), 1e-12);
    EXPECT_NEAR(d.p99, NaivePercentile(v, 99), 1e-12);
  }
}

RequestRecord Rec(bool ok, double start, std::vector<double> chunks, double end, int64_t in,
                  int64_t out, std::string error = "") {
  RequestRecord r;
  r.ok = ok;
  r.error = std::move(error);
  r.start = start;
  r.chunk_times = std::move(chunks);
  r.end = end;
  r.input_tokens = in;
  r.output_tokens = out;
  return r;
}

TEST(Summary, TimelinesByHand) {
  std::vector<RequestRecord> rs(3);
  // A: starts at 0, chunks at 0.5, 0.6, 0.8 (4 tokens: one chunk held 2), ends 0.8.
  rs[0] = Rec(true, 0, {0.5, 0.6, 0.8}, 0.8, 10, 4);
  // B: starts at 1, chunks at 1.2, 1.5, ends 2.0 (the response closed after the last chunk).
  rs[1] = Rec(true, 1, {1.2, 1.5}, 2.0, 20, 2);
  // C: failed at 0.3.
  rs[2] = Rec(false, 0.1, {}, 0.3, 0, 0, "HTTP 429");
  const Summary s = Summarize(rs);
  EXPECT_EQ(s.completed, 2);
  EXPECT_EQ(s.failed, 1);
  ASSERT_EQ(s.errors.size(), 1u);
  EXPECT_EQ(s.errors[0], "HTTP 429");
  EXPECT_DOUBLE_EQ(s.duration_s, 2.0);  // 0 .. 2.0
  EXPECT_EQ(s.input_tokens, 30);
  EXPECT_EQ(s.output_tokens, 6);
  EXPECT_DOUBLE_EQ(s.request_throughput, 1.0);
  EXPECT_DOUBLE_EQ(s.output_throughput, 3.0);
  EXPECT_DOUBLE_EQ(s.total_token_throughput, 18.0);
  // TTFT: 0.5 and 0.2.
  EXPECT_EQ(s.ttft.count, 2);
  EXPECT_NEAR(s.ttft.mean, 0.35, 1e-12);
  EXPECT_NEAR(s.ttft.p50, 0.35, 1e-12);
  // ITL pooled: 0.1, 0.2 (A) and 0.3 (B).
  EXPECT_EQ(s.itl.count, 3);
  EXPECT_NEAR(s.itl.mean, 0.2, 1e-12);
  EXPECT_NEAR(s.itl.p50, 0.2, 1e-12);
  EXPECT_NEAR(s.itl.max, 0.3, 1e-12);
  // TPOT: A (0.8 - 0.5) / 3 = 0.1; B (1.0 - 0.2) / 1 = 0.8.
  EXPECT_EQ(s.tpot.count, 2);
  EXPECT_NEAR(s.tpot.min, 0.1, 1e-12);
  EXPECT_NEAR(s.tpot.max, 0.8, 1e-12);
  // E2E: 0.8 and 1.0.
  EXPECT_NEAR(s.e2e.mean, 0.9, 1e-12);
  EXPECT_NEAR(s.e2e.p90, 0.98, 1e-12);
  const auto j = ToJson(s);
  EXPECT_NEAR(j["ttft_ms"]["mean"].get<double>(), 350, 1e-9);
  EXPECT_EQ(j["failed"].get<int64_t>(), 1);
  EXPECT_NE(FormatTable(s).find("HTTP 429"), std::string::npos);
}

TEST(Summary, Empty) {
  const Summary s = Summarize(std::vector<RequestRecord>{});
  EXPECT_EQ(s.completed, 0);
  EXPECT_EQ(s.request_throughput, 0);
  EXPECT_EQ(s.ttft.count, 0);
}

TEST(Workload, FixedAndRandomLengths) {
  WorkloadOptions o;
  o.num_requests = 200;
  o.input_len = 100;
  o.output_len = 10;
  o.vocab = 50;
  auto fixed = MakeWorkload(o);
  ASSERT_TRUE(fixed.ok()) << fixed.status().ToString();
  for (const auto& r : *fixed) {
    EXPECT_EQ(r.prompt.size(), 100u);
    EXPECT_EQ(r.output_len, 10);
    EXPECT_EQ(r.arrival_s, 0);
    for (int32_t id : r.prompt) EXPECT_TRUE(id >= 0 && id < 50);
  }
  o.range_ratio = 0.5;
  auto random = MakeWorkload(o);
  ASSERT_TRUE(random.ok());
  size_t lo = 1000, hi = 0;
  for (const auto& r : *random) {
    lo = std::min(lo, r.prompt.size());
    hi = std::max(hi, r.prompt.size());
    EXPECT_TRUE(r.output_len >= 5 && r.output_len <= 15) << r.output_len;
  }
  EXPECT_GE(lo, 50u);
  EXPECT_LE(hi, 150u);
  EXPECT_LT(lo, 70u);  // 200 uniform draws over [50, 150] reach both ends
  EXPECT_GT(hi, 130u);
}

TEST(Workload, PoissonArrivals) {
  WorkloadOptions o;
  o.num_requests = 4000;
  o.input_len = 1;
  o.output_len = 1;
  o.request_rate = 50;
  auto w = MakeWorkload(o);
  ASSERT_TRUE(w.ok());
  // Gaps of a Poisson process at 50/s: mean 20 ms, and the standard deviation equals the mean.
  std::vector<double> gaps;
  for (size_t i = 1; i < w->size(); ++i) gaps.push_back((*w)[i].arrival_s - (*w)[i - 1].arrival_s);
  double mean = 0, var = 0;
  for (double g : gaps) mean += g;
  mean /= gaps.size();
  for (double g : gaps) var += (g - mean) * (g - mean);
  var /= gaps.size();
  EXPECT_NEAR(mean, 0.02, 0.002);
  EXPECT_NEAR(std::sqrt(var), 0.02, 0.003);
  for (double g : gaps) EXPECT_GE(g, 0);
}

TEST(Workload, BadOptionsNamed) {
  WorkloadOptions o;
  o.num_requests = 0;
  EXPECT_NE(MakeWorkload(o).status().message().find("--num-requests 0"), std::string::npos);
  o = {};
  o.range_ratio = 1.5;
  EXPECT_NE(MakeWorkload(o).status().message().find("--range-ratio 1.5"), std::string::npos);
  o = {};
  o.request_rate = -1;
  EXPECT_NE(MakeWorkload(o).status().message().find("--request-rate"), std::string::npos);
}

TEST(RunWorkload, ConcurrencyIsBounded) {
  WorkloadOptions o;
  o.num_requests = 40;
  o.input_len = 1;
  o.output_len = 1;
  auto w = MakeWorkload(o);
  ASSERT_TRUE(w.ok());
  std::atomic<int> now{0}, peak{0};
  auto records = RunWorkload(*w, 3, [&](const BenchRequest&) {
    const int n = ++now;
    int p = peak.load();
    while (n > p && !peak.compare_exchange_weak(p, n)) {
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
    --now;
    RequestRecord r;
    r.ok = true;
    return r;
  });
  EXPECT_EQ(records.size(), 40u);
  EXPECT_LE(peak.load(), 3);
  EXPECT_GE(peak.load(), 2);
}

}  // namespace
}  // namespace qilin::bench
