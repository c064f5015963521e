// Synthetic serving workloads and the load generator that plays them against a target: fixed
// or random prompt/output lengths (vLLM's --range-ratio), arrivals all at once or as a Poisson
// process (--request-rate), at most --concurrency requests in flight.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "bench/stats.h"
#include "common/status.h"

namespace qilin::bench {

struct WorkloadOptions {
  int64_t num_requests = 100;
  int64_t input_len = 128;
  int64_t output_len = 128;
  // Lengths uniform in [len * (1 - r), len * (1 + r)] (at least 1); 0: fixed.
  double range_ratio = 0;
  // Prompt token ids are uniform in [0, vocab); the prompts are random, so no prefix is shared.
  int64_t vocab = 30000;
  // Requests per second of a Poisson process; 0 (or infinite): all at the start.
  double request_rate = 0;
  uint64_t seed = 0;
};

struct BenchRequest {
  std::vector<int32_t> prompt;
  int64_t output_len = 0;
  double arrival_s = 0;  // offset from the start of the run
};

// Validates the options (naming the bad value and limit) and draws the requests.
Result<std::vector<BenchRequest>> MakeWorkload(const WorkloadOptions& o);

// Runs one request to its end and reports it (times from `clock`'s zero). Called on many
// threads at once.
using RequestRunner = std::function<RequestRecord(const BenchRequest&)>;

// Plays `requests` through `run`: each starts at its arrival time, once fewer than
// `concurrency` (0: no limit) are in flight. Returns the records in request order.
std::vector<RequestRecord> RunWorkload(const std::vector<BenchRequest>& requests,
                                       int64_t concurrency, const RequestRunner& run);

// Seconds since the first call (the run's clock).
double Now();

}  // namespace qilin::bench
