// What `qilin bench` drives: the engine in-process (offline), a server's OpenAI API over HTTP
// (streaming completions with token-id prompts), or a server's KServe v2 gRPC service
// (ModelStreamInfer on `tensorrt_llm`, streaming token ids). Each makes a RequestRunner for
// RunWorkload; every request asks for exactly its output_len tokens (end tokens ignored).
#pragma once

#include <string>

#include "bench/workload.h"
#include "engine/engine.h"

namespace qilin::bench {

// In-process: Engine::Submit, tokens timed as the engine hands them out. Greedy.
RequestRunner OfflineRunner(Engine* engine);

struct HttpTarget {
  std::string host, port, base_path;
  std::string model;    // "model" of the request; empty: the server's default
  std::string api_key;  // Bearer
};
// "http://HOST:PORT[/base]" -> target; InvalidArgument naming the URL otherwise.
Result<HttpTarget> ParseHttpUrl(const std::string& url);
// POST /v1/completions {prompt: [ids], max_tokens, ignore_eos, stream, include_usage}.
RequestRunner HttpRunner(HttpTarget target);

struct GrpcTarget {
  std::string address;  // HOST:PORT
  std::string model = "tensorrt_llm";
};
RequestRunner GrpcRunner(GrpcTarget target);

}  // namespace qilin::bench
