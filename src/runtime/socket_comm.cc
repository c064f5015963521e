#include "runtime/socket_comm.h"

#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <thread>
#include <vector>

namespace qilin {

namespace {

constexpr uint32_t kHelloMagic = 0x48505451;  // "QTPH"
constexpr uint32_t kFrameMagic = 0x46505451;  // "QTPF"
constexpr uint32_t kVersion = 1;
// A refusal's message, and an abort's, are at most this long.
constexpr int64_t kMaxMessage = 4096;

enum Op : uint32_t {
  kAllReduce = 1,
  kAllGather = 2,
  kBroadcast = 3,
  kBarrier = 4,
  kAbort = 5,
  kGather = 6,
};

const char* OpName(uint32_t op) {
  switch (op) {
    case kAllReduce:
      return "AllReduceSum";
    case kAllGather:
      return "AllGather";
    case kBroadcast:
      return "Broadcast";
    case kBarrier:
      return "Barrier";
    case kGather:
      return "GatherTo0";
    default:
      return "abort";
  }
}

struct Hello {
  uint32_t magic = kHelloMagic;
  uint32_t version = kVersion;
  int32_t rank = 0;
  int32_t world_size = 0;
};
struct HelloReply {
  uint32_t magic = kHelloMagic;
  uint32_t ok = 0;
  int64_t message_bytes = 0;
};

// Every message, both ways. A member's: its call (op, bytes, root). Rank 0's reply: the same op,
// `status` 0 with the result's bytes after it, or 1 (sizes differ) with a message of `bytes`.
struct Frame {
  uint32_t magic = kFrameMagic;
  uint32_t op = 0;
  int64_t bytes = 0;
  int64_t root = 0;
  int64_t status = 0;
};

using Clock = std::chrono::steady_clock;

// Waits until `fd` is readable; false after `timeout_s` (<= 0: no limit).
bool WaitReadable(int fd, double timeout_s) {
  const auto deadline = Clock::now() + std::chrono::duration<double>(timeout_s);
  while (true) {
    int ms = -1;
    if (timeout_s > 0) {
      const double left = std::chrono::duration<double>(deadline - Clock::now()).count();
      if (left <= 0) return false;
      ms = static_cast<int>(std::min(left * 1000.0 + 1, 60000.0));
    }
    pollfd p{fd, POLLIN, 0};
    const int r = poll(&p, 1, ms);
    if (r > 0) return true;
    if (r < 0 && errno != EINTR) return true;  // the read reports the error
    if (r == 0 && timeout_s > 0 && Clock::now() >= deadline) return false;
  }
}

// Reads exactly `n` bytes. Unavailable on EOF or an error; `timeout_s` as WaitReadable.
Status ReadAll(int fd, void* data, int64_t n, double timeout_s, const std::string& peer) {
  char* p = static_cast<char*>(data);
  while (n > 0) {
    if (timeout_s > 0 && !WaitReadable(fd, timeout_s)) {
      return Unavailable("tensor parallel: {} sent nothing for {} s", peer, timeout_s);
    }
    const ssize_t got = recv(fd, p, static_cast<size_t>(std::min<int64_t>(n, 1 << 30)), 0);
    if (got == 0) return Unavailable("tensor parallel: {} closed the connection", peer);
    if (got < 0) {
      if (errno == EINTR) continue;
      return Unavailable("tensor parallel: reading from {}: {}", peer, std::strerror(errno));
    }
    p += got;
    n -= got;
  }
  return Status::Ok();
}

// Reads and drops `n` bytes (a mismatched call's data).
Status Discard(int fd, int64_t n, double timeout_s, const std::string& peer) {
  char buf[1 << 16];
  while (n > 0) {
    const int64_t k = std::min<int64_t>(n, sizeof buf);
    QILIN_RETURN_IF_ERROR(ReadAll(fd, buf, k, timeout_s, peer));
    n -= k;
  }
  return Status::Ok();
}

Status WriteAll(int fd, const void* data, int64_t n, const std::string& peer, int flags = 0) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    const ssize_t sent =
        send(fd, p, static_cast<size_t>(std::min<int64_t>(n, 1 << 30)), MSG_NOSIGNAL | flags);
    if (sent < 0) {
      if (errno == EINTR) continue;
      return Unavailable("tensor parallel: writing to {}: {}", peer, std::strerror(errno));
    }
    p += sent;
    n -= sent;
  }
  return Status::Ok();
}

