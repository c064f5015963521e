#include "server/triton_models.h"

#include <gtest/gtest.h>

#include <cstring>

namespace qilin::server {
namespace {

inference::ModelInferRequest OneInput(const std::string& dt, std::vector<int64_t> shape,
                                      std::string raw) {
  inference::ModelInferRequest req;
  auto* in = req.add_inputs();
  in->set_name("x");
  in->set_datatype(dt);
  for (auto d : shape) in->add_shape(d);
  req.add_raw_input_contents(std::move(raw));
  return req;
}

std::string LenPrefixed(const std::vector<std::string>& v) {
  std::string out;
  for (const auto& s : v) {
    uint32_t n = s.size();
    out.append(reinterpret_cast<const char*>(&n), 4);
    out += s;
  }
  return out;
}

TEST(InferTensor, RawBytesAndNumbersDecode) {
  auto t = InputsFromProto(OneInput("BYTES", {1, 2}, LenPrefixed({"你好", ""})));
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  EXPECT_EQ((*t)[0].bytes, (std::vector<std::string>{"你好", ""}));
  int32_t v[3] = {-5, 0, 70000};
  auto i = InputsFromProto(OneInput("INT32", {3}, std::string(reinterpret_cast<char*>(v), 12)));
  ASSERT_TRUE(i.ok());
  EXPECT_EQ((*i)[0].ints, (std::vector<int64_t>{-5, 0, 70000}));
  uint16_t h = 0x3C00;  // 1.0 in fp16
  auto f = InputsFromProto(OneInput("FP16", {1}, std::string(reinterpret_cast<char*>(&h), 2)));
  ASSERT_TRUE(f.ok());
  EXPECT_EQ((*f)[0].floats[0], 1.0);
}

TEST(InferTensor, BadRawContentsAreNamedErrors) {
  // Length prefix past the end, truncated prefix, element count, byte count, bad dtype/shape.
  std::string bad = LenPrefixed({"abc"});
  bad[0] = 100;
  EXPECT_FALSE(InputsFromProto(OneInput("BYTES", {1}, bad)).ok());
  EXPECT_FALSE(InputsFromProto(OneInput("BYTES", {1}, "ab")).ok());
  EXPECT_FALSE(InputsFromProto(OneInput("BYTES", {2}, LenPrefixed({"a"}))).ok());
  auto r = InputsFromProto(OneInput("INT32", {2}, std::string(7, '\0')));
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("'x'"), std::string::npos);
  EXPECT_FALSE(InputsFromProto(OneInput("INT33", {1}, std::string(4, '\0'))).ok());
  EXPECT_FALSE(InputsFromProto(OneInput("INT32", {-1}, "")).ok());
  EXPECT_FALSE(InputsFromProto(OneInput("INT8", {1 << 20, 1 << 20}, "")).ok());
}

TEST(InferTensor, TypedContentsAndRanges) {
  inference::ModelInferRequest req;
  auto* in = req.add_inputs();
  in->set_name("max_tokens");
  in->set_datatype("UINT8");
  in->add_shape(1);
  in->mutable_contents()->add_uint_contents(300);
  auto r = InputsFromProto(req);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kOutOfRange);
  in->mutable_contents()->set_uint_contents(0, 200);
  r = InputsFromProto(req);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ((*r)[0].ints[0], 200);
  // Raw and typed contents together are refused.
  req.add_raw_input_contents(std::string(1, '\1'));
  EXPECT_FALSE(InputsFromProto(req).ok());
}

TEST(InferTensor, OutputRawRoundTripsThroughProto) {
  inference::ModelInferResponse resp;
  AddOutputToProto(Tensor::Bytes("text_output", {"a", "bcd"}, {1, 2}), &resp);
  AddOutputToProto(Tensor::Int32("ids", {1, -2, 3}, {1, 1, 3}), &resp);
  AddOutputToProto(Tensor::Fp32("lp", {-0.5}, {1, 1}), &resp);
  // Raw layout as Triton's clients decode it: 4-byte little-endian length + bytes.
  EXPECT_EQ(resp.raw_output_contents(0), LenPrefixed({"a", "bcd"}));
  int32_t ids[3];
  std::memcpy(ids, resp.raw_output_contents(1).data(), 12);
  EXPECT_EQ(ids[1], -2);
  auto back = OutputsFromProto(resp);
  ASSERT_TRUE(back.ok());
  EXPECT_EQ((*back)[0].bytes[1], "bcd");
  EXPECT_EQ((*back)[1].ints, (std::vector<int64_t>{1, -2, 3}));
  EXPECT_EQ((*back)[2].floats[0], -0.5);
}

TEST(InferTensor, JsonTensors) {
  auto t = TensorFromJson(nlohmann::json::parse(
      R"({"name":"text_input","datatype":"BYTES","shape":[1,1],"data":[["hi"]]})"));
  ASSERT_TRUE(t.ok());
  EXPECT_EQ(t->bytes[0], "hi");
  EXPECT_FALSE(TensorFromJson(nlohmann::json::parse(
                                  R"({"name":"a","datatype":"INT32","shape":[2],"data":[1]})"))
                   .ok());
  EXPECT_FALSE(TensorFromJson(nlohmann::json::parse(
                                  R"({"name":"a","datatype":"INT8","shape":[1],"data":[300]})"))
                   .ok());
  EXPECT_FALSE(TensorFromJson(nlohmann::json::parse(
                                  R"({"name":"a","datatype":"BOOL","shape":[1],"data":["x"]})"))
                   .ok());
  auto j = TensorToJson(Tensor::Int32("ids", {4, 5}, {1, 2}));
  EXPECT_EQ(j.dump(), R"({"data":[4,5],"datatype":"INT32","name":"ids","shape":[1,2]})");
}

