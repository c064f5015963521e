// Paged attention over the bf16 KV cache: a split-KV decode kernel on CUDA cores (GQA heads share
// each K/V tile in shared memory) and a tensor-core flash-attention kernel for prefill tiles.
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>

#include "kernels/cuda/ops.h"
#include "kernels/cuda/pdl.cuh"
#include "kernels/cuda/ptx.cuh"

namespace qilin::cuda {
namespace {

constexpr int kDecodeTile = 32;  // keys per shared-memory tile (one per lane)
constexpr int kDecodeWarps = 4;
constexpr int kMaxHeadsPerWarp = 4;  // group size up to 16
constexpr int kMaxDPerLane = 8;      // head_dim up to 256
constexpr int kStageLoads = 4;       // 16-byte K and V loads in flight per thread (decode)

// Keys per split of a context of `ctx` keys: ctx / kMaxSplits rounded up to whole 32-key tiles
// (one tile per split up to 512 keys), and at least ctx / `target` (the tensor-core kernel's
// launcher lowers `target` when the batch alone fills the GPU); a context of at most
// `single_keys` keys is one split (the launcher sets it when the batch alone has a block per SM).
__host__ __device__ inline int32_t Partition(int32_t ctx, int32_t target = kMaxSplits,
                                             int32_t single_keys = 0) {
  if (ctx <= single_keys) return ctx > 32 ? (ctx + 31) / 32 * 32 : 32;
  const int32_t per = (ctx + kMaxSplits - 1) / kMaxSplits;
  const int32_t want = (ctx + target - 1) / target;
  const int32_t rounded = ((per > want ? per : want) + 31) / 32 * 32;
  return rounded > 32 ? rounded : 32;
}

__device__ __forceinline__ float Bf(const bf16_t* p, int64_t i) {
  return __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(p)[i]);
}

__device__ __forceinline__ int64_t SlotOf(const AttnBatch& b, int32_t seq, int32_t pos) {
  const int32_t block =
      b.block_tables[static_cast<int64_t>(seq) * b.table_stride + pos / b.block_size];
  return static_cast<int64_t>(block) * b.block_size + pos % b.block_size;
}

// Block (token, kv head, split): reads its split's K/V once (2 * keys * head_dim * 2 bytes) for
// all `group` query heads.
__global__ void __launch_bounds__(kDecodeWarps * 32)
    DecodeKernel(const bf16_t* q, const bf16_t* k_cache, const bf16_t* v_cache, AttnBatch b,
                 const int32_t* tokens, int num_heads, int num_kv_heads, int head_dim, float scale,
                 float* partial, bf16_t* out) {
  PdlLaunchDependents();
  PdlWait();
  extern __shared__ float smem[];
  const int idx = blockIdx.x, kvh = blockIdx.y, split = blockIdx.z;
  const int32_t t = tokens[idx];
  const int32_t ctx = b.positions[t] + 1;
  const int32_t part = Partition(ctx);
  const int32_t nsplit = (ctx + part - 1) / part;
  if (split >= nsplit) return;
  const int32_t start = split * part, end = min(ctx, start + part);
  const int32_t seq = b.seq_of[t];
  const int group = num_heads / num_kv_heads;
  const int D = head_dim, Dp = head_dim + 2;
  const int64_t kv_size = static_cast<int64_t>(num_kv_heads) * D;
  float* q_s = smem;                                         // [group][D]
  bf16_t* k_s = reinterpret_cast<bf16_t*>(q_s + group * D);  // [tile][Dp]
  bf16_t* v_s = k_s + kDecodeTile * Dp;                      // [tile][D]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int i = threadIdx.x; i < group * D; i += blockDim.x) {
    q_s[i] =
        Bf(q, static_cast<int64_t>(t) * num_heads * D + static_cast<int64_t>(kvh) * group * D + i) *
        scale;
  }
  float m[kMaxHeadsPerWarp], l[kMaxHeadsPerWarp], o[kMaxHeadsPerWarp][kMaxDPerLane];
#pragma unroll
  for (int hi = 0; hi < kMaxHeadsPerWarp; ++hi) {
    m[hi] = -INFINITY;
    l[hi] = 0.0f;
#pragma unroll
    for (int i = 0; i < kMaxDPerLane; ++i) o[hi][i] = 0.0f;
  }
  const int half_d = D / 2;
  for (int32_t k0 = start; k0 < end; k0 += kDecodeTile) {
    const int nk = min(kDecodeTile, end - k0);
    __syncthreads();
    if (D % 8 == 0) {
      // 16-byte loads, kStageLoads of K and of V in flight per thread before any store (a
      // dependent table-then-cache chain per chunk otherwise serialises the tile's load).
      const int cpr = D / 8, total = nk * cpr;
      for (int i0 = threadIdx.x; i0 < total; i0 += kStageLoads * blockDim.x) {
        uint4 kv[kStageLoads], vv[kStageLoads];
#pragma unroll
        for (int u = 0; u < kStageLoads; ++u) {
          const int i = i0 + u * blockDim.x;
          if (i < total) {
            const int j = i / cpr, d8 = (i - j * cpr) * 8;
            const int64_t base =
                SlotOf(b, seq, k0 + j) * kv_size + static_cast<int64_t>(kvh) * D + d8;
            kv[u] = *reinterpret_cast<const uint4*>(k_cache + base);
            vv[u] = *reinterpret_cast<const uint4*>(v_cache + base);
          }
        }
#pragma unroll
        for (int u = 0; u < kStageLoads; ++u) {
          const int i = i0 + u * blockDim.x;
          if (i < total) {
            const int j = i / cpr, d8 = (i - j * cpr) * 8;
            uint32_t* kd = reinterpret_cast<uint32_t*>(k_s + j * Dp + d8);  // 4-byte aligned rows
            kd[0] = kv[u].x;
            kd[1] = kv[u].y;
            kd[2] = kv[u].z;
            kd[3] = kv[u].w;
            *reinterpret_cast<uint4*>(v_s + j * D + d8) = vv[u];
          }
        }
      }
    } else {
      for (int i = threadIdx.x; i < nk * half_d; i += blockDim.x) {
        const int j = i / half_d, d2 = i - j * half_d;
        const int64_t base = SlotOf(b, seq, k0 + j) * kv_size + static_cast<int64_t>(kvh) * D;
        reinterpret_cast<uint32_t*>(k_s + j * Dp)[d2] =
            reinterpret_cast<const uint32_t*>(k_cache + base)[d2];
        reinterpret_cast<uint32_t*>(v_s + j * D)[d2] =
            reinterpret_cast<const uint32_t*>(v_cache + base)[d2];
      }
    }
    __syncthreads();
#pragma unroll
    for (int hi = 0; hi < kMaxHeadsPerWarp; ++hi) {
      const int hl = warp + hi * kDecodeWarps;
      if (hl >= group) break;
      float s = -INFINITY;
      if (lane < nk) {
        const float2* qh = reinterpret_cast<const float2*>(q_s + hl * D);
        const __nv_bfloat162* kr = reinterpret_cast<const __nv_bfloat162*>(k_s + lane * Dp);
        float acc0 = 0.0f, acc1 = 0.0f;  // two chains; unrolled so the loads run ahead
#pragma unroll 8
        for (int d2 = 0; d2 < half_d; ++d2) {
          const float2 kv = __bfloat1622float2(kr[d2]);
          const float2 qv = qh[d2];
          acc0 = fmaf(qv.x, kv.x, acc0);
          acc1 = fmaf(qv.y, kv.y, acc1);
        }
        s = acc0 + acc1;
      }
      float mx = s;
      for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
      const float m_new = fmaxf(m[hi], mx);
      const float p = lane < nk ? __expf(s - m_new) : 0.0f;
      const float corr = __expf(m[hi] - m_new);
      float ps = p;
      for (int off = 16; off > 0; off >>= 1) ps += __shfl_xor_sync(0xffffffffu, ps, off);
      l[hi] = l[hi] * corr + ps;
      m[hi] = m_new;
#pragma unroll
      for (int i = 0; i < kMaxDPerLane; ++i) o[hi][i] *= corr;
#pragma unroll 4
      for (int j = 0; j < nk; ++j) {
        const float pj = __shfl_sync(0xffffffffu, p, j);
        const bf16_t* vr = v_s + j * D;
#pragma unroll
        for (int i = 0; i < kMaxDPerLane; ++i) {
          const int d = lane + 32 * i;
          if (d < D) o[hi][i] += pj * Bf(vr, d);
        }
      }
    }
  }
#pragma unroll
  for (int hi = 0; hi < kMaxHeadsPerWarp; ++hi) {
    const int hl = warp + hi * kDecodeWarps;
    if (hl >= group) break;
    const int h = kvh * group + hl;
    if (nsplit == 1) {
      const float inv = 1.0f / l[hi];
      __nv_bfloat16* dst = reinterpret_cast<__nv_bfloat16*>(out) +
                           static_cast<int64_t>(t) * num_heads * D + static_cast<int64_t>(h) * D;
#pragma unroll
      for (int i = 0; i < kMaxDPerLane; ++i) {
        const int d = lane + 32 * i;
        if (d < D) dst[d] = __float2bfloat16(o[hi][i] * inv);
      }
    } else {
      float* pp =
          partial + ((static_cast<int64_t>(idx) * num_heads + h) * kMaxSplits + split) * (D + 2);
      if (lane == 0) {
        pp[0] = m[hi];
        pp[1] = l[hi];
      }
#pragma unroll
      for (int i = 0; i < kMaxDPerLane; ++i) {
        const int d = lane + 32 * i;
        if (d < D) pp[2 + d] = o[hi][i];
      }
    }
  }
}

