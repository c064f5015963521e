#include "model/config.h"

#include <cmath>
#include <filesystem>
#include <fstream>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

namespace qilin {
namespace {

using ::testing::AllOf;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using json = nlohmann::json;

json TinyQwen2() {
  return json{{"architectures", {"Qwen2ForCausalLM"}},
              {"model_type", "qwen2"},
              {"vocab_size", 64},
              {"hidden_size", 32},
              {"intermediate_size", 48},
              {"num_hidden_layers", 2},
              {"num_attention_heads", 4},
              {"num_key_value_heads", 2},
              {"max_position_embeddings", 128},
              {"rms_norm_eps", 1e-5},
              {"rope_theta", 1000000.0},
              {"tie_word_embeddings", true},
              {"torch_dtype", "float16"},
              {"bos_token_id", 1},
              {"eos_token_id", 2},
              {"use_sliding_window", false}};
}

json TinyQwenV1() {
  return json{{"architectures", {"QWenLMHeadModel"}},
              {"model_type", "qwen"},
              {"vocab_size", 64},
              {"hidden_size", 32},
              {"intermediate_size", 96},
              {"num_hidden_layers", 2},
              {"num_attention_heads", 4},
              {"kv_channels", 8},
              {"rotary_emb_base", 10000},
              {"rotary_pct", 1.0},
              {"layer_norm_epsilon", 1e-6},
              {"seq_length", 64},
              {"max_position_embeddings", 256},
              {"use_dynamic_ntk", true},
              {"use_logn_attn", true},
              {"no_bias", true}};
}

Result<ModelConfig> Parse(const json& j) { return ParseModelConfig(j.dump(), "test/config.json"); }

// Expects an error with `code` whose message names the file and contains every part.
template <typename T>
void ExpectError(const Result<T>& r, StatusCode code, std::vector<std::string> parts) {
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), code) << r.status().ToString();
  EXPECT_THAT(r.status().message(), HasSubstr("test/config.json"));
  for (const std::string& p : parts) EXPECT_THAT(r.status().message(), HasSubstr(p));
}

TEST(ConfigTest, Qwen2) {
  auto r = Parse(TinyQwen2());
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  const ModelConfig& c = *r;
  EXPECT_EQ(c.arch, ModelArch::kQwen2);
  EXPECT_STREQ(ModelArchName(c.arch), "Qwen2ForCausalLM");
  EXPECT_EQ(c.architecture, "Qwen2ForCausalLM");
  EXPECT_EQ(c.vocab_size, 64);
  EXPECT_EQ(c.hidden_size, 32);
  EXPECT_EQ(c.intermediate_size, 48);
  EXPECT_EQ(c.num_layers, 2);
  EXPECT_EQ(c.num_heads, 4);
  EXPECT_EQ(c.num_kv_heads, 2);
  EXPECT_EQ(c.head_dim, 8);
  EXPECT_EQ(c.q_size(), 32);
  EXPECT_EQ(c.kv_size(), 16);
  EXPECT_EQ(c.max_position_embeddings, 128);
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-5);
  EXPECT_DOUBLE_EQ(c.rope_theta, 1e6);
  EXPECT_EQ(c.rope_scaling.type, RopeScalingType::kNone);
  EXPECT_TRUE(c.tie_word_embeddings);
  EXPECT_TRUE(c.attention_bias);
  EXPECT_FALSE(c.o_bias);
  EXPECT_FALSE(c.qk_norm);
  EXPECT_EQ(c.dtype, DType::kF16);
  EXPECT_EQ(c.bos_token_id, 1);
  EXPECT_THAT(c.eos_token_ids, ElementsAre(2));
}

TEST(ConfigTest, Qwen2DefaultsKvHeadsToHeads) {
  json j = TinyQwen2();
  j.erase("num_key_value_heads");
  auto r = Parse(j);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->num_kv_heads, 4);
}

