#include "runtime/cuda_tp_backend.h"

#include <algorithm>
#include <map>
#include <new>

#include <fmt/format.h>

#include "runtime/comm_batch.h"
#include "runtime/cuda_device_comm.h"
#include "runtime/validate_batch.h"

#ifdef QILIN_HAVE_NCCL
#include "runtime/cuda_nccl_comm.h"
#endif

namespace qilin {

namespace {

// What rank 0 broadcasts to the other ranks for each call.
enum Op : int64_t { kForward = 1, kAllocateKv = 2, kCopyKv = 3, kShutdown = 4 };
struct Command {
  int64_t op = 0;
  int64_t a = 0;
  int64_t b = 0;
  int64_t payload_bytes = 0;
};

// Makes `device` current for a scope and restores the caller's device after.
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    if (cudaGetDevice(&saved_) != cudaSuccess) {
      cudaGetLastError();
      saved_ = -1;
    }
    if (saved_ != device) cudaSetDevice(device);
  }
  ~DeviceScope() {
    if (saved_ >= 0) cudaSetDevice(saved_);
  }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int saved_ = -1;
};

}  // namespace

struct CudaTpBackend::Rank {
  int device = 0;
  ShardPlan plan;
  ModelConfig local;
  std::unique_ptr<Communicator> comm;  // commands; the staged collectives
#ifdef QILIN_HAVE_NCCL
  std::unique_ptr<NcclCommunicator> nccl;
#endif
  std::unique_ptr<DeviceComm> dcomm;
  std::unique_ptr<CudaBackend> backend;  // destroyed first
  Status status;                         // of the last call

  Status Execute(const Command& cmd, const std::vector<uint8_t>& payload,
                 const ForwardBatch* root_batch, std::vector<float>* logits);
};

Status CudaTpBackend::Rank::Execute(const Command& cmd, const std::vector<uint8_t>& payload,
                                    const ForwardBatch* root_batch, std::vector<float>* logits) {
  switch (cmd.op) {
    case kAllocateKv:
      return backend->AllocateKvCache({static_cast<int32_t>(cmd.a), static_cast<int32_t>(cmd.b)});
    case kCopyKv: {
      const size_t pairs = payload.size() / (2 * sizeof(int32_t));
      const int32_t* p = reinterpret_cast<const int32_t*>(payload.data());
      std::vector<std::pair<int32_t, int32_t>> src_dst(pairs);
      for (size_t i = 0; i < pairs; ++i) src_dst[i] = {p[2 * i], p[2 * i + 1]};
      return backend->CopyKvBlocks(src_dst);
    }
    case kForward: {
      Result<ForwardBatch> decoded = root_batch != nullptr
                                         ? Result<ForwardBatch>(ForwardBatch{})
                                         : DecodeForwardBatch(payload.data(), payload.size());
      float ok = decoded.ok() ? 1.0f : 0.0f;
      QILIN_RETURN_IF_ERROR(comm->AllReduceSum(&ok, 1));
      if (!decoded.ok()) return decoded.status();
      if (ok != static_cast<float>(plan.world_size)) {
        return Internal("tensor parallel: another rank could not decode the step's batch");
      }
      Status st = backend->Forward(root_batch != nullptr ? *root_batch : *decoded, logits);
      // The other ranks may be waiting in a collective this rank will not reach.
      if (!st.ok()) comm->Abort(fmt::format("rank {}: {}", plan.rank, st.ToString()));
      return st;
    }
    default:
      return Internal("tensor parallel: unknown command {}", cmd.op);
  }
}

CudaTpBackend::CudaTpBackend(const ModelConfig& config) : config_(config) {}

