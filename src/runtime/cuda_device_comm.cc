#include "runtime/cuda_device_comm.h"

#include <new>

#ifdef QILIN_HAVE_NCCL
#include <nccl.h>

#include "runtime/cuda_nccl_comm.h"
#endif

namespace qilin {
namespace {

Status Cuda(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return Status::Ok();
  cudaGetLastError();
  return Internal("CUDA {} (staged collective): {}", what, cudaGetErrorString(e));
}

}  // namespace

Status StagedDeviceComm::AllReduceSum(float* data, int64_t count, cudaStream_t stream) {
  if (count <= 0) return comm_->AllReduceSum(nullptr, 0);
  try {
    send_.resize(count);
  } catch (const std::bad_alloc&) {
    comm_->Abort("staged all-reduce: out of host memory");
    return ResourceExhausted("staged all-reduce of {} floats: out of host memory", count);
  }
  const size_t bytes = static_cast<size_t>(count) * sizeof(float);
  Status st = Cuda(cudaMemcpyAsync(send_.data(), data, bytes, cudaMemcpyDeviceToHost, stream),
                   "device to host");
  if (st.ok()) st = Cuda(cudaStreamSynchronize(stream), "device to host");
  if (!st.ok()) {
    comm_->Abort(st.message());
    return st;
  }
  QILIN_RETURN_IF_ERROR(comm_->AllReduceSum(send_.data(), count));
  // Pageable source: returns once the bytes are staged, so send_ may be reused at once.
  QILIN_RETURN_IF_ERROR(
      Cuda(cudaMemcpyAsync(data, send_.data(), bytes, cudaMemcpyHostToDevice, stream),
           "host to device"));
  return Cuda(cudaStreamSynchronize(stream), "host to device");
}

Status StagedDeviceComm::AllGather(const float* send, int64_t count, float* recv,
                                   cudaStream_t stream) {
  const int64_t total = count * world_size();
  try {
    send_.resize(count);
    recv_.resize(total);
  } catch (const std::bad_alloc&) {
    comm_->Abort("staged all-gather: out of host memory");
    return ResourceExhausted("staged all-gather of {} floats: out of host memory", count);
  }
  if (count > 0) {
    Status st = Cuda(
        cudaMemcpyAsync(send_.data(), send, count * sizeof(float), cudaMemcpyDeviceToHost, stream),
        "device to host");
    if (st.ok()) st = Cuda(cudaStreamSynchronize(stream), "device to host");
    if (!st.ok()) {
      comm_->Abort(st.message());
      return st;
    }
  }
  QILIN_RETURN_IF_ERROR(comm_->AllGather(send_.data(), count, recv_.data()));
  if (total == 0) return Status::Ok();
  QILIN_RETURN_IF_ERROR(Cuda(
      cudaMemcpyAsync(recv, recv_.data(), total * sizeof(float), cudaMemcpyHostToDevice, stream),
      "host to device"));
  return Cuda(cudaStreamSynchronize(stream), "host to device");
}

#ifdef QILIN_HAVE_NCCL
int NcclDeviceComm::rank() const { return comm_->rank(); }
int NcclDeviceComm::world_size() const { return comm_->world_size(); }

Status NcclDeviceComm::AllReduceSum(float* data, int64_t count, cudaStream_t stream) {
  const ncclResult_t r = ncclAllReduce(data, data, static_cast<size_t>(count), ncclFloat, ncclSum,
                                       comm_->comm(), stream);
  if (r != ncclSuccess) {
    return Internal("ncclAllReduce (rank {}): {}", comm_->rank(), ncclGetErrorString(r));
  }
  return Status::Ok();
}

Status NcclDeviceComm::AllGather(const float* send, int64_t count, float* recv,
                                 cudaStream_t stream) {
  const ncclResult_t r =
      ncclAllGather(send, recv, static_cast<size_t>(count), ncclFloat, comm_->comm(), stream);
  if (r != ncclSuccess) {
    return Internal("ncclAllGather (rank {}): {}", comm_->rank(), ncclGetErrorString(r));
  }
  return Status::Ok();
}
#endif

}  // namespace qilin