// Block (token, head): merges the splits' (max, sum, unnormalised output).
__global__ void CombineKernel(const int32_t* tokens, const int32_t* positions, int num_heads,
                              int head_dim, const float* partial, bf16_t* out, int target_splits,
                              int single_keys) {
  PdlLaunchDependents();
  PdlWait();
  const int idx = blockIdx.x, h = blockIdx.y;
  const int32_t t = tokens[idx];
  const int32_t ctx = positions[t] + 1;
  const int32_t part = Partition(ctx, target_splits, single_keys);
  const int32_t nsplit = (ctx + part - 1) / part;
  if (nsplit == 1) return;
  const float* pp =
      partial + (static_cast<int64_t>(idx) * num_heads + h) * kMaxSplits * (head_dim + 2);
  float mx = -INFINITY;
  for (int s = 0; s < nsplit; ++s) mx = fmaxf(mx, pp[s * (head_dim + 2)]);
  float denom = 0.0f;
  for (int s = 0; s < nsplit; ++s)
    denom += pp[s * (head_dim + 2) + 1] * __expf(pp[s * (head_dim + 2)] - mx);
  const float inv = 1.0f / denom;
  __nv_bfloat16* dst = reinterpret_cast<__nv_bfloat16*>(out) +
                       static_cast<int64_t>(t) * num_heads * head_dim +
                       static_cast<int64_t>(h) * head_dim;
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float acc = 0.0f;
    for (int s = 0; s < nsplit; ++s) {
      acc += pp[s * (head_dim + 2) + 2 + d] * __expf(pp[s * (head_dim + 2)] - mx);
    }
    dst[d] = __float2bfloat16(acc * inv);
  }
}

// ---- Prefill: FlashAttention-2 style with mma.sync m16n8k16 (bf16 in, f32 accumulate). ----

