#include "bench/stats.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include <fmt/format.h>

namespace qilin::bench {

double Percentile(const std::vector<double>& sorted, double p) {
  if (sorted.empty()) return std::numeric_limits<double>::quiet_NaN();
  const double rank = std::clamp(p, 0.0, 100.0) / 100.0 * static_cast<double>(sorted.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(rank));
  const size_t hi = std::min(lo + 1, sorted.size() - 1);
  return sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - static_cast<double>(lo));
}

Distribution Summarize(std::vector<double> values) {
  Distribution d;
  d.count = static_cast<int64_t>(values.size());
  if (values.empty()) return d;
  std::sort(values.begin(), values.end());
  d.mean = std::accumulate(values.begin(), values.end(), 0.0) / static_cast<double>(values.size());
  d.min = values.front();
  d.max = values.back();
  d.p50 = Percentile(values, 50);
  d.p90 = Percentile(values, 90);
  d.p99 = Percentile(values, 99);
  return d;
}

Summary Summarize(const std::vector<RequestRecord>& records) {
  Summary s;
  std::vector<double> ttft, itl, tpot, e2e;
  double first = std::numeric_limits<double>::infinity(), last = 0;
  for (const auto& r : records) {
    first = std::min(first, r.start);
    last = std::max(last, r.end);
    if (!r.ok) {
      ++s.failed;
      if (s.errors.size() < 5) s.errors.push_back(r.error);
      continue;
    }
    ++s.completed;
    s.input_tokens += r.input_tokens;
    s.output_tokens += r.output_tokens;
    const double latency = r.end - r.start;
    e2e.push_back(latency);
    if (r.chunk_times.empty()) continue;
    const double t = r.chunk_times.front() - r.start;
    ttft.push_back(t);
    for (size_t i = 1; i < r.chunk_times.size(); ++i) {
      itl.push_back(r.chunk_times[i] - r.chunk_times[i - 1]);
    }
    if (r.output_tokens > 1)
      tpot.push_back((latency - t) / static_cast<double>(r.output_tokens - 1));
  }
  s.duration_s = records.empty() ? 0 : std::max(0.0, last - first);
  if (s.duration_s > 0) {
    s.request_throughput = static_cast<double>(s.completed) / s.duration_s;
    s.output_throughput = static_cast<double>(s.output_tokens) / s.duration_s;
    s.total_token_throughput = static_cast<double>(s.input_tokens + s.output_tokens) / s.duration_s;
  }
  s.ttft = Summarize(std::move(ttft));
  s.itl = Summarize(std::move(itl));
  s.tpot = Summarize(std::move(tpot));
  s.e2e = Summarize(std::move(e2e));
  return s;
}

namespace {

nlohmann::json Ms(const Distribution& d) {
  return {{"count", d.count},   {"mean", d.mean * 1e3}, {"min", d.min * 1e3}, {"max", d.max * 1e3},
          {"p50", d.p50 * 1e3}, {"p90", d.p90 * 1e3},   {"p99", d.p99 * 1e3}};
}

}  // namespace

nlohmann::json ToJson(const Summary& s) {
  return {{"completed", s.completed},
          {"failed", s.failed},
          {"duration_s", s.duration_s},
          {"input_tokens", s.input_tokens},
          {"output_tokens", s.output_tokens},
          {"request_throughput", s.request_throughput},
          {"output_throughput", s.output_throughput},
          {"total_token_throughput", s.total_token_throughput},
          {"ttft_ms", Ms(s.ttft)},
          {"itl_ms", Ms(s.itl)},
          {"tpot_ms", Ms(s.tpot)},
          {"e2e_latency_ms", Ms(s.e2e)},
          {"errors", s.errors}};
}

std::string FormatTable(const Summary& s) {
  std::string out;
  out += fmt::format("{:<28}{:>12}\n", "completed requests", s.completed);
  out += fmt::format("{:<28}{:>12}\n", "failed requests", s.failed);
  out += fmt::format("{:<28}{:>12.3f}\n", "duration (s)", s.duration_s);
  out += fmt::format("{:<28}{:>12}\n", "input tokens", s.input_tokens);
  out += fmt::format("{:<28}{:>12}\n", "output tokens", s.output_tokens);
  out += fmt::format("{:<28}{:>12.2f}\n", "requests/s", s.request_throughput);
  out += fmt::format("{:<28}{:>12.1f}\n", "output tokens/s", s.output_throughput);
  out += fmt::format("{:<28}{:>12.1f}\n", "total tokens/s", s.total_token_throughput);
  out += fmt::format("{:<20}{:>10}{:>10}{:>10}{:>10}{:>10}\n", "latency (ms)", "mean", "p50", "p90",
                     "p99", "max");
  auto row = [&](const char* name, const Distribution& d) {
    out += fmt::format("{:<20}{:>10.2f}{:>10.2f}{:>10.2f}{:>10.2f}{:>10.2f}\n", name, d.mean * 1e3,
                       d.p50 * 1e3, d.p90 * 1e3, d.p99 * 1e3, d.max * 1e3);
  };
  row("TTFT", s.ttft);
  row("inter-token", s.itl);
  row("TPOT", s.tpot);
  row("end-to-end", s.e2e);
  for (const auto& e : s.errors) out += fmt::format("error: {}\n", e);
  return out;
}

}  // namespace qilin::bench
