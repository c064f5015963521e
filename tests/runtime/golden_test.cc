// Every fixture architecture against Hugging Face transformers' reference (tests/fixtures/golden,
// made by tools/golden/make_fixtures.py): logits of every prompt position, and greedy
// continuations wherever the reference's top-1/top-2 margin leaves no doubt.
#include <cmath>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "golden_util.h"
#include "model/config.h"
#include "model/safetensors.h"
#include "model/weights.h"
#include "runtime/backend_factory.h"
#include "runtime/greedy_generate.h"

namespace qilin {
namespace {

namespace fs = std::filesystem;
using namespace golden;

class GoldenTest : public ::testing::TestWithParam<std::string> {};

TEST_P(GoldenTest, LogitsMatchTransformers) {
  GoldenFixture f = LoadGoldenFixture(GetParam(), "cpu");
  ASSERT_TRUE(f.backend);
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
        double a = mine[t * vocab + v], b = r[t * vocab + v];
        ASSERT_FALSE(std::isnan(a)) << "NaN at prompt " << p << " position " << t;
        diff2 += (a - b) * (a - b);
        ref2 += b * b;
        worst_abs = std::max(worst_abs, std::abs(a - b));
      }
      double rel = std::sqrt(diff2 / ref2);
      worst_rel = std::max(worst_rel, rel);
      EXPECT_LT(rel, 1e-4) << f.name << " prompt " << p << " position " << t;
    }
  }
  RecordProperty("max_rel_l2", std::to_string(worst_rel));
  RecordProperty("max_abs", std::to_string(worst_abs));
  std::printf("[golden] %-16s max relative L2 %.2e, max abs %.2e\n", f.name.c_str(), worst_rel,
              worst_abs);
}

TEST_P(GoldenTest, GreedyMatchesWhereTheMarginAllows) {
  GoldenFixture f = LoadGoldenFixture(GetParam(), "cpu");
  ASSERT_TRUE(f.backend);
  const auto& prompts = f.reference["prompts"];
  const auto& greedy = f.reference["greedy"];
  int compared = 0;
  for (size_t p = 0; p < prompts.size(); ++p) {
    GreedyRequest req;
    req.prompt_ids = prompts[p].get<std::vector<int32_t>>();
    req.max_tokens = f.reference["gen_tokens"].get<int32_t>();
    req.ignore_eos = true;
    const int32_t block_size = 8;
    ASSERT_TRUE(f.backend->AllocateKvCache({GreedyBlocksNeeded(req, block_size), block_size}).ok());
    auto out = GenerateGreedy(*f.backend, req);
    ASSERT_TRUE(out.ok()) << out.status().ToString();
    auto ref_tokens = greedy[p]["tokens"].get<std::vector<int32_t>>();
    auto margins = greedy[p]["margins"].get<std::vector<double>>();
    ASSERT_EQ(out->size(), ref_tokens.size());
    // Past the first step whose reference margin is within rounding, the contexts may differ.
    for (size_t s = 0; s < ref_tokens.size() && margins[s] > 1e-3; ++s, ++compared) {
      EXPECT_EQ((*out)[s], ref_tokens[s]) << f.name << " prompt " << p << " step " << s;
    }
  }
  EXPECT_GT(compared, 0);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, GoldenTest,
                         ::testing::Values("qwen2", "qwen2-yarn-tied", "qwen3", "llama-linear",
                                           "llama-dynamic", "qwen-v1", "qwen-v1-long"),
                         [](const auto& info) {
                           std::string n = info.param;
                           for (char& c : n)
                             if (c == '-') c = '_';
                           return n;
                         });

}  // namespace
}  // namespace qilin