constexpr int kWarpRows = 32;                             // query rows per warp: two m16 tiles
constexpr int kPrefillWarps = kPrefillTileQ / kWarpRows;  // 4
constexpr int kKeyTile = 64;
constexpr int kPad = 8;  // bf16 padding per shared row: row strides of 4 (mod 32) words

__device__ __forceinline__ uint32_t Pack(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// 2^x by the special-function unit (exp2f adds a denormal-range fix-up around the same
// instruction); 2^-inf = 0.
__device__ __forceinline__ float Exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Four 8x8 b16 matrices: lane l gives the address of row l % 8 of matrix l / 8.
__device__ __forceinline__ void LdMatrixX4(uint32_t r[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(SmemAddr(smem)));
}

// Four 8x8 b16 matrices, transposed: lane l gives the address of row l % 8 of matrix l / 8.
__device__ __forceinline__ void LdMatrixX4Trans(uint32_t r[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(SmemAddr(smem)));
}

template <int D>
constexpr size_t PrefillSmemBytes() {
  // The Q tile, then 2 stages of K and V tiles: (128 + 256) * 136 * 2 = 104 KB at D = 128, so two
  // blocks (16 warps) fit an SM.
  return (size_t{kPrefillTileQ} + size_t{2} * 2 * kKeyTile) * (D + kPad) * sizeof(bf16_t);
}

// Block (head, tile of up to 128 query tokens of one sequence): 4 warps of 32 query rows (two
// m16 tiles, so each K and V fragment read from shared memory feeds two MMAs). Per key tile of
// 64: S = Q K^T, online softmax in registers (log2 domain, the scale folded into one FMA before
// exp2), O += P V. Flops 4 * 128 * keys * D per block; K/V tiles cross L2 once per 128 query rows
// (2 * keys * D * 2 bytes). Q, K and V reach shared memory by cp.async (K/V two stages deep: the
// next tile loads while this one is multiplied) and the tensor cores by ldmatrix (.trans for V's
// B fragments, from row-major rows). Only tiles crossing a warp's diagonal are masked; a warp
// skips the tiles past its last row. The heads of one tile are neighbours on the grid, so the K/V
// of a GQA group is read from L2 by its heads at about the same time.
template <int D>
__global__ void __launch_bounds__(kPrefillWarps * 32, 2)
    PrefillKernel(const bf16_t* q, const bf16_t* k_cache, const bf16_t* v_cache, AttnBatch b,
                  const int2* tiles, int num_heads, int num_kv_heads, float scale_log2,
                  bf16_t* out) {
  extern __shared__ __align__(16) unsigned char prefill_smem[];
  using Row = bf16_t[D + kPad];
  Row* q_s = reinterpret_cast<Row*>(prefill_smem);  // [kPrefillTileQ]
  Row* k_s = q_s + kPrefillTileQ;                   // [2][kKeyTile]
  Row* v_s = k_s + 2 * kKeyTile;                    // [2][kKeyTile]
  constexpr int kThreads = kPrefillWarps * 32;
  constexpr int kChunks = D / 8;                    // 16-byte chunks per row
  constexpr int kRowsPerPass = kThreads / kChunks;  // rows one pass of the block copies
  constexpr int kM = kWarpRows / 16;                // m16 tiles per warp
  static_assert(kThreads % kChunks == 0 && kKeyTile % kRowsPerPass == 0, "tile copy shape");
  const int h = blockIdx.x;
  const int2 tile = tiles[blockIdx.y];
  const int seq = tile.x, q0 = tile.y;
  const int nq = min(kPrefillTileQ, b.query_start[seq + 1] - q0);
  const int group = num_heads / num_kv_heads, kvh = h / group;
  const int32_t pos0 = b.positions[q0];
  const int32_t kv_len = pos0 + nq;  // keys 0 .. last query's position
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, c = lane & 3, mi = lane >> 3, mr = lane & 7;
  const int cc = (threadIdx.x % kChunks) * 8, rr = threadIdx.x / kChunks;
  const int64_t q_stride = static_cast<int64_t>(num_heads) * D;
  const int64_t kv_size = static_cast<int64_t>(num_kv_heads) * D;

  // Q tile (rows past the sequence's chunk are zero), committed with the first K/V tile.
#pragma unroll
  for (int u = 0; u < kPrefillTileQ / kRowsPerPass; ++u) {
    const int r = rr + u * kRowsPerPass;
    const bool valid = r < nq;
    CpAsync16(&q_s[r][cc], q + (valid ? (q0 + r) * q_stride + h * D + cc : 0), valid);
  }
  const int32_t* table = b.block_tables + static_cast<int64_t>(seq) * b.table_stride;
  const int32_t bsz = b.block_size;
  const bf16_t* k_head = k_cache + static_cast<int64_t>(kvh) * D + cc;
  const int64_t v_off = v_cache - k_cache;
  auto load_tile = [&](int stage, int32_t k0) {
#pragma unroll
    for (int u = 0; u < kKeyTile / kRowsPerPass; ++u) {
      const int j = rr + u * kRowsPerPass, p = k0 + j;
      const bool valid = p < kv_len;
      const int64_t slot = valid ? static_cast<int64_t>(table[p / bsz]) * bsz + p % bsz : 0;
      const bf16_t* src = k_head + slot * kv_size;
      CpAsync16(&k_s[stage * kKeyTile + j][cc], src, valid);
      CpAsync16(&v_s[stage * kKeyTile + j][cc], src + v_off, valid);
    }
    CpAsyncCommit();
  };
  const int ntiles = (kv_len + kKeyTile - 1) / kKeyTile;
  load_tile(0, 0);

  const int32_t wq = pos0 + warp * kWarpRows;  // this warp's first query position
  const Row* qw = q_s + warp * kWarpRows;
  float o[kM][D / 8][4];
  float m[kM][2], l[kM][2];
#pragma unroll
  for (int t = 0; t < kM; ++t) {
#pragma unroll
    for (int i = 0; i < D / 8; ++i) o[t][i][0] = o[t][i][1] = o[t][i][2] = o[t][i][3] = 0.0f;
    m[t][0] = m[t][1] = -INFINITY;
    l[t][0] = l[t][1] = 0.0f;
  }

  for (int it = 0; it < ntiles; ++it) {
    const int32_t k0 = it * kKeyTile;
    const int stage = it & 1;
    if (it + 1 < ntiles) {
      load_tile(stage ^ 1, k0 + kKeyTile);  // its stage was freed by the barrier ending it - 1
      CpAsyncWait<1>();
    } else {
      CpAsyncWait<0>();
    }
    __syncthreads();
    const Row* ks = k_s + stage * kKeyTile;
    const Row* vs = v_s + stage * kKeyTile;
    if (k0 <= wq + kWarpRows - 1 && warp * kWarpRows < nq) {  // else no row sees these keys
      float s[kM][kKeyTile / 8][4];
#pragma unroll
      for (int t = 0; t < kM; ++t) {
#pragma unroll
        for (int nt = 0; nt < kKeyTile / 8; ++nt) {
          s[t][nt][0] = s[t][nt][1] = s[t][nt][2] = s[t][nt][3] = 0.0f;
        }
      }
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        // A fragments of d kk * 16 .. + 15: lane l gives row l % 16, column 8 (l / 16).
        uint32_t qa[kM][4];
#pragma unroll
        for (int t = 0; t < kM; ++t) {
          LdMatrixX4(qa[t], &qw[t * 16 + (lane & 15)][kk * 16 + (lane >> 4) * 8]);
        }
#pragma unroll
        for (int np = 0; np < kKeyTile / 16; ++np) {
          // Matrices: (keys 16 np + 0-7, d 0-7), (same keys, d 8-15), (keys + 8-15, d 0-7),
          // (keys + 8-15, d 8-15): b0, b1 of key tile 2 np, then of 2 np + 1.
          uint32_t r[4];
          LdMatrixX4(r, &ks[np * 16 + (mi >> 1) * 8 + mr][kk * 16 + (mi & 1) * 8]);
#pragma unroll
          for (int t = 0; t < kM; ++t) {
            Mma(s[t][2 * np], qa[t], r[0], r[1]);
            Mma(s[t][2 * np + 1], qa[t], r[2], r[3]);
          }
        }
      }
      // Online softmax, both m16 tiles phase by phase and the row max / row sum as trees, so that
      // each warp has independent work between dependent instructions (2 warps per scheduler).
      const bool diagonal = k0 + kKeyTile - 1 > wq;  // the tile crosses some row's diagonal
      float mx[kM][2];
#pragma unroll
      for (int t = 0; t < kM; ++t) {
        if (diagonal) {
          const int32_t qp0 = wq + t * 16 + g, qp1 = qp0 + 8;
#pragma unroll
          for (int nt = 0; nt < kKeyTile / 8; ++nt) {
            const int32_t kp = k0 + nt * 8 + 2 * c;
            if (kp > qp0) s[t][nt][0] = -INFINITY;
            if (kp + 1 > qp0) s[t][nt][1] = -INFINITY;
            if (kp > qp1) s[t][nt][2] = -INFINITY;
            if (kp + 1 > qp1) s[t][nt][3] = -INFINITY;
          }
        }
        float r0[kKeyTile / 8], r1[kKeyTile / 8];
#pragma unroll
        for (int nt = 0; nt < kKeyTile / 8; ++nt) {
          r0[nt] = fmaxf(s[t][nt][0], s[t][nt][1]);
          r1[nt] = fmaxf(s[t][nt][2], s[t][nt][3]);
        }
#pragma unroll
        for (int w = kKeyTile / 16; w > 0; w >>= 1) {
#pragma unroll
          for (int nt = 0; nt < w; ++nt) {
            r0[nt] = fmaxf(r0[nt], r0[nt + w]);
            r1[nt] = fmaxf(r1[nt], r1[nt + w]);
          }
        }
        mx[t][0] = r0[0];
        mx[t][1] = r1[0];
      }
#pragma unroll
      for (int off = 1; off < 4; off <<= 1) {
#pragma unroll
        for (int t = 0; t < kM; ++t) {
          mx[t][0] = fmaxf(mx[t][0], __shfl_xor_sync(0xffffffffu, mx[t][0], off));
          mx[t][1] = fmaxf(mx[t][1], __shfl_xor_sync(0xffffffffu, mx[t][1], off));
        }
      }
      uint32_t a[kM][kKeyTile / 16][4];  // P as bf16 A fragments
#pragma unroll
      for (int t = 0; t < kM; ++t) {
        // Running maxima in log2 units (scale_log2 > 0, so max and scaling commute).
        const float mn0 = fmaxf(m[t][0], mx[t][0] * scale_log2);
        const float mn1 = fmaxf(m[t][1], mx[t][1] * scale_log2);
        const float mu0 = mn0 == -INFINITY ? 0.0f : mn0, mu1 = mn1 == -INFINITY ? 0.0f : mn1;
        const float corr0 = Exp2(m[t][0] - mu0), corr1 = Exp2(m[t][1] - mu1);
        m[t][0] = mn0;
        m[t][1] = mn1;
        float r0[kKeyTile / 8], r1[kKeyTile / 8];
#pragma unroll
        for (int nt = 0; nt < kKeyTile / 8; ++nt) {
          s[t][nt][0] = Exp2(fmaf(s[t][nt][0], scale_log2, -mu0));
          s[t][nt][1] = Exp2(fmaf(s[t][nt][1], scale_log2, -mu0));
          s[t][nt][2] = Exp2(fmaf(s[t][nt][2], scale_log2, -mu1));
          s[t][nt][3] = Exp2(fmaf(s[t][nt][3], scale_log2, -mu1));
          r0[nt] = s[t][nt][0] + s[t][nt][1];
          r1[nt] = s[t][nt][2] + s[t][nt][3];
        }
#pragma unroll
        for (int w = kKeyTile / 16; w > 0; w >>= 1) {
#pragma unroll
          for (int nt = 0; nt < w; ++nt) {
            r0[nt] += r0[nt + w];
            r1[nt] += r1[nt + w];
          }
        }
        l[t][0] = l[t][0] * corr0 + r0[0];
        l[t][1] = l[t][1] * corr1 + r1[0];
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt) {
          o[t][dt][0] *= corr0;
          o[t][dt][1] *= corr0;
          o[t][dt][2] *= corr1;
          o[t][dt][3] *= corr1;
        }
#pragma unroll
        for (int kv = 0; kv < kKeyTile / 16; ++kv) {
          a[t][kv][0] = Pack(s[t][2 * kv][0], s[t][2 * kv][1]);
          a[t][kv][1] = Pack(s[t][2 * kv][2], s[t][2 * kv][3]);
          a[t][kv][2] = Pack(s[t][2 * kv + 1][0], s[t][2 * kv + 1][1]);
          a[t][kv][3] = Pack(s[t][2 * kv + 1][2], s[t][2 * kv + 1][3]);
        }
      }
#pragma unroll
      for (int kv = 0; kv < kKeyTile / 16; ++kv) {
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {
          // Matrices: (keys 0-7, d 0-7), (keys 8-15, d 0-7), (keys 0-7, d 8-15), (8-15, 8-15)
          // of this 16 x 16 block: b0, b1 of d tile 2 dp, then of d tile 2 dp + 1.
          uint32_t r[4];
          LdMatrixX4Trans(r, &vs[kv * 16 + (mi & 1) * 8 + mr][dp * 16 + (mi >> 1) * 8]);
#pragma unroll
          for (int t = 0; t < kM; ++t) {
            Mma(o[t][2 * dp], a[t][kv], r[0], r[1]);
            Mma(o[t][2 * dp + 1], a[t][kv], r[2], r[3]);
          }
        }
      }
    }
    __syncthreads();  // every warp is done with `stage` before it is loaded again
  }
  // Normalised rows go through this warp's own rows of the Q tile, then out as 16-byte stores (a
  // row's D * 2 bytes contiguous) instead of scattered 4-byte ones.
  Row* ow = q_s + warp * kWarpRows;
