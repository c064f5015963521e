#include "runtime/cuda_tp_backend.h"

#include <unistd.h>

#include <algorithm>
#include <functional>
#include <map>
#include <new>

#include <fmt/format.h>

#include "runtime/comm_batch.h"
#include "runtime/cuda_device_comm.h"
#include "runtime/tp_driver.h"
#include "runtime/validate_batch.h"

#ifdef QILIN_HAVE_NCCL
#include "runtime/cuda_nccl_comm.h"
#endif

namespace qilin {

namespace {

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

struct CudaTpBackend::Rank : TpRankWorker {
  int device = 0;
  ShardPlan plan;
  ModelConfig local;
  std::unique_ptr<Communicator> comm;  // commands; the staged collectives
#ifdef QILIN_HAVE_NCCL
  std::unique_ptr<NcclCommunicator> nccl;
#endif
  std::unique_ptr<DeviceComm> dcomm;
  std::unique_ptr<CudaBackend> backend;  // destroyed first

  Status AllocateKv(int32_t num_blocks, int32_t block_size) override {
    DeviceScope scope(device);
    return backend->AllocateKvCache({num_blocks, block_size});
  }
  Status CopyKv(const std::vector<std::pair<int32_t, int32_t>>& src_dst) override {
    DeviceScope scope(device);
    return backend->CopyKvBlocks(src_dst);
  }
  Status Forward(const ForwardBatch& batch, std::vector<float>* logits) override {
    DeviceScope scope(device);
    return backend->Forward(batch, logits);
  }
  // Uploads this rank's shard of `weights` (host views and column copies, dropped after; the
  // embedding stays whole) to its device, with `dcomm` as its collectives.
  Status Upload(const ModelConfig& config, const ModelWeights& weights,
                const CudaBackendOptions& options);
};

Status CudaTpBackend::Rank::Upload(const ModelConfig& config, const ModelWeights& weights,
                                   const CudaBackendOptions& options) {
  DeviceScope scope(device);
  QILIN_ASSIGN_OR_RETURN(ModelWeights shard, ShardWeights(weights, config, plan));
  shard.embed_tokens = weights.embed_tokens;
  CudaBackendOptions o = options;
  o.tp_comm = dcomm.get();
  o.tp_plan = plan;
  auto made = CudaBackend::Create(local, shard, o);
  if (!made.ok()) {
    return made.status().WithContext(
        fmt::format("tensor parallel rank {} on CUDA device {}", plan.rank, device));
  }
  backend = std::move(made).value();
  return Status::Ok();
}

CudaTpBackend::CudaTpBackend(const ModelConfig& config) : TpLeaderBackend(config) {}

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
    b->plans_.push_back(rank->plan);
    b->ranks_.push_back(std::move(rank));
  }
#ifdef QILIN_HAVE_NCCL
  if (use_nccl) {
    // ncclCommInitRank blocks until every rank has joined: one thread per rank.
    QILIN_ASSIGN_OR_RETURN(std::string id, NcclUniqueId());
    std::vector<std::thread> init;
    std::vector<Status> made(tp);
    for (int r = 0; r < tp; ++r) {
      init.emplace_back([&, r] {
        Rank& rk = *b->ranks_[r];
        auto c = NcclCommunicator::Create(tp, r, id, rk.device, /*synchronous=*/false);
        made[r] = c.status();
        if (c.ok()) rk.nccl = std::move(c).value();
      });
    }
    for (std::thread& t : init) t.join();
    for (auto& rk : b->ranks_) {
      QILIN_RETURN_IF_ERROR(
          made[rk->plan.rank].WithContext(fmt::format("tensor parallel rank {}", rk->plan.rank)));
      rk->dcomm = std::make_unique<NcclDeviceComm>(rk->nccl.get());
    }
  }
#endif
  for (auto& rk : b->ranks_) {
    if (!rk->dcomm) rk->dcomm = std::make_unique<StagedDeviceComm>(rk->comm.get());
  }
  for (auto& rk : b->ranks_) QILIN_RETURN_IF_ERROR(rk->Upload(config, weights, options.cuda));
  // Ranks 1..N-1 follow rank 0's broadcasts until it shuts them down or the group fails.
  for (int r = 1; r < tp; ++r) {
    b->threads_.emplace_back([rank = b->ranks_[r].get()] {
      cudaSetDevice(rank->device);
      (void)TpFollow(*rank->comm, *rank);
    });
  }
  b->lead_comm_ = b->ranks_[0]->comm.get();
  b->lead_worker_ = b->ranks_[0].get();
  return b;
}

