#include "model/weights.h"

#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "model/safetensors.h"

namespace qilin {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
namespace fs = std::filesystem;
using json = nlohmann::json;

// Tensors of a tiny checkpoint, by checkpoint name, with random bytes.
struct Tensor {
  DType dtype;
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;
};

class WeightsTest : public ::testing::Test {
 public:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           fmt::format("qilin_weights_{}_{}", ::getpid(),
                       ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  void Add(const std::string& name, std::vector<int64_t> shape, DType dtype = DType::kBF16) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    Tensor t{dtype, std::move(shape), std::vector<uint8_t>(n * DTypeSize(dtype))};
    for (auto& b : t.bytes) b = static_cast<uint8_t>(rng_());
    tensors_[name] = std::move(t);
  }

  // Writes config.json and the tensors, into one file or into `shards` files plus an index.
  void Write(const json& config, int shards = 1) {
    std::ofstream(dir_ / "config.json") << config.dump(2);
    std::vector<std::vector<SafetensorsTensor>> parts(shards);
    json weight_map = json::object();
    int i = 0;
    for (const auto& [name, t] : tensors_) {
      int s = i++ % shards;
      parts[s].push_back({name, t.dtype, t.shape, t.bytes.data(), t.bytes.size()});
      weight_map[name] = fmt::format("model-{:05d}-of-{:05d}.safetensors", s + 1, shards);
    }
    if (shards == 1) {
      ASSERT_TRUE(WriteSafetensors(dir_ / "model.safetensors", parts[0]).ok());
      return;
    }
    for (int s = 0; s < shards; ++s) {
      auto path = dir_ / fmt::format("model-{:05d}-of-{:05d}.safetensors", s + 1, shards);
      ASSERT_TRUE(WriteSafetensors(path, parts[s]).ok());
    }
    std::ofstream(dir_ / "model.safetensors.index.json")
        << json{{"metadata", json::object()}, {"weight_map", weight_map}}.dump();
  }

  Result<ModelWeights> Load() {
    auto config = LoadModelConfig(dir_);
    if (!config.ok()) return config.status();
    return LoadModelWeights(*config, dir_);
  }

  // The view holds exactly rows [row0, row0 + shape[0]) of tensor `name`.
  void ExpectRows(const TensorView& v, const std::string& name, int64_t row0,
                  std::vector<int64_t> shape) {
    ASSERT_FALSE(v.empty()) << name;
    const Tensor& t = tensors_.at(name);
    EXPECT_EQ(v.shape, shape) << name;
    EXPECT_EQ(v.dtype, t.dtype) << name;
    int64_t row_bytes = DTypeSize(t.dtype);
    for (size_t i = 1; i < t.shape.size(); ++i) row_bytes *= t.shape[i];
    ASSERT_LE((row0 + shape[0]) * row_bytes, static_cast<int64_t>(t.bytes.size())) << name;
    ASSERT_EQ(static_cast<int64_t>(v.nbytes()), shape[0] * row_bytes) << name;
    EXPECT_EQ(std::memcmp(v.data, t.bytes.data() + row0 * row_bytes, v.nbytes()), 0) << name;
  }
  void ExpectSame(const TensorView& v, const std::string& name) {
    ExpectRows(v, name, 0, tensors_.at(name).shape);
  }