// Small messages (commands, status codes) go out at once; large ones (a prefill's activations)
// stream through buffers of a few MiB.
void SetNoDelay(int fd) {
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  int bytes = 4 << 20;
  setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &bytes, sizeof bytes);
  setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &bytes, sizeof bytes);
}

Result<addrinfo*> Resolve(const SocketAddress& a, bool passive) {
  addrinfo hints{};
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  if (passive) hints.ai_flags = AI_PASSIVE;
  addrinfo* res = nullptr;
  const std::string port = std::to_string(a.port);
  const int rc = getaddrinfo(a.host.empty() ? nullptr : a.host.c_str(), port.c_str(), &hints, &res);
  if (rc != 0 || res == nullptr) {
    return Unavailable("tensor parallel: cannot resolve '{}': {}", a.host, gai_strerror(rc));
  }
  return res;
}

std::string RankName(int r) { return fmt::format("rank {}", r); }

class SocketComm : public Communicator {
 public:
  // Rank 0: one connected socket per rank 1..N-1 (peers_[r - 1]). Other ranks: peers_[0] is
  // rank 0.
  SocketComm(int rank, int world_size, std::vector<int> peers, double collective_timeout_s)
      : rank_(rank),
        world_size_(world_size),
        peers_(std::move(peers)),
        timeout_s_(collective_timeout_s) {}
  ~SocketComm() override {
    for (int fd : peers_) close(fd);
  }

  int rank() const override { return rank_; }
  int world_size() const override { return world_size_; }
  std::string name() const override { return "socket"; }

  Status AllReduceSum(float* data, int64_t count) override {
    if (count < 0) return InvalidArgument("AllReduceSum: count = {} is negative", count);
    if (world_size_ == 1) return Status::Ok();
    return Collective(kAllReduce, data, count * 4, 0, data, count * 4);
  }

  Status AllGather(const float* send, int64_t count, float* recv) override {
    if (count < 0) return InvalidArgument("AllGather: count = {} is negative", count);
    if (world_size_ == 1) {
      std::copy(send, send + count, recv);
      return Status::Ok();
    }
    return Collective(kAllGather, send, count * 4, 0, recv, count * 4 * world_size_);
  }

  Status GatherTo0(const float* send, int64_t count, float* recv) override {
    if (count < 0) return InvalidArgument("GatherTo0: count = {} is negative", count);
    if (world_size_ == 1) {
      std::copy(send, send + count, recv);
      return Status::Ok();
    }
    return Collective(kGather, send, count * 4, 0, recv, rank_ == 0 ? count * 4 * world_size_ : 0);
  }

  Status Broadcast(void* data, int64_t bytes, int root) override {
    if (bytes < 0) return InvalidArgument("Broadcast: bytes = {} is negative", bytes);
    if (root < 0 || root >= world_size_) {
      return InvalidArgument("Broadcast: root {} is outside [0, {})", root, world_size_);
    }
    if (world_size_ == 1) return Status::Ok();
    return Collective(kBroadcast, data, bytes, root, data, bytes);
  }

  Status Barrier() override {
    if (world_size_ == 1) return Status::Ok();
    return Collective(kBarrier, nullptr, 0, 0, nullptr, 0);
  }

  void Abort(const std::string& why) override {
    AbortGroup(fmt::format("rank {}: {}", rank_, why));
  }