Result<std::unique_ptr<CudaTpBackend::Rank>> CudaTpBackend::JoinProcessGroup(
    const ModelConfig& config, const ModelWeights& weights, std::unique_ptr<Communicator> comm,
    int device, const CudaTpOptions& options) {
  const int tp = comm->world_size(), r = comm->rank();
  QILIN_RETURN_IF_ERROR(TpCheckSameModel(*comm, config));
  auto rank = std::make_unique<Rank>();
  rank->device = device;
  Status st = CheckShardable(config, tp);
  if (st.ok() && (device < 0 || device >= CudaDeviceCount())) {
    st = Unavailable("tensor parallel rank {}: CUDA device {} is not visible ({} visible)", r,
                     device, CudaDeviceCount());
  }
  if (st.ok()) {
    Result<ShardPlan> plan = MakeShardPlan(config, tp, r);
    st = plan.status();
    if (plan.ok()) rank->plan = *plan;
  }
  if (st.ok()) rank->local = ShardedLayerConfig(config, rank->plan);
  QILIN_RETURN_IF_ERROR(TpExchangeStatus(*comm, st));
  rank->comm = std::move(comm);
  // NCCL when every rank wants it and no two ranks share a GPU (NCCL refuses one GPU twice in a
  // communicator): each rank's (host, PCI bus id) against the others'.
  bool use_nccl = false;
#ifdef QILIN_HAVE_NCCL
  {
    char bus[64] = {0};
    DeviceScope scope(device);
    if (cudaDeviceGetPCIBusId(bus, sizeof bus, device) != cudaSuccess) cudaGetLastError();
    char host[256] = {0};
    gethostname(host, sizeof host - 1);
    // Two 20-bit hashes: exact in a float.
    const auto h20 = [](const std::string& x) {
      return static_cast<float>(std::hash<std::string>{}(x)&0xFFFFF);
    };
    const float mine[3] = {options.force_staged ? 0.0f : 1.0f, h20(host), h20(bus)};
    std::vector<float> all(3 * tp);
    QILIN_RETURN_IF_ERROR(rank->comm->AllGather(mine, 3, all.data()));
    use_nccl = true;
    for (int i = 0; i < tp; ++i) {
      if (all[3 * i] == 0.0f) use_nccl = false;
      for (int j = 0; j < i; ++j) {
        if (all[3 * i + 1] == all[3 * j + 1] && all[3 * i + 2] == all[3 * j + 2]) use_nccl = false;
      }
    }
  }
  if (use_nccl) {
    // Rank 0's NCCL id reaches the other processes over the socket group.
    std::string id(128, '\0');
    if (r == 0) {
      Result<std::string> made = NcclUniqueId();
      st = made.status();
      if (made.ok()) id = *made;
    }
    QILIN_RETURN_IF_ERROR(TpExchangeStatus(*rank->comm, st));
    int64_t id_bytes = static_cast<int64_t>(id.size());
    QILIN_RETURN_IF_ERROR(rank->comm->Broadcast(&id_bytes, sizeof id_bytes, 0));
    id.resize(static_cast<size_t>(id_bytes));
    QILIN_RETURN_IF_ERROR(rank->comm->Broadcast(id.data(), id_bytes, 0));
    auto c = NcclCommunicator::Create(tp, r, id, device, /*synchronous=*/false);
    st = c.status();
    if (c.ok()) rank->nccl = std::move(c).value();
    QILIN_RETURN_IF_ERROR(TpExchangeStatus(*rank->comm, st));
    rank->dcomm = std::make_unique<NcclDeviceComm>(rank->nccl.get());
  }
#endif
  (void)use_nccl;
  if (!rank->dcomm) rank->dcomm = std::make_unique<StagedDeviceComm>(rank->comm.get());
  QILIN_RETURN_IF_ERROR(TpExchangeStatus(*rank->comm, rank->Upload(config, weights, options.cuda)));
  return rank;
}

Result<std::unique_ptr<CudaTpBackend>> CudaTpBackend::CreateLeader(
    const ModelConfig& config, const ModelWeights& weights, std::unique_ptr<Communicator> comm,
    int device, CudaTpOptions options) {
  if (comm->rank() != 0) {
    return InvalidArgument("tensor parallel: the leader must be rank 0, not {}", comm->rank());
  }
  std::unique_ptr<CudaTpBackend> b(new CudaTpBackend(config));
  for (int r = 0; r < comm->world_size(); ++r) {
    QILIN_ASSIGN_OR_RETURN(ShardPlan plan, MakeShardPlan(config, comm->world_size(), r));
    b->plans_.push_back(plan);
  }
  QILIN_ASSIGN_OR_RETURN(std::unique_ptr<Rank> rank,
                         JoinProcessGroup(config, weights, std::move(comm), device, options));
  b->ranks_.push_back(std::move(rank));
  b->followers_elsewhere_ = true;
  b->lead_comm_ = b->ranks_[0]->comm.get();
  b->lead_worker_ = b->ranks_[0].get();
  return b;
}

Status CudaTpBackend::Follow(const ModelConfig& config, const ModelWeights& weights,
                             std::unique_ptr<Communicator> comm, int device,
                             CudaTpOptions options) {
  QILIN_ASSIGN_OR_RETURN(std::unique_ptr<Rank> rank,
                         JoinProcessGroup(config, weights, std::move(comm), device, options));
  cudaSetDevice(device);
  Status st = TpFollow(*rank->comm, *rank);
  DeviceScope scope(device);
  rank.reset();
  return st;
}

CudaTpBackend::~CudaTpBackend() {
  // Only once the followers run (a Create that failed before them has none to stop).
  StopFollowers();
  for (auto& rk : ranks_) {
    DeviceScope scope(rk->device);
    rk.reset();
  }
}

std::string CudaTpBackend::collectives() const {
  return ranks_.empty() ? "" : ranks_[0]->dcomm->name();
}
int CudaTpBackend::device(int rank) const { return ranks_.at(rank)->device; }
CudaBackend& CudaTpBackend::rank_backend(int rank) { return *ranks_.at(rank)->backend; }

int64_t CudaTpBackend::KvBytesPerToken() const {
  int64_t total = 0;
  for (const auto& r : ranks_) total += r->backend->KvBytesPerToken();
  // Ranks in other processes hold as many KV heads as rank 0 (ShardPlan replicates evenly).
  total += (tp() - static_cast<int64_t>(ranks_.size())) * ranks_[0]->backend->KvBytesPerToken();
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

}  // namespace qilin
