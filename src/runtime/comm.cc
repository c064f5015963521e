#include "runtime/comm.h"

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <new>
#include <vector>

namespace qilin {

inline constexpr int kMaxInProcessRanks = 1024;

struct InProcessCommGroup::State {
  explicit State(int n) : world_size(n), ptrs(n, nullptr), sizes(n, 0) {}

  const int world_size;
  std::mutex mu;
  std::condition_variable cv;
  int arrived = 0;
  uint64_t generation = 0;
  bool aborted = false;
  std::string abort_reason;

  // Per rank: the buffer and size it brought to the current collective.
  std::vector<const void*> ptrs;
  std::vector<int64_t> sizes;
  std::vector<float> scratch;  // the all-reduce's sums

  // A reusable barrier that an abort releases.
  Status Wait() {
    std::unique_lock<std::mutex> lock(mu);
    if (aborted) return Cancelled();
    const uint64_t gen = generation;
    if (++arrived == world_size) {
      arrived = 0;
      ++generation;
      cv.notify_all();
      return Status::Ok();
    }
    cv.wait(lock, [&] { return generation != gen || aborted; });
    if (generation != gen) return Status::Ok();
    return Cancelled();
  }

  Status Cancelled() const {
    return Status(StatusCode::kCancelled,
                  fmt::format("tensor parallel group aborted: {}", abort_reason));
  }

  void Abort(const std::string& why) {
    std::lock_guard<std::mutex> lock(mu);
    if (!aborted) abort_reason = why;
    aborted = true;
    cv.notify_all();
  }

  // After the first barrier of a collective: the same error on every rank when sizes differ.
  // Every rank then meets once more before returning it, so that no rank's next collective
  // overwrites the sizes while another still reads them.
  Status CheckSizes(const char* op) {
    Status st;
    for (int r = 1; r < world_size && st.ok(); ++r) {
      if (sizes[r] != sizes[0]) {
        st = InvalidArgument("{}: rank {} passed {} elements, rank 0 passed {}", op, r, sizes[r],
                             sizes[0]);
      }
    }
    if (st.ok()) return st;
    QILIN_RETURN_IF_ERROR(Wait());
    return st;
  }
};

namespace {

// [begin, end) of part `i` of `parts` when `total` is split as evenly as possible.
std::pair<int64_t, int64_t> Share(int64_t total, int64_t parts, int64_t i) {
  return {total * i / parts, total * (i + 1) / parts};
}

class InProcessComm : public Communicator {
 public:
  InProcessComm(std::shared_ptr<InProcessCommGroup::State> s, int rank)
      : s_(std::move(s)), rank_(rank) {}

  int rank() const override { return rank_; }
  int world_size() const override { return s_->world_size; }
  std::string name() const override { return "inprocess"; }

  Status AllReduceSum(float* data, int64_t count) override {
    if (count < 0) return InvalidArgument("AllReduceSum: count = {} is negative", count);
    const int n = s_->world_size;
    if (n == 1) return Status::Ok();
    s_->ptrs[rank_] = data;
    s_->sizes[rank_] = count;
    // The previous collective ended with a barrier, so nobody reads the scratch now; the sizes
    // are checked equal below before anyone uses it.
    if (rank_ == 0) {
      try {
        if (static_cast<int64_t>(s_->scratch.size()) < count) s_->scratch.resize(count);
      } catch (const std::bad_alloc&) {
        s_->sizes[0] = -1;  // every rank reports the size mismatch below
      }
    }
    QILIN_RETURN_IF_ERROR(s_->Wait());
    if (s_->sizes[0] < 0) {
      QILIN_RETURN_IF_ERROR(s_->Wait());
      return ResourceExhausted("AllReduceSum: cannot allocate {} floats of scratch", count);
    }
    QILIN_RETURN_IF_ERROR(s_->CheckSizes("AllReduceSum"));
    // Reduce-scatter: this rank's share of the elements, summed over ranks in rank order.
    const auto [b, e] = Share(count, n, rank_);
    float* sum = s_->scratch.data();
    std::copy(static_cast<const float*>(s_->ptrs[0]) + b,
              static_cast<const float*>(s_->ptrs[0]) + e, sum + b);
    for (int r = 1; r < n; ++r) {
      const float* p = static_cast<const float*>(s_->ptrs[r]);
      for (int64_t i = b; i < e; ++i) sum[i] += p[i];
    }
    QILIN_RETURN_IF_ERROR(s_->Wait());
    std::copy(sum, sum + count, data);  // all-gather of the sums
    return s_->Wait();
  }

