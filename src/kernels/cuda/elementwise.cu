// Row-wise kernels: embedding gather, residual add + RMSNorm, SwiGLU, rope + KV cache write,
// random weights, KV block copies. All memory-bound: each reads and writes its rows once.
#include <cuda_bf16.h>

#include "kernels/cuda/ops.h"
#include "kernels/cuda/pdl.cuh"

namespace qilin::cuda {
namespace {

__device__ __forceinline__ float Ld(const bf16_t* p, int64_t i) {
  return __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(p)[i]);
}
__device__ __forceinline__ void St(bf16_t* p, int64_t i, float v) {
  reinterpret_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16(v);
}

__device__ __forceinline__ float WarpSum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024).
__device__ float BlockSum(float v) {
  __shared__ float part[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = WarpSum(v);
  __syncthreads();
  if (lane == 0) part[warp] = v;
  __syncthreads();
  const int warps = blockDim.x >> 5;
  float s = lane < warps ? part[lane] : 0.0f;
  return WarpSum(s);
}

// One block per row: reads dim * 2 bytes, writes dim * 4.
__global__ void EmbeddingKernel(const bf16_t* table, int64_t dim, const int32_t* ids,
                                const int32_t* previous, float* x) {
  PdlLaunchDependents();
  PdlWait();
  const int64_t row = blockIdx.x;
  int32_t id = ids[row];
  if (id < 0) id = previous ? previous[-1 - id] : 0;
  const int64_t src = static_cast<int64_t>(max(id, 0)) * dim;
  for (int64_t j = threadIdx.x; j < dim; j += blockDim.x) x[row * dim + j] = Ld(table, src + j);
}

// One block per row: reads x (4 B) and y (2 B), writes x (4 B) and out (2 B) per element.
__global__ void AddRmsNormKernel(float* x, const float* y, const int32_t* rows, int64_t dim,
                                 const bf16_t* w, float eps, bf16_t* out) {
  PdlLaunchDependents();
  PdlWait();
  const int64_t r = blockIdx.x;
  float* xr = x + (rows ? static_cast<int64_t>(rows[r]) : r) * dim;
  float ss = 0.0f;
  if (y) {
    const float* yr = y + r * dim;
    for (int64_t j = threadIdx.x; j < dim; j += blockDim.x) {
      const float v = xr[j] + yr[j];
      xr[j] = v;
      ss += v * v;
    }
  } else {
    for (int64_t j = threadIdx.x; j < dim; j += blockDim.x) ss += xr[j] * xr[j];
  }
  ss = BlockSum(ss);
  const float inv = 1.0f / sqrtf(ss / static_cast<float>(dim) + eps);
  for (int64_t j = threadIdx.x; j < dim; j += blockDim.x)
    St(out + r * dim, j, xr[j] * inv * Ld(w, j));
}

// The same for rows whose dim is a multiple of 4 (up to 16384): each thread holds V (1..4)
// float4 of the row in registers, so the row is read once with every load in flight at once (the
// loop above issues its loads one store apart: x and y may alias, so each iteration waits for
// the last) and the norm weight is loaded before the PDL wait. blockDim.x * V * 4 >= dim.
template <int V>
__global__ void AddRmsNormVecKernel(float* x, const float* y, const int32_t* rows, int64_t dim,
                                    const bf16_t* w, float eps, bf16_t* out) {
  const int64_t r = blockIdx.x;
  const int64_t q = dim / 4;  // float4 per row
  float4 wv[V];
#pragma unroll
  for (int v = 0; v < V; ++v) {
    const int64_t j = threadIdx.x + static_cast<int64_t>(v) * blockDim.x;
    if (j < q) {
      const uint2 wb = __ldg(reinterpret_cast<const uint2*>(w) + j);
      wv[v] = make_float4(__uint_as_float(wb.x << 16), __uint_as_float(wb.x & 0xffff0000u),
                          __uint_as_float(wb.y << 16), __uint_as_float(wb.y & 0xffff0000u));
    }
  }
  PdlLaunchDependents();
  PdlWait();
  float4* xr = reinterpret_cast<float4*>(x + (rows ? static_cast<int64_t>(rows[r]) : r) * dim);
  const float4* yr = y ? reinterpret_cast<const float4*>(y + r * dim) : nullptr;
  float4 xv[V], yv[V];
#pragma unroll
  for (int v = 0; v < V; ++v) {
    const int64_t j = threadIdx.x + static_cast<int64_t>(v) * blockDim.x;
    if (j < q) {
      xv[v] = xr[j];
      yv[v] = yr ? yr[j] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
  }
  float ss = 0.0f;
#pragma unroll
  for (int v = 0; v < V; ++v) {
    const int64_t j = threadIdx.x + static_cast<int64_t>(v) * blockDim.x;
    if (j < q) {
      if (yr) {
        xv[v].x += yv[v].x;
        xv[v].y += yv[v].y;
        xv[v].z += yv[v].z;
        xv[v].w += yv[v].w;
        xr[j] = xv[v];
      }
      ss += xv[v].x * xv[v].x + xv[v].y * xv[v].y + xv[v].z * xv[v].z + xv[v].w * xv[v].w;
    }
  }
  ss = BlockSum(ss);
  const float inv = 1.0f / sqrtf(ss / static_cast<float>(dim) + eps);
  uint2* o = reinterpret_cast<uint2*>(out + r * dim);
#pragma unroll
  for (int v = 0; v < V; ++v) {
    const int64_t j = threadIdx.x + static_cast<int64_t>(v) * blockDim.x;
    if (j < q) {
      const __nv_bfloat162 lo =
          __floats2bfloat162_rn(xv[v].x * inv * wv[v].x, xv[v].y * inv * wv[v].y);
      const __nv_bfloat162 hi =
          __floats2bfloat162_rn(xv[v].z * inv * wv[v].z, xv[v].w * inv * wv[v].w);
      uint2 u;
      u.x = *reinterpret_cast<const uint32_t*>(&lo);
      u.y = *reinterpret_cast<const uint32_t*>(&hi);
      o[j] = u;
    }
  }
}

__global__ void SiluMulKernel(const float* gu, int64_t n, int64_t inter, bf16_t* out) {
  const int64_t total = n * inter;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / inter, j = i - r * inter;
    const float g = gu[r * 2 * inter + j], u = gu[r * 2 * inter + inter + j];
    St(out, i, g / (1.0f + expf(-g)) * u);
  }
}

// Rows on blockIdx.y, 4 columns per thread: 16-byte loads of gate and up, an 8-byte store, no
// index division (the scalar kernel above ran at half the copy bandwidth on its divisions).
__global__ void SiluMul4Kernel(const float* gu, int64_t inter, bf16_t* out) {
  const int64_t r = blockIdx.y;
  const int64_t j = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * 4;
  if (j >= inter) return;
  const float4 g = *reinterpret_cast<const float4*>(gu + r * 2 * inter + j);
  const float4 u = *reinterpret_cast<const float4*>(gu + r * 2 * inter + inter + j);
  auto f = [](float a, float b) { return a / (1.0f + expf(-a)) * b; };
  __nv_bfloat162 lo = __floats2bfloat162_rn(f(g.x, u.x), f(g.y, u.y));
  __nv_bfloat162 hi = __floats2bfloat162_rn(f(g.z, u.z), f(g.w, u.w));
  uint2 v;
  v.x = *reinterpret_cast<uint32_t*>(&lo);
  v.y = *reinterpret_cast<uint32_t*>(&hi);
  *reinterpret_cast<uint2*>(out + r * inter + j) = v;
}

__device__ __forceinline__ float Silu(float g) { return g / (1.0f + expf(-g)); }

// bf16 gate|up: rows on blockIdx.y, 8 columns per thread: 16-byte loads of gate and up, a 16-byte
// store (6 bytes per output against the f32 kernels' 10).
__global__ void SiluMulBf16x8Kernel(const bf16_t* gu, int64_t inter, bf16_t* out) {
  const int64_t r = blockIdx.y;
  const int64_t j = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * 8;
  if (j >= inter) return;
  const uint4 g = *reinterpret_cast<const uint4*>(gu + r * 2 * inter + j);
  const uint4 u = *reinterpret_cast<const uint4*>(gu + r * 2 * inter + inter + j);
  const auto* g2 = reinterpret_cast<const __nv_bfloat162*>(&g);
  const auto* u2 = reinterpret_cast<const __nv_bfloat162*>(&u);
  uint4 v;
  auto* v2 = reinterpret_cast<__nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 gf = __bfloat1622float2(g2[i]), uf = __bfloat1622float2(u2[i]);
    v2[i] = __floats2bfloat162_rn(Silu(gf.x) * uf.x, Silu(gf.y) * uf.y);
  }
  *reinterpret_cast<uint4*>(out + r * inter + j) = v;
}

