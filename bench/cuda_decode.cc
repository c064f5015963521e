// CUDA backend speed at a real model shape with random weights made on the device, each figure
// beside the limit measured in the same run (DESIGN.md section 5):
//   copy bandwidth (cudaMemcpy D2D, bytes read + written) and bf16 matmul rate (cuBLASLt 8192^3);
//   batch-1 decode tokens/s (CUDA graphs) vs bandwidth / weight bytes;
//   one 4096-token prefill vs 2 * params * tokens / matmul rate;
//   64 concurrent sequences of 128 prompt + 128 generated tokens through the backend.
// Usage: qilin_bench_cuda_decode [--model configs/qwen2.5-7b] [--decode-steps 256]
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "kernels/cuda/gemm.h"
#include "kernels/cuda/ops.h"
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

}  // namespace

int main(int argc, char** argv) {
  std::string model = "configs/qwen2.5-7b";
  int decode_steps = 256;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!std::strcmp(argv[i], "--model"))
      model = argv[i + 1];
    else if (!std::strcmp(argv[i], "--decode-steps"))
      decode_steps = std::atoi(argv[i + 1]);
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

  const auto t0 = Clock::now();
  auto be = CudaBackend::CreateDummy(config, 0);
  if (!be.ok()) Die(be.status().ToString());
  CudaBackend& backend = **be;
  const double init_s = Seconds(t0, Clock::now());
  const double weight_bytes = static_cast<double>(backend.WeightBytes());
  const double params = static_cast<double>(config.NumParameters());
  const int32_t bs = 32, max_tokens = 8192;
  auto blocks = backend.ProposeNumKvBlocks(bs, 0.9, max_tokens);
  if (!blocks.ok()) Die(blocks.status().ToString());
  Check(backend.AllocateKvCache({*blocks, bs}));
  const int32_t vocab = static_cast<int32_t>(config.vocab_size);
  std::vector<float> logits;

  // 3. Batch-1 decode after a 128-token prompt.
  double decode_tps = 0, decode_ms = 0;
  {
    int32_t next = 0;
    std::vector<SeqState> seqs(1);
    ForwardBatch p = MakeBatch(seqs, 128, bs, &next, vocab);
    Check(backend.Forward(p, &logits));
    for (int i = 0; i < 8; ++i) {  // warm-up, graph capture
      ForwardBatch d = MakeBatch(seqs, 1, bs, &next, vocab);
      Check(backend.Forward(d, &logits));
    }
    std::vector<ForwardBatch> steps;
    for (int i = 0; i < decode_steps; ++i) steps.push_back(MakeBatch(seqs, 1, bs, &next, vocab));
    const auto a = Clock::now();
    for (auto& d : steps) Check(backend.Forward(d, &logits));
    const double t = Seconds(a, Clock::now());
    decode_tps = decode_steps / t;
    decode_ms = t / decode_steps * 1e3;
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
  // 5. 64 sequences of 128 prompt + 128 generated tokens: one packed prefill, 128 decode steps.
  double conc_tps = 0, conc_step_ms = 0, conc_prefill_s = 0;
  {
    int32_t next = 0;
    std::vector<SeqState> seqs(64);
    ForwardBatch warm = MakeBatch(seqs, 128, bs, &next, vocab);
    Check(backend.Forward(warm, &logits));  // warm-up of the shapes
    next = 0;
    seqs.assign(64, SeqState{});
    const auto a = Clock::now();
    ForwardBatch p = MakeBatch(seqs, 128, bs, &next, vocab);
    Check(backend.Forward(p, &logits));
    const auto b = Clock::now();
    for (int i = 0; i < 127; ++i) {
      ForwardBatch d = MakeBatch(seqs, 1, bs, &next, vocab);
      Check(backend.Forward(d, &logits));
    }
    const auto c = Clock::now();
    conc_prefill_s = Seconds(a, b);
    conc_step_ms = Seconds(b, c) / 127 * 1e3;
    conc_tps = 64.0 * 128 / Seconds(a, c);
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
  std::printf("%-44s %10.1f tok/s %8.1f tok/s %7.1f%%\n",
              "batch-1 decode (128-token context, graphs)", decode_tps, decode_limit,
              100 * decode_tps / decode_limit);
  std::printf("%-44s %11.2f ms %11.2f ms %7.1f%%\n", "batch-1 decode step", decode_ms,
              1e3 / decode_limit, 100 * decode_tps / decode_limit);
  std::printf("%-44s %11.1f ms %11.1f ms %7.1f%%\n", "prefill, one 4096-token prompt",
              prefill_s * 1e3, prefill_limit_s * 1e3, 100 * prefill_limit_s / prefill_s);
  std::printf("%-44s %10.0f tok/s\n", "prefill tokens/s", 4096 / prefill_s);
  std::printf("%-44s %10.0f tok/s (prefill of 8192 tokens %.1f ms, decode step %.2f ms)\n",
              "64 x (128 in / 128 out), backend only", conc_tps, conc_prefill_s * 1e3,
              conc_step_ms);
  cudaStreamDestroy(st);
  return 0;
}
