// Host overhead of the engine per step — scheduler + batch building, sampler, stop checks and
// responses — with a backend that costs nothing (its logits are filled once and reused), at
// 8, 64 and 256 running sequences in steady decode, vocab 151936 (Qwen's).
//   qilin_bench_engine_overhead [--steps N] [--threads T] [--json]
// Physical floor of the sampler: every step reads rows x vocab x 4 bytes of logits
// (256 x 151936 x 4 = 156 MB at 256 sequences), so its time is bounded below by that over the
// machine's memory bandwidth; the scheduler part has no such floor.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "engine/engine.h"

namespace {

using namespace qilin;

class ZeroCostBackend : public Backend {
 public:
  explicit ZeroCostBackend(int32_t vocab) {
    config_.vocab_size = vocab;
    config_.max_position_embeddings = 1 << 20;
  }
  std::string name() const override { return "zero"; }
  const ModelConfig& config() const override { return config_; }
  int64_t KvBytesPerToken() const override { return 0; }
  Result<int32_t> ProposeNumKvBlocks(int32_t, double, int32_t) const override { return 1 << 16; }
  Status AllocateKvCache(const KvCacheLayout& layout) override {
    layout_ = layout;
    return Status::Ok();
  }
  const KvCacheLayout& kv_layout() const override { return layout_; }
  Status Forward(const ForwardBatch& b, std::vector<float>* logits) override {
    const size_t n = b.logits_indices.size() * static_cast<size_t>(config_.vocab_size);
    if (logits->size() != n) {
      // First call at this size: random logits (a realistic spread), reused afterwards.
      logits->resize(n);
      std::mt19937 rng(1);
      std::normal_distribution<float> d(0.0f, 3.0f);
      for (auto& x : *logits) x = d(rng);
    }
    return Status::Ok();
  }
  Status CopyKvBlocks(const std::vector<std::pair<int32_t, int32_t>>&) override {
    return Status::Ok();
  }

 private:
  ModelConfig config_;
  KvCacheLayout layout_;
};

struct Row {
  int seqs;
  std::string mode;
  double schedule_us, sample_us, output_us, total_us;
};

Row Measure(int seqs, bool top_p, int steps, int threads) {
  const int32_t vocab = 151936;
  ZeroCostBackend backend(vocab);
  EngineConfig cfg;
  cfg.max_batch_size = 256;
  cfg.max_num_tokens = 8192;
  cfg.block_size = 32;
  cfg.kv_cache_tokens = int64_t{seqs} * (128 + steps + 64 + 64);
  cfg.sampler_threads = threads;
  auto engine = Engine::Create(backend, cfg);
  if (!engine.ok()) {
    std::fprintf(stderr, "%s\n", engine.status().ToString().c_str());
    std::exit(1);
  }
  Engine& e = **engine;
  std::mt19937 rng(seqs);
  std::vector<std::shared_ptr<ResponseStream>> streams;
  for (int i = 0; i < seqs; ++i) {
    Request r;
    for (int j = 0; j < 128; ++j) r.prompt.push_back(static_cast<int32_t>(rng() % vocab));
    r.sampling.max_tokens = steps + 64;
    r.sampling.ignore_eos = true;
    if (top_p) {
      r.sampling.temperature = 0.8f;
      r.sampling.top_p = 0.9f;
      r.sampling.seed = i;
    } else {
      r.sampling.temperature = 0.0f;
    }
    streams.push_back(*e.Submit(r));
  }
  // Prefill everything, then a few decode steps to warm up.
  for (int i = 0; i < 8; ++i) (void)e.Step();
  auto drain = [&] {
    for (auto& s : streams) {
      while (s->TryPop()) {
      }
    }
  };
  drain();
  const EngineStats a = e.stats();
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < steps; ++i) {
    (void)e.Step();
    drain();  // a client reading its stream, as a server would (not timed by the engine)
  }
  const auto t1 = std::chrono::steady_clock::now();
  const EngineStats b = e.stats();
  if (b.running != seqs) std::fprintf(stderr, "warning: %d running, not %d\n", b.running, seqs);
  Row row;
  row.seqs = seqs;
  row.mode = top_p ? "top_p=0.9,T=0.8" : "greedy";
  row.schedule_us = (b.schedule_ns - a.schedule_ns) / 1e3 / steps;
  row.sample_us = (b.sample_ns - a.sample_ns) / 1e3 / steps;
  row.output_us = (b.output_ns - a.output_ns) / 1e3 / steps;
  row.total_us = std::chrono::duration<double, std::micro>(t1 - t0).count() / steps;
  return row;
}

