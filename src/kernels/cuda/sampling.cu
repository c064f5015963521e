#include "kernels/cuda/sampling.h"

#include <cub/block/block_scan.cuh>

namespace qilin::cuda {
namespace {

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ uint64_t Mix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// engine/sampler.cc's UniformAt, bit for bit.
__device__ __forceinline__ double UniformAt(uint64_t seed, uint64_t stream, uint64_t counter) {
  const uint64_t h = Mix64(Mix64(Mix64(seed) ^ stream) ^ counter);
  return static_cast<double>(h >> 11) * (1.0 / 9007199254740992.0);
}

// Order-preserving 32-bit key of a float (larger key = larger value); NaN lowest, -0 == +0.
__device__ __forceinline__ uint32_t ValueKey(float v) {
  if (v != v) return 0;
  if (v == 0.0f) v = 0.0f;
  const uint32_t u = __float_as_uint(v);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Larger = better: value descending, then id ascending (the CPU sampler's tie rule).
__device__ __forceinline__ uint64_t Composite(uint32_t key, int32_t id) {
  return (static_cast<uint64_t>(key) << 32) | (0xffffffffu - static_cast<uint32_t>(id));
}
__device__ __forceinline__ int32_t IdOf(uint64_t c) {
  return static_cast<int32_t>(0xffffffffu - static_cast<uint32_t>(c));
}

__device__ __forceinline__ bool Finite(float v) { return v > -INFINITY; }  // false for NaN too

template <typename T, typename Op>
__device__ T BlockReduce(T v, Op op, T* scratch) {
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // scratch may still be read by a previous reduction
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = scratch[lane];
    for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
    if (lane == 0) scratch[kWarps] = v;
  }
  __syncthreads();
  return scratch[kWarps];
}

struct Max {
  template <typename T>
  __device__ T operator()(T a, T b) const {
    return a > b ? a : b;
  }
};
struct Sum {
  template <typename T>
  __device__ T operator()(T a, T b) const {
    return a + b;
  }
};

struct Shared {
  uint64_t cand[kSampleMaxCandidates];  // composite keys, sorted best first after SelectTop
  float prob[kSampleMaxCandidates];
  union {
    cub::BlockScan<int, kThreads>::TempStorage scan_i;
    cub::BlockScan<double, kThreads>::TempStorage scan_d;
  } scan;
  double red_d[kWarps + 1];
  uint64_t red_u[kWarps + 1];
  float red_f[kWarps + 1];
  int red_i[kWarps + 1];
  int hist[256];
  int bucket, remaining, num_gt, found;
  float raw_chosen;
  int token, status, keep;
};

// The best k (<= kSampleMaxCandidates, <= vocab) of x into sh.cand, sorted best first: a radix
// select of the k-th value (4 passes of 8 bits over the row), one gather pass that takes ties in
// id order, and a bitonic sort in shared memory. Returns k.
__device__ int SelectTop(const float* x, int32_t vocab, int k, Shared& sh) {
  const int tid = threadIdx.x;
  uint32_t prefix = 0, mask = 0;
  int remaining = k;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int b = tid; b < 256; b += kThreads) sh.hist[b] = 0;
    __syncthreads();
    for (int32_t i = tid; i < vocab; i += kThreads) {
      const uint32_t key = ValueKey(x[i]);
      if ((key & mask) == prefix) atomicAdd(&sh.hist[(key >> shift) & 255], 1);
    }
    __syncthreads();
    if (tid == 0) {
      int cum = 0, b = 255;
      for (; b > 0; --b) {
        if (cum + sh.hist[b] >= remaining) break;
        cum += sh.hist[b];
      }
      sh.bucket = b;
      sh.remaining = remaining - cum;
    }
    __syncthreads();
    prefix |= static_cast<uint32_t>(sh.bucket) << shift;
    mask |= 255u << shift;
    remaining = sh.remaining;
    __syncthreads();
  }
  // prefix is the k-th key: take every larger one and the first `remaining` equal ones by id.
  const uint32_t kth = prefix;
  const int num_gt = k - remaining;
  if (tid == 0) sh.num_gt = 0;
  __syncthreads();
  int eq_base = 0;
  for (int32_t i0 = 0; i0 < vocab && eq_base < remaining; i0 += kThreads) {
    const int32_t i = i0 + tid;
    const uint32_t key = i < vocab ? ValueKey(x[i]) : 0;
    const bool gt = i < vocab && key > kth, eq = i < vocab && key == kth;
    if (gt) sh.cand[atomicAdd(&sh.num_gt, 1)] = Composite(key, i);
    int rank = 0, total = 0;
    cub::BlockScan<int, kThreads>(sh.scan.scan_i).ExclusiveSum(eq ? 1 : 0, rank, total);
    if (eq && eq_base + rank < remaining) sh.cand[num_gt + eq_base + rank] = Composite(key, i);
    eq_base += total;
    __syncthreads();
  }
  // The gather stops once the equal keys are found; larger ones past that point are missing.
  __syncthreads();
  if (sh.num_gt < num_gt) {
    // Exited early: gather the remaining larger keys (any order, sorted below).
    __syncthreads();
    if (tid == 0) sh.num_gt = 0;
    __syncthreads();
    for (int32_t i = tid; i < vocab; i += kThreads) {
      const uint32_t key = ValueKey(x[i]);
      if (key > kth) sh.cand[atomicAdd(&sh.num_gt, 1)] = Composite(key, i);
    }
    __syncthreads();
  }
  // Bitonic sort, descending, over the next power of two (padding 0 sorts last).
  int n2 = 1;
  while (n2 < k) n2 <<= 1;
  for (int j = k + tid; j < n2; j += kThreads) sh.cand[j] = 0;
  __syncthreads();
  for (int size = 2; size <= n2; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int t = tid; t < n2 / 2; t += kThreads) {
        const int lo = 2 * t - (t & (stride - 1));
        const int hi = lo + stride;
        const bool desc = (lo & size) == 0;
        const uint64_t a = sh.cand[lo], b = sh.cand[hi];
        if ((a < b) == desc) {
          sh.cand[lo] = b;
          sh.cand[hi] = a;
        }
      }
      __syncthreads();
    }
  }
  return k;
}