  fs::path dir_;
  std::map<std::string, Tensor> tensors_;
  std::mt19937 rng_{42};
};

// Sizes of the tiny models: hidden 16, 4 heads of 4 (2 kv heads), MLP 24, vocab 40, 2 layers.
constexpr int64_t kH = 16, kHeads = 4, kKvHeads = 2, kHd = 4, kI = 24, kV = 40, kLayers = 2;

json HfConfig(const char* arch, const char* type) {
  return json{{"architectures", {arch}},
              {"model_type", type},
              {"vocab_size", kV},
              {"hidden_size", kH},
              {"intermediate_size", kI},
              {"num_hidden_layers", kLayers},
              {"num_attention_heads", kHeads},
              {"num_key_value_heads", kKvHeads},
              {"tie_word_embeddings", false},
              {"torch_dtype", "bfloat16"}};
}

// transformers' names for Llama / Qwen2 / Qwen3, written out literally.
void AddHfTensors(WeightsTest* t, int64_t head_dim, bool bias, bool o_bias, bool qk_norm,
                  bool lm_head) {
  const int64_t q = kHeads * head_dim, kv = kKvHeads * head_dim;
  t->Add("model.embed_tokens.weight", {kV, kH});
  for (int i = 0; i < kLayers; ++i) {
    std::string p = "model.layers." + std::to_string(i) + ".";
    t->Add(p + "input_layernorm.weight", {kH});
    t->Add(p + "self_attn.q_proj.weight", {q, kH});
    t->Add(p + "self_attn.k_proj.weight", {kv, kH});
    t->Add(p + "self_attn.v_proj.weight", {kv, kH});
    if (bias) {
      t->Add(p + "self_attn.q_proj.bias", {q});
      t->Add(p + "self_attn.k_proj.bias", {kv});
      t->Add(p + "self_attn.v_proj.bias", {kv});
    }
    if (o_bias) t->Add(p + "self_attn.o_proj.bias", {kH});
    if (qk_norm) {
      t->Add(p + "self_attn.q_norm.weight", {head_dim});
      t->Add(p + "self_attn.k_norm.weight", {head_dim});
    }
    t->Add(p + "self_attn.o_proj.weight", {kH, q});
    t->Add(p + "post_attention_layernorm.weight", {kH});
    t->Add(p + "mlp.gate_proj.weight", {kI, kH});
    t->Add(p + "mlp.up_proj.weight", {kI, kH});
    t->Add(p + "mlp.down_proj.weight", {kH, kI});
  }
  t->Add("model.norm.weight", {kH});
  if (lm_head) t->Add("lm_head.weight", {kV, kH});
}

void CheckHfLayers(WeightsTest* t, const ModelWeights& w, bool bias, bool o_bias, bool qk_norm) {
  ASSERT_EQ(w.layers.size(), static_cast<size_t>(kLayers));
  for (int i = 0; i < kLayers; ++i) {
    std::string p = "model.layers." + std::to_string(i) + ".";
    const LayerWeights& L = w.layers[i];
    t->ExpectSame(L.input_norm, p + "input_layernorm.weight");
    t->ExpectSame(L.q_proj, p + "self_attn.q_proj.weight");
    t->ExpectSame(L.k_proj, p + "self_attn.k_proj.weight");
    t->ExpectSame(L.v_proj, p + "self_attn.v_proj.weight");
    t->ExpectSame(L.o_proj, p + "self_attn.o_proj.weight");
    t->ExpectSame(L.post_attention_norm, p + "post_attention_layernorm.weight");
    t->ExpectSame(L.gate_proj, p + "mlp.gate_proj.weight");
    t->ExpectSame(L.up_proj, p + "mlp.up_proj.weight");
    t->ExpectSame(L.down_proj, p + "mlp.down_proj.weight");
    if (bias) {
      t->ExpectSame(L.q_bias, p + "self_attn.q_proj.bias");
      t->ExpectSame(L.k_bias, p + "self_attn.k_proj.bias");
      t->ExpectSame(L.v_bias, p + "self_attn.v_proj.bias");
    } else {
      EXPECT_TRUE(L.q_bias.empty() && L.k_bias.empty() && L.v_bias.empty());
    }
    if (o_bias) {
      t->ExpectSame(L.o_bias, p + "self_attn.o_proj.bias");
    } else {
      EXPECT_TRUE(L.o_bias.empty());
    }
    if (qk_norm) {
      t->ExpectSame(L.q_norm, p + "self_attn.q_norm.weight");
      t->ExpectSame(L.k_norm, p + "self_attn.k_norm.weight");
    } else {
      EXPECT_TRUE(L.q_norm.empty() && L.k_norm.empty());
    }
  }
}

TEST_F(WeightsTest, Qwen2TiedEmbeddings) {
  json c = HfConfig("Qwen2ForCausalLM", "qwen2");
  c["tie_word_embeddings"] = true;
  AddHfTensors(this, kHd, /*bias=*/true, false, false, /*lm_head=*/false);
  Add("model.layers.0.self_attn.rotary_emb.inv_freq", {kHd / 2}, DType::kF32);  // ignored
  Write(c);
  auto w = Load();
  ASSERT_TRUE(w.ok()) << w.status().ToString();
  ExpectSame(w->embed_tokens, "model.embed_tokens.weight");
  ExpectSame(w->final_norm, "model.norm.weight");
  EXPECT_EQ(w->lm_head.data, w->embed_tokens.data);
  EXPECT_EQ(w->lm_head.shape, w->embed_tokens.shape);
  CheckHfLayers(this, *w, true, false, false);
  EXPECT_FALSE(w->storage.empty());
}

TEST_F(WeightsTest, Qwen3WithQkNormAndExplicitHeadDim) {
  json c = HfConfig("Qwen3ForCausalLM", "qwen3");
  c["head_dim"] = 8;  // q_size 32 != hidden 16
  AddHfTensors(this, 8, /*bias=*/false, false, /*qk_norm=*/true, /*lm_head=*/true);
  Write(c);
  auto w = Load();
  ASSERT_TRUE(w.ok()) << w.status().ToString();
  ExpectSame(w->lm_head, "lm_head.weight");
  EXPECT_NE(w->lm_head.data, w->embed_tokens.data);
  CheckHfLayers(this, *w, false, false, true);
}

TEST_F(WeightsTest, LlamaWithAttentionBiasLoadsOBias) {
  json c = HfConfig("LlamaForCausalLM", "llama");
  c["attention_bias"] = true;
  AddHfTensors(this, kHd, /*bias=*/true, /*o_bias=*/true, false, true);
  Write(c);
  auto w = Load();
  ASSERT_TRUE(w.ok()) << w.status().ToString();
  CheckHfLayers(this, *w, true, true, false);
}

TEST_F(WeightsTest, ShardedCheckpoint) {
  json c = HfConfig("Qwen2ForCausalLM", "qwen2");
  AddHfTensors(this, kHd, true, false, false, true);
  Write(c, /*shards=*/3);
  ASSERT_FALSE(fs::exists(dir_ / "model.safetensors"));
  auto w = Load();
  ASSERT_TRUE(w.ok()) << w.status().ToString();
  EXPECT_EQ(w->storage.size(), 3u);
  ExpectSame(w->embed_tokens, "model.embed_tokens.weight");
  ExpectSame(w->lm_head, "lm_head.weight");
  CheckHfLayers(this, *w, true, false, false);
}

TEST_F(WeightsTest, QwenV1SplitsCAttnIntoRowViews) {
  json c = {{"architectures", {"QWenLMHeadModel"}},
            {"model_type", "qwen"},
            {"vocab_size", kV},
            {"hidden_size", kH},
            {"intermediate_size", 2 * kI},  // Qwen v1 stores twice the branch width
            {"num_hidden_layers", kLayers},
            {"num_attention_heads", kHeads},
            {"kv_channels", kH / kHeads},
            {"seq_length", 64},
            {"no_bias", true},
            {"tie_word_embeddings", false}};
  Add("transformer.wte.weight", {kV, kH});
  for (int i = 0; i < kLayers; ++i) {
    std::string p = "transformer.h." + std::to_string(i) + ".";
    Add(p + "ln_1.weight", {kH});
    Add(p + "attn.c_attn.weight", {3 * kH, kH});
    Add(p + "attn.c_attn.bias", {3 * kH});
    Add(p + "attn.c_proj.weight", {kH, kH});
    Add(p + "ln_2.weight", {kH});
    Add(p + "mlp.w1.weight", {kI, kH});
    Add(p + "mlp.w2.weight", {kI, kH});
    Add(p + "mlp.c_proj.weight", {kH, kI});
    Add(p + "attn.rotary_emb.inv_freq", {2}, DType::kF32);  // a buffer some exports keep
  }
  Add("transformer.ln_f.weight", {kH});
  Add("lm_head.weight", {kV, kH});
  Write(c);
  auto w = Load();
  ASSERT_TRUE(w.ok()) << w.status().ToString();
  ExpectSame(w->embed_tokens, "transformer.wte.weight");
  ExpectSame(w->final_norm, "transformer.ln_f.weight");
  ExpectSame(w->lm_head, "lm_head.weight");
  for (int i = 0; i < kLayers; ++i) {
    std::string p = "transformer.h." + std::to_string(i) + ".";
    const LayerWeights& L = w->layers[i];
    ExpectSame(L.input_norm, p + "ln_1.weight");
    ExpectRows(L.q_proj, p + "attn.c_attn.weight", 0, {kH, kH});
    ExpectRows(L.k_proj, p + "attn.c_attn.weight", kH, {kH, kH});
    ExpectRows(L.v_proj, p + "attn.c_attn.weight", 2 * kH, {kH, kH});
    ExpectRows(L.q_bias, p + "attn.c_attn.bias", 0, {kH});
    ExpectRows(L.k_bias, p + "attn.c_attn.bias", kH, {kH});
    ExpectRows(L.v_bias, p + "attn.c_attn.bias", 2 * kH, {kH});
    ExpectSame(L.o_proj, p + "attn.c_proj.weight");
    EXPECT_TRUE(L.o_bias.empty());
    ExpectSame(L.post_attention_norm, p + "ln_2.weight");
    ExpectSame(L.up_proj, p + "mlp.w1.weight");    // w1(x) is multiplied ...
    ExpectSame(L.gate_proj, p + "mlp.w2.weight");  // ... by silu(w2(x))
    ExpectSame(L.down_proj, p + "mlp.c_proj.weight");
    // Views, not copies: k starts kH rows after q inside the mapping.
    EXPECT_EQ(
        static_cast<const uint8_t*>(L.k_proj.data) - static_cast<const uint8_t*>(L.q_proj.data),
        kH * kH * 2);
  }
}

TEST_F(WeightsTest, MissingTensor) {
  AddHfTensors(this, kHd, true, false, false, true);
  tensors_.erase("model.layers.1.mlp.up_proj.weight");
  Write(HfConfig("Qwen2ForCausalLM", "qwen2"));
  auto w = Load();
  ASSERT_FALSE(w.ok());
  EXPECT_EQ(w.status().code(), StatusCode::kNotFound);
  EXPECT_THAT(w.status().message(), HasSubstr("'model.layers.1.mlp.up_proj.weight'"));
  EXPECT_THAT(w.status().message(), HasSubstr("[24, 16]"));
}

TEST_F(WeightsTest, MissingBiasForQwen2) {
  AddHfTensors(this, kHd, /*bias=*/false, false, false, true);
  Write(HfConfig("Qwen2ForCausalLM", "qwen2"));
  auto w = Load();
  ASSERT_FALSE(w.ok());
  EXPECT_EQ(w.status().code(), StatusCode::kNotFound);
  EXPECT_THAT(w.status().message(), HasSubstr("'model.layers.0.self_attn.q_proj.bias'"));
}

TEST_F(WeightsTest, MissingLmHeadWhenNotTied) {
  AddHfTensors(this, kHd, true, false, false, /*lm_head=*/false);
  Write(HfConfig("Qwen2ForCausalLM", "qwen2"));
  auto w = Load();
  ASSERT_FALSE(w.ok());
  EXPECT_EQ(w.status().code(), StatusCode::kNotFound);
  EXPECT_THAT(w.status().message(), HasSubstr("'lm_head.weight'"));
  EXPECT_THAT(w.status().message(), HasSubstr("tie_word_embeddings"));
}

TEST_F(WeightsTest, WrongShape) {
  AddHfTensors(this, kHd, true, false, false, true);
  Add("model.layers.0.self_attn.k_proj.weight", {kH, kH});  // kv_size is 8, not 16
  Write(HfConfig("Qwen2ForCausalLM", "qwen2"));
  auto w = Load();
  ASSERT_FALSE(w.ok());
  EXPECT_EQ(w.status().code(), StatusCode::kInvalidArgument);
  EXPECT_THAT(w.status().message(), HasSubstr("'model.layers.0.self_attn.k_proj.weight'"));
  EXPECT_THAT(w.status().message(), HasSubstr("shape [16, 16], expected [8, 16]"));
  EXPECT_THAT(w.status().message(), HasSubstr("model.safetensors"));
}

TEST_F(WeightsTest, WrongDtype) {
  AddHfTensors(this, kHd, true, false, false, true);
  Add("model.layers.1.mlp.down_proj.weight", {kH, kI}, DType::kI8);
  Write(HfConfig("Qwen2ForCausalLM", "qwen2"));
  auto w = Load();
  ASSERT_FALSE(w.ok());
  EXPECT_EQ(w.status().code(), StatusCode::kInvalidArgument);
  EXPECT_THAT(w.status().message(), HasSubstr("'model.layers.1.mlp.down_proj.weight'"));
  EXPECT_THAT(w.status().message(), HasSubstr("I8"));
}

TEST_F(WeightsTest, MixedFloatDtypesKeepTheirOwn) {
  AddHfTensors(this, kHd, true, false, false, true);
  Add("model.norm.weight", {kH}, DType::kF32);
  Add("model.layers.0.mlp.gate_proj.weight", {kI, kH}, DType::kF16);
  Write(HfConfig("Qwen2ForCausalLM", "qwen2"));
  auto w = Load();
  ASSERT_TRUE(w.ok()) << w.status().ToString();
  EXPECT_EQ(w->final_norm.dtype, DType::kF32);
  ExpectSame(w->final_norm, "model.norm.weight");
  ExpectSame(w->layers[0].gate_proj, "model.layers.0.mlp.gate_proj.weight");
}

// A file whose header is not padded leaves F32 data at an odd address: the loader copies it
// into an aligned buffer with the same bytes.
TEST_F(WeightsTest, MisalignedTensorsAreCopiedAligned) {
  AddHfTensors(this, kHd, true, false, false, true);
  Add("model.norm.weight", {kH}, DType::kF32);
  std::ofstream(dir_ / "config.json") << HfConfig("Qwen2ForCausalLM", "qwen2").dump();
  json header = json::object();
  std::string data;
  for (const auto& [name, t] : tensors_) {
    header[name] = {{"dtype", std::string(DTypeName(t.dtype))},
                    {"shape", t.shape},
                    {"data_offsets", {data.size(), data.size() + t.bytes.size()}}};
    data.append(reinterpret_cast<const char*>(t.bytes.data()), t.bytes.size());
  }
  std::string text = header.dump();
  if ((8 + text.size()) % 4 == 0) text += " ";  // make the data start misaligned for F32
  std::string bytes(8, '\0');
  for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>((text.size() >> (8 * i)) & 0xff);
  bytes += text + data;
  std::ofstream(dir_ / "model.safetensors", std::ios::binary).write(bytes.data(), bytes.size());
  auto w = Load();
  ASSERT_TRUE(w.ok()) << w.status().ToString();
  EXPECT_EQ(reinterpret_cast<uintptr_t>(w->final_norm.data) % 4, 0u);
  ExpectSame(w->final_norm, "model.norm.weight");
  CheckHfLayers(this, *w, true, false, false);
}

// ExpectedCheckpointTensors agrees with the loader and with the parameter count, per arch.
TEST_F(WeightsTest, ExpectedCheckpointTensorsLoadForEveryArchitecture) {
  json v1 = {{"architectures", {"QWenLMHeadModel"}},
             {"vocab_size", kV},
             {"hidden_size", kH},
             {"intermediate_size", 2 * kI},
             {"num_hidden_layers", kLayers},
             {"num_attention_heads", kHeads},
             {"seq_length", 64}};
  json qwen3 = HfConfig("Qwen3ForCausalLM", "qwen3");
  qwen3["head_dim"] = 8;
  json llama = HfConfig("LlamaForCausalLM", "llama");
  llama["attention_bias"] = true;
  json qwen2 = HfConfig("Qwen2ForCausalLM", "qwen2");
  qwen2["tie_word_embeddings"] = true;
  for (const json& c : {v1, qwen3, llama, qwen2}) {
    tensors_.clear();
    fs::remove(dir_ / "model.safetensors");
    auto config = ParseModelConfig(c.dump(), "test");
    ASSERT_TRUE(config.ok()) << config.status().ToString();
    int64_t params = 0;
    for (const CheckpointTensor& t : ExpectedCheckpointTensors(*config)) {
      Add(t.name, t.shape);
      int64_t n = 1;
      for (int64_t d : t.shape) n *= d;
      params += n;
    }
    EXPECT_EQ(params, config->NumParameters()) << c.dump();
    Write(c);
    auto w = Load();
    ASSERT_TRUE(w.ok()) << w.status().ToString();
    EXPECT_EQ(w->layers.size(), static_cast<size_t>(kLayers));
  }
}

TEST_F(WeightsTest, NoCheckpoint) {
  std::ofstream(dir_ / "config.json") << HfConfig("Qwen2ForCausalLM", "qwen2").dump();
  auto w = Load();
  ASSERT_FALSE(w.ok());
  EXPECT_EQ(w.status().code(), StatusCode::kNotFound);
  EXPECT_THAT(w.status().message(), HasSubstr(dir_.string()));
}

}  // namespace
}  // namespace qilin
