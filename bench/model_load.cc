// Checkpoint loading at a real model shape: writes a safetensors checkpoint (BF16, constant
// bytes) for a config.json, then times opening it (header validation + mmap), mapping every
// tensor (LoadModelWeights) and paging every byte in once. Opening and mapping should cost
// microseconds per tensor whatever the model size; paging in is bounded by the page cache or
// disk read rate.
//
//   qilin_bench_model_load [CONFIG_DIR=configs/qwen2.5-0.5b] [SHARDS=1] [--json]
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "model/config.h"
#include "model/safetensors.h"
#include "model/weights.h"

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

namespace {

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

// Reads one byte per 4 KiB page of `v` (touching every page) and returns their sum.
uint64_t TouchPages(const qilin::TensorView& v) {
  const auto* p = static_cast<const volatile uint8_t*>(v.data);
  uint64_t sum = 0;
  for (size_t off = 0; off < v.nbytes(); off += 4096) sum += p[off];
  return sum;
}

}  // namespace

int main(int argc, char** argv) {
  std::string config_dir = "configs/qwen2.5-0.5b";
  int shards = 1;
  bool json_out = false;
  std::vector<std::string> pos;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--json") == 0) {
      json_out = true;
    } else {
      pos.emplace_back(argv[i]);
    }
  }
  if (pos.size() > 0) config_dir = pos[0];
  if (pos.size() > 1) shards = std::max(1, std::atoi(pos[1].c_str()));

  auto config = qilin::LoadModelConfig(config_dir);
  if (!config.ok()) {
    std::fprintf(stderr, "%s\n", config.status().ToString().c_str());
    return 1;
  }
  const fs::path dir = fs::temp_directory_path() / fmt::format("qilin_bench_model_{}", getpid());
  fs::create_directories(dir);
  fs::copy_file(fs::path(config_dir) / "config.json", dir / "config.json");

  const auto tensors = qilin::ExpectedCheckpointTensors(*config);
  size_t largest = 0;
  for (const auto& t : tensors) {
    int64_t n = 1;
    for (int64_t d : t.shape) n *= d;
    largest = std::max(largest, static_cast<size_t>(n) * 2);
  }
  std::vector<uint8_t> bytes(largest, 0x3c);  // bf16 0x3c3c ~ 0.0115
  std::vector<std::vector<qilin::SafetensorsTensor>> parts(shards);
  nlohmann::json weight_map = nlohmann::json::object();
  uint64_t total = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const auto& t = tensors[i];
    int64_t n = 1;
    for (int64_t d : t.shape) n *= d;
    const size_t s = i * shards / tensors.size();
    parts[s].push_back({t.name, qilin::DType::kBF16, t.shape, bytes.data(), size_t(n) * 2});
    weight_map[t.name] = fmt::format("model-{:05d}-of-{:05d}.safetensors", s + 1, shards);
    total += size_t(n) * 2;
  }
  auto t0 = Clock::now();
  for (int s = 0; s < shards; ++s) {
    std::string name = shards == 1
                           ? "model.safetensors"
                           : fmt::format("model-{:05d}-of-{:05d}.safetensors", s + 1, shards);
    qilin::Status st = qilin::WriteSafetensors(dir / name, parts[s]);
    if (!st.ok()) {
      std::fprintf(stderr, "%s\n", st.ToString().c_str());
      fs::remove_all(dir);
      return 1;
    }
  }
  if (shards > 1) {
    std::FILE* f = std::fopen((dir / "model.safetensors.index.json").c_str(), "w");
    std::string text = nlohmann::json{{"weight_map", weight_map}}.dump();
    std::fwrite(text.data(), 1, text.size(), f);
    std::fclose(f);
  }
  auto t1 = Clock::now();
  auto ckpt = qilin::SafetensorsCheckpoint::Open(dir);
  auto t2 = Clock::now();
  auto weights = qilin::LoadModelWeights(*config, dir);
  auto t3 = Clock::now();
  if (!ckpt.ok() || !weights.ok()) {
    std::fprintf(stderr, "%s\n", (ckpt.ok() ? weights.status() : ckpt.status()).ToString().c_str());
    fs::remove_all(dir);
    return 1;
  }
  uint64_t sum = TouchPages(weights->embed_tokens);
  for (const auto& L : weights->layers) {
    for (const auto* v : {&L.input_norm, &L.q_proj, &L.k_proj, &L.v_proj, &L.q_bias, &L.k_bias,
                          &L.v_bias, &L.q_norm, &L.k_norm, &L.o_proj, &L.post_attention_norm,
                          &L.gate_proj, &L.up_proj, &L.down_proj}) {
      if (!v->empty()) sum += TouchPages(*v);
    }
  }
  if (weights->lm_head.data != weights->embed_tokens.data) sum += TouchPages(weights->lm_head);
  auto t4 = Clock::now();
  fs::remove_all(dir);

  const double write_s = Seconds(t0, t1), open_s = Seconds(t1, t2), load_s = Seconds(t2, t3),
               touch_s = Seconds(t3, t4);
  if (json_out) {
    nlohmann::json j = {{"config", config_dir},
                        {"arch", config->architecture},
                        {"tensors", tensors.size()},
                        {"bytes", total},
                        {"shards", shards},
                        {"write_s", write_s},
                        {"open_s", open_s},
                        {"load_s", load_s},
                        {"page_in_s", touch_s},
                        {"page_in_gb_s", total / touch_s / 1e9},
                        {"checksum", sum}};
    std::printf("%s\n", j.dump(2).c_str());
    return 0;
  }
  std::printf("model           %s (%s), %zu tensors, %.3f GB BF16, %d shard(s)\n",
              config_dir.c_str(), config->architecture.c_str(), tensors.size(), total / 1e9,
              shards);
  std::printf("%-34s %10s %14s\n", "step", "time", "rate");
  std::printf("%-34s %8.3f s %10.2f GB/s\n", "write checkpoint", write_s, total / write_s / 1e9);
  std::printf("%-34s %7.3f ms %8.2f us/tensor\n", "open + validate headers (mmap)", open_s * 1e3,
              open_s * 1e6 / tensors.size());
  std::printf("%-34s %7.3f ms %8.2f us/tensor\n", "LoadModelWeights (open + map names)",
              load_s * 1e3, load_s * 1e6 / tensors.size());
  std::printf("%-34s %8.3f s %10.2f GB/s  (checksum %llu)\n", "page in every byte (page cache)",
              touch_s, total / touch_s / 1e9, static_cast<unsigned long long>(sum));
  return 0;
}
