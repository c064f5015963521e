// The generate extension's JSON body -> typed input tensors, checked against the model config
// that `qilin repo init` writes (datatypes from tensorrtllm_backend's ensemble / tensorrt_llm).
#include "server/kserve_http.h"

#include <gtest/gtest.h>

namespace qilin::server {
namespace {

using nlohmann::json;

const RepositoryModel& ModelNamed(const ModelRepository& repo, const std::string& name) {
  const RepositoryModel* m = repo.Find(name);
  EXPECT_NE(m, nullptr) << name;
  return *m;
}

const Tensor* Input(const InferRequest& r, const std::string& name) {
  for (const auto& t : r.inputs) {
    if (t.name == name) return &t;
  }
  return nullptr;
}

class KserveGenerate : public ::testing::Test {
 protected:
  void SetUp() override {
    auto repo = BuildModelRepository("/r", MakeRepositoryModels({.model_dir = "/m"}));
    ASSERT_TRUE(repo.ok()) << repo.status().ToString();
    repo_ = std::move(repo).value();
  }
  ModelRepository repo_;
};

TEST_F(KserveGenerate, EnsembleFieldsBecomeTypedBatchedTensors) {
  json body = {{"id", "42"},
               {"text_input", "It is a truth"},
               {"max_tokens", 7},
               {"temperature", 1},  // an integer for an FP32 input is fine
               {"stop_words", json::array({"a", "b"})},
               {"parameters", {{"random_seed", 5}}}};
  auto r = GenerateRequestFromJson(ModelNamed(repo_, "ensemble"), body);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->id, "42");
  EXPECT_EQ(r->model_name, "ensemble");
  const Tensor* text = Input(*r, "text_input");
  ASSERT_NE(text, nullptr);
  EXPECT_EQ(text->datatype, "BYTES");
  EXPECT_EQ(text->shape, (std::vector<int64_t>{1, 1}));
  ASSERT_EQ(text->bytes.size(), 1u);
  EXPECT_EQ(text->bytes[0], "It is a truth");
  const Tensor* max_tokens = Input(*r, "max_tokens");
  ASSERT_NE(max_tokens, nullptr);
  EXPECT_EQ(max_tokens->datatype, "INT32");
  ASSERT_EQ(max_tokens->ints.size(), 1u);
  EXPECT_EQ(max_tokens->ints[0], 7);
  const Tensor* temp = Input(*r, "temperature");
  ASSERT_NE(temp, nullptr);
  EXPECT_EQ(temp->datatype, "FP32");
  ASSERT_EQ(temp->floats.size(), 1u);
  EXPECT_FLOAT_EQ(static_cast<float>(temp->floats[0]), 1.0f);
  const Tensor* stops = Input(*r, "stop_words");
  ASSERT_NE(stops, nullptr);
  EXPECT_EQ(stops->shape, (std::vector<int64_t>{1, 2}));
  const Tensor* seed = Input(*r, "random_seed");
  ASSERT_NE(seed, nullptr);
  EXPECT_EQ(seed->datatype, "UINT64");
}

TEST_F(KserveGenerate, BadFieldsAreNamed) {
  const RepositoryModel& ens = ModelNamed(repo_, "ensemble");
  auto unknown = GenerateRequestFromJson(ens, {{"text_input", "x"}, {"colour", 1}});
  ASSERT_FALSE(unknown.ok());
  EXPECT_NE(unknown.status().message().find("'colour'"), std::string::npos);
  EXPECT_NE(unknown.status().message().find("text_input"), std::string::npos);  // lists inputs
  auto wrong_type = GenerateRequestFromJson(ens, {{"text_input", "x"}, {"max_tokens", "many"}});
  ASSERT_FALSE(wrong_type.ok());
  EXPECT_NE(wrong_type.status().message().find("max_tokens"), std::string::npos);
  auto fractional = GenerateRequestFromJson(ens, {{"text_input", "x"}, {"max_tokens", 2.5}});
  EXPECT_FALSE(fractional.ok());
  auto bad_id = GenerateRequestFromJson(ens, {{"text_input", "x"}, {"id", 3}});
  ASSERT_FALSE(bad_id.ok());
  EXPECT_NE(bad_id.status().message().find("id"), std::string::npos);
  auto bad_params = GenerateRequestFromJson(ens, {{"text_input", "x"}, {"parameters", 1}});
  EXPECT_FALSE(bad_params.ok());
}

TEST_F(KserveGenerate, TensorrtLlmTokenIds) {
  json body = {{"input_ids", {11, 12, 13}}, {"input_lengths", 3}, {"request_output_len", 4}};
  auto r = GenerateRequestFromJson(ModelNamed(repo_, "tensorrt_llm"), body);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  const Tensor* ids = Input(*r, "input_ids");
  ASSERT_NE(ids, nullptr);
  EXPECT_EQ(ids->datatype, "INT32");
  EXPECT_EQ(ids->shape, (std::vector<int64_t>{1, 3}));
  EXPECT_EQ(ids->ints, (std::vector<int64_t>{11, 12, 13}));
}

TEST(KserveGenerateResponse, OneElementOutputsAreScalars) {
  InferResponse resp;
  resp.model_name = "tensorrt_llm";
  resp.id = "7";
  resp.outputs.push_back(Tensor::Int32("output_ids", {5, 6}, {1, 1, 2}));
  resp.outputs.push_back(Tensor::Int32("sequence_length", {2}, {1, 1}));
  json j = GenerateResponseToJson(resp);
  EXPECT_EQ(j["model_name"], "tensorrt_llm");
  EXPECT_EQ(j["model_version"], "1");
  EXPECT_EQ(j["id"], "7");
  EXPECT_EQ(j["output_ids"], json::array({5, 6}));
  EXPECT_EQ(j["sequence_length"], 2);
}

}  // namespace
}  // namespace qilin::server