TEST(ConfigTest, Qwen3) {
  json j = TinyQwen2();
  j["architectures"] = {"Qwen3ForCausalLM"};
  j["model_type"] = "qwen3";
  j["head_dim"] = 16;  // explicit, not hidden / heads
  j["tie_word_embeddings"] = false;
  j["eos_token_id"] = {2, 3};
  j["dtype"] = "bfloat16";  // transformers 5 spelling wins over torch_dtype
  auto r = Parse(j);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->arch, ModelArch::kQwen3);
  EXPECT_EQ(r->head_dim, 16);
  EXPECT_EQ(r->q_size(), 64);
  EXPECT_EQ(r->kv_size(), 32);
  EXPECT_TRUE(r->qk_norm);
  EXPECT_FALSE(r->attention_bias);
  EXPECT_FALSE(r->tie_word_embeddings);
  EXPECT_EQ(r->dtype, DType::kBF16);
  EXPECT_THAT(r->eos_token_ids, ElementsAre(2, 3));

  j["attention_bias"] = true;
  j.erase("head_dim");  // Qwen3Config's default head_dim is 128
  r = Parse(j);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_TRUE(r->attention_bias);
  EXPECT_TRUE(r->o_bias);
  EXPECT_EQ(r->head_dim, 128);
}

TEST(ConfigTest, Llama) {
  json j = TinyQwen2();
  j["architectures"] = {"LlamaForCausalLM"};
  j["model_type"] = "llama";
  j["bos_token_id"] = nullptr;
  j.erase("eos_token_id");
  auto r = Parse(j);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->arch, ModelArch::kLlama);
  EXPECT_EQ(r->head_dim, 8);
  EXPECT_FALSE(r->attention_bias);
  EXPECT_FALSE(r->qk_norm);
  EXPECT_EQ(r->bos_token_id, -1);
  EXPECT_TRUE(r->eos_token_ids.empty());
  j["head_dim"] = 4;
  r = Parse(j);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->head_dim, 4);
}

TEST(ConfigTest, ArchitectureFromModelTypeWhenAbsent) {
  json j = TinyQwen2();
  j.erase("architectures");
  auto r = Parse(j);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->arch, ModelArch::kQwen2);
  EXPECT_EQ(r->architecture, "Qwen2ForCausalLM");
}

TEST(ConfigTest, QwenV1) {
  auto r = Parse(TinyQwenV1());
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  const ModelConfig& c = *r;
  EXPECT_EQ(c.arch, ModelArch::kQwenV1);
  EXPECT_EQ(c.intermediate_size, 48);  // half of the stored 96
  EXPECT_EQ(c.num_kv_heads, 4);        // MHA
  EXPECT_EQ(c.head_dim, 8);
  EXPECT_TRUE(c.attention_bias);
  EXPECT_FALSE(c.o_bias);
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_DOUBLE_EQ(c.rope_theta, 10000.0);
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-6);
  EXPECT_EQ(c.seq_length, 64);
  EXPECT_EQ(c.max_position_embeddings, 256);
  EXPECT_TRUE(c.use_dynamic_ntk);
  EXPECT_TRUE(c.use_logn_attn);
  EXPECT_EQ(c.dtype, DType::kBF16);
}

TEST(ConfigTest, QwenV1Errors) {
  json j = TinyQwenV1();
  j["intermediate_size"] = 97;
  ExpectError(Parse(j), StatusCode::kInvalidArgument, {"intermediate_size", "97", "even"});
  j = TinyQwenV1();
  j["rotary_pct"] = 0.5;
  ExpectError(Parse(j), StatusCode::kUnimplemented, {"rotary_pct", "0.5"});
  j = TinyQwenV1();
  j["kv_channels"] = 16;
  ExpectError(Parse(j), StatusCode::kInvalidArgument, {"kv_channels", "hidden_size"});
  j = TinyQwenV1();
  j["no_bias"] = false;
  ExpectError(Parse(j), StatusCode::kUnimplemented, {"no_bias"});
}

