// The OpenAI-compatible API over a ModelPipeline: GET /v1/models, POST /v1/completions,
// POST /v1/chat/completions (stream: SSE "data: {...}" chunks, then "data: [DONE]"), plus
// GET /v2/health/live and /v2/health/ready. Parsing and the response shapes are plain
// functions (tested without a server); OpenAiService wires them to a Router.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "pipeline/pipeline.h"
#include "server/http_server.h"
#include "server/metrics.h"

namespace qilin::server {

// An error in OpenAI's shape: {"error":{"message","type","param","code"}}.
struct ApiError {
  int status = 400;
  std::string message;
  std::string param;  // the request field at fault, or ""
  std::string code;   // e.g. "model_not_found"; "" -> the status
  std::string Body() const;
};

struct ParseLimits {
  int64_t max_n = 64;
  int32_t max_logprobs = 20;
  int32_t max_stop = 16;
};

// A parsed /v1/completions or /v1/chat/completions request.
struct OpenAiRequest {
  bool chat = false;
  std::string model;                            // "" when not given
  std::vector<pipeline::GenerateInput> inputs;  // completions may hold several prompts
  pipeline::GenerateParams params;
  bool stream = false;
  bool include_usage = false;  // stream_options.include_usage
  bool logprobs = false;       // chat: logprobs=true; completions: logprobs=N given
  int32_t top_logprobs = 0;    // chat top_logprobs, completions' logprobs N
  bool echo = false;           // completions: prepend the prompt text
};

// Parses and validates a request body. On error returns false and fills `error` (400 with the
// parameter's name and the limit).
bool ParseOpenAiRequest(const std::string& body, bool chat, const ParseLimits& limits,
                        OpenAiRequest* out, ApiError* error);

// One SSE event: "data: <json>\n\n" (invalid UTF-8 in strings is replaced, never thrown).
std::string SseData(const nlohmann::json& j);
inline std::string SseDone() { return "data: [DONE]\n\n"; }
// JSON text that never throws on invalid UTF-8 (U+FFFD instead).
std::string DumpJson(const nlohmann::json& j);
// "stop", "length" (and "abort" when the server stopped the request).
std::string FinishReasonText(FinishReason r);

struct OpenAiServiceOptions {
  int32_t max_active = 512;  // generation requests admitted at once (running + queued); 429 beyond
  std::vector<std::string> extra_model_ids{"ensemble", "tensorrt_llm", "preprocessing",
                                           "postprocessing"};
  ParseLimits limits;
};

class OpenAiService {
 public:
  OpenAiService(pipeline::ModelPipeline* pipeline, ServerMetrics* metrics,
                OpenAiServiceOptions options);
  // Adds the /v1 routes and /v2/health/{live,ready} to `router`.
  void Register(Router& router);

  // False once draining began (readiness 503, new generations 503).
  void SetAccepting(bool accepting) { accepting_ = accepting; }
  int64_t active() const { return active_.load(); }
  // Model ids /v1/models lists (served name first).
  std::vector<std::string> ModelIds() const;

 private:
  class Job;
  void HandleGenerate(bool chat, HttpRequest& req, ResponderPtr res);
  void HandleModels(HttpRequest& req, ResponderPtr res);

  pipeline::ModelPipeline* pipeline_;
  ServerMetrics* metrics_;
  OpenAiServiceOptions options_;
  std::atomic<int64_t> active_{0};
  std::atomic<bool> accepting_{true};
};

}  // namespace qilin::server