Result<std::unique_ptr<CudaTpBackend>> CudaTpBackend::Create(const ModelConfig& config,
                                                             const ModelWeights& weights, int tp,
                                                             CudaTpOptions options) {
  QILIN_RETURN_IF_ERROR(CheckShardable(config, tp));
  const int devices = CudaDeviceCount();
  if (devices == 0) {
    return Unavailable(
        "--tp {} on device 'cuda': no CUDA device is visible (cudaGetDeviceCount found none)", tp);
  }
  bool use_nccl = false;
#ifdef QILIN_HAVE_NCCL
  use_nccl = !options.force_staged && tp > 1 && devices >= tp;
#endif
  (void)use_nccl;
  std::unique_ptr<CudaTpBackend> b(new CudaTpBackend(config));
  QILIN_ASSIGN_OR_RETURN(b->group_, InProcessCommGroup::Create(tp));
  for (int r = 0; r < tp; ++r) {
    auto rank = std::make_unique<Rank>();
    rank->device = r % devices;
    QILIN_ASSIGN_OR_RETURN(rank->plan, MakeShardPlan(config, tp, r));
    rank->local = ShardedLayerConfig(config, rank->plan);
    QILIN_ASSIGN_OR_RETURN(rank->comm, b->group_->Rank(r));
    b->ranks_.push_back(std::move(rank));
  }
#ifdef QILIN_HAVE_NCCL
  if (use_nccl) {
    // ncclCommInitRank blocks until every rank has joined: one thread per rank.
    QILIN_ASSIGN_OR_RETURN(std::string id, NcclUniqueId());
    std::vector<std::thread> init;
    for (int r = 0; r < tp; ++r) {
      init.emplace_back([&, r] {
        Rank& rk = *b->ranks_[r];
        auto c = NcclCommunicator::Create(tp, r, id, rk.device, /*synchronous=*/false);
        rk.status = c.ok() ? Status::Ok() : c.status();
        if (c.ok()) rk.nccl = std::move(c).value();
      });
    }
    for (std::thread& t : init) t.join();
    for (auto& rk : b->ranks_) {
      QILIN_RETURN_IF_ERROR(
          rk->status.WithContext(fmt::format("tensor parallel rank {}", rk->plan.rank)));
      rk->dcomm = std::make_unique<NcclDeviceComm>(rk->nccl.get());
    }
  }
#endif
  for (auto& rk : b->ranks_) {
    if (!rk->dcomm) rk->dcomm = std::make_unique<StagedDeviceComm>(rk->comm.get());
  }
  // Each rank's shard (host views and column copies) is uploaded and dropped in turn; the
  // embedding stays whole.
  for (auto& rk : b->ranks_) {
    DeviceScope scope(rk->device);
    QILIN_ASSIGN_OR_RETURN(ModelWeights shard, ShardWeights(weights, config, rk->plan));
    shard.embed_tokens = weights.embed_tokens;
    CudaBackendOptions o = options.cuda;
    o.tp_comm = rk->dcomm.get();
    o.tp_plan = rk->plan;
    auto backend = CudaBackend::Create(rk->local, shard, o);
    if (!backend.ok()) {
      return backend.status().WithContext(
          fmt::format("tensor parallel rank {} on CUDA device {}", rk->plan.rank, rk->device));
    }
    rk->backend = std::move(backend).value();
  }
  // Ranks 1..N-1 follow rank 0's broadcasts until kShutdown or an abort.
  for (int r = 1; r < tp; ++r) {
    b->threads_.emplace_back([rank = b->ranks_[r].get()] {
      cudaSetDevice(rank->device);
      while (true) {
        Command cmd;
        if (!rank->comm->Broadcast(&cmd, sizeof(cmd), 0).ok()) return;
        std::vector<uint8_t> payload;
        try {
          payload.resize(cmd.payload_bytes);
        } catch (const std::bad_alloc&) {
          rank->comm->Abort("cannot allocate a command's payload");
          return;
        }
        if (cmd.payload_bytes > 0 &&
            !rank->comm->Broadcast(payload.data(), cmd.payload_bytes, 0).ok())
          return;
        if (cmd.op == kShutdown) return;
        try {
          rank->status = rank->Execute(cmd, payload, nullptr, nullptr);
        } catch (const std::bad_alloc&) {
          rank->comm->Abort("out of host memory in a step");
          return;
        }
        if (!rank->comm->Barrier().ok()) return;
      }
    });
  }
  return b;
}

CudaTpBackend::~CudaTpBackend() {
  // Only once the follower threads run (a Create that failed before them has none to stop).
  if (!threads_.empty()) (void)RunOnAllRanks(kShutdown, 0, 0, {}, nullptr, nullptr);
  for (std::thread& t : threads_) t.join();
  for (auto& rk : ranks_) {
    DeviceScope scope(rk->device);
    rk.reset();
  }
}

std::string CudaTpBackend::collectives() const {
  return ranks_.empty() ? "" : ranks_[0]->dcomm->name();
}
const ShardPlan& CudaTpBackend::plan(int rank) const { return ranks_.at(rank)->plan; }
int CudaTpBackend::device(int rank) const { return ranks_.at(rank)->device; }
CudaBackend& CudaTpBackend::rank_backend(int rank) { return *ranks_.at(rank)->backend; }