__global__ void SiluMulBf16Kernel(const bf16_t* gu, int64_t n, int64_t inter, bf16_t* out) {
  const int64_t total = n * inter;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / inter, j = i - r * inter;
    St(out, i, Silu(Ld(gu, r * 2 * inter + j)) * Ld(gu, r * 2 * inter + inter + j));
  }
}

// Grid (token, group of kRopeWarps heads), one warp per head (q heads, then k heads, then v
// heads). The block first puts the token's cos/sin of every frequency (double sincos, as the CPU
// reference) in shared memory, before the PDL wait: positions and rope tables are step inputs,
// not outputs of the previous kernel. Then each warp rotates its head.
constexpr int kRopeWarps = 8;
__global__ void __launch_bounds__(kRopeWarps * 32)
    RopeWriteKvKernel(const float* qkv, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                      const bf16_t* q_norm, const bf16_t* k_norm, float eps, RopeArgs rope,
                      const int64_t* slot_mapping, bf16_t* q_out, bf16_t* k_cache,
                      bf16_t* v_cache) {
  extern __shared__ float rope_cs[];  // [half] cos, then [half] sin, both times attn_scale
  PdlLaunchDependents();
  const int64_t t = blockIdx.x;
  const int64_t half = head_dim / 2;
  {
    const int32_t table = rope.table_of[t];
    const float* inv_freq = rope.inv_freq + static_cast<int64_t>(table) * half;
    const float attn_scale = rope.attn_scale[table];
    const float pos = static_cast<float>(rope.positions[t]);
    for (int64_t i = threadIdx.x; i < half; i += blockDim.x) {
      const float angle = pos * inv_freq[i];
      double sn, cs;
      sincos(static_cast<double>(angle), &sn, &cs);
      rope_cs[i] = static_cast<float>(cs) * attn_scale;
      rope_cs[half + i] = static_cast<float>(sn) * attn_scale;
    }
  }
  __syncthreads();
  PdlWait();
  const int lane = threadIdx.x & 31;
  const int64_t h = static_cast<int64_t>(blockIdx.y) * kRopeWarps + (threadIdx.x >> 5);
  if (h >= num_heads + 2 * num_kv_heads) return;
  const int64_t row = (num_heads + 2 * num_kv_heads) * head_dim;
  const int64_t kv_size = num_kv_heads * head_dim;
  const int64_t slot = slot_mapping[t];
  const float* src = qkv + t * row + h * head_dim;
  if (h >= num_heads + num_kv_heads) {  // v: copy into the cache
    bf16_t* dst = v_cache + slot * kv_size + (h - num_heads - num_kv_heads) * head_dim;
    for (int64_t i = lane; i < head_dim; i += 32) St(dst, i, src[i]);
    return;
  }
  const bool is_q = h < num_heads;
  const bf16_t* norm = is_q ? q_norm : k_norm;
  float inv = 1.0f;
  if (norm) {
    float ss = 0.0f;
    for (int64_t i = lane; i < head_dim; i += 32) ss += src[i] * src[i];
    ss = WarpSum(ss);
    inv = 1.0f / sqrtf(ss / static_cast<float>(head_dim) + eps);
  }
  bf16_t* dst = is_q ? q_out + t * num_heads * head_dim + h * head_dim
                     : k_cache + slot * kv_size + (h - num_heads) * head_dim;
  const float scale = is_q && rope.logn ? rope.logn[t] : 1.0f;
  for (int64_t i = lane; i < half; i += 32) {
    float a = src[i], b = src[i + half];
    if (norm) {
      a = a * inv * Ld(norm, i);
      b = b * inv * Ld(norm, i + half);
    }
    const float cs = rope_cs[i], sn = rope_cs[half + i];
    St(dst, i, (a * cs - b * sn) * scale);
    St(dst, i + half, (b * cs + a * sn) * scale);
  }
}

