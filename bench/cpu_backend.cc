// CPU backend speed on a real model shape with dummy bf16 weights, beside this machine's limits
// measured in the same run: decode vs weight bytes / copy bandwidth, prefill vs the FMA rate.
//   qilin_bench_cpu_backend [--model configs/qwen2.5-0.5b] [--json] [--dummy-only]
// --dummy-only: time MakeDummyWeights for the config and stop (e.g. Qwen2.5-7B's, 15 GB).
#include <immintrin.h>
#include <omp.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "model/config.h"
#include "model/weights.h"
#include "runtime/cpu_backend.h"

namespace {

using Clock = std::chrono::steady_clock;
double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

// Large memcpy on all threads, best of 5; counts bytes read + written.
double CopyBandwidthGBs() {
  const size_t bytes = size_t{512} << 20;
  std::vector<char> src(bytes, 1), dst(bytes, 0);
  double best = 0;
  for (int rep = 0; rep < 5; ++rep) {
    auto t0 = Clock::now();
#pragma omp parallel
    {
      const size_t nt = omp_get_num_threads(), id = omp_get_thread_num();
      const size_t chunk = bytes / nt;
      std::memcpy(dst.data() + id * chunk, src.data() + id * chunk, chunk);
    }
    best = std::max(best, 2.0 * bytes / Seconds(t0, Clock::now()) / 1e9);
  }
  return best;
}

// Peak f32 FMA rate on all threads: 12 independent 8-wide FMA chains per thread.
double FmaPeakGflops() {
  const int64_t iters = 20'000'000;
  double best = 0;
  for (int rep = 0; rep < 3; ++rep) {
    auto t0 = Clock::now();
    float sink = 0;
#pragma omp parallel reduction(+ : sink)
    {
      __m256 acc[12];
      for (int i = 0; i < 12; ++i) acc[i] = _mm256_set1_ps(static_cast<float>(i));
      const __m256 a = _mm256_set1_ps(0.999999f), b = _mm256_set1_ps(1e-7f);
      for (int64_t it = 0; it < iters; ++it)
        for (int i = 0; i < 12; ++i) acc[i] = _mm256_fmadd_ps(acc[i], a, b);
      for (int i = 0; i < 12; ++i) sink += _mm256_cvtss_f32(acc[i]);
    }
    const double flops = 2.0 * 8 * 12 * iters * omp_get_max_threads();
    best = std::max(best, flops / Seconds(t0, Clock::now()) / 1e9);
    if (sink == 12345.f) std::printf(" ");
  }
  return best;
}

struct Seq {
  int32_t len = 0;
  int32_t first_block = 0;
};

// One step for `seqs`, each adding `k` tokens (ids arbitrary), contiguous blocks per sequence.
qilin::ForwardBatch MakeStep(std::vector<Seq>& seqs, int32_t k, int32_t block_size,
                             int32_t blocks_per_seq) {
  qilin::ForwardBatch b;
  b.query_start = {0};
  b.max_blocks_per_seq = blocks_per_seq;
  for (Seq& s : seqs) {
    for (int32_t i = 0; i < k; ++i) {
      const int32_t p = s.len + i;
      b.token_ids.push_back((p * 7919 + 13) % 150000);
      b.positions.push_back(p);
      b.slot_mapping.push_back(static_cast<int64_t>(s.first_block) * block_size + p);
    }
    s.len += k;
    b.query_start.push_back(b.num_tokens());
    b.context_lens.push_back(s.len);
    b.prompt_lens.push_back(s.len);
    for (int32_t j = 0; j < blocks_per_seq; ++j) b.block_tables.push_back(s.first_block + j);
    b.logits_indices.push_back(b.num_tokens() - 1);
  }
  return b;
}

}  // namespace