  Status AllGather(const float* send, int64_t count, float* recv) override {
    return Gather("AllGather", send, count, recv, /*to_all=*/true);
  }

  Status GatherTo0(const float* send, int64_t count, float* recv) override {
    return Gather("GatherTo0", send, count, recv, /*to_all=*/false);
  }

  Status Broadcast(void* data, int64_t bytes, int root) override {
    if (bytes < 0) return InvalidArgument("Broadcast: bytes = {} is negative", bytes);
    if (root < 0 || root >= s_->world_size) {
      return InvalidArgument("Broadcast: root {} is outside [0, {})", root, s_->world_size);
    }
    s_->ptrs[rank_] = data;
    s_->sizes[rank_] = bytes;
    QILIN_RETURN_IF_ERROR(s_->Wait());
    QILIN_RETURN_IF_ERROR(s_->CheckSizes("Broadcast"));
    if (rank_ != root && bytes > 0) std::memcpy(data, s_->ptrs[root], bytes);
    return s_->Wait();
  }

  Status Barrier() override { return s_->Wait(); }
  void Abort(const std::string& why) override { s_->Abort(fmt::format("rank {}: {}", rank_, why)); }

 private:
  // Every rank's buffer copied in rank order into `recv` on every rank (to_all) or rank 0 only.
  Status Gather(const char* op, const float* send, int64_t count, float* recv, bool to_all) {
    if (count < 0) return InvalidArgument("{}: count = {} is negative", op, count);
    s_->ptrs[rank_] = send;
    s_->sizes[rank_] = count;
    QILIN_RETURN_IF_ERROR(s_->Wait());
    QILIN_RETURN_IF_ERROR(s_->CheckSizes(op));
    if (to_all || rank_ == 0) {
      for (int r = 0; r < s_->world_size; ++r) {
        const float* p = static_cast<const float*>(s_->ptrs[r]);
        std::copy(p, p + count, recv + r * count);
      }
    }
    return s_->Wait();
  }

  std::shared_ptr<InProcessCommGroup::State> s_;
  int rank_;
};

}  // namespace

Status Communicator::GatherTo0(const float* send, int64_t count, float* recv) {
  if (count < 0) return InvalidArgument("GatherTo0: count = {} is negative", count);
  if (rank() == 0) return AllGather(send, count, recv);
  std::vector<float> scratch;
  try {
    scratch.resize(static_cast<size_t>(count) * world_size());
  } catch (const std::bad_alloc&) {
    Abort("cannot allocate a gather's scratch");
    return ResourceExhausted("GatherTo0: cannot allocate {} floats", count * world_size());
  }
  return AllGather(send, count, scratch.data());
}

InProcessCommGroup::InProcessCommGroup(int world_size)
    : state_(std::make_shared<State>(world_size)) {}

InProcessCommGroup::~InProcessCommGroup() = default;

Result<std::shared_ptr<InProcessCommGroup>> InProcessCommGroup::Create(int world_size) {
  if (world_size < 1 || world_size > kMaxInProcessRanks) {
    return InvalidArgument("communicator: world size {} must be in [1, {}]", world_size,
                           kMaxInProcessRanks);
  }
  return std::shared_ptr<InProcessCommGroup>(new InProcessCommGroup(world_size));
}

int InProcessCommGroup::world_size() const { return state_->world_size; }

Result<std::unique_ptr<Communicator>> InProcessCommGroup::Rank(int rank) {
  if (rank < 0 || rank >= state_->world_size) {
    return OutOfRange("communicator: rank {} is outside [0, {})", rank, state_->world_size);
  }
  return std::unique_ptr<Communicator>(new InProcessComm(state_, rank));
}

void InProcessCommGroup::Abort(const std::string& why) { state_->Abort(why); }

}  // namespace qilin
