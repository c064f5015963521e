// Serving benchmark statistics: per-request timings in, the figures people compare out (TTFT,
// inter-token latency, time per output token, end-to-end latency as mean/p50/p90/p99; request
// and token throughput), as vLLM's and TensorRT-LLM's benchmarks define them:
//   TTFT   first output chunk time - request start
//   ITL    gaps between successive output chunks, pooled over all requests
//   TPOT   per request: (latency - TTFT) / (output tokens - 1)
//   E2E    last chunk (or the end of the response) - request start
//   throughput: completed requests / duration, output tokens / duration
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace qilin::bench {

// What happened to one request (times in seconds, from the start of the run).
struct RequestRecord {
  bool ok = false;
  std::string error;
  double start = 0;                 // sent / submitted
  std::vector<double> chunk_times;  // arrival of each piece of output that held tokens
  double end = 0;                   // the response complete
  int64_t input_tokens = 0;
  int64_t output_tokens = 0;
};

// Percentile with linear interpolation between closest ranks (numpy's default): the value at
// rank p/100 * (n - 1) of the sorted values. `sorted` must be ascending; NaN when empty.
double Percentile(const std::vector<double>& sorted, double p);

struct Distribution {
  int64_t count = 0;
  double mean = 0, min = 0, max = 0, p50 = 0, p90 = 0, p99 = 0;
};
Distribution Summarize(std::vector<double> values);

struct Summary {
  int64_t completed = 0, failed = 0;
  double duration_s = 0;  // first start to last end
  int64_t input_tokens = 0, output_tokens = 0;
  double request_throughput = 0;  // completed / s
  double output_throughput = 0;   // output tokens / s
  double total_token_throughput = 0;
  Distribution ttft, itl, tpot, e2e;  // seconds
  std::vector<std::string> errors;    // the first few
};
Summary Summarize(const std::vector<RequestRecord>& records);

// The summary as JSON (latencies in milliseconds) and as a table a person reads.
nlohmann::json ToJson(const Summary& s);
std::string FormatTable(const Summary& s);

}  // namespace qilin::bench