#pragma unroll
  for (int t = 0; t < kM; ++t) {
    float l0 = l[t][0], l1 = l[t][1];
    for (int off = 1; off < 4; off <<= 1) {
      l0 += __shfl_xor_sync(0xffffffffu, l0, off);
      l1 += __shfl_xor_sync(0xffffffffu, l1, off);
    }
    const float inv0 = l0 > 0.0f ? 1.0f / l0 : 0.0f, inv1 = l1 > 0.0f ? 1.0f / l1 : 0.0f;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      const int d = dt * 8 + 2 * c;
      *reinterpret_cast<uint32_t*>(&ow[t * 16 + g][d]) =
          Pack(o[t][dt][0] * inv0, o[t][dt][1] * inv0);
      *reinterpret_cast<uint32_t*>(&ow[t * 16 + g + 8][d]) =
          Pack(o[t][dt][2] * inv1, o[t][dt][3] * inv1);
    }
  }
  __syncwarp();
#pragma unroll
  for (int i = lane; i < kWarpRows * kChunks; i += 32) {
    const int r = i / kChunks, d8 = (i % kChunks) * 8;
    if (warp * kWarpRows + r < nq) {
      *reinterpret_cast<uint4*>(out + (q0 + warp * kWarpRows + r) * q_stride + h * D + d8) =
          *reinterpret_cast<const uint4*>(&ow[r][d8]);
    }
  }
}

