#include "server/http_server.h"

#include <algorithm>
#include <deque>
#include <mutex>
#include <optional>
#include <random>
#include <unordered_set>

#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <nlohmann/json.hpp>

namespace qilin::server {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = net::ip::tcp;

const std::string& HttpRequest::Header(const std::string& name) const {
  static const std::string kEmpty;
  auto it = headers.find(name);
  return it == headers.end() ? kEmpty : it->second;
}

std::string OpenAiErrorType(int status) {
  switch (status) {
    case 401:
      return "authentication_error";
    case 404:
      return "not_found_error";
    case 413:
      return "request_too_large";
    case 429:
      return "rate_limit_error";
    case 503:
      return "service_unavailable";
    default:
      return status >= 500 ? "server_error" : "invalid_request_error";
  }
}

std::string OpenAiErrorBody(int status, const std::string& message, const std::string& type,
                            const std::string& param, const std::string& code) {
  nlohmann::json e = {{"message", message},
                      {"type", type.empty() ? OpenAiErrorType(status) : type},
                      {"param", param.empty() ? nlohmann::json() : nlohmann::json(param)},
                      {"code", code.empty() ? nlohmann::json(status) : nlohmann::json(code)}};
  return nlohmann::json{{"error", e}}.dump(-1, ' ', false,
                                           nlohmann::json::error_handler_t::replace);
}

// ---------------------------------------------------------------------------------------------
// Router

void Router::Add(const std::string& method, const std::string& path, HttpHandler handler,
                 bool protect) {
  exact_[{method, path}] = Route{std::move(handler), protect};
}

void Router::AddPrefix(const std::string& method, const std::string& prefix, HttpHandler handler,
                       bool protect) {
  prefix_.push_back({{method, prefix}, Route{std::move(handler), protect}});
  std::stable_sort(prefix_.begin(), prefix_.end(), [](const auto& a, const auto& b) {
    return a.first.second.size() > b.first.second.size();
  });
}

Router::Match Router::Find(const std::string& method, const std::string& path) const {
  Match m;
  auto it = exact_.find({method, path});
  if (it != exact_.end()) {
    m.handler = &it->second.handler;
    m.protect = it->second.protect;
    m.path_known = true;
    return m;
  }
  for (const auto& [key, route] : exact_) {
    if (key.second == path) m.path_known = true;
  }
  for (const auto& [key, route] : prefix_) {
    if (path.compare(0, key.second.size(), key.second) != 0) continue;
    if (key.first == method) {
      m.handler = &route.handler;
      m.protect = route.protect;
      m.path_known = true;
      return m;
    }
    m.path_known = true;
  }
  return m;
}

// ---------------------------------------------------------------------------------------------
// Sessions

namespace {

std::string NewRequestId() {
  static std::atomic<uint64_t> counter{0};
  static const uint64_t prefix = [] {
    std::random_device rd;
    return (static_cast<uint64_t>(rd()) << 16) ^ rd();
  }();
  return fmt::format("{:012x}{:08x}", prefix & 0xffffffffffffULL, counter.fetch_add(1));
}

std::string StatusLine(int status) {
  auto reason = http::obsolete_reason(static_cast<http::status>(status));
  return fmt::format("HTTP/1.1 {} {}\r\n", status,
                     reason.empty() ? "Unknown" : std::string(reason.data(), reason.size()));
}

class Session;

class Responder : public HttpResponder, public std::enable_shared_from_this<Responder> {
 public:
  explicit Responder(std::shared_ptr<Session> s);
  void Respond(int status, const std::string& content_type, std::string body,
               std::vector<std::pair<std::string, std::string>> headers) override;
  void StartStream(int status, const std::string& content_type,
                   std::vector<std::pair<std::string, std::string>> headers) override;
  void Write(std::string data) override;
  void End() override;
  void OnClose(std::function<void()> fn) override;
  bool closed() const override { return closed_.load(); }
  size_t pending_bytes() const override { return pending_.load(); }
  void Post(std::function<void()> fn) override;

  // Strand-side state (Session reads it).
  std::atomic<bool> closed_{false};
  std::atomic<size_t> pending_{0};
  std::function<void()> on_close_;
  bool finished_ = false;  // Respond or End done
  bool streaming_ = false;
  int status_ = 0;
  // The connection, until the response is over (then null).
  std::shared_ptr<Session> session() const {
    std::lock_guard<std::mutex> lock(mu_);
    return session_;
  }
  void Detach() {
    std::lock_guard<std::mutex> lock(mu_);
    session_.reset();
  }