// Read bandwidth of one pass over 156 MB (the sampler's floor), best of 3, all threads: AVX2
// max over 256-float chunks per thread, as the greedy argmax reads.
double ReadBandwidthGBs(int threads) {
  const size_t n = size_t{256} * 151936;
  std::vector<float> buf(n, 1.0f);
  double best = 0;
  for (int rep = 0; rep < 3; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    float result = 0;
#pragma omp parallel num_threads(threads)
    {
      __m256 a = _mm256_set1_ps(-1e30f), b = a, c = a, d = a;
#pragma omp for
      for (size_t i = 0; i < n; i += 32) {
        a = _mm256_max_ps(a, _mm256_loadu_ps(&buf[i]));
        b = _mm256_max_ps(b, _mm256_loadu_ps(&buf[i + 8]));
        c = _mm256_max_ps(c, _mm256_loadu_ps(&buf[i + 16]));
        d = _mm256_max_ps(d, _mm256_loadu_ps(&buf[i + 24]));
      }
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, _mm256_max_ps(_mm256_max_ps(a, b), _mm256_max_ps(c, d)));
#pragma omp critical
      for (float v : lanes) result = std::max(result, v);
    }
    const auto t1 = std::chrono::steady_clock::now();
    if (result < 0) std::puts("");
    best = std::max(best, n * 4.0 / std::chrono::duration<double>(t1 - t0).count() / 1e9);
  }
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  int steps = 20;
  int threads = omp_get_max_threads();
  bool json = false;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--json"))
      json = true;
    else if (!std::strcmp(argv[i], "--steps") && i + 1 < argc)
      steps = std::atoi(argv[++i]);
    else if (!std::strcmp(argv[i], "--threads") && i + 1 < argc)
      threads = std::atoi(argv[++i]);
    else {
      std::fprintf(stderr, "usage: %s [--steps N] [--threads T] [--json]\n", argv[0]);
      return 2;
    }
  }
  const double bw = ReadBandwidthGBs(threads);
  std::vector<Row> rows;
  for (bool top_p : {false, true}) {
    for (int seqs : {8, 64, 256}) rows.push_back(Measure(seqs, top_p, steps, threads));
  }
  if (json) {
    nlohmann::json j;
    j["threads"] = threads;
    j["read_bandwidth_gbs"] = bw;
    for (const Row& r : rows) {
      j["rows"].push_back({{"seqs", r.seqs},
                           {"mode", r.mode},
                           {"schedule_us", r.schedule_us},
                           {"sample_us", r.sample_us},
                           {"output_us", r.output_us},
                           {"total_us", r.total_us}});
    }
    std::printf("%s\n", j.dump(2).c_str());
    return 0;
  }
  std::printf("engine host overhead per decode step, vocab 151936, %d sampler threads, %d steps\n",
              threads, steps);
  std::printf("logits read bandwidth (all threads): %.1f GB/s\n\n", bw);
  std::printf("%5s  %-16s %12s %12s %12s %12s %14s\n", "seqs", "sampling", "sched+batch", "sample",
              "stop+resp", "step total", "logits floor");
  for (const Row& r : rows) {
    const double floor_us = r.seqs * 151936.0 * 4 / (bw * 1e9) * 1e6;
    std::printf("%5d  %-16s %9.1f us %9.1f us %9.1f us %9.1f us %11.1f us\n", r.seqs,
                r.mode.c_str(), r.schedule_us, r.sample_us, r.output_us, r.total_us, floor_us);
  }
  return 0;
}
