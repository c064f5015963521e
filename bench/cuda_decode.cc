// CUDA backend speed at a real model shape with random weights made on the device, each figure
// beside the limit measured in the same run (DESIGN.md section 5):
//   copy bandwidth (cudaMemcpy D2D, bytes read + written) and bf16 matmul rate (cuBLASLt 8192^3);
//   batch-1 decode tokens/s (CUDA graphs) vs bandwidth / weight bytes;
//   one 4096-token prefill vs 2 * params * tokens / matmul rate;
//   64 concurrent sequences of 128/128, 2048/128 and 128/2048 prompt/generated tokens through the
//   backend, each beside prefill FLOPs / matmul rate + per-step (weights + KV) bytes / bandwidth;
//   their decode steps sample greedily on the device, each step launched before the previous one
//   is waited for (LaunchForwardSample, the engine's overlapped steps), and a few steps one at a
//   time (ForwardSample) and with the logits copied to the host are timed beside them;
//   batch-1 decode with cuBLASLt vs the skinny GEMM kernel and both decode attention kernels;
//   first, a per-op profile (time, GB/s or TFLOP/s, share of a step) at the model's shapes,
//   including one batch-64 decode step op by op.
// Usage: qilin_bench_cuda_decode [--model configs/qwen2.5-7b] [--decode-steps 256] [--profile 0|1]
//                                [--long 0|1]  (--long 0: only the 128/128 workload)
//                                [--runs 0|1]  (--runs 0: limits and the per-op profile only)
//                                [--prefill-sweep 0|1]  (1: prefill steps by prompt count and
//                                length first: where a step's time per token goes)
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "kernels/cuda/gemm.h"
#include "kernels/cuda/ops.h"
#include "kernels/cuda/sampling.h"
#include "model/config.h"
#include "runtime/cuda_backend.h"