 private:
  mutable std::mutex mu_;
  std::shared_ptr<Session> session_;
  net::any_io_executor executor_;  // the connection's strand; outlives the session
};

}  // namespace

struct HttpServer::Impl {
  // Declared before ioc: destroying ioc destroys the handlers still holding sessions, whose
  // destructors take them out of this set.
  std::mutex sessions_mu;
  std::unordered_set<Session*> sessions;
  net::io_context ioc;
  std::optional<tcp::acceptor> acceptor;
  std::optional<net::executor_work_guard<net::io_context::executor_type>> work;
  // The accept loop: re-arms itself after each connection (owned here, so that it does not own
  // itself).
  std::function<void()> accept_loop;
  HttpServer* server = nullptr;
};

namespace {

class Session : public std::enable_shared_from_this<Session> {
 public:
  Session(tcp::socket socket, HttpServer::Impl* impl, const HttpServerOptions* options,
          const Router* router, HttpServerCounters* counters,
          const std::function<void(const HttpRequest&, int, size_t, double)>* observer)
      : stream_(std::move(socket)),
        header_timer_(stream_.get_executor()),
        impl_(impl),
        options_(*options),
        router_(*router),
        counters_(*counters),
        observer_(*observer) {
    beast::error_code ec;
    auto ep = stream_.socket().remote_endpoint(ec);
    if (!ec) remote_ = fmt::format("{}:{}", ep.address().to_string(), ep.port());
  }

  void Run() {
    {
      std::lock_guard<std::mutex> lock(impl_->sessions_mu);
      impl_->sessions.insert(this);
    }
    ++counters_.connections_open;
    net::dispatch(stream_.get_executor(), [self = shared_from_this()] { self->WaitForRequest(); });
  }

  ~Session() {
    --counters_.connections_open;
    std::lock_guard<std::mutex> lock(impl_->sessions_mu);
    impl_->sessions.erase(this);
  }

  auto executor() { return stream_.get_executor(); }

  // Strand only.
  void QueueWrite(std::string data, Responder* r) {
    if (closing_) return;
    r->pending_ += data.size();
    bytes_out_ += data.size();
    writes_.push_back(std::move(data));
    if (!writing_) DoWrite();
  }

  void ResponseFinished(Responder* r) {
    r->finished_ = true;
    const double secs =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - req_.received).count();
    LogAccess(r->status_, secs);
    finished_ = true;
    if (!writing_) AfterResponse();
  }

  void Abandon() {
    net::post(stream_.get_executor(), [self = shared_from_this()] { self->Close(); });
  }

  std::shared_ptr<Responder> responder_;  // the current request's
  HttpRequest req_;
  bool keep_alive_ = true;

 private:
  void LogAccess(int status, double secs) {
    if (options_.access_log) {
      spdlog::info("{} {} {} {} bytes={} duration_ms={:.1f} id={} remote={}", options_.name,
                   req_.method, req_.path, status, bytes_out_, secs * 1e3, req_.request_id,
                   remote_);
    }
    if (observer_) observer_(req_, status, bytes_out_, secs);
  }

  // Waits (up to the idle timeout) for the first byte of a request, then reads its header and
  // body within header_timeout.
  void WaitForRequest() {
    if (closing_) return;
    if (buffer_.size() > 0) return ReadHeader();
    stream_.expires_after(options_.idle_timeout);
    reading_ = true;
    stream_.async_read_some(buffer_.prepare(4096),
                            [self = shared_from_this()](beast::error_code ec, size_t n) {
                              self->reading_ = false;
                              if (ec) return self->Close();
                              self->buffer_.commit(n);
                              self->ReadHeader();
                            });
  }

