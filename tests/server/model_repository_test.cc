#include "server/model_repository.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

namespace qilin::server {
namespace {
namespace fs = std::filesystem;

// A tensorrt_llm config as tensorrtllm_backend's template has it, values filled in by hand.
constexpr char kLlm[] = R"pb(
  name: "tensorrt_llm"
  backend: "tensorrtllm"
  max_batch_size: 8
  model_transaction_policy { decoupled: true }
  dynamic_batching {
    preferred_batch_size: [ 8 ]
    max_queue_delay_microseconds: 0
    default_queue_policy { max_queue_size: 5 }
  } input
  [ {
    name: "input_ids"
    data_type: TYPE_INT32
    dims: [ -1 ]
    allow_ragged_batch: true
  }
    , {
      name: "input_lengths"
      data_type: TYPE_INT32
      dims: [ 1 ]
      reshape: { shape: [] }
    }
    , {
      name: "request_output_len"
      data_type: TYPE_INT32
      dims: [ 1 ]
    }] output
  [ {
    name: "output_ids"
    data_type: TYPE_INT32
    dims: [ -1, -1 ]
  }] instance_group
  [ { count: 1 kind: KIND_CPU }]
  parameters: {
    key: "gpt_model_type"
    value: { string_value: "V1" }
  }
  parameters: {
    key: "gpt_model_path"
    value: { string_value: "/models/qwen" }
  }
  parameters: {
    key: "max_tokens_in_paged_kv_cache"
    value: { string_value: "4096" }
  }
  parameters: {
    key: "kv_cache_free_gpu_mem_fraction"
    value: { string_value: "0.5" }
  }
  parameters: {
    key: "batch_scheduler_policy"
    value: { string_value: "guaranteed_no_evict" }
  }
  parameters: {
    key: "enable_trt_overlap"
    value: { string_value: "${enable_trt_overlap}" }
  }
)pb";

RepositoryModel Model(const std::string& name, const std::string& text) {
  auto cfg = ParseModelConfig(text, name + "/config.pbtxt");
  EXPECT_TRUE(cfg.ok()) << cfg.status().ToString();
  return RepositoryModel{name, TritonModelKind::kEnsemble,
                         cfg.ok() ? *cfg : inference::ModelConfig{}, name + "/config.pbtxt"};
}

TEST(ModelRepository, ParsesTensorrtLlmSettings) {
  std::vector<RepositoryModel> models = {Model("tensorrt_llm", kLlm)};
  auto repo = BuildModelRepository("/repo", models);
  ASSERT_TRUE(repo.ok()) << repo.status().ToString();
  const RepositorySettings& s = repo->settings;
  EXPECT_EQ(s.model_dir, "/models/qwen");
  EXPECT_EQ(s.tokenizer_dir, "/models/qwen");
  EXPECT_EQ(s.max_batch_size, 8);
  EXPECT_TRUE(s.decoupled);
  EXPECT_FALSE(s.inflight_batching);
  EXPECT_TRUE(s.guaranteed_no_evict);
  EXPECT_EQ(s.max_tokens_in_paged_kv_cache, 4096);
  EXPECT_DOUBLE_EQ(s.kv_cache_free_gpu_mem_fraction, 0.5);
  EXPECT_EQ(s.max_queue_size, 5u);
  EXPECT_EQ(repo->models[0].kind, TritonModelKind::kTensorrtLlm);
}

TEST(ModelRepository, PlaceholderOutsideStringsNamesEveryOneWithItsLine) {
  auto r = ParseModelConfig(
      "name: \"x\"\nmax_batch_size: ${triton_max_batch_size}\n"
      "model_transaction_policy {\n  decoupled: ${decoupled_mode}\n}\n",
      "m/config.pbtxt");
  ASSERT_FALSE(r.ok());
  const std::string& msg = r.status().message();
  EXPECT_NE(msg.find("m/config.pbtxt"), std::string::npos) << msg;
  EXPECT_NE(msg.find("line 2: ${triton_max_batch_size}"), std::string::npos) << msg;
  EXPECT_NE(msg.find("line 4: ${decoupled_mode}"), std::string::npos) << msg;
}

TEST(ModelRepository, PlaceholderInAHonouredParameterIsAnError) {
  std::string text = kLlm;
  text.replace(text.find("/models/qwen"), 12, "${engine_dir}");
  auto repo = BuildModelRepository("/repo", {Model("tensorrt_llm", text)});
  ASSERT_FALSE(repo.ok());
  EXPECT_NE(repo.status().message().find("'gpt_model_path'"), std::string::npos);
  EXPECT_NE(repo.status().message().find("${engine_dir}"), std::string::npos);
}

TEST(ModelRepository, UnknownFieldIsNamedWithLine) {
  auto r = ParseModelConfig("name: \"x\"\nbackend: \"python\"\nsequence_batching { }\n", "f");
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("sequence_batching"), std::string::npos)
      << r.status().message();
  EXPECT_NE(r.status().message().find("line 3"), std::string::npos) << r.status().message();
  auto r2 = ParseModelConfig("name: \"x\"\ninput [ { name: \"a\" data_typ: TYPE_INT32 } ]\n", "f");
  ASSERT_FALSE(r2.ok());
  EXPECT_NE(r2.status().message().find("data_typ"), std::string::npos);
}