int main(int argc, char** argv) {
  std::string model_dir = "configs/qwen2.5-0.5b";
  bool json = false;
  bool dummy_only = false;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--json") {
      json = true;
    } else if (a == "--dummy-only") {
      dummy_only = true;
    } else if (a == "--model" && i + 1 < argc) {
      model_dir = argv[++i];
    } else {
      std::fprintf(stderr, "usage: %s [--model DIR] [--json] [--dummy-only]\n", argv[0]);
      return 2;
    }
  }
  auto config_or = qilin::LoadModelConfig(model_dir);
  qilin::ModelConfig config;
  if (config_or.ok()) {
    config = *config_or;
  } else {  // Qwen2.5-0.5B's shape
    std::fprintf(stderr, "note: %s; using the built-in Qwen2.5-0.5B shape\n",
                 config_or.status().message().c_str());
    config.arch = qilin::ModelArch::kQwen2;
    config.architecture = "Qwen2ForCausalLM";
    config.vocab_size = 151936;
    config.hidden_size = 896;
    config.intermediate_size = 4864;
    config.num_layers = 24;
    config.num_heads = 14;
    config.num_kv_heads = 2;
    config.head_dim = 64;
    config.max_position_embeddings = 32768;
    config.rope_theta = 1e6;
    config.tie_word_embeddings = true;
    config.attention_bias = true;
  }
  if (dummy_only) {
    auto t0 = Clock::now();
    auto weights = qilin::MakeDummyWeights(config, qilin::DType::kBF16, 1);
    if (!weights.ok()) {
      std::fprintf(stderr, "%s\n", weights.status().ToString().c_str());
      return 1;
    }
    const double s = Seconds(t0, Clock::now());
    int64_t bytes = 0;
    bytes += weights->embed_tokens.nbytes();
    if (!config.tie_word_embeddings) bytes += weights->lm_head.nbytes();
    for (const auto& l : weights->layers)
      for (const auto* t :
           {&l.q_proj, &l.k_proj, &l.v_proj, &l.o_proj, &l.gate_proj, &l.up_proj, &l.down_proj})
        bytes += t->nbytes();
    std::printf("MakeDummyWeights %s (%.2f GB of bf16 matrices): %.2f s, %d threads\n",
                model_dir.c_str(), bytes / 1e9, s, omp_get_max_threads());
    return 0;
  }
  const double copy_gbs = CopyBandwidthGBs();
  const double fma_gflops = FmaPeakGflops();

  auto t0 = Clock::now();
  auto weights = qilin::MakeDummyWeights(config, qilin::DType::kBF16, 1);
  if (!weights.ok()) {
    std::fprintf(stderr, "%s\n", weights.status().ToString().c_str());
    return 1;
  }
  const double build_s = Seconds(t0, Clock::now());
  // Bytes a decode step streams: every layer matrix, the norms, and lm_head (not the embedding
  // table, of which it reads one row per token).
  int64_t step_bytes = weights->final_norm.nbytes() + weights->lm_head.nbytes();
  int64_t matmul_params = weights->lm_head.numel();
  for (const auto& l : weights->layers) {
    for (const auto* t :
         {&l.input_norm, &l.q_proj, &l.k_proj, &l.v_proj, &l.q_bias, &l.k_bias, &l.v_bias,
          &l.o_proj, &l.post_attention_norm, &l.gate_proj, &l.up_proj, &l.down_proj}) {
      step_bytes += t->empty() ? 0 : t->nbytes();
    }
    for (const auto* t :
         {&l.q_proj, &l.k_proj, &l.v_proj, &l.o_proj, &l.gate_proj, &l.up_proj, &l.down_proj})
      matmul_params += t->numel();
  }
  auto backend_or = qilin::CpuBackend::Create(config, std::move(weights).value());
  if (!backend_or.ok()) {
    std::fprintf(stderr, "%s\n", backend_or.status().ToString().c_str());
    return 1;
  }
  qilin::CpuBackend& backend = **backend_or;
  const int32_t bs = 32, prefill_len = 512, decode_steps = 16, ctx0 = 32;
  const int32_t blocks_per_seq = (prefill_len + 64 + bs - 1) / bs;
  if (!backend.AllocateKvCache({blocks_per_seq * 9, bs}).ok()) return 1;
  std::vector<float> logits;

  // Prefill: one 512-token prompt, logits of the last token only.
  std::vector<Seq> one = {{0, 0}};
  qilin::ForwardBatch pf = MakeStep(one, prefill_len, bs, blocks_per_seq);
  t0 = Clock::now();
  if (!backend.Forward(pf, &logits).ok()) return 1;
  const double prefill_s = Seconds(t0, Clock::now());

  auto decode = [&](int32_t batch) {
    std::vector<Seq> seqs;
    for (int32_t i = 0; i < batch; ++i) seqs.push_back({0, (i + 1) * blocks_per_seq});
    qilin::ForwardBatch warm = MakeStep(seqs, ctx0, bs, blocks_per_seq);
    (void)backend.Forward(warm, &logits);
    auto s0 = Clock::now();
    for (int32_t i = 0; i < decode_steps; ++i) {
      qilin::ForwardBatch b = MakeStep(seqs, 1, bs, blocks_per_seq);
      if (!backend.Forward(b, &logits).ok()) std::abort();
    }
    return Seconds(s0, Clock::now()) / decode_steps;  // seconds per step
  };
  const double step1 = decode(1);
  const double step8 = decode(8);

  const double prefill_tps = prefill_len / prefill_s;
  const int64_t lm_head = static_cast<int64_t>(config.vocab_size) * config.hidden_size;
  const double prefill_flops = 2.0 * (matmul_params - lm_head) * prefill_len + 2.0 * lm_head;
  const double pf_gflops = prefill_flops / prefill_s / 1e9;
  const double decode_gbs = step_bytes / step1 / 1e9;
  const double decode_floor_ms = step_bytes / (copy_gbs * 1e9) * 1e3;
  const double prefill_floor_s = prefill_flops / (fma_gflops * 1e9);
  const int threads = omp_get_max_threads();

  if (json) {
    nlohmann::json j = {
        {"model", config.architecture},
        {"hidden", config.hidden_size},
        {"layers", config.num_layers},
        {"threads", threads},
        {"weight_dtype", "bf16"},
        {"dummy_weights_build_s", build_s},
        {"copy_bandwidth_gbs", copy_gbs},
        {"fma_peak_gflops", fma_gflops},
        {"decode_step_weight_bytes", step_bytes},
        {"decode_b1_tokens_per_s", 1.0 / step1},
        {"decode_b1_ms_per_token", step1 * 1e3},
        {"decode_b1_weight_gbs", decode_gbs},
        {"decode_b1_floor_ms", decode_floor_ms},
        {"decode_b8_tokens_per_s", 8.0 / step8},
        {"prefill_tokens", prefill_len},
        {"prefill_tokens_per_s", prefill_tps},
        {"prefill_gflops", pf_gflops},
        {"prefill_floor_s", prefill_floor_s},
    };
    std::printf("%s\n", j.dump(2).c_str());
    return 0;
  }
  std::printf("CPU backend: %s shape (hidden %ld, %ld layers), dummy bf16 weights, %d threads\n",
              config.architecture.c_str(), static_cast<long>(config.hidden_size),
              static_cast<long>(config.num_layers), threads);
  std::printf("  dummy weights built in %.2f s\n", build_s);
  std::printf("  %-34s %12s %s\n", "measure", "value", "limit (same run)");
  std::printf("  %-34s %9.2f GB/s  (memcpy, read+write)\n", "copy bandwidth", copy_gbs);
  std::printf("  %-34s %9.1f GFLOP/s (f32 FMA, all threads)\n", "FMA peak", fma_gflops);
  std::printf("  %-34s %9.2f tok/s  %.1f ms/token; floor %.1f ms = %.0f MB / copy bw\n",
              "decode, batch 1", 1.0 / step1, step1 * 1e3, decode_floor_ms, step_bytes / 1e6);
  std::printf("  %-34s %9.2f GB/s  %.0f%% of copy bandwidth\n", "decode, batch 1, weight bytes",
              decode_gbs, 100.0 * decode_gbs / copy_gbs);
  std::printf("  %-34s %9.2f tok/s  %.1f ms/step\n", "decode, batch 8", 8.0 / step8, step8 * 1e3);
  std::printf("  %-34s %9.1f tok/s  %.2f s; floor %.2f s at FMA peak\n", "prefill, 512 tokens",
              prefill_tps, prefill_s, prefill_floor_s);
  std::printf("  %-34s %9.1f GFLOP/s %.0f%% of FMA peak (matmuls only)\n", "prefill, matmul rate",
              pf_gflops, 100.0 * pf_gflops / fma_gflops);
  return 0;
}
