#include "runtime/tp_launch.h"

#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <thread>
#include <vector>

#include <spdlog/spdlog.h>

#include "model/weights.h"
#include "runtime/backend_factory.h"
#include "runtime/socket_comm.h"
#include "runtime/tp_cpu_backend.h"
#include "runtime/tp_driver.h"
#include "runtime/tp_factory.h"

#ifdef QILIN_HAVE_CUDA
#include "runtime/cuda_backend.h"
#include "runtime/cuda_tp_backend.h"
#endif

namespace qilin {

namespace {

constexpr const char* kMpiDefaultMaster = "127.0.0.1:29531";

std::optional<int> EnvInt(std::initializer_list<const char*> names) {
  for (const char* n : names) {
    const char* v = std::getenv(n);
    if (v == nullptr || *v == '\0') continue;
    char* end = nullptr;
    const long x = std::strtol(v, &end, 10);
    if (*end == '\0' && x >= 0 && x < (1 << 20)) return static_cast<int>(x);
  }
  return std::nullopt;
}

std::string MasterOf(const TpLaunchOptions& launch) {
  if (!launch.master.empty()) return launch.master;
  return launch.mode == "mpi" ? kMpiDefaultMaster : "127.0.0.1:0";
}

// The model every rank makes, from `source`.
Result<ModelWeights> MakeWeights(const ModelConfig& config, const TpModelSource& source) {
  if (source.dummy_weights) return MakeDummyWeights(config, source.dtype, source.seed);
  return LoadModelWeights(config, source.model_dir);
}

// The GPU of an mpirun-started rank on `device`: its local rank over the visible GPUs.
int MpiCudaDevice(const std::string& device, const MpiPlace& place) {
#ifdef QILIN_HAVE_CUDA
  if (device == "cuda") return place.local_rank % std::max(1, CudaDeviceCount());
#endif
  (void)device;
  (void)place;
  return 0;
}

// Rank 0's backend over a joined group of processes.
Result<std::unique_ptr<Backend>> LeadGroup(const std::string& device, int cuda_device,
                                           const ModelConfig& config, const TpModelSource& source,
                                           std::unique_ptr<Communicator> comm) {
  Result<ModelWeights> weights = MakeWeights(config, source);
  if (!weights.ok()) {
    // The other ranks wait for this rank's shard; they learn why it failed.
    Status st = weights.status();
    (void)TpExchangeStatus(*comm, st);
    return st;
  }
#ifdef QILIN_HAVE_CUDA
  if (device == "cuda") {
    QILIN_ASSIGN_OR_RETURN(
        std::unique_ptr<CudaTpBackend> b,
        CudaTpBackend::CreateLeader(config, *weights, std::move(comm), cuda_device));
    return std::unique_ptr<Backend>(std::move(b));
  }
#endif
  (void)cuda_device;
  QILIN_ASSIGN_OR_RETURN(std::unique_ptr<TpCpuBackend> b,
                         TpCpuBackend::CreateLeader(config, *weights, std::move(comm)));
  return std::unique_ptr<Backend>(std::move(b));
}

// A backend whose ranks 1..N-1 are child processes: they are shut down with it (the inner
// backend's destructor) and reaped; one that does not exit in time is killed.
std::string ExitText(int status) {
  return WIFEXITED(status) ? fmt::format("status {}", WEXITSTATUS(status))
                           : fmt::format("signal {}", WTERMSIG(status));
}

// Waits up to `grace_s` for each child in turn, then kills what is left.
void ReapChildren(std::vector<pid_t>& children, double grace_s) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(grace_s);
  for (pid_t pid : children) {
    int status = 0;
    while (waitpid(pid, &status, WNOHANG) == 0) {
      if (std::chrono::steady_clock::now() >= deadline) {
        spdlog::warn("tensor parallel: worker process {} did not exit; killing it", pid);
        kill(pid, SIGKILL);
        waitpid(pid, &status, 0);
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
      spdlog::warn("tensor parallel: worker process {} ended with {}", pid, ExitText(status));
    }
  }
  children.clear();
}

// A backend whose ranks 1..N-1 are child processes (children[r - 1] is rank r): they are shut
// down with it (the inner backend's destructor) and reaped; one that does not exit in time is
// killed. A child that exits while serving makes Health() an error at once, before any step
// runs into the broken group.
class ProcessGroupBackend : public Backend {
 public:
  ProcessGroupBackend(std::unique_ptr<Backend> inner, std::vector<pid_t> children)
      : inner_(std::move(inner)), children_(std::move(children)) {}
  ~ProcessGroupBackend() override {
    inner_.reset();
    std::lock_guard<std::mutex> lock(mu_);
    ReapChildren(children_, 30.0);
  }

