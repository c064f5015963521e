#include "server/metrics.h"

#include <cmath>

#include <fmt/format.h>

namespace qilin::server {
namespace {

std::vector<double> LatencyBounds() {
  return {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120};
}

std::string Num(double v) {
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  if (std::isnan(v)) return "NaN";
  return fmt::format("{}", v);
}

void Header(std::string* out, const std::string& name, const std::string& type,
            const std::string& help) {
  *out += fmt::format("# HELP {} {}\n# TYPE {} {}\n", name, help, name, type);
}

}  // namespace

std::string PromEscape(const std::string& value) {
  std::string out;
  for (char c : value) {
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '"') {
      out += "\\\"";
    } else if (c == '\n') {
      out += "\\n";
    } else {
      out += c;
    }
  }
  return out;
}

Histogram::Histogram(std::vector<double> bounds)
    : bounds_(std::move(bounds)), counts_(bounds_.size() + 1, 0) {}

void Histogram::Observe(double value) {
  size_t i = 0;
  while (i < bounds_.size() && value > bounds_[i]) ++i;
  std::lock_guard<std::mutex> lock(mu_);
  ++counts_[i];
  sum_ += value;
  ++count_;
}

uint64_t Histogram::count() const {
  std::lock_guard<std::mutex> lock(mu_);
  return count_;
}

void Histogram::Render(const std::string& name, const std::string& labels, std::string* out) const {
  std::lock_guard<std::mutex> lock(mu_);
  const std::string sep = labels.empty() ? "" : ",";
  uint64_t cumulative = 0;
  for (size_t i = 0; i <= bounds_.size(); ++i) {
    cumulative += counts_[i];
    const std::string le = i < bounds_.size() ? Num(bounds_[i]) : "+Inf";
    *out += fmt::format("{}_bucket{{{}{}le=\"{}\"}} {}\n", name, labels, sep, le, cumulative);
  }
  const std::string braces = labels.empty() ? "" : "{" + labels + "}";
  *out += fmt::format("{}_sum{} {}\n", name, braces, Num(sum_));
  *out += fmt::format("{}_count{} {}\n", name, braces, count_);
}

ServerMetrics::ServerMetrics(std::string model_name)
    : model_(std::move(model_name)),
      e2e_(LatencyBounds()),
      ttft_(LatencyBounds()),
      itl_({0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5}),
      http_duration_(LatencyBounds()) {}

void ServerMetrics::RecordRequest(const std::string& endpoint, int status, double seconds) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    ++requests_[{endpoint, status}];
    duration_sum_[endpoint] += seconds;
  }
  http_duration_.Observe(seconds);
}

void ServerMetrics::RecordGeneration(int64_t prompt_tokens, int64_t generated_tokens,
                                     double e2e_seconds, bool success) {
  prompt_tokens_ += prompt_tokens;
  generated_tokens_ += generated_tokens;
  request_duration_us_ += static_cast<uint64_t>(e2e_seconds * 1e6);
  (success ? success_ : failure_).fetch_add(1);
  e2e_.Observe(e2e_seconds);
}