namespace {

using namespace qilin;
using Clock = std::chrono::steady_clock;

[[noreturn]] void Die(const std::string& msg) {
  std::fprintf(stderr, "cuda_decode: %s\n", msg.c_str());
  std::exit(1);
}
void Check(const Status& s) {
  if (!s.ok()) Die(s.ToString());
}
void Check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) Die(std::string(what) + ": " + cudaGetErrorString(e));
}
double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}
double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Times `f` (enqueued on `s`) with events: median of `reps` after 2 warm-ups, seconds.
template <typename F>
double TimeEvents(cudaStream_t s, int reps, F&& f) {
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  std::vector<double> t;
  for (int i = 0; i < reps + 2; ++i) {
    cudaEventRecord(a, s);
    f();
    cudaEventRecord(b, s);
    Check(cudaEventSynchronize(b), "event");
    float ms = 0;
    cudaEventElapsedTime(&ms, a, b);
    if (i >= 2) t.push_back(ms / 1e3);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  return Median(t);
}

struct SeqState {
  std::vector<int32_t> blocks;
  int32_t len = 0;
};

// One step over `seqs`, each adding `take` tokens (token ids arbitrary but valid).
ForwardBatch MakeBatch(std::vector<SeqState>& seqs, int32_t take, int32_t bs, int32_t* next_block,
                       int32_t vocab) {
  ForwardBatch b;
  b.query_start = {0};
  int32_t max_blocks = 0;
  for (auto& s : seqs) {
    while (static_cast<int32_t>(s.blocks.size()) * bs < s.len + take)
      s.blocks.push_back((*next_block)++);
    max_blocks = std::max<int32_t>(max_blocks, s.blocks.size());
  }
  b.max_blocks_per_seq = max_blocks;
  for (auto& s : seqs) {
    for (int32_t p = s.len; p < s.len + take; ++p) {
      b.token_ids.push_back((p * 7919 + 13) % vocab);
      b.positions.push_back(p);
      b.slot_mapping.push_back(int64_t{s.blocks[p / bs]} * bs + p % bs);
    }
    b.query_start.push_back(b.num_tokens());
    b.logits_indices.push_back(b.num_tokens() - 1);
    s.len += take;
    b.context_lens.push_back(s.len);
    b.prompt_lens.push_back(s.len);
    for (int32_t j = 0; j < max_blocks; ++j)
      b.block_tables.push_back(j < static_cast<int32_t>(s.blocks.size()) ? s.blocks[j] : -1);
  }
  return b;
}

// Per-op profile at the model's shapes, each op launched `kReps` times back to back between two
// events (as in a graph) over rotating weight slices (no L2 reuse, as across layers). Prints time
// per launch, achieved GB/s (weights + activations, bytes counted once) or TFLOP/s, and the share
// of a step (ops x layers). Prefill ops at n = 4096, decode ops at n = 1 (and the skinny GEMM
// against cuBLASLt at n = 1..8).
void ProfileOps(const ModelConfig& c, cudaStream_t st, double bandwidth, double matmul) {
  const int64_t h = c.hidden_size, qs = c.q_size(), kvs = c.kv_size(), inter = c.intermediate_size;
  const int64_t qkv = qs + 2 * kvs, L = c.num_layers, V = c.vocab_size;
  const int64_t big = std::max({V * h, 2 * inter * h});  // elements of the weight pool
  const int64_t pool = 2 * big;                          // rotating slices
  const int64_t N = 4096;
  cuda::bf16_t *w, *xa, *xb;
  float *yf, *gu;
  Check(cudaMalloc(&w, pool * 2), "malloc");
  Check(cudaMalloc(&xa, N * inter * 2), "malloc");
  Check(cudaMalloc(&xb, N * inter * 2), "malloc");
  Check(cudaMalloc(&yf, N * 2 * inter * 4), "malloc");
  Check(cudaMalloc(&gu, N * 2 * inter * 4), "malloc");
  Check(cuda::FillRandomBf16(w, pool, 7, 0.0f, 0.02f, st), "fill");
  Check(cuda::FillRandomBf16(xa, N * inter, 8, 0.0f, 1.0f, st), "fill");
  Check(cuda::FillRandomF32(yf, N * 2 * inter, 9, 0.0f, 1.0f, st), "fill");
  Check(cuda::FillRandomF32(gu, N * 2 * inter, 11, 0.0f, 1.0f, st), "fill");
  cuda::Gemm gemm;
  Check(gemm.Init());
  constexpr int kReps = 20;
  auto slice = [&](int64_t elems, int i) {
    const int64_t k = std::max<int64_t>(1, pool / elems);
    return w + (i % k) * elems;
  };
  // Median over 5 rounds of kReps launches; seconds per launch.
  auto time = [&](auto&& f) {
    int i = 0;
    return TimeEvents(st, 5,
                      [&] {
                        for (int r = 0; r < kReps; ++r) f(i++);
                      }) /
           kReps;
  };
  std::printf("\n== per-op profile (%s shapes), %d launches back to back ==\n", "model", kReps);
  std::printf("%-34s %6s %10s %12s %7s %9s\n", "op", "n", "us/launch", "rate", "x/step", "ms/step");
  auto row = [&](const char* op, int64_t n, double t, double bytes, double flops, double per_step) {
    char rate[32];
    if (flops > 0)
      std::snprintf(rate, sizeof rate, "%.0f TF/s", flops / t / 1e12);
    else
      std::snprintf(rate, sizeof rate, "%.0f GB/s", bytes / t / 1e9);
    std::printf("%-34s %6lld %10.1f %12s %7.0f %9.3f\n", op, static_cast<long long>(n), t * 1e6,
                rate, per_step, t * per_step * 1e3);
  };
  struct Shape {
    const char* name;
    int64_t in, out;
    double per_step;
  };
  const Shape shapes[] = {{"qkv_proj", h, qkv, double(L)},
                          {"o_proj", qs, h, double(L)},
                          {"gate_up_proj", h, 2 * inter, double(L)},
                          {"down_proj", inter, h, double(L)},
                          {"lm_head (1 row)", h, V, 1.0}};
  // Decode: GEMMs at n = 1..64, cuBLASLt, and up to 8 rows the skinny kernel beside it.
  for (int64_t n : {1, 2, 4, 8, 16, 32, 64}) {
    for (const Shape& s : shapes) {
      const double bytes = 2.0 * s.in * s.out + 2.0 * n * s.in + 4.0 * n * s.out;
      for (int mode = 0; mode < (n <= cuda::kGemvMaxRows ? 2 : 1); ++mode) {
        gemm.set_gemv_max_rows(mode == 0 ? 0 : cuda::kGemvMaxRows);
        const double t = time([&](int i) {
          Check(gemm.Linear(xa, n, s.in, slice(s.in * s.out, i), s.out, nullptr, yf, true, st));
        });
        char name[64];
        std::snprintf(name, sizeof name, "%s %s", s.name, mode == 0 ? "cublasLt" : "gemv");
        row(name, n, t, bytes, 0, n == 1 ? s.per_step : 0);
      }
    }
    if (n > cuda::kGemvMaxRows) continue;
    // gate|up + SwiGLU fused in the skinny kernel.
    gemm.set_gemv_max_rows(cuda::kGemvMaxRows);
    const double t = time([&](int i) {
      Check(gemm.LinearSwiGlu(xa, n, h, slice(2 * inter * h, i), inter, gu, xb, st));
    });
    row("gate_up + SwiGLU gemv", n, t, 4.0 * inter * h, 0, n == 1 ? double(L) : 0);
  }
  // Row kernels at n = 1 and n = 4096.
  for (int64_t n : {int64_t{1}, N}) {
    const double ps = double(L);
    float* x = yf;
    double t =
        time([&](int) { Check(cuda::AddRmsNorm(x, gu, nullptr, n, h, w, 1e-6f, xb, st), "norm"); });
    row("add + rmsnorm", n, t, n * h * (4.0 + 4 + 4 + 2), 0, 2 * ps);
    // Prefill-sized steps take bf16 gate|up (Gemm::swiglu_bf16_min_rows), smaller ones f32.
    const bool bf16_step = n >= gemm.swiglu_bf16_min_rows();
    t = time([&](int) { Check(cuda::SiluMul(gu, n, inter, xb, st), "silu"); });
    row("silu*mul (f32 in)", n, t, n * inter * 10.0, 0, bf16_step ? 0 : ps);
    const auto* gub = reinterpret_cast<const cuda::bf16_t*>(gu);
    t = time([&](int) { Check(cuda::SiluMul(gub, n, inter, xb, st), "silu"); });
    row("silu*mul (bf16 in)", n, t, n * inter * 6.0, 0, bf16_step ? ps : 0);
    // Rope + KV write: positions 0..n-1 of one sequence, slots 0..n-1 (of xa as the cache).
    std::vector<int32_t> pos(n), table(n, 0);
    std::vector<int64_t> slots(n);
    for (int64_t i = 0; i < n; ++i) pos[i] = static_cast<int32_t>(i), slots[i] = i;
    std::vector<float> inv_freq(c.head_dim / 2), attn_scale = {1.0f};
    for (int64_t i = 0; i < c.head_dim / 2; ++i)
      inv_freq[i] = static_cast<float>(std::pow(1e6, -2.0 * i / c.head_dim));
    int32_t *d_pos, *d_table;
    int64_t* d_slots;
    float *d_inv, *d_scale;
    Check(cudaMalloc(&d_pos, n * 4), "malloc");
    Check(cudaMalloc(&d_table, n * 4), "malloc");
    Check(cudaMalloc(&d_slots, n * 8), "malloc");
    Check(cudaMalloc(&d_inv, inv_freq.size() * 4), "malloc");
    Check(cudaMalloc(&d_scale, 4), "malloc");
    cudaMemcpy(d_pos, pos.data(), n * 4, cudaMemcpyHostToDevice);
    cudaMemcpy(d_table, table.data(), n * 4, cudaMemcpyHostToDevice);
    cudaMemcpy(d_slots, slots.data(), n * 8, cudaMemcpyHostToDevice);
    cudaMemcpy(d_inv, inv_freq.data(), inv_freq.size() * 4, cudaMemcpyHostToDevice);
    cudaMemcpy(d_scale, attn_scale.data(), 4, cudaMemcpyHostToDevice);
    cuda::RopeArgs rope;
    rope.inv_freq = d_inv;
    rope.attn_scale = d_scale;
    rope.table_of = d_table;
    rope.positions = d_pos;
    t = time([&](int) {
      Check(cuda::RopeWriteKv(gu, n, c.num_heads, c.num_kv_heads, c.head_dim, nullptr, nullptr,
                              1e-6f, rope, d_slots, xb, xa, xa + n * kvs, st),
            "rope");
    });
    row("rope + KV write", n, t, n * qkv * (4.0 + 2), 0, ps);
    for (void* p :
         {static_cast<void*>(d_pos), static_cast<void*>(d_table), static_cast<void*>(d_slots),
          static_cast<void*>(d_inv), static_cast<void*>(d_scale)})
      cudaFree(p);
  }
  // Prefill GEMMs at n = 4096: f32 vs bf16 outputs.
  gemm.set_gemv_max_rows(0);
  for (const Shape& s : shapes) {
    if (s.per_step == 1.0) continue;
    for (bool f32 : {true, false}) {
      const double t = time([&](int i) {
        Check(gemm.Linear(xa, N, s.in, slice(s.in * s.out, i), s.out, nullptr, yf, f32, st));
      });
      char name[64];
      std::snprintf(name, sizeof name, "%s %s out", s.name, f32 ? "f32" : "bf16");
      // The step's own choice: bf16 out for gate_up at prefill sizes, f32 out for the others.
      const bool bf16_used = s.out == 2 * inter && N >= gemm.swiglu_bf16_min_rows();
      row(name, N, t, 0, 2.0 * N * s.in * s.out, f32 != bf16_used ? s.per_step : 0);
    }
  }
  // Prefill attention at 4096 tokens, one sequence, causal.
  {
    const int32_t bs = 32, blocks = N / bs;
    cuda::bf16_t* kv;
    Check(cudaMalloc(&kv, 2 * N * kvs * 2), "malloc");
    Check(cuda::FillRandomBf16(kv, 2 * N * kvs, 10, 0.0f, 1.0f, st), "fill");
    std::vector<int32_t> qstart = {0, static_cast<int32_t>(N)}, seq_of(N, 0), pos(N), table(blocks);
    for (int64_t i = 0; i < N; ++i) pos[i] = static_cast<int32_t>(i);
    for (int32_t b = 0; b < blocks; ++b) table[b] = b;
    std::vector<int2> tiles;
    for (int64_t t0 = N - cuda::kPrefillTileQ; t0 >= 0; t0 -= cuda::kPrefillTileQ)
      tiles.push_back(make_int2(0, static_cast<int32_t>(t0)));
    int32_t *d_qs, *d_seq, *d_pos, *d_tab;
    int2* d_tiles;
    Check(cudaMalloc(&d_qs, 8), "malloc");
    Check(cudaMalloc(&d_seq, N * 4), "malloc");
    Check(cudaMalloc(&d_pos, N * 4), "malloc");
    Check(cudaMalloc(&d_tab, blocks * 4), "malloc");
    Check(cudaMalloc(&d_tiles, tiles.size() * 8), "malloc");
    cudaMemcpy(d_qs, qstart.data(), 8, cudaMemcpyHostToDevice);
    cudaMemcpy(d_seq, seq_of.data(), N * 4, cudaMemcpyHostToDevice);
    cudaMemcpy(d_pos, pos.data(), N * 4, cudaMemcpyHostToDevice);
    cudaMemcpy(d_tab, table.data(), blocks * 4, cudaMemcpyHostToDevice);
    cudaMemcpy(d_tiles, tiles.data(), tiles.size() * 8, cudaMemcpyHostToDevice);
    cuda::AttnBatch ab;
    ab.query_start = d_qs;
    ab.seq_of = d_seq;
    ab.positions = d_pos;
    ab.block_tables = d_tab;
    ab.table_stride = blocks;
    ab.block_size = bs;
    const float scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
    const double t = time([&](int) {
      Check(cuda::PagedAttentionPrefill(xa, kv, kv + N * kvs, ab, d_tiles,
                                        static_cast<int32_t>(tiles.size()), c.num_heads,
                                        c.num_kv_heads, c.head_dim, scale, xb, st),
            "prefill attention");
    });
    const double flops = 4.0 * N * N / 2 * c.head_dim * c.num_heads;  // causal half
    row("prefill attention (causal)", N, t, 0, flops, double(L));
    // Decode attention of the last token over 128 and 4096 keys (one launch incl. combine).
    float* partial;
    Check(cudaMalloc(&partial, cuda::DecodePartialFloats(1, c.num_heads, c.head_dim) * 4), "m");
    for (int32_t ctx : {128, 4096}) {
      const int32_t tok = ctx - 1;
      int32_t* d_tok;
      Check(cudaMalloc(&d_tok, 4), "malloc");
      cudaMemcpy(d_tok, &tok, 4, cudaMemcpyHostToDevice);
      for (bool mma : {false, true}) {
        auto* attend = mma ? cuda::PagedAttentionDecodeMma : cuda::PagedAttentionDecode;
        const double td = time([&](int) {
          Check(attend(xa, kv, kv + N * kvs, ab, d_tok, 1, cuda::kMaxSplits, c.num_heads,
                       c.num_kv_heads, c.head_dim, scale, partial, xb, st),
                "decode attention");
        });
        char name[64];
        std::snprintf(name, sizeof name, "decode attn ctx %d %s", ctx, mma ? "mma" : "cuda-core");
        row(name, 1, td, 2.0 * ctx * kvs * 2, 0, ctx == 128 && mma ? double(L) : 0);
      }
      cudaFree(d_tok);
    }
    cudaFree(partial);
    cudaFree(kv);
    cudaFree(d_qs);
    cudaFree(d_seq);
    cudaFree(d_pos);
    cudaFree(d_tab);
    cudaFree(d_tiles);
  }
  // One decode step at batch 64 (context 128), op by op: where the step goes beyond the weights.
  {
    const int64_t B = 64;
    const int32_t ctx = 128, bs = 32, per = ctx / bs;
    double sum_ms = 0;
    auto row64 = [&](const char* op, double t, double bytes, double per_step) {
      row(op, B, t, bytes, 0, per_step);
      sum_ms += t * per_step * 1e3;
    };
    for (const Shape& s : shapes) {
      gemm.set_gemv_max_rows(cuda::Gemm().gemv_max_rows());
      const double bytes = 2.0 * s.in * s.out + 2.0 * B * s.in + 4.0 * B * s.out;
      const double t = time([&](int i) {
        Check(gemm.Linear(xa, B, s.in, slice(s.in * s.out, i), s.out, nullptr, yf, true, st));
      });
      char name[64];
      std::snprintf(name, sizeof name, "b64 %s", s.per_step == 1.0 ? "lm_head (64 rows)" : s.name);
      row64(name, t, bytes, s.per_step);
    }
    double t = time([&](int) { Check(cuda::SiluMul(gu, B, inter, xb, st), "silu"); });
    row64("b64 silu*mul", t, B * inter * 10.0, double(L));
    t = time([&](int) { Check(cuda::AddRmsNorm(yf, gu, nullptr, B, h, w, 1e-6f, xb, st), "n"); });
    row64("b64 add + rmsnorm", t, B * h * 14.0, 2.0 * L);
    // Decode attention: 64 sequences of 128 keys each, own blocks.
    cuda::bf16_t* kv;
    const int64_t toks = B * ctx;
    Check(cudaMalloc(&kv, 2 * toks * kvs * 2), "malloc");
    Check(cuda::FillRandomBf16(kv, 2 * toks * kvs, 11, 0.0f, 1.0f, st), "fill");
    std::vector<int32_t> qstart(B + 1), seq_of(B), pos(B, ctx - 1), table(B * per), dec(B);
    for (int32_t s = 0; s <= B; ++s) qstart[s] = s;
    for (int32_t s = 0; s < B; ++s) seq_of[s] = dec[s] = s;
    for (int32_t b = 0; b < B * per; ++b) table[b] = b;
    int32_t *d_qs, *d_seq, *d_pos, *d_tab, *d_dec;
    Check(cudaMalloc(&d_qs, (B + 1) * 4), "malloc");
    Check(cudaMalloc(&d_seq, B * 4), "malloc");
    Check(cudaMalloc(&d_pos, B * 4), "malloc");
    Check(cudaMalloc(&d_tab, B * per * 4), "malloc");
    Check(cudaMalloc(&d_dec, B * 4), "malloc");
    cudaMemcpy(d_qs, qstart.data(), (B + 1) * 4, cudaMemcpyHostToDevice);
    cudaMemcpy(d_seq, seq_of.data(), B * 4, cudaMemcpyHostToDevice);
    cudaMemcpy(d_pos, pos.data(), B * 4, cudaMemcpyHostToDevice);
    cudaMemcpy(d_tab, table.data(), B * per * 4, cudaMemcpyHostToDevice);
    cudaMemcpy(d_dec, dec.data(), B * 4, cudaMemcpyHostToDevice);
    cuda::AttnBatch ab;
    ab.query_start = d_qs;
    ab.seq_of = d_seq;
    ab.positions = d_pos;
    ab.block_tables = d_tab;
    ab.table_stride = per;
    ab.block_size = bs;
    float* partial;
    Check(cudaMalloc(&partial, cuda::DecodePartialFloats(B, c.num_heads, c.head_dim) * 4), "m");
    const float scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
    t = time([&](int) {
      Check(cuda::PagedAttentionDecodeMma(xa, kv, kv + toks * kvs, ab, d_dec, B, cuda::kMaxSplits,
                                          c.num_heads, c.num_kv_heads, c.head_dim, scale, partial,
                                          xb, st),
            "decode attention");
    });
    row64("b64 decode attn ctx 128 mma", t, 2.0 * toks * kvs * 2, double(L));
    // Greedy sampling of the 64 logits rows on the device.
    float* lg;
    cuda::SampleRowParams* d_par;
    cuda::SampleEntry* d_ent;
    float* d_sav;
    cuda::SampleRowOut* d_out;
    Check(cudaMalloc(&lg, B * V * 4), "malloc");
    Check(cuda::FillRandomF32(lg, B * V, 12, 0.0f, 3.0f, st), "fill");
    Check(cudaMalloc(&d_par, B * sizeof(cuda::SampleRowParams)), "malloc");
    Check(cudaMalloc(&d_ent, sizeof(cuda::SampleEntry)), "malloc");
    Check(cudaMalloc(&d_sav, 4), "malloc");
    Check(cudaMalloc(&d_out, B * sizeof(cuda::SampleRowOut)), "malloc");
    std::vector<cuda::SampleRowParams> par(B);
    cudaMemcpy(d_par, par.data(), B * sizeof(cuda::SampleRowParams), cudaMemcpyHostToDevice);
    t = time([&](int) {
      Check(cuda::SampleRows(lg, static_cast<int32_t>(V), B, d_par, d_ent, d_sav, d_out, st), "s");
    });
    row64("b64 greedy sampling (device)", t, B * V * 4.0, 1.0);
    for (auto& q : par) {
      q.greedy = 0;
      q.temperature = 0.8f;
      q.top_k = 50;
      q.top_p = 0.9f;
    }
    cudaMemcpy(d_par, par.data(), B * sizeof(cuda::SampleRowParams), cudaMemcpyHostToDevice);
    t = time([&](int) {
      Check(cuda::SampleRows(lg, static_cast<int32_t>(V), B, d_par, d_ent, d_sav, d_out, st), "s");
    });
    row("b64 top-k 50 top-p 0.9 sampling", B, t, B * V * 4.0, 0, 0);
    std::printf("%-34s %6lld %10s %12s %7s %9.3f\n", "b64 sum of the ops above", (long long)B, "",
                "", "", sum_ms);
    cudaFree(lg);
    cudaFree(d_par);
    cudaFree(d_ent);
    cudaFree(d_sav);
    cudaFree(d_out);
    cudaFree(partial);
    cudaFree(kv);
    cudaFree(d_qs);
    cudaFree(d_seq);
    cudaFree(d_pos);
    cudaFree(d_tab);
    cudaFree(d_dec);
  }
  std::printf("(bandwidth %.0f GB/s, matmul %.0f TFLOP/s measured above)\n", bandwidth / 1e9,
              matmul / 1e12);
  cudaFree(w);
  cudaFree(xa);
  cudaFree(xb);
  cudaFree(yf);
  cudaFree(gu);
}

}  // namespace

