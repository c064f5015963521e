// qilin's HTTP/1.1 server: Boost.Beast over Asio, keep-alive, a small pool of event-loop
// threads holding any number of open connections and streams (no thread per stream).
//
// Routes are added by exact method + path; a handler runs on the connection's strand and must
// not block: it answers at once (Respond) or later from any thread, or streams (StartStream,
// Write..., End) as results arrive, e.g. from a pipeline Generation's listener.
//
//   HttpServer server(opts);
//   server.router().Add("GET", "/v2/health/live", [](HttpRequest& req, ResponderPtr res) {
//     res->Respond(200, "text/plain", "");
//   });
//   QILIN_RETURN_IF_ERROR(server.Start());   // binds; a port in use is Unavailable
//
// Built in: request body limit (413), header-read timeout (408, then close: slowloris), request
// ids (x-request-id, taken from the client or made), an access log line per request (method,
// path, status, bytes, duration), Bearer api keys (401) for routes marked as protected, and a
// client disconnect reported to the handler (OnClose) so that it can cancel its work.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "common/status.h"

namespace qilin::server {

struct HttpRequest {
  std::string method;                          // "GET", "POST", ...
  std::string target;                          // as sent: path + query
  std::string path;                            // without the query
  std::string query;                           // after '?', undecoded
  std::map<std::string, std::string> headers;  // names lower-cased
  std::string body;
  std::string request_id;  // x-request-id from the client, or a fresh one
  std::string remote;      // peer address
  std::chrono::steady_clock::time_point received;

  // Header value or "" (name lower-case).
  const std::string& Header(const std::string& name) const;
};

// Answers one request. Thread-safe: every method may be called from any thread; the work runs
// on the connection's strand. Exactly one of Respond or StartStream...End per request.
class HttpResponder {
 public:
  virtual ~HttpResponder() = default;
  // A whole response with Content-Length.
  virtual void Respond(int status, const std::string& content_type, std::string body,
                       std::vector<std::pair<std::string, std::string>> headers = {}) = 0;
  // A chunked response: headers now, then Write() chunks, then End().
  virtual void StartStream(int status, const std::string& content_type,
                           std::vector<std::pair<std::string, std::string>> headers = {}) = 0;
  virtual void Write(std::string data) = 0;
  virtual void End() = 0;
  // `fn` runs once (on the strand) when the client goes away before the response ended, or at
  // once when it already has. Used to cancel the request's work.
  virtual void OnClose(std::function<void()> fn) = 0;
  virtual bool closed() const = 0;
  // Bytes queued on the socket but not yet written (back-pressure for slow readers).
  virtual size_t pending_bytes() const = 0;
  // Runs `fn` on the connection's strand (e.g. from an engine listener).
  virtual void Post(std::function<void()> fn) = 0;
};
using ResponderPtr = std::shared_ptr<HttpResponder>;
using HttpHandler = std::function<void(HttpRequest& req, ResponderPtr res)>;

class Router {
 public:
  // Exact method + path. `protect`: needs the api key when the server has one.
  void Add(const std::string& method, const std::string& path, HttpHandler handler,
           bool protect = true);
  // Paths starting with `prefix` (e.g. "/v2/models/"), tried after exact routes, longest
  // prefix first.
  void AddPrefix(const std::string& method, const std::string& prefix, HttpHandler handler,
                 bool protect = true);

  struct Match {
    const HttpHandler* handler = nullptr;
    bool protect = true;
    bool path_known = false;  // some route has this path (with another method: 405)
  };
  Match Find(const std::string& method, const std::string& path) const;

 private:
  struct Route {
    HttpHandler handler;
    bool protect;
  };
  std::map<std::pair<std::string, std::string>, Route> exact_;
  std::vector<std::pair<std::pair<std::string, std::string>, Route>> prefix_;
};

struct HttpServerOptions {
  std::string name = "http";  // in logs
  std::string host = "0.0.0.0";
  uint16_t port = 8000;             // 0: any free port (see HttpServer::port())
  int threads = 2;                  // event-loop threads
  size_t max_body_bytes = 8 << 20;  // 413 beyond
  size_t max_header_bytes = 64 << 10;
  std::chrono::milliseconds header_timeout{10000};  // whole request must arrive in this
  std::chrono::milliseconds idle_timeout{60000};    // keep-alive wait for the next request
  std::string api_key;  // non-empty: protected routes need "Authorization: Bearer <key>"
  bool access_log = true;
  int max_connections = 20000;  // refused beyond (closed at once)
  // Error body for the server's own errors (404, 405, 401, 413, 408): OpenAI's shape by default.
  std::function<std::string(int status, const std::string& message, const std::string& type)>
      error_body;
};

// Builds {"error":{"message","type","param","code"}} (OpenAI's shape).
std::string OpenAiErrorBody(int status, const std::string& message, const std::string& type,
                            const std::string& param = "", const std::string& code = "");
// "invalid_request_error" for 4xx, "server_error" for 5xx and the like.
std::string OpenAiErrorType(int status);

// Counters a metrics endpoint reads.
struct HttpServerCounters {
  std::atomic<int64_t> connections_open{0};
  std::atomic<int64_t> requests{0};
};

class HttpServer {
 public:
  explicit HttpServer(HttpServerOptions options);
  ~HttpServer();  // Stop()
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;

  Router& router() { return router_; }
  // Called after each request is answered: (request, status, bytes, seconds).
  void SetObserver(std::function<void(const HttpRequest&, int, size_t, double)> fn) {
    observer_ = std::move(fn);
  }

  // Binds and listens, then runs the event loop threads. A port in use is Unavailable
  // ("port 8000 is in use"); a bad host InvalidArgument.
  Status Start();
  // Stops accepting new connections (open ones keep being served).
  void StopAccepting();
  // Closes everything and joins the threads.
  void Stop();
  uint16_t port() const { return bound_port_; }
  const HttpServerCounters& counters() const { return counters_; }

  struct Impl;

 private:
  HttpServerOptions options_;
  Router router_;
  std::function<void(const HttpRequest&, int, size_t, double)> observer_;
  HttpServerCounters counters_;
  std::unique_ptr<Impl> impl_;
  std::vector<std::thread> threads_;
  uint16_t bound_port_ = 0;
};

}  // namespace qilin::server
