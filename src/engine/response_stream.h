// A request's response channel: the engine loop pushes, a client thread pops. Closed once every
// sequence of the request has finished, after which Pop drains what is left and then returns
// nothing.
#pragma once

#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <optional>

#include "engine/request.h"

namespace qilin {

class ResponseStream {
 public:
  explicit ResponseStream(int64_t request_id, int32_t num_sequences)
      : request_id_(request_id), open_sequences_(num_sequences) {}

  int64_t request_id() const { return request_id_; }

  // Engine side. A finished response closes its sequence; the last one closes the stream.
  void Push(Response response) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (response.finished() && open_sequences_ > 0) --open_sequences_;
      queue_.push_back(std::move(response));
    }
    cv_.notify_all();
    Notify();
  }

  // Async consumers: `fn` runs (on the pushing thread, so it must be quick: e.g. post to an
  // event loop) after every Push, and once at once when responses are already queued. Clear it
  // (nullptr) before the listener's captures go away.
  void SetListener(std::function<void()> fn) {
    bool pending;
    {
      std::lock_guard<std::mutex> lock(listener_mu_);
      listener_ = std::move(fn);
      pending = static_cast<bool>(listener_);
    }
    if (pending) {
      std::lock_guard<std::mutex> lock(mu_);
      pending = !queue_.empty() || open_sequences_ == 0;
    }
    if (pending) Notify();
  }

  // Blocks until a response is there or the stream is closed and drained (then nullopt).
  std::optional<Response> Pop() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return !queue_.empty() || open_sequences_ == 0; });
    return PopLocked();
  }
  // As Pop, giving up after `timeout` (nullopt; check closed()).
  template <typename Rep, typename Period>
  std::optional<Response> PopFor(std::chrono::duration<Rep, Period> timeout) {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait_for(lock, timeout, [&] { return !queue_.empty() || open_sequences_ == 0; });
    return PopLocked();
  }
  std::optional<Response> TryPop() {
    std::lock_guard<std::mutex> lock(mu_);
    return PopLocked();
  }
  // True once every sequence finished (responses may still be queued).
  bool closed() const {
    std::lock_guard<std::mutex> lock(mu_);
    return open_sequences_ == 0;
  }

 private:
  std::optional<Response> PopLocked() {
    if (queue_.empty()) return std::nullopt;
    Response r = std::move(queue_.front());
    queue_.pop_front();
    return r;
  }

  void Notify() {
    std::lock_guard<std::mutex> lock(listener_mu_);
    if (listener_) listener_();
  }

  const int64_t request_id_;
  std::mutex listener_mu_;  // held while the listener runs, so clearing it waits for a call
  std::function<void()> listener_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Response> queue_;
  int32_t open_sequences_;
};

}  // namespace qilin
