// `qilin chat "你好"`: a streaming client of a running `qilin serve` (or any OpenAI-compatible
// server): POST /v1/chat/completions with stream=true, the answer's deltas printed to stdout as
// they arrive.
#include <iostream>
#include <memory>
#include <string>

#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <nlohmann/json.hpp>

#include "cli/command.h"
#include "common/status.h"

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
  http::request<http::string_body> req{http::verb::post, u.base_path + "/v1/chat/completions",
                                       11};
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

RegisterCommand reg("chat", "chat with a running server (streams the answer)", [](CLI::App& sub) {
  auto o = std::make_shared<ChatOptions>();
  sub.add_option("message", o->message, "the user message")->required();
  sub.add_option("--url", o->url, "server URL")->capture_default_str();
  sub.add_option("--system", o->system, "system message");
  sub.add_option("--model", o->model, "model id (default: the server's)");
  sub.add_option("--api-key", o->api_key, "Bearer key when the server wants one");
  sub.add_option("--max-tokens", o->max_tokens, "answer length limit")->capture_default_str();
  sub.add_option("--temperature", o->temperature, "sampling temperature (0: greedy)")
      ->capture_default_str();
  return [o]() { return RunChat(*o); };
});

}  // namespace
}  // namespace qilin::cli
