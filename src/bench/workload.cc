#include "bench/workload.h"

#include <chrono>
#include <cmath>
#include <condition_variable>
#include <mutex>
#include <random>
#include <thread>

namespace qilin::bench {

double Now() {
  static const auto t0 = std::chrono::steady_clock::now();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

Result<std::vector<BenchRequest>> MakeWorkload(const WorkloadOptions& o) {
  if (o.num_requests < 1 || o.num_requests > 100000) {
    return OutOfRange("--num-requests {} is outside [1, 100000]", o.num_requests);
  }
  if (o.input_len < 1 || o.input_len > (1 << 22)) {
    return OutOfRange("--input-len {} is outside [1, 4194304]", o.input_len);
  }
  if (o.output_len < 1 || o.output_len > (1 << 22)) {
    return OutOfRange("--output-len {} is outside [1, 4194304]", o.output_len);
  }
  if (!(o.range_ratio >= 0 && o.range_ratio < 1)) {
    return OutOfRange("--range-ratio {} is outside [0, 1)", o.range_ratio);
  }
  if (!(o.request_rate >= 0)) return OutOfRange("--request-rate {} is negative", o.request_rate);
  if (o.vocab < 1) return OutOfRange("vocabulary size {} is below 1", o.vocab);
  std::mt19937_64 rng(o.seed);
  auto length = [&](int64_t len) {
    if (o.range_ratio == 0) return len;
    const auto lo =
        std::max<int64_t>(1, static_cast<int64_t>(std::floor(len * (1 - o.range_ratio))));
    const auto hi =
        std::max<int64_t>(lo, static_cast<int64_t>(std::ceil(len * (1 + o.range_ratio))));
    return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
  };
  std::uniform_int_distribution<int32_t> token(0, static_cast<int32_t>(o.vocab - 1));
  std::exponential_distribution<double> gap(
      o.request_rate > 0 && std::isfinite(o.request_rate) ? o.request_rate : 1.0);
  const bool poisson = o.request_rate > 0 && std::isfinite(o.request_rate);
  std::vector<BenchRequest> out(o.num_requests);
  double t = 0;
  for (auto& r : out) {
    r.prompt.resize(length(o.input_len));
    for (auto& id : r.prompt) id = token(rng);
    r.output_len = length(o.output_len);
    if (poisson) {
      r.arrival_s = t;
      t += gap(rng);
    }
  }
  return out;
}

std::vector<RequestRecord> RunWorkload(const std::vector<BenchRequest>& requests,
                                       int64_t concurrency, const RequestRunner& run) {
  std::vector<RequestRecord> records(requests.size());
  std::mutex mu;
  std::condition_variable cv;
  int64_t in_flight = 0;
  std::vector<std::thread> threads;
  threads.reserve(requests.size());
  const double t0 = Now();
  for (size_t i = 0; i < requests.size(); ++i) {
    const double due = t0 + requests[i].arrival_s;
    const double wait = due - Now();
    if (wait > 0) std::this_thread::sleep_for(std::chrono::duration<double>(wait));
    {
      std::unique_lock<std::mutex> lock(mu);
      cv.wait(lock, [&] { return concurrency <= 0 || in_flight < concurrency; });
      ++in_flight;
    }
    threads.emplace_back([&, i] {
      records[i] = run(requests[i]);
      std::lock_guard<std::mutex> lock(mu);
      --in_flight;
      cv.notify_all();
    });
  }
  for (auto& t : threads) t.join();
  return records;
}

}  // namespace qilin::bench