TEST(ConfigTest, PublishedConfigsParseWithPublishedParameterCounts) {
  struct Case {
    const char* dir;
    ModelArch arch;
    int64_t params;  // as Hugging Face reports for the published safetensors
  };
  const Case cases[] = {
      {"qwen2.5-0.5b", ModelArch::kQwen2, 494032768},
      {"qwen2.5-7b", ModelArch::kQwen2, 7615616512},
      {"qwen2.5-32b", ModelArch::kQwen2, 32763876352},
      {"qwen-7b", ModelArch::kQwenV1, 7721324544},
      {"qwen3-8b", ModelArch::kQwen3, 8190735360},
  };
  for (const Case& c : cases) {
    auto r = LoadModelConfig(std::filesystem::path(QILIN_SOURCE_DIR) / "configs" / c.dir);
    ASSERT_TRUE(r.ok()) << c.dir << ": " << r.status().ToString();
    EXPECT_EQ(r->arch, c.arch) << c.dir;
    EXPECT_EQ(r->NumParameters(), c.params) << c.dir;
    EXPECT_EQ(r->dtype, DType::kBF16) << c.dir;
  }
  auto qwen7b = LoadModelConfig(std::filesystem::path(QILIN_SOURCE_DIR) / "configs/qwen-7b");
  ASSERT_TRUE(qwen7b.ok());
  EXPECT_EQ(qwen7b->intermediate_size, 11008);
  EXPECT_EQ(qwen7b->seq_length, 8192);
  auto qwen3 = LoadModelConfig(std::filesystem::path(QILIN_SOURCE_DIR) / "configs/qwen3-8b");
  ASSERT_TRUE(qwen3.ok());
  EXPECT_EQ(qwen3->head_dim, 128);
  EXPECT_EQ(qwen3->num_kv_heads, 8);
  EXPECT_DOUBLE_EQ(qwen3->rope_theta, 1e6);
}

TEST(ConfigTest, ClassicRopeScaling) {
  json j = TinyQwen2();
  j["rope_scaling"] = {{"type", "yarn"}, {"factor", 4.0}, {"original_max_position_embeddings", 32}};
  auto r = Parse(j);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->rope_scaling.type, RopeScalingType::kYarn);
  EXPECT_DOUBLE_EQ(r->rope_scaling.factor, 4.0);
  EXPECT_EQ(r->rope_scaling.original_max_position_embeddings, 32);
  EXPECT_DOUBLE_EQ(r->rope_scaling.beta_fast, 32.0);
  EXPECT_DOUBLE_EQ(r->rope_scaling.beta_slow, 1.0);
  EXPECT_DOUBLE_EQ(r->rope_scaling.attention_factor, 0.0);
  EXPECT_DOUBLE_EQ(r->rope_theta, 1e6);

  j["rope_scaling"] = {{"rope_type", "linear"}, {"factor", 2}};
  r = Parse(j);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->rope_scaling.type, RopeScalingType::kLinear);
  EXPECT_DOUBLE_EQ(r->rope_scaling.factor, 2.0);
  EXPECT_EQ(r->rope_scaling.original_max_position_embeddings, 128);  // max_position_embeddings

  j["rope_scaling"] = {{"rope_type", "dynamic"}, {"factor", 2.5}};
  r = Parse(j);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->rope_scaling.type, RopeScalingType::kDynamic);

  j["rope_scaling"] = {{"type", "yarn"},
                       {"factor", 4.0},
                       {"beta_fast", 16},
                       {"beta_slow", 2},
                       {"attention_factor", 1.5}};
  r = Parse(j);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_DOUBLE_EQ(r->rope_scaling.beta_fast, 16.0);
  EXPECT_DOUBLE_EQ(r->rope_scaling.beta_slow, 2.0);
  EXPECT_DOUBLE_EQ(r->rope_scaling.attention_factor, 1.5);
}

// transformers 5 writes rope_parameters with rope_theta inside and no top-level rope_theta.
TEST(ConfigTest, Transformers5RopeParameters) {
  json j = TinyQwen2();
  j.erase("rope_theta");
  j["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 500000.0}};
  auto r = Parse(j);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_DOUBLE_EQ(r->rope_theta, 500000.0);
  EXPECT_EQ(r->rope_scaling.type, RopeScalingType::kNone);

  j["rope_parameters"] = {{"rope_type", "yarn"},
                          {"rope_theta", 250000.0},
                          {"factor", 8.0},
                          {"original_max_position_embeddings", 16}};
  r = Parse(j);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_DOUBLE_EQ(r->rope_theta, 250000.0);
  EXPECT_EQ(r->rope_scaling.type, RopeScalingType::kYarn);
  EXPECT_DOUBLE_EQ(r->rope_scaling.factor, 8.0);
  EXPECT_EQ(r->rope_scaling.original_max_position_embeddings, 16);

  // Per-layer-type form with only full attention.
  j["rope_parameters"] = {{"full_attention", {{"rope_type", "linear"}, {"factor", 3.0}}}};
  r = Parse(j);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->rope_scaling.type, RopeScalingType::kLinear);
  EXPECT_DOUBLE_EQ(r->rope_theta, 10000.0);  // neither form names one: the default

  // Empty rope_scaling next to rope_parameters: rope_parameters counts.
  j["rope_scaling"] = json::object();
  j["rope_parameters"] = {{"rope_type", "dynamic"}, {"factor", 2.0}};
  r = Parse(j);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->rope_scaling.type, RopeScalingType::kDynamic);
}