__device__ __forceinline__ uint64_t SplitMix(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

template <typename T>
__global__ void FillRandomKernel(T* dst, int64_t n, uint64_t seed, float mean, float stdev) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint64_t h = SplitMix(seed * 0x2545f4914f6cdd1dull ^ SplitMix(static_cast<uint64_t>(i)));
    // Box-Muller from two 24-bit uniforms in (0, 1].
    const float u1 = (static_cast<float>(h & 0xffffff) + 1.0f) * (1.0f / 16777216.0f);
    const float u2 = static_cast<float>((h >> 24) & 0xffffff) * (1.0f / 16777216.0f);
    const float z = sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2);
    if constexpr (sizeof(T) == 4) {
      dst[i] = mean + stdev * z;
    } else {
      St(dst, i, mean + stdev * z);
    }
  }
}

__global__ void CopyBlocksKernel(bf16_t* cache, const int2* pairs, int64_t block_elems) {
  const int2 p = pairs[blockIdx.y];
  const bf16_t* src = cache + static_cast<int64_t>(p.x) * block_elems;
  bf16_t* dst = cache + static_cast<int64_t>(p.y) * block_elems;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < block_elems;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    dst[i] = src[i];
}

int GridFor(int64_t total, int threads) {
  const int64_t blocks = (total + threads - 1) / threads;
  return static_cast<int>(blocks < 132 * 16 ? (blocks > 0 ? blocks : 1) : 132 * 16);
}

}  // namespace