  void ReadHeader() {
    parser_.emplace();
    parser_->body_limit(options_.max_body_bytes);
    parser_->header_limit(static_cast<uint32_t>(options_.max_header_bytes));
    // The whole request (header and body) must arrive within header_timeout. A timer of our
    // own, not the stream's timeout, which would close the socket before the 408 is written.
    stream_.expires_never();
    header_timed_out_ = false;
    header_timer_.expires_after(options_.header_timeout);
    const uint64_t gen = ++header_gen_;
    header_timer_.async_wait([self = shared_from_this(), gen](beast::error_code ec) {
      // Cancelled (the request arrived), or a stale expiry of an earlier request.
      if (ec || self->closing_ || gen != self->header_gen_ || !self->parser_) return;
      self->header_timed_out_ = true;
      beast::error_code ignore;
      self->stream_.socket().cancel(ignore);
    });
    reading_ = true;
    http::async_read_header(stream_, buffer_, *parser_,
                            [self = shared_from_this()](beast::error_code ec, size_t) {
                              self->reading_ = false;
                              self->OnHeader(ec);
                            });
  }

  void OnHeader(beast::error_code ec) {
    if (ec) return ReadFailed(ec);
    auto& msg = parser_->get();
    if (beast::iequals(msg[http::field::expect], "100-continue")) {
      // curl waits for this before sending a body over 1 KiB.
      writes_.push_back("HTTP/1.1 100 Continue\r\n\r\n");
      if (!writing_) DoWrite();
    }
    reading_ = true;
    http::async_read(stream_, buffer_, *parser_,
                     [self = shared_from_this()](beast::error_code ec, size_t) {
                       self->reading_ = false;
                       if (ec) return self->ReadFailed(ec);
                       self->OnRequest();
                     });
  }

  void ReadFailed(beast::error_code ec) {
    header_timer_.cancel();
    if (header_timed_out_) ec = beast::error::timeout;
    if (ec == http::error::end_of_stream || ec == net::error::eof ||
        ec == net::error::connection_reset || ec == net::error::operation_aborted) {
      return Close();
    }
    int status = 400;
    std::string message;
    if (ec == http::error::body_limit) {
      status = 413;
      message =
          fmt::format("the request body is over the limit of {} bytes", options_.max_body_bytes);
    } else if (ec == http::error::header_limit) {
      status = 431;
      message = fmt::format("the request headers are over the limit of {} bytes",
                            options_.max_header_bytes);
    } else if (ec == beast::error::timeout) {
      status = 408;
      message =
          fmt::format("the request did not arrive within {} ms", options_.header_timeout.count());
    } else {
      message = fmt::format("malformed HTTP request: {}", ec.message());
    }
    req_ = HttpRequest{};
    req_.received = std::chrono::steady_clock::now();
    req_.request_id = NewRequestId();
    if (parser_ && parser_->is_header_done()) {
      auto& msg = parser_->get();
      req_.method = std::string(msg.method_string());
      req_.target = std::string(msg.target());
      req_.path = req_.target.substr(0, req_.target.find('?'));
    } else {
      req_.method = "-";
      req_.path = "-";
    }
    keep_alive_ = false;
    auto r = std::make_shared<Responder>(shared_from_this());
    responder_ = r;
    r->Respond(status, "application/json", ErrorBody(status, message), {});
  }

  std::string ErrorBody(int status, const std::string& message) const {
    if (options_.error_body) return options_.error_body(status, message, OpenAiErrorType(status));
    return OpenAiErrorBody(status, message, OpenAiErrorType(status));
  }

  void OnRequest() {
    header_timer_.cancel();
    auto msg = parser_->release();
    parser_.reset();
    ++counters_.requests;
    req_ = HttpRequest{};
    req_.received = std::chrono::steady_clock::now();
    req_.method = std::string(msg.method_string());
    req_.target = std::string(msg.target());
    const size_t q = req_.target.find('?');
    req_.path = req_.target.substr(0, q);
    if (q != std::string::npos) req_.query = req_.target.substr(q + 1);
    for (const auto& f : msg) {
      std::string name(f.name_string());
      std::transform(name.begin(), name.end(), name.begin(),
                     [](unsigned char c) { return std::tolower(c); });
      req_.headers[name] = std::string(f.value());
    }
    req_.body = std::move(msg.body());
    req_.remote = remote_;
    const std::string& rid = req_.Header("x-request-id");
    req_.request_id = (!rid.empty() && rid.size() <= 128) ? rid : NewRequestId();
    keep_alive_ = msg.keep_alive();
    bytes_out_ = 0;
    finished_ = false;

    auto r = std::make_shared<Responder>(shared_from_this());
    responder_ = r;
    // The response may take long (a stream): no timeout while it runs; a read stays posted to
    // see the client go away.
    stream_.expires_never();
    WatchForClose();

    Router::Match m = router_.Find(req_.method, req_.path);
    if (!m.handler) {
      const int status = m.path_known ? 405 : 404;
      const std::string message =
          m.path_known ? fmt::format("method {} is not allowed on {}", req_.method, req_.path)
                       : fmt::format("no route for {} {}", req_.method, req_.path);
      return r->Respond(status, "application/json", ErrorBody(status, message), {});
    }
    if (m.protect && !options_.api_key.empty()) {
      const std::string& auth = req_.Header("authorization");
      const std::string want = "Bearer " + options_.api_key;
      if (auth != want) {
        return r->Respond(401, "application/json",
                          ErrorBody(401, auth.empty() ? "missing API key (Authorization: Bearer)"
                                                      : "invalid API key"),
                          {{"WWW-Authenticate", "Bearer"}});
      }
    }
    try {
      (*m.handler)(req_, r);
    } catch (const std::exception& e) {
      spdlog::error("{} {} {}: handler failed: {}", options_.name, req_.method, req_.path,
                    e.what());
      if (!r->finished_ && !r->streaming_) {
        r->Respond(500, "application/json", ErrorBody(500, "internal error"), {});
      } else if (r->streaming_ && !r->finished_) {
        r->End();
      }
    }
  }