// ---- Decode on tensor cores: the query heads of one KV head are the 16 rows of the MMA. ----

constexpr int kDecMmaWarps = 4;
constexpr int kDecMmaTile = 64;  // keys per stage; warp w multiplies keys 16 w .. 16 w + 15

template <int D>
constexpr size_t DecodeMmaSmemBytes() {
  const size_t stages = size_t{2} * 2 * kDecMmaTile * (D + kPad) * sizeof(bf16_t);
  const size_t merge = size_t{kDecMmaWarps} * 16 * (D + 2) * sizeof(float);
  return stages > merge ? stages : merge;
}

// Block (token, kv head, split) over the split's keys [start, end): K/V tiles of 64 keys stream
// through two cp.async stages (reads 2 * keys * D * 2 bytes once for all `group` heads); each
// warp runs S = Q K^T and O += P V on its 16 keys of the tile with online softmax (log2 domain),
// then the 4 warps' (max, sum, O) merge through shared memory. Output: bf16 rows, or the
// (max in natural-log units, sum, unnormalised O) partials that CombineKernel merges.
template <int D>
__global__ void __launch_bounds__(kDecMmaWarps * 32)
    DecodeMmaKernel(const bf16_t* q, const bf16_t* k_cache, const bf16_t* v_cache, AttnBatch b,
                    const int32_t* tokens, int num_heads, int num_kv_heads, float scale_log2,
                    float* partial, bf16_t* out, int target_splits, int single_keys) {
  PdlLaunchDependents();
  extern __shared__ __align__(16) unsigned char dec_smem[];
  using Row = bf16_t[D + kPad];
  Row* k_s = reinterpret_cast<Row*>(dec_smem);  // [2][kDecMmaTile]
  Row* v_s = k_s + 2 * kDecMmaTile;             // [2][kDecMmaTile]
  const int idx = blockIdx.x, kvh = blockIdx.y, split = blockIdx.z;
  const int32_t t = tokens[idx];
  const int32_t ctx = b.positions[t] + 1;
  const int32_t part = Partition(ctx, target_splits, single_keys);
  const int32_t nsplit = (ctx + part - 1) / part;
  if (split >= nsplit) return;
  const int32_t start = split * part, end = min(ctx, start + part);
  const int32_t seq = b.seq_of[t];
  const int group = num_heads / num_kv_heads;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, c = lane & 3, mi = lane >> 3, mr = lane & 7;
  const int64_t kv_size = static_cast<int64_t>(num_kv_heads) * D;

  // Copies the keys [k0, k0 + kDecMmaTile) of the split into `stage` (zeros past its end), all
  // but key `skip`; the caller commits.
  auto load_tile = [&](int stage, int32_t k0, int32_t skip) {
    for (int i = threadIdx.x; i < kDecMmaTile * (D / 8); i += blockDim.x) {
      const int j = i / (D / 8), d8 = (i % (D / 8)) * 8;
      if (k0 + j == skip) continue;
      const bool valid = k0 + j < end;
      const int64_t base =
          valid ? SlotOf(b, seq, k0 + j) * kv_size + static_cast<int64_t>(kvh) * D + d8 : 0;
      CpAsync16(&k_s[stage * kDecMmaTile + j][d8], k_cache + base, valid);
      CpAsync16(&v_s[stage * kDecMmaTile + j][d8], v_cache + base, valid);
    }
  };
  const int ntiles = (end - start + kDecMmaTile - 1) / kDecMmaTile;
  // Every key but the token's own (ctx - 1) was written by an earlier step, and the positions
  // and block tables are step inputs: the first tile is fetched before the PDL wait, overlapping
  // the previous kernel (rope + KV write, which writes key ctx - 1 and q). Key ctx - 1 follows
  // the wait, in the same commit group.
  const int32_t own = end == ctx ? ctx - 1 : -1;  // in this split only if it is the last
  load_tile(0, start, own);
  PdlWait();
  if (own >= 0 && own < start + kDecMmaTile) {
    const int j = own - start;
    for (int d8 = threadIdx.x * 8; d8 < D; d8 += blockDim.x * 8) {
      const int64_t base = SlotOf(b, seq, own) * kv_size + static_cast<int64_t>(kvh) * D + d8;
      CpAsync16(&k_s[j][d8], k_cache + base, true);
      CpAsync16(&v_s[j][d8], v_cache + base, true);
    }
  }
  CpAsyncCommit();

  // Q fragments: row r is head kvh * group + r (zero past the group).
  const int r0 = g, r1 = g + 8;
  uint32_t qf[D / 16][4];
  {
    const bf16_t* qt =
        q + static_cast<int64_t>(t) * num_heads * D + static_cast<int64_t>(kvh) * group * D;
    const uint32_t* row0 = reinterpret_cast<const uint32_t*>(qt + r0 * D);
    const uint32_t* row1 = reinterpret_cast<const uint32_t*>(qt + r1 * D);
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      qf[kk][0] = r0 < group ? row0[kk * 8 + c] : 0u;
      qf[kk][1] = r1 < group ? row1[kk * 8 + c] : 0u;
      qf[kk][2] = r0 < group ? row0[kk * 8 + c + 4] : 0u;
      qf[kk][3] = r1 < group ? row1[kk * 8 + c + 4] : 0u;
    }
  }
  float o[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;

  for (int it = 0; it < ntiles; ++it) {
    const int32_t k0 = start + it * kDecMmaTile;
    const int stage = it & 1;
    if (it + 1 < ntiles) {
      load_tile(stage ^ 1, k0 + kDecMmaTile, -1);
      CpAsyncCommit();
      CpAsyncWait<1>();
    } else {
      CpAsyncWait<0>();
    }
    __syncthreads();
    const Row* ks = k_s + stage * kDecMmaTile + warp * 16;  // this warp's 16 keys
    const Row* vs = v_s + stage * kDecMmaTile + warp * 16;
    const int32_t kw = k0 + warp * 16;
    if (kw < end) {
      float s[2][4];
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < D / 16; kk += 2) {
          uint32_t r[4];
          LdMatrixX4(r, &ks[nt * 8 + mr][kk * 16 + mi * 8]);
          Mma(s[nt], qf[kk], r[0], r[1]);
          Mma(s[nt], qf[kk + 1], r[2], r[3]);
        }
      }
      float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        const int32_t kp = kw + nt * 8 + 2 * c;
        s[nt][0] = kp < end ? s[nt][0] * scale_log2 : -INFINITY;
        s[nt][1] = kp + 1 < end ? s[nt][1] * scale_log2 : -INFINITY;
        s[nt][2] = kp < end ? s[nt][2] * scale_log2 : -INFINITY;
        s[nt][3] = kp + 1 < end ? s[nt][3] * scale_log2 : -INFINITY;
        mx0 = fmaxf(mx0, fmaxf(s[nt][0], s[nt][1]));
        mx1 = fmaxf(mx1, fmaxf(s[nt][2], s[nt][3]));
      }
      for (int off = 1; off < 4; off <<= 1) {
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
      }
      const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
      const float mu0 = mn0 == -INFINITY ? 0.0f : mn0, mu1 = mn1 == -INFINITY ? 0.0f : mn1;
      const float corr0 = exp2f(m0 - mu0), corr1 = exp2f(m1 - mu1);
      m0 = mn0;
      m1 = mn1;
      float sum0 = 0.0f, sum1 = 0.0f;
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        s[nt][0] = exp2f(s[nt][0] - mu0);
        s[nt][1] = exp2f(s[nt][1] - mu0);
        s[nt][2] = exp2f(s[nt][2] - mu1);
        s[nt][3] = exp2f(s[nt][3] - mu1);
        sum0 += s[nt][0] + s[nt][1];
        sum1 += s[nt][2] + s[nt][3];
      }
      l0 = l0 * corr0 + sum0;
      l1 = l1 * corr1 + sum1;
      uint32_t a[4];
      a[0] = Pack(s[0][0], s[0][1]);
      a[1] = Pack(s[0][2], s[0][3]);
      a[2] = Pack(s[1][0], s[1][1]);
      a[3] = Pack(s[1][2], s[1][3]);
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        o[2 * dp][0] *= corr0;
        o[2 * dp][1] *= corr0;
        o[2 * dp][2] *= corr1;
        o[2 * dp][3] *= corr1;
        o[2 * dp + 1][0] *= corr0;
        o[2 * dp + 1][1] *= corr0;
        o[2 * dp + 1][2] *= corr1;
        o[2 * dp + 1][3] *= corr1;
        uint32_t r[4];
        LdMatrixX4Trans(r, &vs[(mi & 1) * 8 + mr][dp * 16 + (mi >> 1) * 8]);
        Mma(o[2 * dp], a, r[0], r[1]);
        Mma(o[2 * dp + 1], a, r[2], r[3]);
      }
    }
    __syncthreads();  // every warp is done with `stage` before it is loaded again
  }
  for (int off = 1; off < 4; off <<= 1) {
    l0 += __shfl_xor_sync(0xffffffffu, l0, off);
    l1 += __shfl_xor_sync(0xffffffffu, l1, off);
  }
  // Merge the warps: red[w][row] = (max, sum, O[0 .. D)) in the stages' memory (free now).
  float* red = reinterpret_cast<float*>(dec_smem);
  constexpr int kRow = D + 2;
  {
    float* w0 = red + (warp * 16 + r0) * kRow;
    float* w1 = red + (warp * 16 + r1) * kRow;
    if (c == 0) {
      w0[0] = m0;
      w0[1] = l0;
      w1[0] = m1;
      w1[1] = l1;
    }
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      const int d = dt * 8 + 2 * c;
      w0[2 + d] = o[dt][0];
      w0[3 + d] = o[dt][1];
      w1[2 + d] = o[dt][2];
      w1[3 + d] = o[dt][3];
    }
  }
  __syncthreads();
  constexpr float kLn2 = 0.6931471805599453f;
  for (int i = threadIdx.x; i < group * D; i += blockDim.x) {
    const int row = i / D, d = i - row * D;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kDecMmaWarps; ++w) mx = fmaxf(mx, red[(w * 16 + row) * kRow]);
    const float mu = mx == -INFINITY ? 0.0f : mx;
    float l = 0.0f, acc = 0.0f;
