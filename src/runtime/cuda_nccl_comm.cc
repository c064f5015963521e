#include "runtime/cuda_nccl_comm.h"

#include <cstring>

namespace qilin {
namespace {

Status CudaCheck(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return Status::Ok();
  return Internal("{}: CUDA error {} ({})", what, cudaGetErrorName(e), cudaGetErrorString(e));
}

bool IsDevicePointer(const void* p) {
  cudaPointerAttributes attr{};
  if (cudaPointerGetAttributes(&attr, p) != cudaSuccess) {
    (void)cudaGetLastError();  // clear the sticky-free error of an unknown pointer
    return false;
  }
  return attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged;
}

}  // namespace

Result<std::string> NcclUniqueId() {
  ncclUniqueId id;
  const ncclResult_t r = ncclGetUniqueId(&id);
  if (r != ncclSuccess) {
    return Internal("ncclGetUniqueId: {} ({})", ncclGetErrorString(r), ncclGetLastError(nullptr));
  }
  return std::string(id.internal, sizeof(id.internal));
}

Result<std::unique_ptr<NcclCommunicator>> NcclCommunicator::Create(int world_size, int rank,
                                                                   const std::string& unique_id,
                                                                   int device, bool synchronous) {
  if (world_size < 1) return InvalidArgument("NCCL: world size {} must be >= 1", world_size);
  if (rank < 0 || rank >= world_size) {
    return InvalidArgument("NCCL: rank {} is outside [0, {})", rank, world_size);
  }
  ncclUniqueId id;
  if (unique_id.size() != sizeof(id.internal)) {
    return InvalidArgument("NCCL: unique id has {} bytes, expected {}", unique_id.size(),
                           sizeof(id.internal));
  }
  std::memcpy(id.internal, unique_id.data(), sizeof(id.internal));
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess) devices = 0;
  if (device < 0 || device >= devices) {
    return InvalidArgument("NCCL: CUDA device {} is outside the {} visible devices", device,
                           devices);
  }
  std::unique_ptr<NcclCommunicator> c(new NcclCommunicator());
  c->world_size_ = world_size;
  c->rank_ = rank;
  c->device_ = device;
  c->synchronous_ = synchronous;
  QILIN_RETURN_IF_ERROR(CudaCheck(cudaSetDevice(device), "NCCL: cudaSetDevice"));
  QILIN_RETURN_IF_ERROR(
      CudaCheck(cudaStreamCreateWithFlags(&c->stream_, cudaStreamNonBlocking), "NCCL: stream"));
  c->staging_bytes_ = 1 << 20;
  QILIN_RETURN_IF_ERROR(
      CudaCheck(cudaMalloc(&c->staging_, c->staging_bytes_), "NCCL: staging buffer"));
  const ncclResult_t r = ncclCommInitRank(&c->comm_, world_size, id, rank);
  if (r != ncclSuccess) {
    c->comm_ = nullptr;
    return Internal("ncclCommInitRank (rank {} of {}, device {}): {} ({})", rank, world_size,
                    device, ncclGetErrorString(r), ncclGetLastError(nullptr));
  }
  return c;
}

NcclCommunicator::~NcclCommunicator() {
  if (comm_ != nullptr) {
    if (aborted_) {
      (void)ncclCommAbort(comm_);
    } else {
      (void)ncclCommDestroy(comm_);
    }
  }
  if (staging_ != nullptr) (void)cudaFree(staging_);
  if (stream_ != nullptr) (void)cudaStreamDestroy(stream_);
}

Status NcclCommunicator::Check(ncclResult_t r, const char* what) const {
  if (r == ncclSuccess) return Status::Ok();
  return Internal("{} (NCCL rank {} of {}): {} ({})", what, rank_, world_size_,
                  ncclGetErrorString(r), ncclGetLastError(comm_));
}

Status NcclCommunicator::Finish(const char* what) {
  if (!synchronous_) return Status::Ok();
  return CudaCheck(cudaStreamSynchronize(stream_), what);
}

Status NcclCommunicator::AllReduceSum(float* data, int64_t count) {
  if (aborted_) return Status(StatusCode::kCancelled, "NCCL group aborted: " + abort_reason_);
  if (count < 0) return InvalidArgument("AllReduceSum: count = {} is negative", count);
  if (count == 0) return Status::Ok();
  QILIN_RETURN_IF_ERROR(CudaCheck(cudaSetDevice(device_), "AllReduceSum: cudaSetDevice"));
  QILIN_RETURN_IF_ERROR(Check(
      ncclAllReduce(data, data, static_cast<size_t>(count), ncclFloat, ncclSum, comm_, stream_),
      "ncclAllReduce"));
  return Finish("AllReduceSum");
}