 private:
  Status Aborted() const {
    return Status(StatusCode::kCancelled,
                  fmt::format("tensor parallel group aborted: {}", abort_reason_));
  }

  // Tells every peer (without blocking on a full socket) and closes the connections' both
  // directions, so that every rank's pending and later calls fail.
  void AbortGroup(const std::string& why) {
    if (aborted_.exchange(true)) return;
    abort_reason_ = why.substr(0, kMaxMessage);
    Frame f;
    f.op = kAbort;
    f.bytes = static_cast<int64_t>(abort_reason_.size());
    for (int fd : peers_) {
      (void)WriteAll(fd, &f, sizeof f, "peer", MSG_DONTWAIT);
      (void)WriteAll(fd, abort_reason_.data(), f.bytes, "peer", MSG_DONTWAIT);
      shutdown(fd, SHUT_RDWR);
    }
  }

  // A peer's abort frame (its message follows) or a broken connection: the group is over.
  Status PeerFailed(int fd, const Frame* f, const Status& io, const std::string& peer) {
    if (aborted_) return Aborted();
    std::string why = io.ok() ? "" : io.message();
    if (f != nullptr && f->op == kAbort && f->bytes >= 0 && f->bytes <= kMaxMessage) {
      std::string msg(static_cast<size_t>(f->bytes), '\0');
      if (ReadAll(fd, msg.data(), f->bytes, 5, peer).ok()) why = msg;
    } else if (f != nullptr && why.empty()) {
      why = fmt::format("{} sent a malformed message", peer);
    }
    AbortGroup(why);
    return Aborted();
  }

  Status Collective(uint32_t op, const void* send, int64_t send_bytes, int root, void* recv,
                    int64_t recv_bytes) {
    if (aborted_) return Aborted();
    return rank_ == 0 ? Lead(op, send, send_bytes, root, recv, recv_bytes)
                      : Join(op, send, send_bytes, root, recv, recv_bytes);
  }

  // Ranks 1..N-1: the call to rank 0 (with this rank's data where it contributes), then its
  // reply.
  Status Join(uint32_t op, const void* send, int64_t send_bytes, int root, void* recv,
              int64_t recv_bytes) {
    const int fd = peers_[0];
    const std::string peer = RankName(0);
    Frame call;
    call.op = op;
    call.bytes = send_bytes;
    call.root = root;
    const bool contributes = op == kAllReduce || op == kAllGather || op == kGather ||
                             (op == kBroadcast && root == rank_);
    Status io = WriteAll(fd, &call, sizeof call, peer);
    if (io.ok() && contributes) io = WriteAll(fd, send, send_bytes, peer);
    if (!io.ok()) return PeerFailed(fd, nullptr, io, peer);
    Frame reply;
    io = ReadAll(fd, &reply, sizeof reply, 0, peer);
    if (!io.ok()) return PeerFailed(fd, nullptr, io, peer);
    if (reply.magic != kFrameMagic || reply.op != op) return PeerFailed(fd, &reply, io, peer);
    if (reply.status != 0) {
      if (reply.bytes < 0 || reply.bytes > kMaxMessage) return PeerFailed(fd, &reply, io, peer);
      std::string msg(static_cast<size_t>(reply.bytes), '\0');
      io = ReadAll(fd, msg.data(), reply.bytes, 0, peer);
      if (!io.ok()) return PeerFailed(fd, nullptr, io, peer);
      return InvalidArgument("{}", msg);
    }
    const bool receives = !(op == kBroadcast && root == rank_) && op != kBarrier && op != kGather;
    if (receives) {
      if (reply.bytes != recv_bytes) return PeerFailed(fd, &reply, io, peer);
      io = ReadAll(fd, recv, recv_bytes, 0, peer);
      if (!io.ok()) return PeerFailed(fd, nullptr, io, peer);
    }
    return Status::Ok();
  }