int main(int argc, char** argv) {
  std::string model = "configs/qwen2.5-7b";
  int decode_steps = 256;
  bool profile = true, long_runs = true, runs = true, prefill_sweep = false;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!std::strcmp(argv[i], "--model"))
      model = argv[i + 1];
    else if (!std::strcmp(argv[i], "--decode-steps"))
      decode_steps = std::atoi(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--profile"))
      profile = std::atoi(argv[i + 1]) != 0;
    else if (!std::strcmp(argv[i], "--long"))
      long_runs = std::atoi(argv[i + 1]) != 0;
    else if (!std::strcmp(argv[i], "--runs"))
      runs = std::atoi(argv[i + 1]) != 0;
    else if (!std::strcmp(argv[i], "--prefill-sweep"))
      prefill_sweep = std::atoi(argv[i + 1]) != 0;
    else
      Die(std::string("unknown flag ") + argv[i]);
  }
  if (CudaDeviceCount() == 0) Die("no CUDA device");
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, 0);
  auto cfg = LoadModelConfig(model);
  if (!cfg.ok()) Die(cfg.status().ToString());
  ModelConfig config = *cfg;
  cudaStream_t st;
  cudaStreamCreate(&st);

  // 1. Copy bandwidth: 2 GiB device to device, bytes read + written.
  double bandwidth = 0;
  {
    const size_t bytes = size_t{2} << 30;
    void *a, *b;
    Check(cudaMalloc(&a, bytes), "malloc");
    Check(cudaMalloc(&b, bytes), "malloc");
    cudaMemsetAsync(a, 1, bytes, st);
    const double t =
        TimeEvents(st, 10, [&] { cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, st); });
    bandwidth = 2.0 * bytes / t;
    cudaFree(a);
    cudaFree(b);
  }
  // 2. bf16 matmul rate: cuBLASLt 8192^3 on random data.
  double matmul = 0;
  {
    const int64_t n = 8192;
    cuda::bf16_t *x, *w, *y;
    Check(cudaMalloc(&x, n * n * 2), "malloc");
    Check(cudaMalloc(&w, n * n * 2), "malloc");
    Check(cudaMalloc(&y, n * n * 2), "malloc");
    cuda::FillRandomBf16(x, n * n, 1, 0.0f, 1.0f, st);
    cuda::FillRandomBf16(w, n * n, 2, 0.0f, 1.0f, st);
    cuda::Gemm gemm;
    Check(gemm.Init());
    const double t =
        TimeEvents(st, 10, [&] { Check(gemm.Linear(x, n, n, w, n, nullptr, y, false, st)); });
    matmul = 2.0 * n * n * n / t;
    cudaFree(x);
    cudaFree(w);
    cudaFree(y);
  }

  if (profile) ProfileOps(config, st, bandwidth, matmul);
  if (!runs) {
    std::printf("copy bandwidth %.0f GB/s, bf16 matmul %.0f TFLOP/s\n", bandwidth / 1e9,
                matmul / 1e12);
    return 0;
  }

  const auto t0 = Clock::now();
  auto be = CudaBackend::CreateDummy(config, 0);
  if (!be.ok()) Die(be.status().ToString());
  CudaBackend& backend = **be;
  const double init_s = Seconds(t0, Clock::now());
  const double weight_bytes = static_cast<double>(backend.WeightBytes());
  const double params = static_cast<double>(config.NumParameters());
  const int32_t bs = 32, max_tokens = 16384;
  auto blocks = backend.ProposeNumKvBlocks(bs, 0.9, max_tokens);
  if (!blocks.ok()) Die(blocks.status().ToString());
  Check(backend.AllocateKvCache({*blocks, bs}));
  // GPU time of each step's layers + lm_head beside its wall time (CudaBackend::SetStepTiming).
  Check(backend.SetStepTiming(true));
  const int32_t vocab = static_cast<int32_t>(config.vocab_size);
  const double kv_per_token = static_cast<double>(backend.KvBytesPerToken());
  std::vector<float> logits;

  // 2b. Prefill steps of P prompts of L tokens each (one step, the first run of each shape
  // untimed): wall and GPU time per token, against 2 * params per token at the matmul rate. Equal
  // token counts with different prompt lengths separate the causal attention from the rest.
  if (prefill_sweep) {
    std::printf("%-28s %8s %10s %10s %10s %8s\n", "prefill step", "tokens", "wall ms", "GPU ms",
                "us/token", "of GEMM");
    const int shapes[][2] = {{1, 4096},  {64, 128}, {2, 4096}, {4, 2048},  {8, 1024},
                             {128, 128}, {8, 2048}, {4, 4096}, {16, 1024}, {1, 16384}};
    for (const auto& [P, L] : shapes) {
      std::vector<double> wall, gpu;
      for (int r = 0; r < 4; ++r) {
        int32_t next = 0;
        std::vector<SeqState> seqs(P);
        ForwardBatch p = MakeBatch(seqs, L, bs, &next, vocab);
        const auto s0 = Clock::now();
        Check(backend.Forward(p, &logits));
        if (r == 0) continue;
        wall.push_back(Seconds(s0, Clock::now()) * 1e3);
        gpu.push_back(backend.LastStepGpuMs());
      }
      const double tokens = double(P) * L, ms = Median(gpu);
      const double gemm_ms = 2.0 * params * tokens / matmul * 1e3;
      char name[64];
      std::snprintf(name, sizeof name, "%d x %d", P, L);
      std::printf("%-28s %8.0f %10.1f %10.1f %10.2f %7.1f%%\n", name, tokens, Median(wall), ms,
                  ms * 1e3 / tokens, 100 * gemm_ms / ms);
    }
  }

  // 3. Batch-1 decode after a 128-token prompt: cuBLASLt GEMMs (gemv 0), then the default path.
  // Modes: 0 cuBLASLt GEMMs + CUDA-core attention, 1 skinny GEMMs + CUDA-core attention,
  // 2 skinny GEMMs + tensor-core decode attention (the default), logits to the host each step;
  // 3 the same kernels, the token sampled greedily on the GPU (ForwardSample); 4 as 3 with each
  // step launched before the previous one is waited for, its token the previous step's on the
  // device (LaunchForwardSample: the engine's overlapped steps, its default where the requests
  // allow it).
  constexpr int kModes = 5;
  const char* mode_names[kModes] = {"cuBLASLt, CUDA-core attn", "gemv, CUDA-core attn",
                                    "gemv, tensor-core attn", "gemv, tc attn, greedy on GPU",
                                    "gemv, tc attn, greedy, overlapped"};
  const std::vector<DeviceSampleSpec> greedy1(1);
  std::vector<DeviceSampleResult> sampled1;
  double decode_tps[kModes] = {}, decode_ms[kModes] = {}, decode_gpu_ms[kModes] = {};
  const int default_gemv = cuda::Gemm().gemv_max_rows();
  for (int mode = 0; mode < kModes; ++mode) {
    Check(backend.SetGemvMaxRows(mode == 0 ? 0 : default_gemv));
    Check(backend.SetDecodeAttentionMma(mode >= 2));
    int32_t next = 0;
    std::vector<SeqState> seqs(1);
    ForwardBatch p = MakeBatch(seqs, 128, bs, &next, vocab);
    Check(backend.Forward(p, &logits));
    int launched = 0;
    auto step = [&](ForwardBatch& d) {
      if (mode < 3) return Check(backend.Forward(d, &logits));
      if (mode == 3) return Check(backend.ForwardSample(d, greedy1, &sampled1));
      // The token is the one the previous launched step sampled (none yet: the given one).
      if (launched > 0) d.token_ids[0] = Backend::PreviousRowToken(0);
      Check(backend.LaunchForwardSample(d, greedy1));
      if (++launched > 1) Check(backend.WaitForwardSample(&sampled1));
    };
    for (int i = 0; i < 8; ++i) {  // warm-up, capture
      ForwardBatch d = MakeBatch(seqs, 1, bs, &next, vocab);
      step(d);
    }
    std::vector<ForwardBatch> steps;
    for (int i = 0; i < decode_steps; ++i) steps.push_back(MakeBatch(seqs, 1, bs, &next, vocab));
    const auto a = Clock::now();
    std::vector<double> gpu_ms;
    for (auto& d : steps) {
      step(d);
      gpu_ms.push_back(backend.LastStepGpuMs());
    }
    if (launched > 0) Check(backend.WaitForwardSample(&sampled1));
    const double t = Seconds(a, Clock::now());
    decode_gpu_ms[mode] = Median(gpu_ms);
    decode_tps[mode] = decode_steps / t;
    decode_ms[mode] = t / decode_steps * 1e3;
  }
  // 4. One 4096-token prefill (logits of the last token).
  double prefill_s = 0;
  {
    std::vector<double> ts;
    for (int rep = 0; rep < 4; ++rep) {
      int32_t next = 0;
      std::vector<SeqState> seqs(1);
      ForwardBatch p = MakeBatch(seqs, 4096, bs, &next, vocab);
      const auto a = Clock::now();
      Check(backend.Forward(p, &logits));
      if (rep > 0) ts.push_back(Seconds(a, Clock::now()));
    }
    prefill_s = Median(ts);
  }
  // 5. 64 sequences of `in` prompt + `out` generated tokens through the backend: prefill in steps
  // of whole prompts (at most max_tokens tokens), then out - 1 decode steps of all 64. Limit:
  // prefill FLOPs (2 * params * tokens + causal attention 2 * in^2 * q_size * layers per sequence)
  // / matmul rate, plus per decode step (weight bytes + KV bytes of all contexts) / bandwidth.
  struct Workload {
    int in, out;
    double tps = 0, prefill_s = 0, step_ms = 0, limit_tps = 0, logits_ms = 0;
    double pinned_ms = 0, host_step_ms = 0, gpu_step_ms = 0, sync_step_ms = 0;
  };
  // Host-logits decode steps of the first workload by CudaBackendOptions::host_copy_threads.
  const int copy_threads[] = {0, 1, 2, 4, 8};
  double copy_step_ms[5] = {};
  // Decode steps sample greedily on the device (Backend::ForwardSample): token ids come back.
  const std::vector<DeviceSampleSpec> greedy_specs(64);
  std::vector<DeviceSampleResult> sampled;
  std::vector<Workload> loads = {{128, 128}};
  if (long_runs) loads.insert(loads.end(), {{2048, 128}, {128, 2048}});
  for (Workload& wl : loads) {
    const int S = 64;
    int32_t next = 0;
    std::vector<SeqState> seqs(S);
    const int per_step = std::max(1, max_tokens / wl.in);
    {  // Warm-up of the workload's shapes (GEMM plans tuned as a server's warm-up tunes them), and
       // the batch-64 graph captured: one prefill step as timed below, two decode steps.
      std::vector<SeqState> part(seqs.begin(), seqs.begin() + std::min(S, per_step));
      ForwardBatch warm = MakeBatch(part, wl.in, bs, &next, vocab);
      Check(backend.Forward(warm, &logits));
      std::copy(part.begin(), part.end(), seqs.begin());
      for (int i = 0; i < 2; ++i) {
        ForwardBatch d = MakeBatch(seqs, 1, bs, &next, vocab);
        Check(backend.ForwardSample(d, greedy_specs, &sampled));
      }
      next = 0;
      seqs.assign(S, SeqState{});
    }
    const auto a = Clock::now();
    for (int s0 = 0; s0 < S; s0 += per_step) {
      std::vector<SeqState> part(seqs.begin() + s0, seqs.begin() + std::min(S, s0 + per_step));
      ForwardBatch p = MakeBatch(part, wl.in, bs, &next, vocab);
      Check(backend.Forward(p, &logits));
      std::copy(part.begin(), part.end(), seqs.begin() + s0);
    }
    const auto b = Clock::now();
    std::vector<double> gpu_ms;
    // Overlapped: step i + 1 is built and launched before step i is waited for; its tokens are
    // step i's (row r of a step is sequence r).
    for (int i = 0; i < wl.out - 1; ++i) {
      ForwardBatch d = MakeBatch(seqs, 1, bs, &next, vocab);
      if (i > 0) {
        for (int r = 0; r < S; ++r) d.token_ids[r] = Backend::PreviousRowToken(r);
      }
      Check(backend.LaunchForwardSample(d, greedy_specs));
      if (i > 0) {
        Check(backend.WaitForwardSample(&sampled));
        gpu_ms.push_back(backend.LastStepGpuMs());
      }
    }
    Check(backend.WaitForwardSample(&sampled));
    const auto c = Clock::now();
    wl.gpu_step_ms = Median(gpu_ms);
    {  // For comparison: steps one at a time (ForwardSample).
      const int k = 16;
      const auto s0 = Clock::now();
      for (int i = 0; i < k; ++i) {
        ForwardBatch d = MakeBatch(seqs, 1, bs, &next, vocab);
        Check(backend.ForwardSample(d, greedy_specs, &sampled));
      }
      wl.sync_step_ms = Seconds(s0, Clock::now()) / k * 1e3;
    }
    // For comparison: a few more steps with the logits copied to the host (the host sampler's
    // path; the copy goes to pageable memory, std::vector).
    {
      const int k = 8;
      const auto h0 = Clock::now();
      for (int i = 0; i < k; ++i) {
        ForwardBatch d = MakeBatch(seqs, 1, bs, &next, vocab);
        Check(backend.Forward(d, &logits));
      }
      wl.host_step_ms = Seconds(h0, Clock::now()) / k * 1e3;
      for (int v = 0; &wl == &loads[0] && v < 5; ++v) {
        backend.SetHostCopyThreads(copy_threads[v]);
        ForwardBatch d = MakeBatch(seqs, 1, bs, &next, vocab);
        Check(backend.Forward(d, &logits));  // staging allocated, threads started
        const auto v0 = Clock::now();
        for (int i = 0; i < k; ++i) {
          ForwardBatch e = MakeBatch(seqs, 1, bs, &next, vocab);
          Check(backend.Forward(e, &logits));
        }
        copy_step_ms[v] = Seconds(v0, Clock::now()) / k * 1e3;
      }
      backend.SetHostCopyThreads(CudaBackendOptions().host_copy_threads);
    }
    wl.prefill_s = Seconds(a, b);
    wl.step_ms = Seconds(b, c) / (wl.out - 1) * 1e3;
    wl.tps = double(S) * wl.out / Seconds(a, c);
    double limit_s =
        S *
        (2.0 * params * wl.in + 2.0 * wl.in * double(wl.in) * config.q_size() * config.num_layers) /
        matmul;
    for (int i = 1; i < wl.out; ++i)
      limit_s += (weight_bytes + S * (wl.in + i) * kv_per_token) / bandwidth;
    wl.limit_tps = double(S) * wl.out / limit_s;
    // The logits of one batch-64 step copied to the host (part of every decode step).
    std::vector<float> host(static_cast<size_t>(S) * vocab);
    float* dev;
    Check(cudaMalloc(&dev, host.size() * 4), "malloc");
    wl.logits_ms =
        TimeEvents(st, 5,
                   [&] {
                     cudaMemcpyAsync(host.data(), dev, host.size() * 4, cudaMemcpyDeviceToHost, st);
                   }) *
        1e3;
    float* pinned;
    Check(cudaMallocHost(&pinned, host.size() * 4), "malloc host");
    Check(cudaMalloc(&dev, host.size() * 4), "malloc");
    wl.pinned_ms =
        TimeEvents(
            st, 5,
            [&] { cudaMemcpyAsync(pinned, dev, host.size() * 4, cudaMemcpyDeviceToHost, st); }) *
        1e3;
    cudaFreeHost(pinned);
    cudaFree(dev);
  }

  const double decode_limit = bandwidth / weight_bytes;
  const double prefill_limit_s = 2.0 * params * 4096 / matmul;
  std::printf("\n== qilin CUDA backend: %s, %s (dummy bf16 weights on the device) ==\n", prop.name,
              model.c_str());
  std::printf("device: %s, %d SMs, %.1f GiB\n", prop.name, prop.multiProcessorCount,
              prop.totalGlobalMem / 1073741824.0);
  std::printf(
      "model: %.2f B params, %.2f GB bf16 weights on the device (made in %.2f s); KV pool "
      "%d blocks of %d tokens\n",
      params / 1e9, weight_bytes / 1e9, init_s, *blocks, bs);
  std::printf("%-44s %14s %14s %8s\n", "figure", "measured", "limit", "of limit");
  std::printf("%-44s %11.0f GB/s %14s %8s\n", "copy bandwidth D2D (read+write)", bandwidth / 1e9,
              "", "");
  std::printf("%-44s %9.0f TFLOP/s %14s %8s\n", "bf16 matmul 8192^3 (cuBLASLt)", matmul / 1e12, "",
              "");
  for (int mode = 0; mode < kModes; ++mode) {
    char name[64];
    std::snprintf(name, sizeof name, "batch-1 decode, %s", mode_names[mode]);
    std::printf("%-44s %10.1f tok/s %8.1f tok/s %7.1f%%\n", name, decode_tps[mode], decode_limit,
                100 * decode_tps[mode] / decode_limit);
    std::printf("%-44s %11.2f ms %11.2f ms %7.1f%%  (GPU, layers + lm_head: %.2f ms)\n", "  step",
                decode_ms[mode], 1e3 / decode_limit, 100 * decode_tps[mode] / decode_limit,
                decode_gpu_ms[mode]);
  }
  std::printf("%-44s %11.1f ms %11.1f ms %7.1f%%\n", "prefill, one 4096-token prompt",
              prefill_s * 1e3, prefill_limit_s * 1e3, 100 * prefill_limit_s / prefill_s);
  std::printf("%-44s %10.0f tok/s\n", "prefill tokens/s", 4096 / prefill_s);
  for (const Workload& wl : loads) {
    char name[64];
    std::snprintf(name, sizeof name, "64 x (%d in / %d out), backend only", wl.in, wl.out);
    std::printf("%-44s %10.0f tok/s %8.0f tok/s %7.1f%%\n", name, wl.tps, wl.limit_tps,
                100 * wl.tps / wl.limit_tps);
    std::printf(
        "  prefill %.1f ms, decode step %.2f ms overlapped with greedy sampling on the device "
        "(GPU, "
        "layers + lm_head: %.2f ms); %.2f ms one at a time; %.2f ms with the logits to the host (a "
        "64-row logits copy: %.2f ms pageable, %.2f ms pinned)\n",
        wl.prefill_s * 1e3, wl.step_ms, wl.gpu_step_ms, wl.sync_step_ms, wl.host_step_ms,
        wl.logits_ms, wl.pinned_ms);
  }
  std::printf(
      "batch-64 decode step with the logits to the host, by host_copy_threads "
      "(0: pageable cudaMemcpy; N: pinned staging, N threads copy out):");
  for (int v = 0; v < 5; ++v) std::printf(" %d: %.2f ms;", copy_threads[v], copy_step_ms[v]);
  std::printf("\n");
  cudaStreamDestroy(st);
  return 0;
}