TEST(InferTensor, FinalResponseFlags) {
  inference::ModelInferResponse r;
  SetFinalFlag(&r, false);
  EXPECT_FALSE(r.parameters().at("triton_final_response").bool_param());
  SetFinalFlag(&r, true);
  EXPECT_TRUE(r.parameters().at("triton_final_response").bool_param());
  inference::ModelInferRequest req;
  EXPECT_FALSE(WantsEmptyFinalResponse(req));
  (*req.mutable_parameters())["triton_enable_empty_final_response"].set_string_param("true");
  EXPECT_FALSE(WantsEmptyFinalResponse(req));  // must be a bool parameter, as in Triton
  (*req.mutable_parameters())["triton_enable_empty_final_response"].set_bool_param(true);
  EXPECT_TRUE(WantsEmptyFinalResponse(req));
}

TEST(WordList, MatchesTensorrtLlmLayout) {
  // to_word_list_format([["a b", "c"]]) with ids a b -> [7, 8], c -> [9]:
  // ids [7, 8, 9], offsets [2, 3, -1].
  auto v = ToWordListFormat({{7, 8}, {9}}, 0);
  EXPECT_EQ(v, (std::vector<int64_t>{7, 8, 9, 2, 3, -1}));
  EXPECT_EQ(ToWordListFormat({}, 0), (std::vector<int64_t>{0, -1}));
  auto back = FromWordListFormat(v.data(), v.data() + 3, 3);
  ASSERT_TRUE(back.ok());
  EXPECT_EQ(*back, (std::vector<std::vector<int32_t>>{{7, 8}, {9}}));
  const int64_t bad_ids[2] = {1, 2}, bad_off[2] = {5, -1};
  EXPECT_FALSE(FromWordListFormat(bad_ids, bad_off, 2).ok());
}

TEST(TritonModels, PreAndPostprocessingAgreeWithTheTokenizer) {
  auto tok = tokenizer::Tokenizer::Load(std::string(QILIN_SOURCE_DIR) + "/models/demo");
  ASSERT_TRUE(tok.ok()) << tok.status().ToString();
  auto repo = BuildModelRepository("/r", MakeRepositoryModels({.model_dir = "/m"}));
  ASSERT_TRUE(repo.ok()) << repo.status().ToString();
  TritonModels models(nullptr, *tok, std::move(repo).value());
  InferRequest pre;
  pre.model_name = "preprocessing";
  pre.id = "p1";
  pre.inputs.push_back(Tensor::Bytes("QUERY", {"It is a truth", "你好"}, {2, 1}));
  pre.inputs.push_back(Tensor::Int32("REQUEST_OUTPUT_LEN", {8, 9}, {2, 1}));
  pre.inputs.push_back(Tensor::Bytes("STOP_WORDS_DICT", {"truth", ""}, {2, 1}));
  std::vector<InferResponse> got;
  auto call = models.Infer(pre, [&](InferResponse r) { got.push_back(std::move(r)); });
  ASSERT_TRUE(call.ok()) << call.status().ToString();
  ASSERT_EQ(got.size(), 1u);
  EXPECT_TRUE(got[0].final);
  EXPECT_EQ(got[0].id, "p1");
  const auto a = *(*tok)->Encode("It is a truth");
  const auto b = *(*tok)->Encode("你好");
  const Tensor& ids = got[0].outputs[0];
  ASSERT_EQ(ids.name, "INPUT_ID");
  const int64_t width = std::max(a.size(), b.size());
  EXPECT_EQ(ids.shape, (std::vector<int64_t>{2, width}));
  for (size_t i = 0; i < a.size(); ++i) EXPECT_EQ(ids.ints[i], a[i]);
  for (size_t i = 0; i < b.size(); ++i) EXPECT_EQ(ids.ints[width + i], b[i]);
  EXPECT_EQ(got[0].outputs[1].ints, (std::vector<int64_t>{int64_t(a.size()), int64_t(b.size())}));
  const auto stop = *(*tok)->Encode("truth");
  const Tensor& sw = got[0].outputs[3];
  ASSERT_EQ(sw.name, "STOP_WORDS_IDS");
  EXPECT_EQ(sw.ints[0], stop[0]);
  EXPECT_EQ(sw.ints[sw.shape[2]], int64_t(stop.size()));  // first word's end offset

  // postprocessing turns the ids back into the text.
  InferRequest post;
  post.model_name = "postprocessing";
  post.inputs.push_back(Tensor::Int32("TOKENS_BATCH", ids.ints, {2, 1, width}));
  post.inputs.push_back(Tensor::Int32("SEQUENCE_LENGTH", got[0].outputs[1].ints, {2, 1}));
  got.clear();
  ASSERT_TRUE(models.Infer(post, [&](InferResponse r) { got.push_back(std::move(r)); }).ok());
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].outputs[0].bytes, (std::vector<std::string>{"It is a truth", "你好"}));

  // Errors name the model, tensor and limit.
  post.inputs[1] = Tensor::Int32("SEQUENCE_LENGTH", {99, 1}, {2, 1});
  auto bad = models.Infer(post, [](InferResponse) {});
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("SEQUENCE_LENGTH"), std::string::npos);
  InferRequest unknown;
  unknown.model_name = "nope";
  EXPECT_EQ(models.Infer(unknown, [](InferResponse) {}).status().code(), StatusCode::kNotFound);
  InferRequest missing;
  missing.model_name = "ensemble";
  auto m = models.Infer(missing, [](InferResponse) {});
  ASSERT_FALSE(m.ok());
  EXPECT_NE(m.status().message().find("text_input"), std::string::npos);
}

}  // namespace
}  // namespace qilin::server