TEST(ConfigTest, BadRopeScaling) {
  json j = TinyQwen2();
  j["rope_scaling"] = {{"rope_type", "llama3"}, {"factor", 8.0}};
  ExpectError(Parse(j), StatusCode::kInvalidArgument,
              {"rope_scaling.rope_type", "'llama3'", "yarn"});
  j = TinyQwen2();
  j["rope_parameters"] = {{"rope_type", "longrope"}};
  ExpectError(Parse(j), StatusCode::kInvalidArgument, {"rope_parameters.rope_type", "longrope"});
  j = TinyQwen2();
  j["rope_scaling"] = {{"type", "linear"}};
  ExpectError(Parse(j), StatusCode::kInvalidArgument, {"rope_scaling.factor", "missing"});
  j["rope_scaling"] = {{"type", "linear"}, {"factor", -2}};
  ExpectError(Parse(j), StatusCode::kInvalidArgument, {"rope_scaling.factor", "positive"});
  j["rope_scaling"] = "yarn";
  ExpectError(Parse(j), StatusCode::kInvalidArgument, {"rope_scaling", "an object", "string"});
  j["rope_scaling"] = {{"type", "yarn"}, {"factor", 2}, {"beta_fast", 1}, {"beta_slow", 4}};
  ExpectError(Parse(j), StatusCode::kInvalidArgument, {"beta_fast"});
}

TEST(ConfigTest, UnknownArchitectureIsNamedWithTheSupportedOnes) {
  json j = TinyQwen2();
  j["architectures"] = {"MistralForCausalLM"};
  j["model_type"] = "mistral";
  ExpectError(Parse(j), StatusCode::kInvalidArgument,
              {"MistralForCausalLM", "Qwen2ForCausalLM", "QWenLMHeadModel", "LlamaForCausalLM",
               "Qwen3ForCausalLM"});
}

TEST(ConfigTest, ModelTypeContradictingArchitecture) {
  json j = TinyQwen2();
  j["model_type"] = "qwen3";
  ExpectError(Parse(j), StatusCode::kInvalidArgument, {"qwen3", "Qwen2ForCausalLM"});
}

TEST(ConfigTest, MissingKeyIsNamed) {
  for (const char* key : {"hidden_size", "vocab_size", "num_hidden_layers", "num_attention_heads",
                          "intermediate_size"}) {
    json j = TinyQwen2();
    j.erase(key);
    ExpectError(Parse(j), StatusCode::kInvalidArgument, {std::string("'") + key + "'", "missing"});
  }
  json j = TinyQwenV1();
  j.erase("hidden_size");
  ExpectError(Parse(j), StatusCode::kInvalidArgument, {"'hidden_size'", "missing"});
}

