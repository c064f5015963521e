// The HTTP server over real loopback sockets, with a plain blocking socket client that writes
// raw HTTP/1.1 and reads raw bytes (no HTTP library on the client side).
#include "server/http_server.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <string>
#include <thread>

#include <gtest/gtest.h>

namespace qilin::server {
namespace {

class RawClient {
 public:
  explicit RawClient(uint16_t port) {
    fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    ::inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    connected_ = ::connect(fd_, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0;
    timeval tv{5, 0};  // no test waits forever on a server that does not answer
    ::setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  }
  ~RawClient() { ::close(fd_); }
  bool connected() const { return connected_; }
  void Send(const std::string& s) {
    ASSERT_EQ(::write(fd_, s.data(), s.size()), (ssize_t)s.size());
  }
  // Reads until `count` complete responses (by Content-Length) are in, or EOF / timeout.
  std::string ReadResponses(int count) {
    std::string got;
    char buf[4096];
    while (Complete(got) < count) {
      ssize_t n = ::read(fd_, buf, sizeof(buf));
      if (n <= 0) break;
      got.append(buf, n);
    }
    return got;
  }
  // One read: what is there (empty on EOF / timeout).
  std::string ReadSome() {
    char buf[4096];
    ssize_t n = ::read(fd_, buf, sizeof(buf));
    return n > 0 ? std::string(buf, n) : std::string();
  }
  // Reads until the server closes (or the timeout).
  std::string ReadAll() {
    std::string got;
    char buf[4096];
    for (;;) {
      ssize_t n = ::read(fd_, buf, sizeof(buf));
      if (n <= 0) break;
      got.append(buf, n);
    }
    return got;
  }

 private:
  // Complete responses in `s` (header + Content-Length bytes).
  static int Complete(const std::string& s) {
    int count = 0;
    size_t pos = 0;
    for (;;) {
      size_t end = s.find("\r\n\r\n", pos);
      if (end == std::string::npos) return count;
      size_t cl = s.find("Content-Length: ", pos);
      if (cl == std::string::npos || cl > end) return count;
      size_t len = std::stoul(s.substr(cl + 16));
      if (s.size() < end + 4 + len) return count;
      pos = end + 4 + len;
      ++count;
    }
  }
  int fd_ = -1;
  bool connected_ = false;
};

int CountOf(const std::string& s, const std::string& what) {
  int n = 0;
  for (size_t p = s.find(what); p != std::string::npos; p = s.find(what, p + 1)) ++n;
  return n;
}

class HttpServerTest : public ::testing::Test {
 protected:
  void StartServer(HttpServerOptions o = {}) {
    o.host = "127.0.0.1";
    o.port = 0;
    o.access_log = false;
    server_ = std::make_unique<HttpServer>(o);
    server_->router().Add("POST", "/echo", [](HttpRequest& req, ResponderPtr res) {
      res->Respond(200, "text/plain", "echo:" + req.body);
    });
    server_->router().Add("GET", "/stream", [this](HttpRequest&, ResponderPtr res) {
      res->StartStream(200, "text/event-stream");
      res->OnClose([this] { closed_.store(true); });
      res->Write("data: 1\n\n");
      // Never ends by itself: the test's client goes away.
    });
    ASSERT_TRUE(server_->Start().ok());
    port_ = server_->port();
  }
  void TearDown() override {
    if (server_) server_->Stop();
  }
  std::unique_ptr<HttpServer> server_;
  uint16_t port_ = 0;
  std::atomic<bool> closed_{false};
};

std::string Post(const std::string& body, bool close = false) {
  return "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: " + std::to_string(body.size()) +
         (close ? "\r\nConnection: close" : "") + "\r\n\r\n" + body;
}

TEST_F(HttpServerTest, KeepAliveServesSeveralRequestsOnOneConnection) {
  StartServer();
  RawClient c(port_);
  ASSERT_TRUE(c.connected());
  // One after the other, each sent after the previous answer (what the openai SDK does).
  for (const char* body : {"n0", "n1", "n2"}) {
    c.Send(Post(body));
    std::string r = c.ReadResponses(1);
    EXPECT_NE(r.find("HTTP/1.1 200"), std::string::npos) << body << ": " << r;
    EXPECT_NE(r.find(std::string("echo:") + body), std::string::npos) << r;
  }
}

TEST_F(HttpServerTest, PipelinedRequestsAreAnsweredInOrder) {
  StartServer();
  RawClient c(port_);
  c.Send(Post("a") + Post("b") + Post("c", true));
  std::string r = c.ReadAll();
  EXPECT_EQ(CountOf(r, "HTTP/1.1 200"), 3) << r;
  const size_t a = r.find("echo:a"), b = r.find("echo:b"), cc = r.find("echo:c");
  ASSERT_NE(cc, std::string::npos) << r;
  EXPECT_LT(a, b);
  EXPECT_LT(b, cc);
}

TEST_F(HttpServerTest, UnknownRouteWrongMethodAndBodyLimit) {
  HttpServerOptions o;
  o.max_body_bytes = 100;
  StartServer(o);
  {
    RawClient c(port_);
    c.Send("GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n");
    EXPECT_NE(c.ReadResponses(1).find("HTTP/1.1 404"), std::string::npos);
    // The same connection still serves after an error answer.
    c.Send("GET /echo HTTP/1.1\r\nHost: x\r\n\r\n");
    EXPECT_NE(c.ReadResponses(1).find("HTTP/1.1 405"), std::string::npos);
  }
  RawClient c(port_);
  c.Send(Post(std::string(101, 'x')));
  std::string r = c.ReadAll();
  EXPECT_NE(r.find("HTTP/1.1 413"), std::string::npos) << r;
  EXPECT_NE(r.find("limit of 100 bytes"), std::string::npos) << r;
}

TEST_F(HttpServerTest, SlowHeadersGet408) {
  HttpServerOptions o;
  o.header_timeout = std::chrono::milliseconds(300);
  StartServer(o);
  RawClient c(port_);
  c.Send("POST /echo HTTP/1.1\r\nHost: x\r\n");  // never finishes its headers
  const auto t0 = std::chrono::steady_clock::now();
  std::string r = c.ReadAll();
  EXPECT_EQ(r.rfind("HTTP/1.1 408", 0), 0u) << r;
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(3));
}

TEST_F(HttpServerTest, ApiKeyGuardsProtectedRoutes) {
  HttpServerOptions o;
  o.api_key = "sekret";
  StartServer(o);
  RawClient c(port_);
  c.Send(Post("x"));
  std::string r = c.ReadResponses(1);
  EXPECT_NE(r.find("HTTP/1.1 401"), std::string::npos) << r;
  c.Send(
      "POST /echo HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sekret\r\nContent-Length: "
      "1\r\n\r\ny");
  r = c.ReadResponses(1);
  EXPECT_NE(r.find("echo:y"), std::string::npos) << r;
}

TEST_F(HttpServerTest, ClientGoingAwayMidStreamIsReported) {
  StartServer();
  {
    RawClient c(port_);
    c.Send("GET /stream HTTP/1.1\r\nHost: x\r\n\r\n");
    // The stream's header and first chunk, then hang up.
    std::string r;
    while (r.find("data: 1") == std::string::npos) {
      std::string more = c.ReadSome();
      if (more.empty()) break;
      r += more;
    }
    EXPECT_NE(r.find("Transfer-Encoding: chunked"), std::string::npos) << r;
    EXPECT_FALSE(closed_.load());
  }
  for (int i = 0; i < 200 && !closed_.load(); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_TRUE(closed_.load());
}

}  // namespace
}  // namespace qilin::server