  // Rank 0: every other rank's call, checked against this one's, then the result to each.
  Status Lead(uint32_t op, const void* send, int64_t send_bytes, int root, void* recv,
              int64_t recv_bytes) {
    Status mismatch;
    // The all-reduce sums into sum_ (rank 0's data first, then rank order) and leaves `recv`
    // as it was when the call fails.
    if (op == kAllReduce) {
      const float* mine = static_cast<const float*>(send);
      sum_.assign(mine, mine + send_bytes / 4);
    }
    if ((op == kAllGather || op == kGather) && send_bytes > 0) std::memcpy(recv, send, send_bytes);
    for (int r = 1; r < world_size_; ++r) {
      const int fd = peers_[r - 1];
      const std::string peer = RankName(r);
      Frame call;
      Status io = ReadAll(fd, &call, sizeof call, timeout_s_, peer);
      if (!io.ok()) return PeerFailed(fd, nullptr, io, peer);
      if (call.magic != kFrameMagic || call.op < kAllReduce || call.op > kGather ||
          call.bytes < 0) {
        return PeerFailed(fd, &call, io, peer);
      }
      if (call.op == kAbort) return PeerFailed(fd, &call, io, peer);
      const bool contributes = call.op == kAllReduce || call.op == kAllGather ||
                               call.op == kGather || (call.op == kBroadcast && call.root == r);
      const bool same = call.op == op && call.bytes == send_bytes && call.root == root;
      if (!same && mismatch.ok()) {
        mismatch =
            call.op != op ? InvalidArgument("tensor parallel: rank {} called {}, rank 0 called {}",
                                            r, OpName(call.op), OpName(op))
            : op == kBroadcast ? InvalidArgument(
                                     "Broadcast: rank {} passed {} bytes from root {}, rank 0 "
                                     "passed {} from root {}",
                                     r, call.bytes, call.root, send_bytes, root)
                               : InvalidArgument("{}: rank {} passed {} elements, rank 0 passed {}",
                                                 OpName(op), r, call.bytes / 4, send_bytes / 4);
      }
      if (!contributes) continue;
      if (!same || !mismatch.ok()) {
        io = Discard(fd, call.bytes, timeout_s_, peer);
      } else if (op == kAllReduce) {
        scratch_.resize(static_cast<size_t>(send_bytes / 4));
        io = ReadAll(fd, scratch_.data(), send_bytes, timeout_s_, peer);
        if (io.ok()) {
          for (size_t i = 0; i < scratch_.size(); ++i) sum_[i] += scratch_[i];
        }
      } else if (op == kAllGather || op == kGather) {
        io = ReadAll(fd, static_cast<char*>(recv) + r * send_bytes, send_bytes, timeout_s_, peer);
      } else {  // the broadcast's root
        io = ReadAll(fd, recv, send_bytes, timeout_s_, peer);
      }
      if (!io.ok()) return PeerFailed(fd, nullptr, io, peer);
    }
    if (op == kAllReduce && mismatch.ok())
      std::copy(sum_.begin(), sum_.end(), static_cast<float*>(recv));
    for (int r = 1; r < world_size_; ++r) {
      const int fd = peers_[r - 1];
      const std::string peer = RankName(r);
      Frame reply;
      reply.op = op;
      reply.root = root;
      Status io;
      if (!mismatch.ok()) {
        const std::string& msg = mismatch.message();
        reply.status = 1;
        reply.bytes = static_cast<int64_t>(std::min<size_t>(msg.size(), kMaxMessage));
        io = WriteAll(fd, &reply, sizeof reply, peer);
        if (io.ok()) io = WriteAll(fd, msg.data(), reply.bytes, peer);
      } else {
        const bool receives = !(op == kBroadcast && root == r) && op != kBarrier && op != kGather;
        reply.bytes = receives ? recv_bytes : 0;
        io = WriteAll(fd, &reply, sizeof reply, peer);
        if (io.ok() && receives) io = WriteAll(fd, recv, recv_bytes, peer);
      }
      if (!io.ok()) return PeerFailed(fd, nullptr, io, peer);
    }
    return mismatch;
  }

