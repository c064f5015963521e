#include <gtest/gtest.h>

#include "model/config.h"

namespace qilin {
namespace {

ModelConfig Base() {
  ModelConfig c;
  c.max_position_embeddings = 4096;
  return c;
}

TEST(MaxModelLenTest, DerivedFromRopeScaling) {
  ModelConfig c = Base();
  EXPECT_EQ(c.MaxModelLen(), 4096);
  c.rope_scaling.type = RopeScalingType::kLinear;
  c.rope_scaling.factor = 2.0;
  EXPECT_EQ(c.MaxModelLen(), 8192);
  c.rope_scaling.type = RopeScalingType::kDynamic;
  EXPECT_EQ(c.MaxModelLen(), 8192);
  // Qwen2.5's published yarn: factor 4 over an original 32768.
  c.max_position_embeddings = 32768;
  c.rope_scaling = {RopeScalingType::kYarn, 4.0, 32768};
  EXPECT_EQ(c.MaxModelLen(), 131072);
}

TEST(MaxModelLenTest, QwenV1AndOverride) {
  ModelConfig c = Base();
  c.arch = ModelArch::kQwenV1;
  c.max_position_embeddings = 2048;
  c.seq_length = 8192;
  EXPECT_EQ(c.MaxModelLen(), 8192);
  c.max_model_len = 1000;
  EXPECT_EQ(c.MaxModelLen(), 1000);
}

}  // namespace
}  // namespace qilin
