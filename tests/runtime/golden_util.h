// Helpers shared by the tests that run the golden fixtures (tests/fixtures/golden, made by
// tools/golden/make_fixtures.py) through a backend: where the fixtures are, a fixture loaded on a
// device with its transformers reference, and one prefill that returns every position's logits.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdio>
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

// Every position's logits of every prompt of `f` against transformers' reference: the relative L2
// error of each position below `max_rel_l2`, no NaN. Prints "[<prefix>] <fixture><label> max
// relative L2 ..., max abs ..." and records both as test properties (suffixed with `label`).
inline void CheckLogitsAgainstReference(GoldenFixture& f, double max_rel_l2,
                                        const std::string& prefix, const std::string& label = "") {
  const int64_t vocab = f.config.vocab_size;
  const auto& prompts = f.reference["prompts"];
  double worst_rel = 0, worst_abs = 0;
  for (size_t p = 0; p < prompts.size(); ++p) {
    std::vector<int32_t> ids = prompts[p].get<std::vector<int32_t>>();
    std::vector<float> mine = PrefillAllPositions(*f.backend, ids);
    auto ref = f.logits->Find("logits_" + std::to_string(p));
    ASSERT_TRUE(ref.ok()) << ref.status().ToString();
    ASSERT_EQ(ref->dtype, DType::kF32);
    ASSERT_EQ(ref->shape, (std::vector<int64_t>{static_cast<int64_t>(ids.size()), vocab}));
    ASSERT_EQ(mine.size(), ids.size() * vocab);
    const float* r = static_cast<const float*>(ref->data);
    for (size_t t = 0; t < ids.size(); ++t) {
      double diff2 = 0, ref2 = 0;
      for (int64_t v = 0; v < vocab; ++v) {
        const double a = mine[t * vocab + v], b = r[t * vocab + v];
        ASSERT_FALSE(std::isnan(a)) << "NaN at prompt " << p << " position " << t;
        diff2 += (a - b) * (a - b);
        ref2 += b * b;
        worst_abs = std::max(worst_abs, std::abs(a - b));
      }
      const double rel = std::sqrt(diff2 / ref2);
      worst_rel = std::max(worst_rel, rel);
      EXPECT_LT(rel, max_rel_l2) << f.name << label << " prompt " << p << " position " << t;
    }
  }
  ::testing::Test::RecordProperty("max_rel_l2" + label, std::to_string(worst_rel));
  ::testing::Test::RecordProperty("max_abs" + label, std::to_string(worst_abs));
  std::printf("[%s] %-16s%-12s max relative L2 %.2e, max abs %.2e\n", prefix.c_str(),
              f.name.c_str(), label.c_str(), worst_rel, worst_abs);
}

}  // namespace qilin::golden