#pragma unroll
    for (int w = 0; w < kDecMmaWarps; ++w) {
      const float* rw = red + (w * 16 + row) * kRow;
      const float f = exp2f(rw[0] - mu);
      l += rw[1] * f;
      acc += rw[2 + d] * f;
    }
    const int h = kvh * group + row;
    if (nsplit == 1) {
      reinterpret_cast<__nv_bfloat16*>(
          out)[static_cast<int64_t>(t) * num_heads * D + static_cast<int64_t>(h) * D + d] =
          __float2bfloat16(l > 0.0f ? acc / l : 0.0f);
    } else {
      float* pp =
          partial + ((static_cast<int64_t>(idx) * num_heads + h) * kMaxSplits + split) * (D + 2);
      if (d == 0) {
        pp[0] = mx * kLn2;  // CombineKernel works in natural-log units
        pp[1] = l;
      }
      pp[2 + d] = acc;
    }
  }
}
}  // namespace

int32_t DecodePartition(int32_t context_len) { return Partition(context_len); }

int64_t DecodePartialFloats(int64_t max_tokens, int64_t num_heads, int64_t head_dim) {
  return max_tokens * num_heads * kMaxSplits * (head_dim + 2);
}

cudaError_t PagedAttentionDecode(const bf16_t* q, const bf16_t* k_cache, const bf16_t* v_cache,
                                 const AttnBatch& batch, const int32_t* tokens, int32_t count,
                                 int32_t max_splits, int64_t num_heads, int64_t num_kv_heads,
                                 int64_t head_dim, float scale, float* partial, bf16_t* out,
                                 cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  const int64_t group = num_heads / num_kv_heads;
  if (group > kDecodeWarps * kMaxHeadsPerWarp || head_dim > 32 * kMaxDPerLane || head_dim % 2) {
    return cudaErrorInvalidValue;
  }
  const int splits = max_splits < 1 ? 1 : (max_splits > kMaxSplits ? kMaxSplits : max_splits);
  const size_t smem = group * head_dim * sizeof(float) +
                      kDecodeTile * (head_dim + 2) * sizeof(bf16_t) +
                      kDecodeTile * head_dim * sizeof(bf16_t);
  dim3 grid(count, static_cast<unsigned>(num_kv_heads), splits);
  cudaError_t err =
      LaunchPdl(DecodeKernel, grid, dim3(kDecodeWarps * 32), smem, stream, q, k_cache, v_cache,
                batch, tokens, static_cast<int>(num_heads), static_cast<int>(num_kv_heads),
                static_cast<int>(head_dim), scale, partial, out);
  if (err != cudaSuccess || splits == 1) return err;
  return LaunchPdl(CombineKernel, dim3(count, static_cast<unsigned>(num_heads)), dim3(64), 0,
                   stream, tokens, batch.positions, static_cast<int>(num_heads),
                   static_cast<int>(head_dim), partial, out, kMaxSplits, 0);
}