TEST(ConfigTest, WrongTypesAreNamed) {
  json j = TinyQwen2();
  j["hidden_size"] = "big";
  ExpectError(Parse(j), StatusCode::kInvalidArgument, {"'hidden_size'", "integer", "string"});
  j = TinyQwen2();
  j["hidden_size"] = 32.5;
  ExpectError(Parse(j), StatusCode::kInvalidArgument, {"'hidden_size'", "integer", "number"});
  j = TinyQwen2();
  j["tie_word_embeddings"] = "yes";
  ExpectError(Parse(j), StatusCode::kInvalidArgument, {"'tie_word_embeddings'", "boolean"});
  j = TinyQwen2();
  j["rms_norm_eps"] = {1, 2};
  ExpectError(Parse(j), StatusCode::kInvalidArgument, {"'rms_norm_eps'", "number", "array"});
  j = TinyQwen2();
  j["eos_token_id"] = "</s>";
  ExpectError(Parse(j), StatusCode::kInvalidArgument, {"'eos_token_id'", "integer"});
  j = TinyQwen2();
  j["eos_token_id"] = {1, "x"};
  ExpectError(Parse(j), StatusCode::kInvalidArgument, {"'eos_token_id'"});
  j = TinyQwen2();
  j["architectures"] = "Qwen2ForCausalLM";
  ExpectError(Parse(j), StatusCode::kInvalidArgument, {"'architectures'", "list"});
  j = TinyQwen2();
  j["torch_dtype"] = "float64";
  ExpectError(Parse(j), StatusCode::kInvalidArgument, {"'torch_dtype'", "float64"});
  j = TinyQwen2();
  j["vocab_size"] = 18446744073709551615ull;
  ExpectError(Parse(j), StatusCode::kOutOfRange, {"'vocab_size'"});
}

TEST(ConfigTest, NonPositiveAndOversizedValues) {
  for (int64_t bad : {0, -4}) {
    json j = TinyQwen2();
    j["num_hidden_layers"] = bad;
    ExpectError(Parse(j), StatusCode::kInvalidArgument,
                {"'num_hidden_layers'", "positive", std::to_string(bad)});
  }
  json j = TinyQwen2();
  j["hidden_size"] = int64_t{1} << 40;
  ExpectError(Parse(j), StatusCode::kOutOfRange, {"'hidden_size'", "limit"});
  j = TinyQwen2();
  j["rms_norm_eps"] = 0;
  ExpectError(Parse(j), StatusCode::kInvalidArgument, {"'rms_norm_eps'"});
}

TEST(ConfigTest, ContradictoryHeads) {
  json j = TinyQwen2();
  j["num_key_value_heads"] = 3;  // 4 heads in groups of 3
  ExpectError(Parse(j), StatusCode::kInvalidArgument,
              {"num_attention_heads (4)", "num_key_value_heads (3)"});
  j = TinyQwen2();
  j["num_attention_heads"] = 5;  // 32 / 5
  j["num_key_value_heads"] = 5;
  ExpectError(Parse(j), StatusCode::kInvalidArgument, {"hidden_size (32)", "(5)", "head_dim"});
  j["head_dim"] = 8;  // explicit head_dim makes it fine
  EXPECT_TRUE(Parse(j).ok());
}

TEST(ConfigTest, UnsupportedFeatures) {
  json j = TinyQwen2();
  j["use_sliding_window"] = true;
  ExpectError(Parse(j), StatusCode::kUnimplemented, {"'use_sliding_window'"});
  j = TinyQwen2();
  j["layer_types"] = {"full_attention", "sliding_attention"};
  ExpectError(Parse(j), StatusCode::kUnimplemented,
              {"'layer_types'", "layer 1", "sliding_attention"});
  j["layer_types"] = {"full_attention", "full_attention"};
  EXPECT_TRUE(Parse(j).ok());
  j = TinyQwen2();
  j["hidden_act"] = "gelu";
  ExpectError(Parse(j), StatusCode::kUnimplemented, {"'hidden_act'", "gelu"});
  j = TinyQwen2();
  j["architectures"] = {"LlamaForCausalLM"};
  j["model_type"] = "llama";
  j["mlp_bias"] = true;
  ExpectError(Parse(j), StatusCode::kUnimplemented, {"'mlp_bias'"});
}

TEST(ConfigTest, InvalidJsonNamesThePosition) {
  auto r = ParseModelConfig("{\"hidden_size\": 32,, }", "test/config.json");
  ExpectError(r, StatusCode::kInvalidArgument, {"invalid JSON at byte offset 19", "column 20"});
  r = ParseModelConfig("[1, 2]", "test/config.json");
  ExpectError(r, StatusCode::kInvalidArgument, {"object", "array"});
  r = ParseModelConfig(std::string(100000, '['), "test/config.json");
  ExpectError(r, StatusCode::kInvalidArgument, {"nested"});
  r = ParseModelConfig("", "test/config.json");
  ExpectError(r, StatusCode::kInvalidArgument, {"invalid JSON"});
}

