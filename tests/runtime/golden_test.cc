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
  // f32 arithmetic from the same weights: only summation order differs from transformers.
  CheckLogitsAgainstReference(f, 1e-4, "golden");
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