  // While a response runs, a read detects the client closing (and buffers a pipelined next
  // request, up to a bound).
  void WatchForClose() {
    // With a pipelined request already buffered, no watch: that request is read next.
    if (reading_ || closing_ || buffer_.size() > 0) return;
    reading_ = true;
    stream_.async_read_some(buffer_.prepare(4096),
                            [self = shared_from_this()](beast::error_code ec, size_t n) {
                              self->reading_ = false;
                              if (ec) {
                                // The client went away (or the idle timeout passed).
                                return self->Close();
                              }
                              self->buffer_.commit(n);
                              if (self->awaiting_request_) {
                                // The response ended while this read was pending: these
                                // bytes start the next request on the connection.
                                self->awaiting_request_ = false;
                                self->ReadHeader();
                              } else if (self->finished_ && !self->writing_) {
                                self->AfterResponse();
                              } else {
                                self->WatchForClose();
                              }
                            });
  }

  void DoWrite() {
    if (writes_.empty() || closing_) return;
    writing_ = true;
    net::async_write(stream_, net::buffer(writes_.front()),
                     [self = shared_from_this()](beast::error_code ec, size_t n) {
                       self->writing_ = false;
                       if (self->closing_) {
                         // Closed while this write ran: its buffer was kept alive until now.
                         self->writes_.clear();
                         return;
                       }
                       if (self->responder_) self->responder_->pending_ -= n;
                       if (ec) return self->Close();
                       self->writes_.pop_front();
                       if (!self->writes_.empty()) return self->DoWrite();
                       if (self->finished_) self->AfterResponse();
                     });
  }

  // The response is written out: next request, or close.
  void AfterResponse() {
    if (closing_) return;
    finished_ = false;
    if (responder_) {
      responder_->Detach();
      responder_.reset();
    }
    if (!keep_alive_) {
      beast::error_code ec;
      stream_.socket().shutdown(tcp::socket::shutdown_send, ec);
      // Linger: read (and drop) what the client still sends so that the close is not a reset
      // that eats our error response.
      if (!reading_) Drain();
      return;
    }
    if (reading_) {
      // The close watch is pending: it becomes the wait for the next request.
      awaiting_request_ = true;
      stream_.expires_after(options_.idle_timeout);
      return;
    }
    WaitForRequest();
  }

  void Drain() {
    stream_.expires_after(std::chrono::seconds(2));
    reading_ = true;
    buffer_.consume(buffer_.size());
    stream_.async_read_some(buffer_.prepare(65536),
                            [self = shared_from_this()](beast::error_code ec, size_t n) {
                              self->reading_ = false;
                              self->drained_ += n;
                              if (ec || self->drained_ > (64u << 20)) return self->Close();
                              self->Drain();
                            });
  }

