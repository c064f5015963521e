// Programmatic dependent launch (Hopper, sm_90+): a kernel launched with LaunchPdl may start
// while the kernel before it in the stream is still running. The contract for such a kernel:
//   - PdlLaunchDependents() early lets the next PDL kernel be scheduled once every block of this
//     one has started (or exited);
//   - PdlWait() blocks until the previous kernel has finished and its writes are visible. Before
//     it a kernel may only read what no earlier kernel of the step writes (weights), and must not
//     write anything at all: the previous kernel may still be reading or writing it.
// The decode step's small kernels (embedding, norms, rope, decode attention and its combine) are
// launched so; the skinny GEMMs are not (gemv.cu says why) but wait all the same. Measured on an
// H200 (docs/performance.md): neutral at batch 1, within noise at batch 64.
// QILIN_PDL=0 in the environment turns it off (A/B benchmarks); devices below sm_90 never use it.
#pragma once

#include <cuda_runtime.h>

#include <utility>

namespace qilin::cuda {

// Whether LaunchPdl sets the attribute on the current device (cached per device).
bool PdlEnabled();
// Tests and benchmarks: 1 forces PDL on (where the device has it), 0 off, -1 back to QILIN_PDL.
// Captured CUDA graphs keep the setting they were captured with.
void SetPdlOverride(int on);

__device__ __forceinline__ void PdlWait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void PdlLaunchDependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// kernel<<<grid, block, smem, stream>>>(args...) with programmatic stream serialization allowed
// when PdlEnabled(). Every kernel launched so must call PdlWait() before touching activations.
template <typename... Params, typename... Args>
cudaError_t LaunchPdl(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                      cudaStream_t stream, Args&&... args) {
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = PdlEnabled() ? 1 : 0;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}

}  // namespace qilin::cuda