Status CudaTpBackend::RunOnAllRanks(int64_t op, int64_t a, int64_t b, std::vector<uint8_t> payload,
                                    const ForwardBatch* batch, std::vector<float>* logits) {
  Rank& r0 = *ranks_[0];
  Command cmd{op, a, b, static_cast<int64_t>(payload.size())};
  QILIN_RETURN_IF_ERROR(r0.comm->Broadcast(&cmd, sizeof(cmd), 0));
  if (cmd.payload_bytes > 0) {
    QILIN_RETURN_IF_ERROR(r0.comm->Broadcast(payload.data(), cmd.payload_bytes, 0));
  }
  if (op == kShutdown) return Status::Ok();
  {
    DeviceScope scope(r0.device);
    try {
      r0.status = r0.Execute(cmd, payload, batch, logits);
    } catch (const std::bad_alloc&) {
      r0.comm->Abort("out of host memory in a step");
      return ResourceExhausted("tensor parallel rank 0: out of host memory in a step");
    }
  }
  const Status barrier = r0.comm->Barrier();
  for (const auto& r : ranks_) {
    if (!r->status.ok()) {
      return r->status.WithContext(fmt::format("tensor parallel rank {}", r->plan.rank));
    }
  }
  return barrier;
}

int64_t CudaTpBackend::KvBytesPerToken() const {
  int64_t total = 0;
  for (const auto& r : ranks_) total += r->backend->KvBytesPerToken();
  return total;
}

Result<int32_t> CudaTpBackend::ProposeNumKvBlocks(int32_t block_size, double memory_fraction,
                                                  int32_t max_num_tokens) const {
  std::map<int, int> on_device;
  for (const auto& r : ranks_) ++on_device[r->device];
  int32_t blocks = INT32_MAX;
  for (const auto& r : ranks_) {
    DeviceScope scope(r->device);
    auto b = r->backend->ProposeNumKvBlocks(block_size, memory_fraction / on_device[r->device],
                                            max_num_tokens);
    if (!b.ok()) {
      return b.status().WithContext(fmt::format("tensor parallel rank {}", r->plan.rank));
    }
    blocks = std::min(blocks, *b);
  }
  return blocks;
}

Status CudaTpBackend::AllocateKvCache(const KvCacheLayout& layout) {
  if (layout.block_size <= 0 || layout.num_blocks <= 0) {
    return InvalidArgument("KV cache layout: num_blocks = {} and block_size = {} must be positive",
                           layout.num_blocks, layout.block_size);
  }
  layout_ = KvCacheLayout{0, layout.block_size};
  QILIN_RETURN_IF_ERROR(
      RunOnAllRanks(kAllocateKv, layout.num_blocks, layout.block_size, {}, nullptr, nullptr));
  layout_ = layout;
  return Status::Ok();
}

Status CudaTpBackend::CopyKvBlocks(const std::vector<std::pair<int32_t, int32_t>>& src_dst) {
  std::vector<uint8_t> payload(src_dst.size() * 2 * sizeof(int32_t));
  int32_t* p = reinterpret_cast<int32_t*>(payload.data());
  for (size_t i = 0; i < src_dst.size(); ++i) {
    const auto [src, dst] = src_dst[i];
    for (int32_t blk : {src, dst}) {
      if (blk < 0 || blk >= layout_.num_blocks) {
        return InvalidArgument("CopyKvBlocks: block {} is outside the pool of {} blocks", blk,
                               layout_.num_blocks);
      }
    }
    p[2 * i] = src;
    p[2 * i + 1] = dst;
  }
  if (src_dst.empty()) return Status::Ok();
  return RunOnAllRanks(kCopyKv, 0, 0, std::move(payload), nullptr, nullptr);
}

Status CudaTpBackend::Forward(const ForwardBatch& batch, std::vector<float>* logits) {
  QILIN_RETURN_IF_ERROR(ValidateForwardBatch(batch, config_, layout_));
  if (logits == nullptr) return InvalidArgument("CudaTpBackend::Forward: no logits vector");
  if (tp() == 1) return RunOnAllRanks(kForward, 0, 0, {}, &batch, logits);
  return RunOnAllRanks(kForward, 0, 0, EncodeForwardBatch(batch), &batch, logits);
}

}  // namespace qilin