 public:
  void Close() {
    if (closing_) return;
    closing_ = true;
    header_timer_.cancel();
    if (responder_) {
      std::shared_ptr<Responder> r = responder_;
      r->closed_ = true;
      if (!r->finished_) {
        LogAccess(r->status_ ? r->status_ : 499,
                  std::chrono::duration<double>(std::chrono::steady_clock::now() - req_.received)
                      .count());
      }
      std::function<void()> fn = std::move(r->on_close_);
      r->on_close_ = nullptr;
      r->Detach();
      responder_.reset();
      if (fn && !r->finished_) fn();
    }
    beast::error_code ec;
    stream_.socket().shutdown(tcp::socket::shutdown_both, ec);
    stream_.socket().close(ec);
    // An async_write in flight still reads writes_.front(): its handler clears the rest.
    if (!writing_) writes_.clear();
  }

 private:
  beast::tcp_stream stream_;
  net::steady_timer header_timer_;
  bool header_timed_out_ = false;
  uint64_t header_gen_ = 0;
  beast::flat_buffer buffer_;
  std::optional<http::request_parser<http::string_body>> parser_;
  HttpServer::Impl* impl_;
  const HttpServerOptions& options_;
  const Router& router_;
  HttpServerCounters& counters_;
  const std::function<void(const HttpRequest&, int, size_t, double)>& observer_;
  std::string remote_;
  std::deque<std::string> writes_;
  bool writing_ = false;
  bool reading_ = false;
  bool closing_ = false;
  bool finished_ = false;          // the current response is complete (maybe not yet written)
  bool awaiting_request_ = false;  // between responses, with the close-watch read pending
  size_t bytes_out_ = 0;
  size_t drained_ = 0;
};

std::string HeaderBlock(const std::vector<std::pair<std::string, std::string>>& headers) {
  std::string out;
  for (const auto& [k, v] : headers) {
    // No CR/LF from handlers into the header block.
    if (k.find_first_of("\r\n") != std::string::npos ||
        v.find_first_of("\r\n") != std::string::npos) {
      continue;
    }
    out += k + ": " + v + "\r\n";
  }
  return out;
}

void Responder::Respond(int status, const std::string& content_type, std::string body,
                        std::vector<std::pair<std::string, std::string>> headers) {
  auto self = shared_from_this();
  Post([self, status, content_type, body = std::move(body), headers = std::move(headers)]() {
    std::shared_ptr<Session> s = self->session();
    if (!s || self->finished_ || self->streaming_ || self->closed_) return;
    self->status_ = status;
    std::string head = StatusLine(status);
    head += "Server: qilin\r\n";
    head += "Content-Type: " + content_type + "\r\n";
    head += fmt::format("Content-Length: {}\r\n", body.size());
    head += "x-request-id: " + s->req_.request_id + "\r\n";
    if (!s->keep_alive_) head += "Connection: close\r\n";
    head += HeaderBlock(headers);
    head += "\r\n";
    if (s->req_.method != "HEAD") head += body;
    s->QueueWrite(std::move(head), self.get());
    s->ResponseFinished(self.get());
  });
}

void Responder::StartStream(int status, const std::string& content_type,
                            std::vector<std::pair<std::string, std::string>> headers) {
  auto self = shared_from_this();
  Post([self, status, content_type, headers = std::move(headers)]() {
    std::shared_ptr<Session> s = self->session();
    if (!s || self->finished_ || self->streaming_ || self->closed_) return;
    self->status_ = status;
    self->streaming_ = true;
    std::string head = StatusLine(status);
    head += "Server: qilin\r\n";
    head += "Content-Type: " + content_type + "\r\n";
    head += "Transfer-Encoding: chunked\r\n";
    head += "Cache-Control: no-cache\r\n";
    head += "x-request-id: " + s->req_.request_id + "\r\n";
    if (!s->keep_alive_) head += "Connection: close\r\n";
    head += HeaderBlock(headers);
    head += "\r\n";
    s->QueueWrite(std::move(head), self.get());
  });
}

void Responder::Write(std::string data) {
  if (data.empty()) return;
  auto self = shared_from_this();
  Post([self, data = std::move(data)]() {
    std::shared_ptr<Session> s = self->session();
    if (!s || self->finished_ || !self->streaming_ || self->closed_) return;
    s->QueueWrite(fmt::format("{:x}\r\n", data.size()) + data + "\r\n", self.get());
  });
}

void Responder::End() {
  auto self = shared_from_this();
  Post([self]() {
    std::shared_ptr<Session> s = self->session();
    if (!s || self->finished_ || !self->streaming_ || self->closed_) return;
    s->QueueWrite("0\r\n\r\n", self.get());
    s->ResponseFinished(self.get());
  });
}

void Responder::OnClose(std::function<void()> fn) {
  auto self = shared_from_this();
  Post([self, fn = std::move(fn)]() mutable {
    if (self->closed_ && !self->finished_) {
      if (fn) fn();
      return;
    }
    if (!self->finished_) self->on_close_ = std::move(fn);
  });
}

Responder::Responder(std::shared_ptr<Session> s) : session_(s), executor_(s->executor()) {}

void Responder::Post(std::function<void()> fn) { net::post(executor_, std::move(fn)); }

}  // namespace

