#include "runtime/greedy_generate.h"

#include <gtest/gtest.h>

#include <algorithm>

#include "model/weights.h"
#include "runtime/cpu_backend.h"

namespace qilin {
namespace {

ModelConfig Tiny() {
  ModelConfig c;
  c.arch = ModelArch::kQwen2;
  c.vocab_size = 37;
  c.hidden_size = 24;
  c.intermediate_size = 40;
  c.num_layers = 2;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.head_dim = 6;
  c.max_position_embeddings = 40;
  c.attention_bias = true;
  return c;
}

// Each generated id is the argmax of an independent one-shot forward over prompt + ids so far.
TEST(GreedyGenerate, MatchesArgmaxOfFullForwards) {
  ModelConfig c = Tiny();
  auto backend = CpuBackend::Create(c, *MakeDummyWeights(c, DType::kBF16, 3, 0.3f, 0.1f));
  ASSERT_TRUE(backend.ok());
  CpuBackend& b = **backend;
  GreedyRequest r{{5, 9, 2, 30}, 8, true};
  ASSERT_TRUE(b.AllocateKvCache({GreedyBlocksNeeded(r, 4), 4}).ok());
  auto out = GenerateGreedy(b, r);
  ASSERT_TRUE(out.ok()) << out.status().ToString();
  ASSERT_EQ(out->size(), 8u);
  std::vector<int32_t> seq = r.prompt_ids;
  for (int32_t id : *out) {
    GreedyRequest one{seq, 1, true};
    ASSERT_TRUE(b.AllocateKvCache({GreedyBlocksNeeded(one, 64), 64}).ok());
    auto next = GenerateGreedy(b, one);
    ASSERT_TRUE(next.ok());
    EXPECT_EQ((*next)[0], id);
    seq.push_back(id);
  }
  // Stops at an eos id (the third generated token) unless ignore_eos.
  c.eos_token_ids = {(*out)[2]};
  auto eos_backend = CpuBackend::Create(c, *MakeDummyWeights(c, DType::kBF16, 3, 0.3f, 0.1f));
  ASSERT_TRUE(eos_backend.ok());
  ASSERT_TRUE((*eos_backend)->AllocateKvCache({8, 4}).ok());
  r.ignore_eos = false;
  auto stopped = GenerateGreedy(**eos_backend, r);
  ASSERT_TRUE(stopped.ok());
  const size_t first = std::find(out->begin(), out->end(), (*out)[2]) - out->begin();
  EXPECT_EQ(stopped->size(), first + 1);
}

TEST(GreedyGenerate, RejectsBadRequests) {
  const ModelConfig c = Tiny();
  EXPECT_NE(ValidateGreedyRequest(c, {{}, 4, false}, "p").message().find("empty"),
            std::string::npos);
  EXPECT_NE(ValidateGreedyRequest(c, {{1, 37}, 4, false}, "p").message().find("token id 37"),
            std::string::npos);
  EXPECT_NE(ValidateGreedyRequest(c, {{1}, 0, false}, "p").message().find("max_tokens = 0"),
            std::string::npos);
  EXPECT_NE(ValidateGreedyRequest(c, {{1, 2}, 39, false}, "p").message().find("40"),
            std::string::npos);
  EXPECT_TRUE(ValidateGreedyRequest(c, {{1, 2}, 38, false}, "p").ok());
}

}  // namespace
}  // namespace qilin
