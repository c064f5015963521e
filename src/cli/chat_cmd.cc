// `qilin chat "你好"`: a streaming client of a running `qilin serve`, the answer's deltas
// printed to stdout as they arrive.
//   HTTP (default, any OpenAI-compatible server): POST /v1/chat/completions, stream=true (SSE).
//   gRPC (--grpc HOST:PORT or --url grpc://HOST:PORT; qilin or Triton + tensorrtllm_backend):
//     KServe v2 ModelStreamInfer on the `ensemble` model, the conversation rendered as ChatML
//     (Qwen's chat format) into text_input, one response per text delta until the one marked
//     triton_final_response, as the tutorial's inflight_batcher_llm_client.py streams.
#include <grpcpp/grpcpp.h>

#include <cstring>
#include <iostream>
#include <memory>
#include <string>

#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <nlohmann/json.hpp>

#include "cli/command.h"
#include "common/status.h"
#include "grpc_service.grpc.pb.h"

namespace qilin::cli {
namespace {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = net::ip::tcp;

struct ChatOptions {
  std::string message;
  std::string url = "http://localhost:8000";
  std::string system;
  std::string model;
  std::string api_key;
  std::string grpc;  // HOST:PORT: chat over KServe v2 gRPC instead of HTTP
  std::string grpc_model = "ensemble";
  bool raw = false;  // gRPC: send the message as is, without the ChatML frame
  int64_t max_tokens = 256;
  double temperature = 0.7;
};

struct Url {
  std::string host, port, base_path;
};

Url ParseUrl(const std::string& url) {
  std::string rest = url;
  if (rest.rfind("http://", 0) == 0) {
    rest = rest.substr(7);
  } else if (rest.find("://") != std::string::npos) {
    throw Error(InvalidArgument("--url '{}': only http:// is supported by this build", url));
  }
  Url u;
  const size_t slash = rest.find('/');
  std::string hostport = rest.substr(0, slash);
  u.base_path = slash == std::string::npos ? "" : rest.substr(slash);
  while (!u.base_path.empty() && u.base_path.back() == '/') u.base_path.pop_back();
  if (u.base_path.size() >= 3 && u.base_path.substr(u.base_path.size() - 3) == "/v1") {
    u.base_path.resize(u.base_path.size() - 3);
  }
  const size_t colon = hostport.rfind(':');
  if (colon == std::string::npos) {
    u.host = hostport;
    u.port = "80";
  } else {
    u.host = hostport.substr(0, colon);
    u.port = hostport.substr(colon + 1);
  }
  if (u.host.empty()) throw Error(InvalidArgument("--url '{}' has no host", url));
  return u;
}

int RunChat(const ChatOptions& o) {
  if (o.message.empty()) throw Error(InvalidArgument("give a message: qilin chat \"Hello\""));
  const Url u = ParseUrl(o.url);
  nlohmann::json messages = nlohmann::json::array();
  if (!o.system.empty()) messages.push_back({{"role", "system"}, {"content", o.system}});
  messages.push_back({{"role", "user"}, {"content", o.message}});
  nlohmann::json body = {{"messages", messages},
                         {"stream", true},
                         {"max_tokens", o.max_tokens},
                         {"temperature", o.temperature}};
  if (!o.model.empty()) body["model"] = o.model;

  net::io_context ioc;
  tcp::resolver resolver(ioc);
  beast::tcp_stream stream(ioc);
  beast::error_code ec;
  auto endpoints = resolver.resolve(u.host, u.port, ec);
  if (ec) throw Error(Unavailable("cannot resolve {}: {}", u.host, ec.message()));
  stream.connect(endpoints, ec);
  if (ec) {
    throw Error(Unavailable("cannot connect to {}:{} ({}); is `qilin serve` running?", u.host,
                            u.port, ec.message()));
  }
  http::request<http::string_body> req{http::verb::post, u.base_path + "/v1/chat/completions", 11};
  req.set(http::field::host, u.host);
  req.set(http::field::content_type, "application/json");
  req.set(http::field::accept, "text/event-stream");
  if (!o.api_key.empty()) req.set(http::field::authorization, "Bearer " + o.api_key);
  req.body() = body.dump();
  req.prepare_payload();
  http::write(stream, req, ec);
  if (ec) throw Error(Unavailable("sending the request: {}", ec.message()));

  beast::flat_buffer buffer;
  http::response_parser<http::string_body> parser;
  parser.body_limit(boost::none);
  http::read_header(stream, buffer, parser, ec);
  if (ec) throw Error(Unavailable("reading the response: {}", ec.message()));
  const int status = static_cast<int>(parser.get().result_int());
  if (status != 200) {
    http::read(stream, buffer, parser, ec);
    std::string message = parser.get().body();
    auto j = nlohmann::json::parse(message, nullptr, false);
    if (!j.is_discarded() && j.contains("error") && j["error"].contains("message")) {
      message = j["error"]["message"].get<std::string>();
    }
    throw Error(Status(StatusCode::kUnavailable, fmt::format("HTTP {}: {}", status, message)));
  }
  // SSE: events are "data: ...\n\n"; print each delta's content as it comes.
  std::string pending;
  bool done = false;
  std::string error;
  auto consume = [&](std::string_view data) {
    pending.append(data);
    size_t pos;
    while ((pos = pending.find("\n\n")) != std::string::npos) {
      std::string event = pending.substr(0, pos);
      pending.erase(0, pos + 2);
      if (event.rfind("data: ", 0) != 0) continue;
      std::string payload = event.substr(6);
      if (payload == "[DONE]") {
        done = true;
        continue;
      }
      auto j = nlohmann::json::parse(payload, nullptr, false);
      if (j.is_discarded()) continue;
      if (j.contains("error")) error = j["error"].value("message", "error");
      if (!j.contains("choices")) continue;
      for (const auto& c : j["choices"]) {
        if (c.contains("delta") && c["delta"].contains("content") &&
            c["delta"]["content"].is_string()) {
          std::cout << c["delta"]["content"].get<std::string>() << std::flush;
        }
      }
    }
  };
  while (!parser.is_done()) {
    http::read_some(stream, buffer, parser, ec);
    if (ec) break;
    consume(parser.get().body());
    parser.get().body().clear();
  }
  std::cout << "\n";
  if (!error.empty()) throw Error(Status(StatusCode::kInternal, error));
  if (!done) throw Error(Unavailable("the stream ended without [DONE]"));
  stream.socket().shutdown(tcp::socket::shutdown_both, ec);
  return 0;
}

// ---- gRPC: KServe v2 ModelStreamInfer on the ensemble ----------------------------------------

// Qwen's chat format (ChatML), the frame the ensemble's text_input gets.
std::string RenderChatMl(const ChatOptions& o) {
  std::string text;
  if (!o.system.empty()) text += "<|im_start|>system\n" + o.system + "<|im_end|>\n";
  text += "<|im_start|>user\n" + o.message + "<|im_end|>\n<|im_start|>assistant\n";
  return text;
}

void AddInput(inference::ModelInferRequest* req, const std::string& name,
              const std::string& datatype) {
  auto* in = req->add_inputs();
  in->set_name(name);
  in->set_datatype(datatype);
  in->add_shape(1);
  in->add_shape(1);
}

std::string BytesOutput(const inference::ModelInferResponse& r, const std::string& name) {
  for (int i = 0; i < r.outputs_size(); ++i) {
    const auto& o = r.outputs(i);
    if (o.name() != name) continue;
    if (i < r.raw_output_contents_size()) {
      // Raw BYTES: each element a 4-byte little-endian length, then its bytes.
      const std::string& raw = r.raw_output_contents(i);
      std::string out;
      size_t p = 0;
      while (p + 4 <= raw.size()) {
        uint32_t n = 0;
        for (int b = 3; b >= 0; --b) n = (n << 8) | static_cast<unsigned char>(raw[p + b]);
        p += 4;
        if (n > raw.size() - p) {
          throw Error(
              Status(StatusCode::kDataLoss,
                     fmt::format("output '{}': a BYTES element claims {} bytes, {} are left", name,
                                 n, raw.size() - p)));
        }
        out.append(raw, p, n);
        p += n;
      }
      return out;
    }
    std::string out;
    for (const auto& b : o.contents().bytes_contents()) out += b;
    return out;
  }
  return "";
}

int RunChatGrpc(const ChatOptions& o) {
  if (o.message.empty()) throw Error(InvalidArgument("give a message: qilin chat \"Hello\""));
  std::string target = o.grpc;
  if (target.rfind("grpc://", 0) == 0) target = target.substr(7);
  if (target.empty() || target.find(':') == std::string::npos) {
    throw Error(InvalidArgument("--grpc '{}': give HOST:PORT (e.g. localhost:8001)", o.grpc));
  }
  auto channel = grpc::CreateChannel(target, grpc::InsecureChannelCredentials());
  auto stub = inference::GRPCInferenceService::NewStub(channel);

  inference::ModelInferRequest req;
  req.set_model_name(o.grpc_model);
  req.set_id("qilin-chat-1");
  AddInput(&req, "text_input", "BYTES");
  req.mutable_inputs(0)->mutable_contents()->add_bytes_contents(o.raw ? o.message
                                                                      : RenderChatMl(o));
  AddInput(&req, "max_tokens", "INT32");
  req.mutable_inputs(1)->mutable_contents()->add_int_contents(static_cast<int32_t>(o.max_tokens));
  AddInput(&req, "stream", "BOOL");
  req.mutable_inputs(2)->mutable_contents()->add_bool_contents(true);
  if (o.temperature > 0) {
    AddInput(&req, "temperature", "FP32");
    req.mutable_inputs(3)->mutable_contents()->add_fp32_contents(static_cast<float>(o.temperature));
    AddInput(&req, "top_p", "FP32");
    req.mutable_inputs(4)->mutable_contents()->add_fp32_contents(1.0f);
  }
  // temperature 0: no sampling inputs, which TensorRT-LLM's ensemble decodes greedily.

  grpc::ClientContext ctx;
  if (!o.api_key.empty()) ctx.AddMetadata("authorization", "Bearer " + o.api_key);
  auto stream = stub->ModelStreamInfer(&ctx);
  if (!stream->Write(req)) {
    grpc::Status s = stream->Finish();
    throw Error(Unavailable("cannot reach {} over gRPC ({}); is `qilin serve` running?", target,
                            s.error_message()));
  }
  inference::ModelStreamInferResponse resp;
  bool final = false;
  std::string error;
  while (!final && stream->Read(&resp)) {
    if (!resp.error_message().empty()) {
      error = resp.error_message();
      break;
    }
    const auto& r = resp.infer_response();
    std::cout << BytesOutput(r, "text_output") << std::flush;
    auto it = r.parameters().find("triton_final_response");
    final = it != r.parameters().end() && it->second.bool_param();
  }
  stream->WritesDone();
  if (!final) ctx.TryCancel();
  grpc::Status s = stream->Finish();
  std::cout << "\n";
  if (!error.empty()) throw Error(Status(StatusCode::kInvalidArgument, error));
  if (!final) {
    if (!s.ok()) {
      throw Error(Unavailable("gRPC {} from {}: {}", static_cast<int>(s.error_code()), target,
                              s.error_message()));
    }
    throw Error(Unavailable("the stream ended without a final response"));
  }
  return 0;
}

RegisterCommand reg("chat", "chat with a running server (streams the answer)", [](CLI::App& sub) {
  auto o = std::make_shared<ChatOptions>();
  sub.add_option("message", o->message, "the user message")->required();
  sub.add_option("--url", o->url, "server URL (http://HOST:PORT, or grpc://HOST:PORT)")
      ->capture_default_str();
  sub.add_option("--grpc", o->grpc, "chat over KServe v2 gRPC at HOST:PORT (e.g. localhost:8001)");
  sub.add_option("--grpc-model", o->grpc_model, "gRPC: the text-in/text-out model")
      ->capture_default_str();
  sub.add_flag("--raw", o->raw, "gRPC: send the message as is (no ChatML frame)");
  sub.add_option("--system", o->system, "system message");
  sub.add_option("--model", o->model, "model id (default: the server's)");
  sub.add_option("--api-key", o->api_key, "Bearer key when the server wants one");
  sub.add_option("--max-tokens", o->max_tokens, "answer length limit")->capture_default_str();
  sub.add_option("--temperature", o->temperature, "sampling temperature (0: greedy)")
      ->capture_default_str();
  return [o]() {
    if (!o->grpc.empty() || o->url.rfind("grpc://", 0) == 0) {
      if (o->grpc.empty()) o->grpc = o->url;
      return RunChatGrpc(*o);
    }
    return RunChat(*o);
  };
});

}  // namespace
}  // namespace qilin::cli
