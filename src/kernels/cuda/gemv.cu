// Skinny GEMMs for decode steps (n <= kGemvMaxRows tokens): y[n, out] = x[n, in] * W[out, in]^T.
// Bound by reading W once: out * in * 2 bytes at copy bandwidth (Qwen2.5-7B down_proj: 136 MB,
// 45 us at 3 TB/s). One warp per output row streams the row in 16-byte loads that bypass L1,
// kUnroll (kUnrollLong for rows of >= 8192 inputs) of them in flight per lane; the x rows (n * in *
// 2 bytes, a few KB, L1/L2-resident) are read beside them. f32 accumulation in a fixed order per
// lane, then a warp tree: the result of a token does not depend on the other tokens of the step.
#include <cuda_bf16.h>

#include "kernels/cuda/ops.h"
#include "kernels/cuda/pdl.cuh"
#include "kernels/cuda/ptx.cuh"

namespace qilin::cuda {
namespace {

constexpr int kWarps = 4;       // warps (output rows) per block: ~7 blocks per SM for 3584 rows
constexpr int kUnroll = 4;      // 16-byte weight loads in flight per lane and weight row
constexpr int kUnrollLong = 8;  // the same for long rows (in >= 8192, no SwiGLU)

__device__ __forceinline__ float Lo(uint32_t u) { return __uint_as_float(u << 16); }
__device__ __forceinline__ float Hi(uint32_t u) { return __uint_as_float(u & 0xffff0000u); }

__device__ __forceinline__ float Dot2(uint32_t w, uint32_t x, float acc) {
  return fmaf(Hi(w), Hi(x), fmaf(Lo(w), Lo(x), acc));
}
__device__ __forceinline__ float Dot8(const uint4& w, const uint4& x, float acc) {
  return Dot2(w.w, x.w, Dot2(w.z, x.z, Dot2(w.y, x.y, Dot2(w.x, x.x, acc))));
}

__device__ __forceinline__ float WarpSum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

struct GemvParams {
  const bf16_t* x;   // [n, in]
  const bf16_t* w;   // [rows (x2 for SwiGLU), in]
  const void* bias;  // [rows] of y's type, or null (not with SwiGLU)
  void* y;           // [n, rows]
  int64_t in;        // multiple of 8
  int64_t rows;      // outputs per token (inter for SwiGLU)
  bool y_f32;
};

// N tokens; kSwiGlu: the warp of output j reads gate row j and up row rows + j and writes
// bf16(silu(gate) * up).
template <int N, bool kSwiGlu, int U>
__global__ void __launch_bounds__(kWarps * 32) GemvKernel(GemvParams p) {
  constexpr int R = kSwiGlu ? 2 : 1;
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (row >= p.rows) return;
  const int64_t chunks = p.in / 8;
  const uint4* xr = reinterpret_cast<const uint4*>(p.x);
  const uint4* wr[R];
  wr[0] = reinterpret_cast<const uint4*>(p.w) + row * chunks;
  if constexpr (kSwiGlu) wr[R - 1] = reinterpret_cast<const uint4*>(p.w) + (p.rows + row) * chunks;
  float acc[R][N];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int t = 0; t < N; ++t) acc[r][t] = 0.0f;
  // One full step of U loads per lane and weight row, the dots of all N tokens.
  auto dots = [&](const uint4(&wv)[R][U], int64_t c) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int t = 0; t < N; ++t) {
        const uint4 xv = __ldg(xr + t * chunks + c + 32 * u);
#pragma unroll
        for (int r = 0; r < R; ++r) acc[r][t] = Dot8(wv[r][u], xv, acc[r][t]);
      }
    }
  };
  auto load = [&](uint4(&wv)[R][U], int64_t c) {
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int u = 0; u < U; ++u) wv[r][u] = LoadStream(wr[r] + c + 32 * u);
  };
  int64_t c = lane;
  // The first step's weights are loaded before waiting for the kernel that writes x: under a PDL
  // launch they would overlap its tail; LaunchGemv launches plainly (see there), so the wait
  // returns at once and the trigger only lets the next (PDL-launched) kernel be scheduled early.
  if (c + 32 * (U - 1) < chunks) {
    uint4 wv[R][U];
    load(wv, c);
    PdlLaunchDependents();
    PdlWait();
    dots(wv, c);
    c += 32 * U;
  } else {
    PdlLaunchDependents();
    PdlWait();
  }
  for (; c + 32 * (U - 1) < chunks; c += 32 * U) {
    uint4 wv[R][U];
    load(wv, c);
    dots(wv, c);
  }
  for (; c < chunks; c += 32) {
    uint4 wv[R];
#pragma unroll
    for (int r = 0; r < R; ++r) wv[r] = LoadStream(wr[r] + c);
#pragma unroll
    for (int t = 0; t < N; ++t) {
      const uint4 xv = __ldg(xr + t * chunks + c);
#pragma unroll
      for (int r = 0; r < R; ++r) acc[r][t] = Dot8(wv[r], xv, acc[r][t]);
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int t = 0; t < N; ++t) acc[r][t] = WarpSum(acc[r][t]);
#pragma unroll
  for (int t = 0; t < N; ++t) {
    if (lane != t) continue;
    const int64_t o = t * p.rows + row;
    if constexpr (kSwiGlu) {
      const float g = acc[0][t], u = acc[R - 1][t];
      reinterpret_cast<__nv_bfloat16*>(p.y)[o] = __float2bfloat16(g / (1.0f + expf(-g)) * u);
    } else if (p.y_f32) {
      const float b = p.bias ? static_cast<const float*>(p.bias)[row] : 0.0f;
      static_cast<float*>(p.y)[o] = acc[0][t] + b;
    } else {
      const float b =
          p.bias ? __bfloat162float(static_cast<const __nv_bfloat16*>(p.bias)[row]) : 0.0f;
      reinterpret_cast<__nv_bfloat16*>(p.y)[o] = __float2bfloat16(acc[0][t] + b);
    }
  }
}