namespace {

// Blocks per SM that the tensor-core decode attention aims for when its batch alone has enough
// (token, KV head) pairs: splits = ceil(factor * SMs / pairs), at most kMaxSplits. Fewer, longer
// splits keep every warp of a block busy (a split of 32 keys leaves half of a 64-key tile empty)
// and shrink the merge. QILIN_DECODE_SPLIT_FACTOR overrides it (0: always kMaxSplits).
// And once the pairs alone give a block per SM, a token of at most `single_keys` keys
// (QILIN_DECODE_SINGLE_SPLIT_KEYS, default 256; 0: off) is one split: no merge at all.
struct DecodeSplits {
  int target = kMaxSplits;
  int single_keys = 0;
};
DecodeSplits DecodeTargetSplits(int64_t count, int64_t num_kv_heads) {
  static const int sms = [] {
    int dev = 0, n = 0;
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
      cudaGetLastError();
      return 0;
    }
    return n;
  }();
  static const int factor = [] {
    const char* e = std::getenv("QILIN_DECODE_SPLIT_FACTOR");
    return e ? std::atoi(e) : 4;
  }();
  static const int single = [] {
    const char* e = std::getenv("QILIN_DECODE_SINGLE_SPLIT_KEYS");
    return e ? std::max(0, std::atoi(e)) : 256;
  }();
  const int64_t pairs = count * num_kv_heads;
  DecodeSplits d;
  if (factor <= 0 || sms <= 0 || pairs <= 0) return d;  // DecodePartition's splits
  const int64_t t = (static_cast<int64_t>(factor) * sms + pairs - 1) / pairs;
  d.target = static_cast<int>(std::min<int64_t>(std::max<int64_t>(t, 1), kMaxSplits));
  if (pairs >= sms) d.single_keys = single;
  return d;
}

}  // namespace