// ---------------------------------------------------------------------------------------------
// HttpServer

HttpServer::HttpServer(HttpServerOptions options) : options_(std::move(options)) {}

HttpServer::~HttpServer() { Stop(); }

Status HttpServer::Start() {
  impl_ = std::make_unique<Impl>();
  impl_->server = this;
  beast::error_code ec;
  auto addr = net::ip::make_address(options_.host, ec);
  if (ec) return InvalidArgument("host '{}' is not an IP address", options_.host);
  tcp::endpoint ep(addr, options_.port);
  impl_->acceptor.emplace(impl_->ioc);
  auto& acc = *impl_->acceptor;
  acc.open(ep.protocol(), ec);
  if (ec) return Unavailable("cannot open a socket for {}: {}", options_.name, ec.message());
  acc.set_option(net::socket_base::reuse_address(true), ec);
  acc.bind(ep, ec);
  if (ec == net::error::address_in_use) {
    return Unavailable("port {} is in use", options_.port);
  }
  if (ec) return Unavailable("cannot bind {}:{}: {}", options_.host, options_.port, ec.message());
  acc.listen(net::socket_base::max_listen_connections, ec);
  if (ec) return Unavailable("cannot listen on port {}: {}", options_.port, ec.message());
  bound_port_ = acc.local_endpoint().port();
  impl_->work.emplace(impl_->ioc.get_executor());

  // The accept loop.
  impl_->accept_loop = [this]() {
    if (!impl_->acceptor || !impl_->acceptor->is_open()) return;
    impl_->acceptor->async_accept(
        net::make_strand(impl_->ioc), [this](beast::error_code ec, tcp::socket socket) {
          if (ec == net::error::operation_aborted) return;
          if (!ec) {
            if (counters_.connections_open.load() >= options_.max_connections) {
              beast::error_code ignore;
              socket.close(ignore);
            } else {
              socket.set_option(tcp::no_delay(true), ec);
              std::make_shared<Session>(std::move(socket), impl_.get(), &options_, &router_,
                                        &counters_, &observer_)
                  ->Run();
            }
          }
          impl_->accept_loop();
        });
  };
  net::post(impl_->ioc, [this] { impl_->accept_loop(); });
  const int n = std::max(1, options_.threads);
  for (int i = 0; i < n; ++i) {
    threads_.emplace_back([this] {
      for (;;) {
        try {
          impl_->ioc.run();
          return;
        } catch (const std::exception& e) {
          spdlog::error("{}: event loop: {}", options_.name, e.what());
        }
      }
    });
  }
  return Status::Ok();
}

void HttpServer::StopAccepting() {
  if (!impl_) return;
  net::post(impl_->ioc, [this] {
    beast::error_code ec;
    if (impl_->acceptor) impl_->acceptor->close(ec);
  });
}

void HttpServer::Stop() {
  if (!impl_) return;
  StopAccepting();
  std::vector<std::shared_ptr<Session>> open;
  {
    std::lock_guard<std::mutex> lock(impl_->sessions_mu);
    for (Session* s : impl_->sessions) {
      // The set holds live sessions only (erased in the destructor under the lock).
      if (auto sp = s->weak_from_this().lock()) open.push_back(std::move(sp));
    }
  }
  // Outside the lock: dropping the last reference runs ~Session, which takes it.
  for (auto& sp : open) sp->Abandon();
  open.clear();
  impl_->work.reset();
  // Give the close handlers a moment to run, then stop the loop.
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(2);
  while (std::chrono::steady_clock::now() < deadline) {
    {
      std::lock_guard<std::mutex> lock(impl_->sessions_mu);
      if (impl_->sessions.empty()) break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  impl_->ioc.stop();
  for (auto& t : threads_) t.join();
  threads_.clear();
  impl_->acceptor.reset();
  impl_.reset();
}

}  // namespace qilin::server