std::string ServerMetrics::Render(const EngineStats& s, int64_t open_connections,
                                  int64_t active_requests,
                                  const std::vector<ModelRequestCounts>& triton_models) const {
  std::string out;
  const std::string m = fmt::format("model=\"{}\",version=\"1\"", PromEscape(model_));
  const std::string model_only = fmt::format("model_name=\"{}\"", PromEscape(model_));

  // Triton's names. Triton declares these as counters without the _total suffix; they are
  // written untyped here so that Prometheus' own lint (promtool) accepts the exposition.
  out += "# HELP nv_inference_request_success Number of successful inference requests\n";
  out += fmt::format("nv_inference_request_success{{{}}} {}\n", m, success_.load());
  auto label = [](const ModelRequestCounts& t) {
    return fmt::format("model=\"{}\",version=\"1\"", PromEscape(t.model));
  };
  for (const auto& t : triton_models) {
    out += fmt::format("nv_inference_request_success{{{}}} {}\n", label(t), t.success);
  }
  out += "# HELP nv_inference_request_failure Number of failed inference requests\n";
  out += fmt::format("nv_inference_request_failure{{{},reason=\"REJECTED\"}} {}\n", m,
                     rejected_.load());
  out +=
      fmt::format("nv_inference_request_failure{{{},reason=\"BACKEND\"}} {}\n", m, failure_.load());
  for (const auto& t : triton_models) {
    out += fmt::format("nv_inference_request_failure{{{},reason=\"BACKEND\"}} {}\n", label(t),
                       t.failure);
  }
  out += "# HELP nv_inference_count Number of inferences performed\n";
  out += fmt::format("nv_inference_count{{{}}} {}\n", m, success_.load() + failure_.load());
  for (const auto& t : triton_models) {
    out += fmt::format("nv_inference_count{{{}}} {}\n", label(t), t.success + t.failure);
  }
  // Triton's nv_inference_request_duration_us, in seconds (promtool refuses abbreviated units).
  Header(&out, "qilin_inference_request_duration_seconds_total", "counter",
         "Cumulative inference request duration, by model");
  out += fmt::format("qilin_inference_request_duration_seconds_total{{{}}} {}\n", m,
                     Num(request_duration_us_.load() / 1e6));
  for (const auto& t : triton_models) {
    out += fmt::format("qilin_inference_request_duration_seconds_total{{{}}} {}\n", label(t),
                       Num(t.duration_us / 1e6));
  }
  out += "# HELP nv_inference_pending_request_count Requests waiting to be scheduled\n";
  out += fmt::format("nv_inference_pending_request_count{{{}}} {}\n", m, s.waiting);
  out += "# HELP nv_trt_llm_request_metrics TRT-LLM request metrics\n";
  out += fmt::format("nv_trt_llm_request_metrics{{request_type=\"active\"}} {}\n",
                     s.running + s.waiting);
  out += fmt::format("nv_trt_llm_request_metrics{{request_type=\"scheduled\"}} {}\n", s.running);
  out += fmt::format("nv_trt_llm_request_metrics{{request_type=\"waiting\"}} {}\n", s.waiting);
  out += "# HELP nv_trt_llm_kv_cache_block_metrics TRT-LLM KV cache block metrics\n";
  out += fmt::format("nv_trt_llm_kv_cache_block_metrics{{kv_cache_block_type=\"max\"}} {}\n",
                     s.kv_blocks_total);
  out += fmt::format("nv_trt_llm_kv_cache_block_metrics{{kv_cache_block_type=\"free\"}} {}\n",
                     s.kv_blocks_free);
  out += fmt::format("nv_trt_llm_kv_cache_block_metrics{{kv_cache_block_type=\"used\"}} {}\n",
                     s.kv_blocks_used);

  // qilin's own.
  Header(&out, "qilin_requests_total", "counter", "HTTP requests by endpoint and status");
  std::map<std::string, double> durations;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& [key, count] : requests_) {
      out += fmt::format("qilin_requests_total{{endpoint=\"{}\",status=\"{}\"}} {}\n",
                         PromEscape(key.first), key.second, count);
    }
    durations = duration_sum_;
  }
  Header(&out, "qilin_request_duration_seconds_total", "counter",
         "Time spent answering HTTP requests, by endpoint");
  for (const auto& [ep, secs] : durations) {
    out += fmt::format("qilin_request_duration_seconds_total{{endpoint=\"{}\"}} {}\n",
                       PromEscape(ep), Num(secs));
  }
  Header(&out, "qilin_http_request_duration_seconds", "histogram", "HTTP request duration");
  http_duration_.Render("qilin_http_request_duration_seconds", "", &out);
  Header(&out, "qilin_request_success_total", "counter", "Generations that finished");
  out += fmt::format("qilin_request_success_total{{{}}} {}\n", model_only, success_.load());
  Header(&out, "qilin_request_failure_total", "counter", "Generations that failed");
  out += fmt::format("qilin_request_failure_total{{{}}} {}\n", model_only, failure_.load());
  Header(&out, "qilin_request_rejected_total", "counter",
         "Requests refused because the admission queue was full (429)");
  out += fmt::format("qilin_request_rejected_total{{{}}} {}\n", model_only, rejected_.load());
  Header(&out, "qilin_e2e_request_latency_seconds", "histogram",
         "Generation time from arrival to the last token");
  e2e_.Render("qilin_e2e_request_latency_seconds", model_only, &out);
  Header(&out, "qilin_time_to_first_token_seconds", "histogram",
         "Time from arrival to the first generated token");
  ttft_.Render("qilin_time_to_first_token_seconds", model_only, &out);
  Header(&out, "qilin_inter_token_latency_seconds", "histogram",
         "Time between consecutive tokens of a sequence");
  itl_.Render("qilin_inter_token_latency_seconds", model_only, &out);
  Header(&out, "qilin_prompt_tokens_total", "counter", "Prompt tokens of finished requests");
  out += fmt::format("qilin_prompt_tokens_total{{{}}} {}\n", model_only, prompt_tokens_.load());
  Header(&out, "qilin_generation_tokens_total", "counter", "Generated tokens");
  out +=
      fmt::format("qilin_generation_tokens_total{{{}}} {}\n", model_only, generated_tokens_.load());
  Header(&out, "qilin_num_requests_running", "gauge", "Sequences groups running in the engine");
  out += fmt::format("qilin_num_requests_running{{{}}} {}\n", model_only, s.running);
  Header(&out, "qilin_num_requests_waiting", "gauge", "Requests waiting for KV blocks");
  out += fmt::format("qilin_num_requests_waiting{{{}}} {}\n", model_only, s.waiting);
  Header(&out, "qilin_active_requests", "gauge", "Generation requests admitted by the server");
  out += fmt::format("qilin_active_requests{{{}}} {}\n", model_only, active_requests);
  Header(&out, "qilin_open_connections", "gauge", "Open HTTP connections");
  out += fmt::format("qilin_open_connections {}\n", open_connections);
  Header(&out, "qilin_kv_cache_blocks_capacity", "gauge", "KV cache blocks in the pool");
  out += fmt::format("qilin_kv_cache_blocks_capacity{{{}}} {}\n", model_only, s.kv_blocks_total);
  Header(&out, "qilin_kv_cache_blocks_used", "gauge",
         "KV cache blocks held by requests (cached prefix blocks not counted)");
  out += fmt::format("qilin_kv_cache_blocks_used{{{}}} {}\n", model_only, s.kv_blocks_used);
  Header(&out, "qilin_kv_cache_blocks_free", "gauge", "KV cache blocks free or evictable");
  out += fmt::format("qilin_kv_cache_blocks_free{{{}}} {}\n", model_only, s.kv_blocks_free);
  Header(&out, "qilin_kv_cache_blocks_cached", "gauge",
         "Unreferenced blocks kept for prefix caching");
  out += fmt::format("qilin_kv_cache_blocks_cached{{{}}} {}\n", model_only, s.kv_blocks_cached);
  Header(&out, "qilin_kv_cache_usage_ratio", "gauge", "Used / total KV blocks");
  out += fmt::format(
      "qilin_kv_cache_usage_ratio{{{}}} {}\n", model_only,
      Num(s.kv_blocks_total ? static_cast<double>(s.kv_blocks_used) / s.kv_blocks_total : 0.0));
  Header(&out, "qilin_prefix_cache_queries_total", "counter", "Prompt blocks looked up");
  out += fmt::format("qilin_prefix_cache_queries_total{{{}}} {}\n", model_only,
                     s.prefix_cache_queries);
  Header(&out, "qilin_prefix_cache_hits_total", "counter", "Prompt blocks found in the cache");
  out += fmt::format("qilin_prefix_cache_hits_total{{{}}} {}\n", model_only, s.prefix_cache_hits);
  Header(&out, "qilin_prefix_cache_hit_rate", "gauge", "Hits / queries since start");
  out += fmt::format("qilin_prefix_cache_hit_rate{{{}}} {}\n", model_only,
                     Num(s.prefix_cache_hit_rate()));
  Header(&out, "qilin_engine_prefill_tokens_total", "counter",
         "Prompt tokens the engine ran (all APIs; prefix cache hits not counted)");
  out += fmt::format("qilin_engine_prefill_tokens_total{{{}}} {}\n", model_only, s.prefill_tokens);
  Header(&out, "qilin_engine_generated_tokens_total", "counter",
         "Tokens the engine generated (all APIs)");
  out +=
      fmt::format("qilin_engine_generated_tokens_total{{{}}} {}\n", model_only, s.generated_tokens);
  Header(&out, "qilin_engine_steps_total", "counter", "Engine steps run");
  out += fmt::format("qilin_engine_steps_total{{{}}} {}\n", model_only, s.steps);
  Header(&out, "qilin_engine_overlapped_steps_total", "counter",
         "Engine steps launched while the previous step still ran on the device");
  out +=
      fmt::format("qilin_engine_overlapped_steps_total{{{}}} {}\n", model_only, s.overlapped_steps);
  Header(&out, "qilin_preemptions_total", "counter", "Sequences preempted for KV blocks");
  out += fmt::format("qilin_preemptions_total{{{}}} {}\n", model_only, s.preemptions);
  return out;
}

}  // namespace qilin::server