  const int rank_;
  const int world_size_;
  std::vector<int> peers_;
  const double timeout_s_;
  std::atomic<bool> aborted_{false};
  std::string abort_reason_;
  std::vector<float> scratch_, sum_;
};

}  // namespace

Result<SocketAddress> ParseSocketAddress(const std::string& text, const std::string& what) {
  const size_t colon = text.rfind(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 == text.size()) {
    return InvalidArgument("{} '{}' is not HOST:PORT", what, text);
  }
  SocketAddress a;
  a.host = text.substr(0, colon);
  const std::string port = text.substr(colon + 1);
  if (port.size() > 5 || port.find_first_not_of("0123456789") != std::string::npos ||
      std::stoi(port) > 65535) {
    return InvalidArgument("{} '{}': port '{}' is not in 0..65535", what, text, port);
  }
  a.port = std::stoi(port);
  return a;
}

Result<std::unique_ptr<SocketCommListener>> SocketCommListener::Listen(
    const SocketAddress& address) {
  QILIN_ASSIGN_OR_RETURN(addrinfo * res, Resolve(address, true));
  const int fd = socket(res->ai_family, res->ai_socktype | SOCK_CLOEXEC, res->ai_protocol);
  if (fd < 0) {
    freeaddrinfo(res);
    return Unavailable("tensor parallel: socket(): {}", std::strerror(errno));
  }
  int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  const int rc = bind(fd, res->ai_addr, res->ai_addrlen);
  const int err = errno;
  freeaddrinfo(res);
  if (rc != 0 || listen(fd, 128) != 0) {
    close(fd);
    return Unavailable(
        "tensor parallel: cannot listen on {}:{}: {}{}", address.host, address.port,
        std::strerror(rc != 0 ? err : errno),
        rc != 0 && err == EADDRINUSE ? " (choose another port with --tp-master)" : "");
  }
  sockaddr_in bound{};
  socklen_t len = sizeof bound;
  getsockname(fd, reinterpret_cast<sockaddr*>(&bound), &len);
  return std::unique_ptr<SocketCommListener>(new SocketCommListener(fd, ntohs(bound.sin_port)));
}

SocketCommListener::~SocketCommListener() {
  if (fd_ >= 0) close(fd_);
}