// One block per row; see SampleRows.
__global__ void __launch_bounds__(kThreads)
    SampleRowsKernel(float* logits, int32_t vocab, const SampleRowParams* params,
                     const SampleEntry* entries, float* saved, SampleRowOut* out, int32_t* ids) {
  __shared__ Shared sh;
  const int tid = threadIdx.x;
  const SampleRowParams p = params[blockIdx.x];
  float* x = logits + static_cast<int64_t>(blockIdx.x) * vocab;
  SampleRowOut& o = out[blockIdx.x];
  const SampleEntry* ent = entries + p.entry_begin;
  float* sav = saved + p.entry_begin;

  // 1. Logprobs are of the raw row (before the processors).
  double lse = 0.0;
  if (p.logprobs >= 0) {
    float m = -INFINITY;
    for (int32_t i = tid; i < vocab; i += kThreads) m = fmaxf(m, x[i]);  // fmaxf drops NaN
    m = BlockReduce(m, Max(), sh.red_f);
    double s = 0.0;
    if (Finite(m)) {
      for (int32_t i = tid; i < vocab; i += kThreads) {
        const float v = x[i];
        if (Finite(v)) s += exp(static_cast<double>(v) - m);
      }
    }
    s = BlockReduce(s, Sum(), sh.red_d);
    lse = Finite(m) ? m + log(s) : -INFINITY;
    int num_top = 0;
    if (p.logprobs > 0) {
      num_top = SelectTop(x, vocab, min(p.logprobs, vocab), sh);
      for (int j = tid; j < num_top; j += kThreads) {
        const int32_t id = IdOf(sh.cand[j]);
        o.top_id[j] = id;
        o.top_logprob[j] = static_cast<float>(static_cast<double>(x[id]) - lse);
      }
    }
    if (tid == 0) o.num_top = num_top;
    __syncthreads();
  } else if (tid == 0) {
    o.num_top = 0;
  }

  // 2. Processors in place (each entry is a distinct token), raw values kept in `saved`.
  for (int j = tid; j < p.entry_count; j += kThreads) {
    const SampleEntry e = ent[j];
    const float raw = x[e.token];
    float l = raw;
    sav[j] = raw;
    if ((e.flags & kSampleInSequence) && p.repetition_penalty != 1.0f) {
      l = l > 0 ? __fdiv_rn(l, p.repetition_penalty) : __fmul_rn(l, p.repetition_penalty);
    }
    if (e.out_count > 0 && (p.presence_penalty != 0.0f || p.frequency_penalty != 0.0f)) {
      l = __fsub_rn(l, __fadd_rn(__fmul_rn(p.frequency_penalty, static_cast<float>(e.out_count)),
                                 p.presence_penalty));
    }
    if (e.flags & kSampleMasked) l = -INFINITY;
    x[e.token] = l;
  }
  __syncthreads();

  // 3. The best token after the processors (ties: lower id; NaN never wins).
  uint64_t best = 0;
  for (int32_t i = tid; i < vocab; i += kThreads) {
    const uint64_t c = Composite(ValueKey(x[i]), i);
    best = c > best ? c : best;
  }
  best = BlockReduce(best, Max(), sh.red_u);
  const int32_t top = IdOf(best);
  const float top_v = x[top];
  if (tid == 0) {
    sh.token = Finite(top_v) ? top : -1;
    sh.status = kSampleOk;
  }
  __syncthreads();

  if (!p.greedy && Finite(top_v)) {
    const double m = top_v;
    const double inv_t = 1.0 / static_cast<double>(p.temperature);
    const double u = UniformAt(p.seed, p.stream, p.counter);
    if (p.top_k > 0 && p.top_k < vocab) {
      // Top-k: the k best, probabilities as the CPU computes them (double exp, rounded to float);
      // sums in the same (sorted) order.
      const int k = SelectTop(x, vocab, p.top_k, sh);
      for (int j = tid; j < k; j += kThreads) {
        const float v = x[IdOf(sh.cand[j])];
        sh.prob[j] = static_cast<float>(exp((static_cast<double>(v) - m) * inv_t));
      }
      __syncthreads();
      if (tid == 0) {
        int n = 0;
        double total = 0.0;
        while (n < k && sh.prob[n] > 0.0f) total += sh.prob[n++];  // nonincreasing
        int keep = n;
        if (p.top_p < 1.0f) {
          double acc = 0.0;
          for (int j = 0; j < n; ++j) {
            acc += sh.prob[j];
            if (acc >= static_cast<double>(p.top_p) * total) {
              keep = j + 1;
              break;
            }
          }
        }
        double mass = 0.0;
        int last = -1;
        for (int j = 0; j < keep; ++j) {
          if (p.min_p > 0.0f && sh.prob[j] < p.min_p) continue;
          mass += sh.prob[j];
          last = j;
        }
        int token = top;
        if (last >= 0) {
          token = IdOf(sh.cand[last]);
          const double target = u * mass;
          double acc = 0.0;
          for (int j = 0; j < keep; ++j) {
            if (p.min_p > 0.0f && sh.prob[j] < p.min_p) continue;
            acc += sh.prob[j];
            if (acc > target) {
              token = IdOf(sh.cand[j]);
              break;
            }
          }
        }
        sh.token = token;
      }
      __syncthreads();
    } else {
      // Float probabilities as the CPU's ExpShifted: exp((v - m) * inv_t) in float.
      const float mf = static_cast<float>(m), inv_tf = static_cast<float>(inv_t);
      auto prob = [&](float v) {
        return Finite(v) ? expf(__fmul_rn(__fsub_rn(v, mf), inv_tf)) : 0.0f;
      };
      if (p.top_p < 1.0f) {
        double total = 0.0;
        int valid = 0, num_minp = 0;
        for (int32_t i = tid; i < vocab; i += kThreads) {
          const float pr = prob(x[i]);
          total += pr;
          valid += pr > 0.0f;
          num_minp += pr > 0.0f && pr >= p.min_p;
        }
        total = BlockReduce(total, Sum(), sh.red_d);
        valid = BlockReduce(valid, Sum(), sh.red_i);
        num_minp = BlockReduce(num_minp, Sum(), sh.red_i);
        // The nucleus walks the sorted order; its edge must lie among the best candidates.
        const int k = SelectTop(x, vocab, min(kSampleMaxCandidates, vocab), sh);
        for (int j = tid; j < k; j += kThreads) sh.prob[j] = prob(x[IdOf(sh.cand[j])]);
        __syncthreads();
        if (tid == 0) {
          int n = 0;
          while (n < k && sh.prob[n] > 0.0f) ++n;
          int keep = -1;  // -1: beyond the candidates
          double acc = 0.0;
          for (int j = 0; j < n; ++j) {
            acc += sh.prob[j];
            if (acc >= static_cast<double>(p.top_p) * total) {
              keep = j + 1;
              break;
            }
          }
          if (keep < 0 && valid <= n) keep = n;
          if (p.min_p > 0.0f) {
            if (keep < 0 && num_minp <= n) keep = num_minp;
            if (keep >= 0) keep = max(1, min(keep, num_minp));
          }
          if (keep < 0 || n == 0) {
            sh.status = n == 0 ? kSampleOk : kSampleNeedsHost;
          } else {
            double mass = 0.0;
            for (int j = 0; j < keep; ++j) mass += sh.prob[j];
            const double target = u * mass;
            int pos = keep - 1;
            acc = 0.0;
            for (int j = 0; j < keep; ++j) {
              acc += sh.prob[j];
              if (acc > target) {
                pos = j;
                break;
              }
            }
            sh.token = IdOf(sh.cand[pos]);
          }
        }
        __syncthreads();
      } else {
        // Inverse CDF in id order over the tokens kept (p > 0, p >= min_p): each thread sums a
        // contiguous slice, a scan finds the slice holding the target, that slice is walked.
        const int32_t per = (vocab + kThreads - 1) / kThreads;
        const int32_t i0 = min(vocab, tid * per), i1 = min(vocab, i0 + per);
        double s = 0.0;
        int32_t last_kept = -1;
        for (int32_t i = i0; i < i1; ++i) {
          const float pr = prob(x[i]);
          if (pr > 0.0f && pr >= p.min_p) {
            s += pr;
            last_kept = i;
          }
        }
        double before = 0.0, mass = 0.0;
        cub::BlockScan<double, kThreads>(sh.scan.scan_d).ExclusiveSum(s, before, mass);
        last_kept = BlockReduce(last_kept, Max(), sh.red_i);
        if (tid == 0) sh.found = INT32_MAX;
        __syncthreads();
        const double target = u * mass;
        if (last_kept >= 0 && s > 0.0 && before + s > target) {
          double acc = before;
          for (int32_t i = i0; i < i1; ++i) {
            const float pr = prob(x[i]);
            if (!(pr > 0.0f && pr >= p.min_p)) continue;
            acc += pr;
            if (acc > target) {
              atomicMin(&sh.found, i);
              break;
            }
          }
        }
        __syncthreads();
        if (tid == 0)
          sh.token = last_kept < 0 ? top : (sh.found < INT32_MAX ? sh.found : last_kept);
        __syncthreads();
      }
    }
  }

  // 4. The chosen token's raw logit; rows handed back get their raw values again.
  const int status = sh.status;
  const int32_t token = sh.token < 0 ? 0 : sh.token;
  if (tid == 0) sh.raw_chosen = x[token];
  __syncthreads();
  for (int j = tid; j < p.entry_count; j += kThreads) {
    if (ent[j].token == token) sh.raw_chosen = sav[j];
    if (status == kSampleNeedsHost) x[ent[j].token] = sav[j];
  }
  __syncthreads();
  if (tid == 0) {
    o.token = token;
    o.status = status;
    if (ids) ids[blockIdx.x] = status == kSampleNeedsHost ? -1 : token;
    o.logprob =
        p.logprobs >= 0 ? static_cast<float>(static_cast<double>(sh.raw_chosen) - lse) : 0.0f;
  }
}

}  // namespace

cudaError_t SampleRows(float* logits, int32_t vocab, int32_t rows, const SampleRowParams* params,
                       const SampleEntry* entries, float* saved, SampleRowOut* out,
                       cudaStream_t stream, int32_t* ids) {
  if (rows <= 0) return cudaSuccess;
  SampleRowsKernel<<<rows, kThreads, 0, stream>>>(logits, vocab, params, entries, saved, out, ids);
  return cudaGetLastError();
}

}  // namespace qilin::cuda
