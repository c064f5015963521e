// Triton model repositories (config.pbtxt) as qilin reads and writes them.
//
// A repository laid out like tensorrtllm_backend's all_models/inflight_batcher_llm holds one
// folder per model, each with a config.pbtxt in protobuf text format: preprocessing
// (tokenizer), tensorrt_llm (the engine), postprocessing (detokenizer) and ensemble (the three
// chained), optionally tensorrt_llm_bls. qilin parses them into inference::ModelConfig
// (proto/model_config.proto), checks them, and runs the same models natively in-process.
//
//   QILIN_ASSIGN_OR_RETURN(ModelRepository repo, LoadModelRepository("/models/repo"));
//   repo.settings.model_dir     // the checkpoint gpt_model_path points at
//
// Errors name the file, line, key and value: unfilled `${...}` placeholders (every one, with
// its line), fields that model_config.proto does not have, parameters that no Triton
// tensorrtllm/python model knows, values out of range.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"
#include "model_config.pb.h"

namespace qilin::server {

// The role a model plays; how qilin runs it.
enum class TritonModelKind {
  kEnsemble,       // text in, text out (preprocessing -> tensorrt_llm -> postprocessing)
  kTensorrtLlm,    // token ids in, token ids out (the engine)
  kPreprocessing,  // text -> token ids
  kPostprocessing  // token ids -> text
};
const char* TritonModelKindName(TritonModelKind kind);

// Parses one config.pbtxt. `file` names it in errors. Fails on `${...}` placeholders outside
// parameter values (they are not valid text format) and on unknown fields, naming them.
Result<inference::ModelConfig> ParseModelConfig(std::string_view text, const std::string& file);
// Reads and parses `path`.
Result<inference::ModelConfig> ReadModelConfig(const std::string& path);
// Text format as written by `qilin repo init` (and served by the ModelConfig endpoints).
std::string ModelConfigToText(const inference::ModelConfig& config);

// The serving settings a repository configures (tensorrt_llm's parameters and its model
// settings, the tokenizer of preprocessing/postprocessing). Defaults as Triton's
// tensorrtllm backend documents them.
struct RepositorySettings {
  std::string model_dir;      // gpt_model_path: an HF checkpoint folder (or a qilin engine)
  std::string tokenizer_dir;  // preprocessing's tokenizer_dir; empty: model_dir
  std::string tokenizer_type = "auto";
  int32_t max_batch_size = 0;                   // tensorrt_llm's max_batch_size; 0: engine default
  bool decoupled = false;                       // tensorrt_llm / ensemble model_transaction_policy
  bool inflight_batching = true;                // gpt_model_type inflight(_fused)_batching vs V1
  bool guaranteed_no_evict = false;             // batch_scheduler_policy
  int64_t max_tokens_in_paged_kv_cache = 0;     // 0: unset (size from memory fraction)
  double kv_cache_free_gpu_mem_fraction = 0.9;  // of free device memory for the KV pool
  bool enable_kv_cache_reuse = true;            // prefix caching
  bool enable_chunked_context = true;           // chunked prefill
  bool exclude_input_in_output = true;          // tensorrt_llm output_ids without the prompt
  int32_t max_beam_width = 1;
  uint32_t max_queue_size = 0;      // dynamic_batching.default_queue_policy; 0: none
  bool skip_special_tokens = true;  // postprocessing
  bool add_special_tokens = true;   // preprocessing (Qwen adds none)
};

struct RepositoryModel {
  std::string name;  // folder name == config name
  TritonModelKind kind;
  inference::ModelConfig config;
  std::string config_path;
};

struct ModelRepository {
  std::string dir;
  std::vector<RepositoryModel> models;
  RepositorySettings settings;

  const RepositoryModel* Find(std::string_view name) const;
};

// True when `dir` looks like a Triton model repository: a folder with at least one
// subfolder holding a config.pbtxt (and no config.json of its own).
bool IsModelRepository(const std::string& dir);

// Loads and checks every model of the repository.
Result<ModelRepository> LoadModelRepository(const std::string& dir);

// Builds the repository's models from parsed configs (LoadModelRepository after reading the
// files; exposed for tests). `dir` resolves relative paths.
Result<ModelRepository> BuildModelRepository(const std::string& dir,
                                             std::vector<RepositoryModel> models);

struct RepoInitOptions {
  std::string model_dir;  // HF checkpoint (config.json, weights, tokenizer)
  int32_t max_batch_size = 64;
  bool decoupled = true;  // streaming over ModelStreamInfer / generate_stream
  int64_t max_tokens_in_paged_kv_cache = 0;
  double kv_cache_free_gpu_mem_fraction = 0.9;
  std::string batch_scheduler_policy = "max_utilization";
  uint32_t max_queue_size = 0;
};

// The four model configs qilin serves, complete (no placeholders): what `qilin repo init`
// writes and what `qilin serve MODEL_DIR` shows on its ModelConfig endpoints.
std::vector<RepositoryModel> MakeRepositoryModels(const RepoInitOptions& options);
// Writes `out`/<model>/config.pbtxt and an empty version folder `out`/<model>/1 for each.
// Refuses to overwrite an existing config.pbtxt.
Status WriteModelRepository(const RepoInitOptions& options, const std::string& out);

}  // namespace qilin::server