Result<std::unique_ptr<Communicator>> SocketCommListener::Accept(
    int world_size, double timeout_s, double collective_timeout_s,
    const std::function<Status()>& check) {
  if (world_size < 1 || world_size > 1024) {
    return InvalidArgument("tensor parallel: world size {} must be in [1, 1024]", world_size);
  }
  std::vector<int> peers(world_size - 1, -1);
  auto close_all = [&] {
    for (int fd : peers)
      if (fd >= 0) close(fd);
  };
  int joined = 0;
  const auto deadline = Clock::now() + std::chrono::duration<double>(timeout_s);
  while (joined < world_size - 1) {
    const double left = std::chrono::duration<double>(deadline - Clock::now()).count();
    if (check) {
      if (Status st = check(); !st.ok()) {
        close_all();
        return st;
      }
    }
    if (left > 0 && !WaitReadable(fd_, std::min(left, 0.2))) continue;
    if (left <= 0) {
      std::string missing;
      for (int r = 1; r < world_size; ++r) {
        if (peers[r - 1] < 0) missing += (missing.empty() ? "" : ", ") + std::to_string(r);
      }
      close_all();
      return Unavailable(
          "tensor parallel: ranks {} of {} did not join rank 0 on port {} within {} s", missing,
          world_size, port_, timeout_s);
    }
    const int c = accept4(fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (c < 0) continue;
    SetNoDelay(c);
    Hello hello;
    HelloReply reply;
    std::string refusal;
    if (!ReadAll(c, &hello, sizeof hello, 10, "a joining rank").ok() ||
        hello.magic != kHelloMagic) {
      refusal = "not a qilin tensor-parallel rank";
    } else if (hello.version != kVersion) {
      refusal =
          fmt::format("protocol version {} differs from rank 0's {}", hello.version, kVersion);
    } else if (hello.world_size != world_size) {
      refusal = fmt::format("world size {} differs from rank 0's {}", hello.world_size, world_size);
    } else if (hello.rank < 1 || hello.rank >= world_size) {
      refusal = fmt::format("rank {} is outside [1, {})", hello.rank, world_size);
    } else if (peers[hello.rank - 1] >= 0) {
      refusal = fmt::format("rank {} has already joined", hello.rank);
    }
    reply.ok = refusal.empty() ? 1 : 0;
    reply.message_bytes = static_cast<int64_t>(refusal.size());
    const bool sent = WriteAll(c, &reply, sizeof reply, "a joining rank").ok() &&
                      WriteAll(c, refusal.data(), reply.message_bytes, "a joining rank").ok();
    if (!refusal.empty() || !sent) {
      close(c);
      continue;
    }
    peers[hello.rank - 1] = c;
    ++joined;
  }
  return std::unique_ptr<Communicator>(
      new SocketComm(0, world_size, std::move(peers), collective_timeout_s));
}

Result<std::unique_ptr<Communicator>> ConnectSocketComm(const SocketAddress& address, int rank,
                                                        int world_size, double timeout_s) {
  if (world_size < 2 || world_size > 1024 || rank < 1 || rank >= world_size) {
    return InvalidArgument("tensor parallel: rank {} of world size {} cannot join rank 0", rank,
                           world_size);
  }
  const auto deadline = Clock::now() + std::chrono::duration<double>(timeout_s);
  std::string last = "no attempt";
  while (true) {
    Result<addrinfo*> res = Resolve(address, false);
    if (res.ok()) {
      const int fd =
          socket((*res)->ai_family, (*res)->ai_socktype | SOCK_CLOEXEC, (*res)->ai_protocol);
      const int rc = fd < 0 ? -1 : connect(fd, (*res)->ai_addr, (*res)->ai_addrlen);
      last = rc == 0 ? "" : std::strerror(errno);
      freeaddrinfo(*res);
      if (rc == 0) {
        SetNoDelay(fd);
        const std::string peer = fmt::format("rank 0 at {}:{}", address.host, address.port);
        Hello hello;
        hello.rank = rank;
        hello.world_size = world_size;
        HelloReply reply;
        Status io = WriteAll(fd, &hello, sizeof hello, peer);
        if (io.ok()) io = ReadAll(fd, &reply, sizeof reply, timeout_s > 0 ? timeout_s : 60, peer);
        if (io.ok() && (reply.magic != kHelloMagic || reply.message_bytes < 0 ||
                        reply.message_bytes > kMaxMessage)) {
          io = Unavailable("tensor parallel: {} is not a qilin rank 0", peer);
        }
        if (!io.ok()) {
          close(fd);
          return io;
        }
        if (reply.ok != 1) {
          std::string msg(static_cast<size_t>(reply.message_bytes), '\0');
          (void)ReadAll(fd, msg.data(), reply.message_bytes, 10, peer);
          close(fd);
          return InvalidArgument("tensor parallel: {} refused rank {}: {}", peer, rank, msg);
        }
        return std::unique_ptr<Communicator>(new SocketComm(rank, world_size, {fd}, 0));
      }
      if (fd >= 0) close(fd);
    } else {
      last = res.status().message();
    }
    if (Clock::now() >= deadline) {
      return Unavailable("tensor parallel: rank {} could not join rank 0 at {}:{} within {} s: {}",
                         rank, address.host, address.port, timeout_s, last);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
}

}  // namespace qilin