template <bool kSwiGlu>
cudaError_t LaunchGemv(int64_t n, const GemvParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((p.rows + kWarps - 1) / kWarps));
  // Long rows (down_proj's 18944 inputs) keep 8 loads in flight per lane: 41.0 -> 35.0 us on an
  // H200. Shorter rows stay at 4 (8 would leave them a serial tail of single loads).
  const bool long_rows = !kSwiGlu && p.in >= 8192;
  // A plain launch, not LaunchPdl: launched early, a one-wave GEMM's blocks land on whichever SMs
  // the previous kernel freed first and finish unevenly (H200, batch-1 decode: 235 tok/s plain,
  // 225-231 with PDL). The kernel still waits (a no-op here) so that either launch is correct.
  switch (n) {
#define QILIN_GEMV_CASE(N)                                                      \
  case N:                                                                       \
    if (long_rows) {                                                            \
      GemvKernel<N, kSwiGlu, kUnrollLong><<<grid, kWarps * 32, 0, stream>>>(p); \
    } else {                                                                    \
      GemvKernel<N, kSwiGlu, kUnroll><<<grid, kWarps * 32, 0, stream>>>(p);     \
    }                                                                           \
    break;
    QILIN_GEMV_CASE(1)
    QILIN_GEMV_CASE(2)
    QILIN_GEMV_CASE(3)
    QILIN_GEMV_CASE(4)
    QILIN_GEMV_CASE(5)
    QILIN_GEMV_CASE(6)
    QILIN_GEMV_CASE(7)
    QILIN_GEMV_CASE(8)
#undef QILIN_GEMV_CASE
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace

bool GemvSupported(int64_t n, int64_t in, const void* x, const void* w) {
  return n >= 1 && n <= kGemvMaxRows && in % 8 == 0 && in > 0 &&
         ((reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(w)) & 15) == 0;
}

cudaError_t Gemv(const bf16_t* x, int64_t n, int64_t in, const bf16_t* w, int64_t out,
                 const void* bias, void* y, bool y_f32, cudaStream_t stream) {
  if (!GemvSupported(n, in, x, w) || out <= 0) return cudaErrorInvalidValue;
  return LaunchGemv<false>(n, GemvParams{x, w, bias, y, in, out, y_f32}, stream);
}

cudaError_t GemvSwiGlu(const bf16_t* x, int64_t n, int64_t in, const bf16_t* w_gate_up,
                       int64_t inter, bf16_t* out, cudaStream_t stream) {
  if (!GemvSupported(n, in, x, w_gate_up) || inter <= 0) return cudaErrorInvalidValue;
  return LaunchGemv<true>(n, GemvParams{x, w_gate_up, nullptr, out, in, inter, false}, stream);
}

}  // namespace qilin::cuda