cudaError_t EmbeddingGather(const bf16_t* table, int64_t dim, const int32_t* ids, int64_t n,
                            float* x, cudaStream_t stream, const int32_t* previous) {
  if (n == 0) return cudaSuccess;
  return LaunchPdl(EmbeddingKernel, dim3(static_cast<unsigned>(n)), dim3(256), 0, stream, table,
                   dim, ids, previous, x);
}

cudaError_t AddRmsNorm(float* x, const float* y, const int32_t* rows, int64_t n, int64_t dim,
                       const bf16_t* w, float eps, bf16_t* out, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const bool aligned = ((reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(y) |
                         reinterpret_cast<uintptr_t>(out)) &
                        15) == 0 &&
                       (reinterpret_cast<uintptr_t>(w) & 7) == 0;
  if (dim % 4 == 0 && dim <= 4 * 1024 * 4 && aligned) {
    const int64_t q = dim / 4;
    const int v = static_cast<int>((q + 1023) / 1024);  // float4 per thread: 1..4
    const int t = static_cast<int>(((q + v - 1) / v + 31) / 32 * 32);
    const dim3 grid(static_cast<unsigned>(n)), block(t);
    switch (v) {
      case 1:
        return LaunchPdl(AddRmsNormVecKernel<1>, grid, block, 0, stream, x, y, rows, dim, w, eps,
                         out);
      case 2:
        return LaunchPdl(AddRmsNormVecKernel<2>, grid, block, 0, stream, x, y, rows, dim, w, eps,
                         out);
      case 3:
        return LaunchPdl(AddRmsNormVecKernel<3>, grid, block, 0, stream, x, y, rows, dim, w, eps,
                         out);
      default:
        return LaunchPdl(AddRmsNormVecKernel<4>, grid, block, 0, stream, x, y, rows, dim, w, eps,
                         out);
    }
  }
  const int threads = dim >= 4096 ? 1024 : dim >= 1024 ? 512 : 128;
  return LaunchPdl(AddRmsNormKernel, dim3(static_cast<unsigned>(n)), dim3(threads), 0, stream, x, y,
                   rows, dim, w, eps, out);
}

