// Prometheus metrics of the server: counters, gauges and histograms rendered in the text
// exposition format (version 0.0.4). Triton's names where Triton has one
// (nv_inference_request_success, nv_inference_request_failure, nv_inference_count, ...,
// nv_trt_llm_kv_cache_block_metrics), qilin_* names for the rest.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "engine/engine.h"

namespace qilin::server {

// A cumulative histogram with fixed upper bounds (seconds).
class Histogram {
 public:
  explicit Histogram(std::vector<double> bounds);
  void Observe(double value);
  // Appends "<name>_bucket{le=...}", "_sum" and "_count" lines (`labels` like `model="x"`).
  void Render(const std::string& name, const std::string& labels, std::string* out) const;
  uint64_t count() const;

 private:
  std::vector<double> bounds_;
  mutable std::mutex mu_;
  std::vector<uint64_t> counts_;  // per bucket (not cumulative), + the +Inf one
  double sum_ = 0;
  uint64_t count_ = 0;
};

// Requests of one Triton model (ensemble, tensorrt_llm, ...: HTTP /v2 and gRPC together).
struct ModelRequestCounts {
  std::string model;
  int64_t success = 0;
  int64_t failure = 0;
  int64_t duration_us = 0;  // success + failure time
};

class ServerMetrics {
 public:
  explicit ServerMetrics(std::string model_name);

  // One finished HTTP request: `endpoint` the route ("/v1/chat/completions"), its status.
  void RecordRequest(const std::string& endpoint, int status, double seconds);
  // One finished generation: its prompt/generated tokens, queue-to-first-token and e2e times.
  void RecordGeneration(int64_t prompt_tokens, int64_t generated_tokens, double e2e_seconds,
                        bool success);
  void ObserveTimeToFirstToken(double seconds) { ttft_.Observe(seconds); }
  void ObserveInterTokenLatency(double seconds) { itl_.Observe(seconds); }
  void RequestRejected() { rejected_.fetch_add(1); }  // 429

  // The text format, with the engine's gauges and counters as of `stats`.
  // `triton_models`: the KServe v2 models' counters, written beside the OpenAI API's (labelled
  // with the served model name) under Triton's nv_inference_* names.
  std::string Render(const EngineStats& stats, int64_t open_connections, int64_t active_requests,
                     const std::vector<ModelRequestCounts>& triton_models = {}) const;

  uint64_t ttft_count() const { return ttft_.count(); }

 private:
  std::string model_;
  mutable std::mutex mu_;
  // (endpoint, status) -> count, and durations per endpoint.
  std::map<std::pair<std::string, int>, uint64_t> requests_;
  std::map<std::string, double> duration_sum_;
  std::atomic<uint64_t> success_{0}, failure_{0}, rejected_{0};
  std::atomic<int64_t> prompt_tokens_{0}, generated_tokens_{0};
  std::atomic<uint64_t> request_duration_us_{0};
  Histogram e2e_;
  Histogram ttft_;
  Histogram itl_;
  Histogram http_duration_;
};

// Prometheus label value escaping: backslash, double quote and newline.
std::string PromEscape(const std::string& value);

}  // namespace qilin::server