Status NcclCommunicator::AllGather(const float* send, int64_t count, float* recv) {
  if (aborted_) return Status(StatusCode::kCancelled, "NCCL group aborted: " + abort_reason_);
  if (count < 0) return InvalidArgument("AllGather: count = {} is negative", count);
  if (count == 0) return Status::Ok();
  QILIN_RETURN_IF_ERROR(CudaCheck(cudaSetDevice(device_), "AllGather: cudaSetDevice"));
  QILIN_RETURN_IF_ERROR(
      Check(ncclAllGather(send, recv, static_cast<size_t>(count), ncclFloat, comm_, stream_),
            "ncclAllGather"));
  return Finish("AllGather");
}

Status NcclCommunicator::Broadcast(void* data, int64_t bytes, int root) {
  if (aborted_) return Status(StatusCode::kCancelled, "NCCL group aborted: " + abort_reason_);
  if (bytes < 0) return InvalidArgument("Broadcast: bytes = {} is negative", bytes);
  if (root < 0 || root >= world_size_) {
    return InvalidArgument("Broadcast: root {} is outside [0, {})", root, world_size_);
  }
  if (bytes == 0) return Status::Ok();
  QILIN_RETURN_IF_ERROR(CudaCheck(cudaSetDevice(device_), "Broadcast: cudaSetDevice"));
  if (IsDevicePointer(data)) {
    QILIN_RETURN_IF_ERROR(Check(
        ncclBroadcast(data, data, static_cast<size_t>(bytes), ncclUint8, root, comm_, stream_),
        "ncclBroadcast"));
    return Finish("Broadcast");
  }
  // Host memory: through the staging buffer (grown to fit; every rank passes the same size).
  if (static_cast<size_t>(bytes) > staging_bytes_) {
    QILIN_RETURN_IF_ERROR(CudaCheck(cudaStreamSynchronize(stream_), "Broadcast"));
    QILIN_RETURN_IF_ERROR(CudaCheck(cudaFree(staging_), "Broadcast: cudaFree"));
    staging_ = nullptr;
    staging_bytes_ = 0;
    QILIN_RETURN_IF_ERROR(CudaCheck(cudaMalloc(&staging_, bytes), "Broadcast: staging buffer"));
    staging_bytes_ = static_cast<size_t>(bytes);
  }
  if (rank_ == root) {
    QILIN_RETURN_IF_ERROR(CudaCheck(
        cudaMemcpyAsync(staging_, data, bytes, cudaMemcpyHostToDevice, stream_), "Broadcast"));
  }
  QILIN_RETURN_IF_ERROR(Check(ncclBroadcast(staging_, staging_, static_cast<size_t>(bytes),
                                            ncclUint8, root, comm_, stream_),
                              "ncclBroadcast"));
  if (rank_ != root) {
    QILIN_RETURN_IF_ERROR(CudaCheck(
        cudaMemcpyAsync(data, staging_, bytes, cudaMemcpyDeviceToHost, stream_), "Broadcast"));
  }
  // The host buffer is read or written by the stream: always wait.
  return CudaCheck(cudaStreamSynchronize(stream_), "Broadcast");
}

Status NcclCommunicator::Barrier() {
  if (aborted_) return Status(StatusCode::kCancelled, "NCCL group aborted: " + abort_reason_);
  QILIN_RETURN_IF_ERROR(CudaCheck(cudaSetDevice(device_), "Barrier: cudaSetDevice"));
  QILIN_RETURN_IF_ERROR(
      Check(ncclAllReduce(staging_, staging_, 1, ncclFloat, ncclSum, comm_, stream_),
            "Barrier (ncclAllReduce)"));
  return CudaCheck(cudaStreamSynchronize(stream_), "Barrier");
}

void NcclCommunicator::Abort(const std::string& why) {
  if (aborted_) return;
  aborted_ = true;
  abort_reason_ = why;
  // Frees this rank's side at once, even with operations pending. NCCL gives the other ranks no
  // notice: whoever launched them (a thread group, mpirun) must abort them as well.
  if (comm_ != nullptr) {
    (void)ncclCommAbort(comm_);
    comm_ = nullptr;
  }
}

}  // namespace qilin