  std::string name() const override { return inner_->name(); }
  const ModelConfig& config() const override { return inner_->config(); }
  int64_t KvBytesPerToken() const override { return inner_->KvBytesPerToken(); }
  Result<int32_t> ProposeNumKvBlocks(int32_t block_size, double memory_fraction,
                                     int32_t max_num_tokens) const override {
    return inner_->ProposeNumKvBlocks(block_size, memory_fraction, max_num_tokens);
  }
  Status AllocateKvCache(const KvCacheLayout& layout) override {
    return inner_->AllocateKvCache(layout);
  }
  const KvCacheLayout& kv_layout() const override { return inner_->kv_layout(); }
  Status Forward(const ForwardBatch& batch, std::vector<float>* logits) override {
    return inner_->Forward(batch, logits);
  }
  Status CopyKvBlocks(const std::vector<std::pair<int32_t, int32_t>>& src_dst) override {
    return inner_->CopyKvBlocks(src_dst);
  }
  Status Health() const override {
    std::lock_guard<std::mutex> lock(mu_);
    if (!exited_.ok()) return exited_;
    for (size_t i = 0; i < children_.size(); ++i) {
      int status = 0;
      if (waitpid(children_[i], &status, WNOHANG) == children_[i]) {
        exited_ = Unavailable("tensor parallel rank {} (tp-worker process {}) exited with {}",
                              i + 1, children_[i], ExitText(status));
        children_.erase(children_.begin() + static_cast<std::ptrdiff_t>(i));
        return exited_;
      }
    }
    return inner_->Health();
  }