TEST(ModelRepository, UnknownParameterKeyIsNamed) {
  std::string text = std::string(kLlm) +
                     "parameters: { key: \"gpt_model_pth\" value: { string_value: \"/x\" } }\n";
  auto repo = BuildModelRepository("/repo", {Model("tensorrt_llm", text)});
  ASSERT_FALSE(repo.ok());
  EXPECT_NE(repo.status().message().find("'gpt_model_pth'"), std::string::npos)
      << repo.status().message();
}

TEST(ModelRepository, BadValuesNameKeyAndLimit) {
  for (auto [from, to, key] :
       {std::tuple{"\"V1\"", "\"V2\"", "gpt_model_type"},
        std::tuple{"\"0.5\"", "\"1.5\"", "kv_cache_free_gpu_mem_fraction"},
        std::tuple{"\"4096\"", "\"-3\"", "max_tokens_in_paged_kv_cache"},
        std::tuple{"\"guaranteed_no_evict\"", "\"fifo\"", "batch_scheduler_policy"}}) {
    std::string text = kLlm;
    text.replace(text.find(from), strlen(from), to);
    auto repo = BuildModelRepository("/repo", {Model("tensorrt_llm", text)});
    ASSERT_FALSE(repo.ok()) << key;
    EXPECT_NE(repo.status().message().find(key), std::string::npos) << repo.status().message();
  }
}

TEST(ModelRepository, NeedsAnEngineModelAndKnownEnsembleSteps) {
  auto none = BuildModelRepository("/repo", {});
  EXPECT_FALSE(none.ok());
  auto models = MakeRepositoryModels({.model_dir = "/m"});
  models.back().config.mutable_parameters()->erase("gpt_model_path");
  auto missing = BuildModelRepository("/repo", models);
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.status().message().find("gpt_model_path"), std::string::npos);
  auto bad_step = MakeRepositoryModels({.model_dir = "/m"});
  bad_step[0].config.mutable_ensemble_scheduling()->mutable_step(1)->set_model_name("trt");
  auto r = BuildModelRepository("/repo", bad_step);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("'trt'"), std::string::npos);
}

TEST(ModelRepository, RepoInitWritesWhatLoadsBack) {
  const fs::path out = fs::temp_directory_path() / "qilin_repo_init_test";
  fs::remove_all(out);
  const std::string model = std::string(QILIN_SOURCE_DIR) + "/models/demo";
  RepoInitOptions o;
  o.model_dir = model;
  o.max_batch_size = 4;
  o.max_queue_size = 7;
  ASSERT_TRUE(WriteModelRepository(o, out.string()).ok());
  EXPECT_TRUE(IsModelRepository(out.string()));
  EXPECT_FALSE(IsModelRepository(model));
  auto repo = LoadModelRepository(out.string());
  ASSERT_TRUE(repo.ok()) << repo.status().ToString();
  EXPECT_EQ(repo->models.size(), 4u);
  EXPECT_EQ(repo->settings.model_dir, fs::absolute(model).lexically_normal().string());
  EXPECT_EQ(repo->settings.max_batch_size, 4);
  EXPECT_EQ(repo->settings.max_queue_size, 7u);
  EXPECT_TRUE(repo->settings.decoupled);
  for (const char* name : {"ensemble", "preprocessing", "postprocessing", "tensorrt_llm"}) {
    ASSERT_NE(repo->Find(name), nullptr) << name;
    EXPECT_TRUE(fs::is_directory(out / name / "1"));
  }
  EXPECT_EQ(repo->Find("ensemble")->kind, TritonModelKind::kEnsemble);
  EXPECT_EQ(repo->Find("preprocessing")->kind, TritonModelKind::kPreprocessing);
  // No overwrite.
  Status again = WriteModelRepository(o, out.string());
  EXPECT_EQ(again.code(), StatusCode::kFailedPrecondition);
  fs::remove_all(out);
}

}  // namespace
}  // namespace qilin::server
