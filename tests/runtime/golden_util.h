// Helpers shared by the tests that run the golden fixtures (tests/fixtures/golden, made by
// tools/golden/make_fixtures.py) through a backend: where the fixtures are, a fixture loaded on a
// device with its transformers reference, and one prefill that returns every position's logits.
#pragma once

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "model/config.h"
#include "model/safetensors.h"
#include "model/weights.h"
#include "runtime/backend.h"
#include "runtime/backend_factory.h"

namespace qilin::golden {

// QILIN_FIXTURES_DIR overrides the source tree (the device machine gets a copy of the fixtures).
inline std::filesystem::path GoldenDir() {
  const char* env = std::getenv("QILIN_FIXTURES_DIR");
  return env ? std::filesystem::path(env) / "golden"
             : std::filesystem::path(QILIN_SOURCE_DIR) / "tests/fixtures/golden";
}

// The fixture's config. transformers imposes no length limit; llama-dynamic's reference runs
// 37 + 12 = 49 tokens, past the 24 x 2 that qilin derives for dynamic scaling by default.
inline ModelConfig GoldenConfig(const std::string& name) {
  auto c = LoadModelConfig(GoldenDir() / name);
  EXPECT_TRUE(c.ok()) << c.status().ToString();
  ModelConfig config = c.ok() ? *c : ModelConfig{};
  config.max_model_len = 64;
  return config;
}

struct GoldenFixture {
  std::string name;
  ModelConfig config;
  std::unique_ptr<Backend> backend;
  nlohmann::json reference;                 // prompts, greedy continuations, margins
  std::shared_ptr<SafetensorsFile> logits;  // logits_<prompt> [tokens, vocab] f32
};

// The fixture `name` on `device` ("cpu", "cuda") with its reference.
inline GoldenFixture LoadGoldenFixture(const std::string& name, const std::string& device) {
  GoldenFixture f;
  f.name = name;
  const std::filesystem::path dir = GoldenDir() / name;
  f.config = GoldenConfig(name);
  auto weights = LoadModelWeights(f.config, dir);
  EXPECT_TRUE(weights.ok()) << weights.status().ToString();
  if (!weights.ok()) return f;
  auto backend = MakeBackend(device, f.config, std::move(weights).value());
  EXPECT_TRUE(backend.ok()) << backend.status().ToString();
  if (backend.ok()) f.backend = std::move(backend).value();
  std::ifstream in(dir / "reference.json");
  f.reference = nlohmann::json::parse(in);
  auto logits = SafetensorsFile::Open(dir / "reference.safetensors");
  EXPECT_TRUE(logits.ok()) << logits.status().ToString();
  if (logits.ok()) f.logits = *logits;
  return f;
}

// One sequence, every position's logits, in a single prefill over a fresh KV pool of blocks of
// 16. `reversed`: the sequence's blocks in reverse order from block `blocks` down (one spare
// block), so that the slots are not the positions.
inline std::vector<float> PrefillAllPositions(Backend& backend, const std::vector<int32_t>& ids,
                                              bool reversed = false) {
  const int32_t block_size = 16;
  const int32_t n = static_cast<int32_t>(ids.size());
  const int32_t blocks = (n + block_size - 1) / block_size;
  EXPECT_TRUE(backend.AllocateKvCache({reversed ? blocks + 1 : blocks, block_size}).ok());
  ForwardBatch b;
  b.token_ids = ids;
  for (int32_t i = 0; i < n; ++i) {
    b.positions.push_back(i);
    const int64_t block = reversed ? blocks - i / block_size : i / block_size;
    b.slot_mapping.push_back(block * block_size + i % block_size);
    b.logits_indices.push_back(i);
  }
  b.query_start = {0, n};
  b.context_lens = {n};
  b.prompt_lens = {n};
  b.max_blocks_per_seq = blocks;
  for (int32_t i = 0; i < blocks; ++i) b.block_tables.push_back(reversed ? blocks - i : i);
  std::vector<float> logits;
  Status st = backend.Forward(b, &logits);
  EXPECT_TRUE(st.ok()) << st.ToString();
  return logits;
}

}  // namespace qilin::golden