bool DecodeMmaSupported(int64_t head_dim, int64_t num_heads, int64_t num_kv_heads) {
  return (head_dim == 64 || head_dim == 128) && num_kv_heads > 0 && num_heads % num_kv_heads == 0 &&
         num_heads / num_kv_heads <= 16;
}

cudaError_t PagedAttentionDecodeMma(const bf16_t* q, const bf16_t* k_cache, const bf16_t* v_cache,
                                    const AttnBatch& batch, const int32_t* tokens, int32_t count,
                                    int32_t max_splits, int64_t num_heads, int64_t num_kv_heads,
                                    int64_t head_dim, float scale, float* partial, bf16_t* out,
                                    cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  if (!DecodeMmaSupported(head_dim, num_heads, num_kv_heads)) return cudaErrorInvalidValue;
  const int splits = max_splits < 1 ? 1 : (max_splits > kMaxSplits ? kMaxSplits : max_splits);
  const DecodeSplits ds = DecodeTargetSplits(count, num_kv_heads);
  const float scale_log2 = scale * 1.4426950408889634f;
  dim3 grid(count, static_cast<unsigned>(num_kv_heads), splits);
  auto launch = [&]<int D>() -> cudaError_t {
    static const cudaError_t attr =
        cudaFuncSetAttribute(DecodeMmaKernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(DecodeMmaSmemBytes<D>()));
    if (attr != cudaSuccess) return attr;
    return LaunchPdl(DecodeMmaKernel<D>, grid, dim3(kDecMmaWarps * 32), DecodeMmaSmemBytes<D>(),
                     stream, q, k_cache, v_cache, batch, tokens, static_cast<int>(num_heads),
                     static_cast<int>(num_kv_heads), scale_log2, partial, out, ds.target,
                     ds.single_keys);
  };
  const cudaError_t err =
      head_dim == 64 ? launch.template operator()<64>() : launch.template operator()<128>();
  if (err != cudaSuccess || splits == 1) return err;
  return LaunchPdl(CombineKernel, dim3(count, static_cast<unsigned>(num_heads)), dim3(64), 0,
                   stream, tokens, batch.positions, static_cast<int>(num_heads),
                   static_cast<int>(head_dim), partial, out, ds.target, ds.single_keys);
}

bool PrefillSupported(int64_t head_dim) { return head_dim == 64 || head_dim == 128; }

namespace {
template <int D>
cudaError_t LaunchPrefill(const bf16_t* q, const bf16_t* k_cache, const bf16_t* v_cache,
                          const AttnBatch& batch, const int2* tiles, int32_t count, int num_heads,
                          int num_kv_heads, float scale_log2, bf16_t* out, cudaStream_t stream) {
  constexpr size_t kSmem = PrefillSmemBytes<D>();
  static const cudaError_t attr = [] {
    const cudaError_t e = cudaFuncSetAttribute(
        PrefillKernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kSmem));
    if (e != cudaSuccess) return e;
    return cudaFuncSetAttribute(PrefillKernel<D>, cudaFuncAttributePreferredSharedMemoryCarveout,
                                static_cast<int>(cudaSharedmemCarveoutMaxShared));
  }();
  if (attr != cudaSuccess) return attr;
  const dim3 grid(static_cast<unsigned>(num_heads), static_cast<unsigned>(count));
  PrefillKernel<D><<<grid, kPrefillWarps * 32, kSmem, stream>>>(
      q, k_cache, v_cache, batch, tiles, num_heads, num_kv_heads, scale_log2, out);
  return cudaGetLastError();
}
}  // namespace

cudaError_t PagedAttentionPrefill(const bf16_t* q, const bf16_t* k_cache, const bf16_t* v_cache,
                                  const AttnBatch& batch, const int2* tiles, int32_t count,
                                  int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                                  float scale, bf16_t* out, cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  if (count > 65535) return cudaErrorInvalidValue;  // tiles on grid.y
  const float scale_log2 = scale * 1.4426950408889634f;
  const int h = static_cast<int>(num_heads), kv = static_cast<int>(num_kv_heads);
  if (head_dim == 64) {
    return LaunchPrefill<64>(q, k_cache, v_cache, batch, tiles, count, h, kv, scale_log2, out,
                             stream);
  }
  if (head_dim == 128) {
    return LaunchPrefill<128>(q, k_cache, v_cache, batch, tiles, count, h, kv, scale_log2, out,
                              stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace qilin::cuda