cudaError_t SiluMul(const float* gu, int64_t n, int64_t inter, bf16_t* out, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const bool aligned =
      ((reinterpret_cast<uintptr_t>(gu) & 15) | (reinterpret_cast<uintptr_t>(out) & 7)) == 0;
  if (inter % 4 == 0 && n <= 65535 && aligned) {
    const dim3 grid(static_cast<unsigned>((inter / 4 + 255) / 256), static_cast<unsigned>(n));
    SiluMul4Kernel<<<grid, 256, 0, stream>>>(gu, inter, out);
    return cudaGetLastError();
  }
  SiluMulKernel<<<GridFor(n * inter, 256), 256, 0, stream>>>(gu, n, inter, out);
  return cudaGetLastError();
}

cudaError_t SiluMul(const bf16_t* gu, int64_t n, int64_t inter, bf16_t* out, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const bool aligned =
      ((reinterpret_cast<uintptr_t>(gu) | reinterpret_cast<uintptr_t>(out)) & 15) == 0;
  if (inter % 8 == 0 && n <= 65535 && aligned) {
    const dim3 grid(static_cast<unsigned>((inter / 8 + 127) / 128), static_cast<unsigned>(n));
    SiluMulBf16x8Kernel<<<grid, 128, 0, stream>>>(gu, inter, out);
    return cudaGetLastError();
  }
  SiluMulBf16Kernel<<<GridFor(n * inter, 256), 256, 0, stream>>>(gu, n, inter, out);
  return cudaGetLastError();
}

cudaError_t RopeWriteKv(const float* qkv, int64_t n, int64_t num_heads, int64_t num_kv_heads,
                        int64_t head_dim, const bf16_t* q_norm, const bf16_t* k_norm, float eps,
                        const RopeArgs& rope, const int64_t* slot_mapping, bf16_t* q_out,
                        bf16_t* k_cache, bf16_t* v_cache, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int64_t heads = num_heads + 2 * num_kv_heads;
  const dim3 grid(static_cast<unsigned>(n),
                  static_cast<unsigned>((heads + kRopeWarps - 1) / kRopeWarps));
  return LaunchPdl(RopeWriteKvKernel, grid, dim3(kRopeWarps * 32), head_dim * sizeof(float), stream,
                   qkv, num_heads, num_kv_heads, head_dim, q_norm, k_norm, eps, rope, slot_mapping,
                   q_out, k_cache, v_cache);
}

cudaError_t FillRandomBf16(bf16_t* dst, int64_t n, uint64_t seed, float mean, float stdev,
                           cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  FillRandomKernel<bf16_t><<<GridFor(n, 256), 256, 0, stream>>>(dst, n, seed, mean, stdev);
  return cudaGetLastError();
}

cudaError_t FillRandomF32(float* dst, int64_t n, uint64_t seed, float mean, float stdev,
                          cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  FillRandomKernel<float><<<GridFor(n, 256), 256, 0, stream>>>(dst, n, seed, mean, stdev);
  return cudaGetLastError();
}

cudaError_t CopyBlocks(bf16_t* cache, const int2* pairs, int32_t count, int64_t block_elems,
                       cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  dim3 grid(static_cast<unsigned>((block_elems + 255) / 256 < 64 ? (block_elems + 255) / 256 : 64),
            count);
  CopyBlocksKernel<<<grid, 256, 0, stream>>>(cache, pairs, block_elems);
  return cudaGetLastError();
}

}  // namespace qilin::cuda