TEST(ConfigTest, FileNotFound) {
  auto dir = std::filesystem::temp_directory_path() / "qilin_config_test_missing";
  std::filesystem::remove_all(dir);
  auto r = LoadModelConfig(dir);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kNotFound);
  EXPECT_THAT(r.status().message(), HasSubstr((dir / "config.json").string()));
}

TEST(ConfigTest, LoadFromDirectory) {
  auto dir = std::filesystem::temp_directory_path() / "qilin_config_test_load";
  std::filesystem::create_directories(dir);
  std::ofstream(dir / "config.json") << TinyQwenV1().dump(2);
  auto r = LoadModelConfig(dir);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->arch, ModelArch::kQwenV1);
  std::ofstream(dir / "config.json") << "{\"architectures\": [\"QWenLMHeadModel\"], oops";
  r = LoadModelConfig(dir);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(), HasSubstr((dir / "config.json").string()));
  std::filesystem::remove_all(dir);
}

// Independent reference for get_ntk_alpha: the smallest k with seq_length * 2^(k-1) >= len
// (which is ceil(log2(len / seq_length) + 1)), alpha = 2^k - 1, at least 1. Integer-only.
double ReferenceNtkAlpha(int64_t len, int64_t seq_length) {
  if (len <= seq_length) return 1.0;
  int k = 1;
  while (seq_length * (int64_t{1} << (k - 1)) < len) ++k;
  return std::max(static_cast<double>((int64_t{1} << k) - 1), 1.0);
}

TEST(ConfigTest, QwenV1NtkAlphaMatchesTheFormula) {
  auto r = Parse(TinyQwenV1());  // seq_length 64
  ASSERT_TRUE(r.ok());
  for (int64_t len : {1, 10, 63, 64, 65, 100, 127, 128, 129, 200, 256, 257, 1000, 4096, 5000}) {
    EXPECT_DOUBLE_EQ(QwenV1NtkAlpha(*r, len), ReferenceNtkAlpha(len, 64)) << len;
  }
  // Spot values worked by hand: 65/64 -> ceil(1.02) = 2 -> 3; 128/64 -> 2 -> 3; 129 -> 3 -> 7.
  EXPECT_DOUBLE_EQ(QwenV1NtkAlpha(*r, 65), 3.0);
  EXPECT_DOUBLE_EQ(QwenV1NtkAlpha(*r, 128), 3.0);
  EXPECT_DOUBLE_EQ(QwenV1NtkAlpha(*r, 129), 7.0);
  ModelConfig off = *r;
  off.use_dynamic_ntk = false;
  EXPECT_DOUBLE_EQ(QwenV1NtkAlpha(off, 5000), 1.0);

  auto big = LoadModelConfig(std::filesystem::path(QILIN_SOURCE_DIR) / "configs/qwen-7b");
  ASSERT_TRUE(big.ok());
  for (int64_t len : {2048, 8192, 8193, 16384, 16385, 32768, 40000}) {
    EXPECT_DOUBLE_EQ(QwenV1NtkAlpha(*big, len), ReferenceNtkAlpha(len, 8192)) << len;
  }
}

TEST(ConfigTest, QwenV1LognScaleMatchesTheFormula) {
  auto r = Parse(TinyQwenV1());  // seq_length 64
  ASSERT_TRUE(r.ok());
  for (int64_t pos : {0, 1, 62, 63, 64, 65, 100, 1000, 32766}) {
    const int64_t i = pos + 1;
    // log base seq_length computed through log10, not the natural log the code uses.
    double expect = i > 64 ? std::log10(static_cast<double>(i)) / std::log10(64.0) : 1.0;
    EXPECT_NEAR(QwenV1LognScale(*r, pos), expect, 1e-12) << pos;
  }
  EXPECT_DOUBLE_EQ(QwenV1LognScale(*r, 63), 1.0);      // i = 64 = seq_length
  EXPECT_NEAR(QwenV1LognScale(*r, 4095), 2.0, 1e-12);  // i = 4096 = 64^2
  EXPECT_NEAR(QwenV1LognScale(*r, 511), 1.5, 1e-12);   // i = 512 = 64^1.5
  ModelConfig off = *r;
  off.use_logn_attn = false;
  EXPECT_DOUBLE_EQ(QwenV1LognScale(off, 4095), 1.0);
}

}  // namespace
}  // namespace qilin