 private:
  std::unique_ptr<Backend> inner_;
  mutable std::mutex mu_;
  mutable std::vector<pid_t> children_;
  mutable Status exited_;
};

Result<pid_t> Spawn(const std::vector<std::string>& args) {
  std::vector<char*> argv;
  for (const std::string& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  const pid_t parent = getpid();
  const pid_t pid = fork();
  if (pid < 0) return Unavailable("tensor parallel: fork(): {}", std::strerror(errno));
  if (pid == 0) {
    // A worker never outlives rank 0's process (it ignores SIGTERM: see RunTpWorker).
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent) _exit(1);
    execv(argv[0], argv.data());
    std::fprintf(stderr, "qilin tp-worker: cannot run %s: %s\n", argv[0], std::strerror(errno));
    _exit(127);
  }
  return pid;
}

}  // namespace

std::optional<MpiPlace> MpiPlaceFromEnvironment() {
  const std::optional<int> rank = EnvInt({"OMPI_COMM_WORLD_RANK", "PMI_RANK", "QILIN_TP_RANK"});
  const std::optional<int> size =
      EnvInt({"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "QILIN_TP_WORLD_SIZE"});
  if (!rank || !size) return std::nullopt;
  MpiPlace p;
  p.rank = *rank;
  p.world_size = *size;
  p.local_rank = EnvInt({"OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "QILIN_TP_LOCAL_RANK"})
                     .value_or(*rank);
  return p;
}

Status CheckTpLaunch(const TpLaunchOptions& launch, int tp) {
  if (launch.mode != "thread" && launch.mode != "process" && launch.mode != "mpi") {
    return InvalidArgument("--tp-launch '{}' is not one of thread, process, mpi", launch.mode);
  }
  if (tp < 1) return InvalidArgument("--tp {} must be >= 1", tp);
  if (launch.mode == "thread") return Status::Ok();
  QILIN_RETURN_IF_ERROR(ParseSocketAddress(MasterOf(launch), "--tp-master").status());
  if (launch.mode == "mpi") {
    const std::optional<MpiPlace> place = MpiPlaceFromEnvironment();
    if (!place) {
      return InvalidArgument(
          "--tp-launch mpi: no rank in the environment (OMPI_COMM_WORLD_RANK, PMI_RANK or "
          "QILIN_TP_RANK); start it with `mpirun -np {} qilin ...`",
          tp > 1 ? std::to_string(tp) : std::string("N"));
    }
    if (place->world_size != tp || place->rank >= place->world_size) {
      return InvalidArgument(
          "--tp-launch mpi: mpirun started {} processes (this is rank {}) but --tp is {}; they "
          "must be equal",
          place->world_size, place->rank, tp);
    }
  }
  if (launch.join_timeout_s <= 0) {
    return InvalidArgument("tensor parallel join timeout {} s must be positive",
                           launch.join_timeout_s);
  }
  return Status::Ok();
}

bool IsMpiFollower(const TpLaunchOptions& launch) {
  if (launch.mode != "mpi") return false;
  const std::optional<MpiPlace> place = MpiPlaceFromEnvironment();
  return place && place->rank > 0;
}

Result<std::unique_ptr<Backend>> LaunchTpBackend(const std::string& device_name,
                                                 const ModelConfig& config,
                                                 const TpModelSource& source, int tp,
                                                 const TpLaunchOptions& launch) {
  QILIN_RETURN_IF_ERROR(CheckTpLaunch(launch, tp));
  const std::string device = ResolveDevice(device_name);
  if (launch.mode == "thread" || tp == 1) {
    if (source.dummy_weights) {
      return MakeDummyTpBackend(device, config, source.dtype, source.seed, tp);
    }
    QILIN_ASSIGN_OR_RETURN(ModelWeights weights, LoadModelWeights(config, source.model_dir));
    return MakeTpBackend(device, config, std::move(weights), tp);
  }
  QILIN_RETURN_IF_ERROR(CheckTpDevice(device, config, tp));
  QILIN_ASSIGN_OR_RETURN(SocketAddress master, ParseSocketAddress(MasterOf(launch), "--tp-master"));
  if (IsMpiFollower(launch)) {
    return FailedPrecondition("tensor parallel: rank > 0 of an mpi launch runs RunMpiFollower");
  }
  const int cuda_device =
      launch.mode == "mpi" ? MpiCudaDevice(device, *MpiPlaceFromEnvironment()) : 0;
  QILIN_ASSIGN_OR_RETURN(std::unique_ptr<SocketCommListener> listener,
                         SocketCommListener::Listen(master));
  spdlog::info("tensor parallel: rank 0 of {} listening on {}:{} ({} ranks)", tp, master.host,
               listener->port(), launch.mode == "mpi" ? "mpirun's" : "spawned");

  std::vector<pid_t> children;
  if (launch.mode == "process") {
    std::string binary = launch.worker_binary;
    if (binary.empty()) {
      std::error_code ec;
      binary = std::filesystem::read_symlink("/proc/self/exe", ec).string();
      if (ec) return Unavailable("tensor parallel: cannot find this executable: {}", ec.message());
    }
#ifdef QILIN_HAVE_CUDA
    const int gpus = device == "cuda" ? std::max(1, CudaDeviceCount()) : 1;
#else
    const int gpus = 1;
#endif
    for (int r = 1; r < tp; ++r) {
      std::vector<std::string> args = {
          binary,           "tp-worker",
          "--tp",           std::to_string(tp),
          "--tp-rank",      std::to_string(r),
          "--tp-master",    fmt::format("{}:{}", master.host, listener->port()),
          "--device",       device,
          "--cuda-device",  std::to_string(r % gpus),
          "--join-timeout", fmt::format("{}", launch.join_timeout_s)};
      if (source.dummy_weights) {
        args.insert(args.end(), {"--dummy-weights", "--dtype", std::string(DTypeName(source.dtype)),
                                 "--seed", std::to_string(source.seed)});
      }
      if (source.max_model_len > 0) {
        args.insert(args.end(), {"--max-model-len", std::to_string(source.max_model_len)});
      }
      args.insert(args.end(), {"--model", source.model_dir});
      Result<pid_t> pid = Spawn(args);
      if (!pid.ok()) {
        ReapChildren(children, 0);  // workers ignore SIGTERM: killed at once
        return pid.status();
      }
      children.push_back(*pid);
    }
  }
  // A spawned rank that exits before joining ends the wait with its rank and exit status.
  auto alive = [&]() -> Status {
    for (size_t i = 0; i < children.size(); ++i) {
      int status = 0;
      if (waitpid(children[i], &status, WNOHANG) == children[i]) {
        children.erase(children.begin() + static_cast<std::ptrdiff_t>(i));
        return Unavailable(
            "tensor parallel rank {} (tp-worker process) exited with {} before joining (its "
            "error is above)",
            i + 1, ExitText(status));
      }
    }
    return Status::Ok();
  };
  // Workers that joined see the group close and exit; the others are still trying to join.
  auto fail = [&](Status st) {
    ReapChildren(children, 2);
    return st;
  };
  Result<std::unique_ptr<Communicator>> comm =
      listener->Accept(tp, launch.join_timeout_s, 600, alive);
  if (!comm.ok()) return fail(comm.status());
  Result<std::unique_ptr<Backend>> lead =
      LeadGroup(device, cuda_device, config, source, std::move(comm).value());
  if (!lead.ok()) return fail(lead.status());
  spdlog::info("tensor parallel: {} ranks joined ({} processes)", tp, tp);
  if (children.empty()) return lead;
  return std::unique_ptr<Backend>(
      new ProcessGroupBackend(std::move(lead).value(), std::move(children)));
}

Status RunMpiFollower(const std::string& device_name, const TpModelSource& source, int tp,
                      const TpLaunchOptions& launch) {
  const std::optional<MpiPlace> place = MpiPlaceFromEnvironment();
  if (launch.mode != "mpi" || !place || place->rank == 0) {
    return FailedPrecondition("tensor parallel: not a following rank of an mpi launch");
  }
  const std::string master = MasterOf(launch);
  spdlog::info("tensor parallel: rank {} of {} (mpirun), following rank 0 at {}", place->rank,
               place->world_size, master);
  return RunTpWorker(device_name, MpiCudaDevice(ResolveDevice(device_name), *place), source, tp,
                     place->rank, master, launch.join_timeout_s);
}

Status RunTpWorker(const std::string& device_name, int cuda_device, const TpModelSource& source,
                   int tp, int rank, const std::string& master_text, double join_timeout_s) {
  QILIN_ASSIGN_OR_RETURN(SocketAddress master, ParseSocketAddress(master_text, "--tp-master"));
  // Ctrl-C in a terminal and mpirun's SIGTERM reach every rank: a follower lets rank 0 drain its
  // requests and shut the group down (or exits when rank 0's connection closes).
  signal(SIGINT, SIG_IGN);
  signal(SIGTERM, SIG_IGN);
  const std::string device = ResolveDevice(device_name);
  QILIN_ASSIGN_OR_RETURN(ModelConfig config, LoadModelConfig(source.model_dir));
  if (source.max_model_len > 0) config.max_model_len = source.max_model_len;
  QILIN_ASSIGN_OR_RETURN(std::unique_ptr<Communicator> comm,
                         ConnectSocketComm(master, rank, tp, join_timeout_s));
  spdlog::info("tensor parallel rank {} of {}: joined rank 0 at {}:{}", rank, tp, master.host,
               master.port);
  Result<ModelWeights> weights = MakeWeights(config, source);
  if (!weights.ok()) {
    (void)TpExchangeStatus(*comm, weights.status());
    return weights.status();
  }
#ifdef QILIN_HAVE_CUDA
  if (device == "cuda")
    return CudaTpBackend::Follow(config, *weights, std::move(comm), cuda_device);
#endif
  (void)cuda_device;
  if (device != "cpu") return InvalidArgument("unknown device '{}'", device);
  return TpCpuBackend::Follow(config, *weights, std::move(comm));
}

}  // namespace qilin
