// The model pipeline: what Triton's preprocessing / tensorrt_llm / postprocessing / ensemble
// models do, natively and in-process. Text (a prompt, chat messages or token ids) goes in, is
// templated and tokenized, runs on the Engine, and comes back as streaming text deltas with their
// token ids and logprobs, per sample index.
//
//   QILIN_ASSIGN_OR_RETURN(auto pipe, ModelPipeline::Create("models/demo", {}));
//   GenerateInput in = GenerateInput::Text("It is a truth");
//   GenerateParams params;  params.sampling.max_tokens = 32;
//   QILIN_ASSIGN_OR_RETURN(auto gen, pipe->Submit(in, params));
//   while (auto d = gen->Next()) std::cout << d->text;        // blocking, or:
//   gen->SetListener([&] { post(loop, [&] { for (auto& d : gen->Poll()) ...; }); });  // async
//
// Thread safety: ModelPipeline is thread-safe. A Generation belongs to one consumer at a time;
// Cancel() may be called from any thread.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/status.h"
#include "engine/engine.h"
#include "engine/request.h"
#include "model/config.h"
#include "runtime/tp_launch.h"
#include "tokenizer/tokenizer.h"

namespace qilin::pipeline {

struct PipelineOptions {
  // "cpu", "cuda", or "auto": cuda where this build and machine have a GPU, else cpu.
  std::string device = "cpu";
  EngineConfig engine;            // engine.max_seq_len 0: the model's MaxModelLen()
  std::string served_model_name;  // empty: the model folder's name
  int64_t max_model_len = 0;      // 0: from config.json (rope scaling included)
  // On the CPU backend (without engine.kv_cache_tokens) the KV pool takes at most this
  // fraction of available host memory; 0: engine.kv_cache_memory_fraction alone.
  double cpu_kv_cache_memory_fraction = 0.1;
  bool dummy_weights = false;  // random weights (for speed tests without a checkpoint)
  // Engine::WarmUp before serving (CUDA: decode graphs captured and GEMM plans tuned for every
  // batch-size bucket and the largest prefill now, not in the first clients' requests).
  bool warm_up = true;
  // Where tokenizer.json / tokenizer_config.json are; empty: the model folder. With
  // dummy_weights a folder of config.json alone (configs/qwen2.5-7b) serves with another's.
  std::string tokenizer_dir;
  // Tensor parallelism: the model sharded over this many ranks (on "cuda" rank r on GPU
  // r % device count). 1: one backend. Where the ranks run: tp_launch (runtime/tp_launch.h;
  // threads of this process by default).
  int tp = 1;
  TpLaunchOptions tp_launch;
};

struct ModelInfo {
  std::string name;  // served model name (the OpenAI "id")
  std::string model_dir;
  std::string architecture;
  std::string device;
  int64_t max_model_len = 0;  // prompt + generated tokens
  int64_t vocab_size = 0;     // the model's (may exceed the tokenizer's)
  int64_t num_parameters = 0;
  std::vector<int32_t> eos_token_ids;  // generation_config's and config.json's, united
  int32_t kv_blocks = 0;
  int32_t block_size = 0;
  int64_t created_unix = 0;  // when the pipeline was made
};

// One of: a plain prompt (no template), chat messages (the model's chat template applies), or
// token ids (passed through).
struct GenerateInput {
  enum class Kind { kText, kChat, kTokens };
  Kind kind = Kind::kText;
  std::string text;
  nlohmann::ordered_json messages;  // [{"role":..., "content":...}, ...]
  tokenizer::ChatTemplateOptions chat_options;
  std::vector<int32_t> token_ids;

  static GenerateInput Text(std::string t) {
    GenerateInput in;
    in.kind = Kind::kText;
    in.text = std::move(t);
    return in;
  }
  static GenerateInput Chat(nlohmann::ordered_json m) {
    GenerateInput in;
    in.kind = Kind::kChat;
    in.messages = std::move(m);
    return in;
  }
  static GenerateInput Tokens(std::vector<int32_t> ids) {
    GenerateInput in;
    in.kind = Kind::kTokens;
    in.token_ids = std::move(ids);
    return in;
  }
};

struct GenerateParams {
  // Everything the engine takes: temperature, top_p, n, seed, max_tokens (0 below: the room
  // left in the model length), stop strings, stop token ids, logprobs, penalties,
  // skip_special_tokens.
  SamplingParams sampling;
  // True: max_tokens was not given; generate up to the model length.
  bool max_tokens_auto = false;
  int32_t priority = 0;
};

// A piece of one sample's output.
struct Delta {
  int32_t index = 0;  // sample index in [0, n)
  std::string text;
  std::vector<int32_t> token_ids;
  std::vector<TokenLogprob> logprobs;  // one per token id when logprobs were asked
  FinishReason finish_reason = FinishReason::kNone;
  Status error;  // the engine failed the request
  bool finished() const { return finish_reason != FinishReason::kNone; }
};

// A submitted request: its stream of deltas, its usage, Cancel.
class Generation {
 public:
  Generation(Engine* engine, std::shared_ptr<ResponseStream> stream, int32_t prompt_tokens,
             int32_t n);
  ~Generation();  // clears the listener; cancels the request when it has not finished
  Generation(const Generation&) = delete;
  Generation& operator=(const Generation&) = delete;

  int64_t request_id() const { return request_id_; }
  int32_t prompt_tokens() const { return prompt_tokens_; }
  int32_t n() const { return n_; }
  // Generated tokens so far, all samples (the usage's completion_tokens).
  int32_t completion_tokens() const { return completion_tokens_; }
  // True once every sample finished and every delta was taken.
  bool done() const { return done_; }

  // Blocking: the next delta, or nullopt when done.
  std::optional<Delta> Next();
  std::optional<Delta> NextFor(std::chrono::milliseconds timeout);
  // Non-blocking: every delta available now (may be empty).
  std::vector<Delta> Poll();
  // See ResponseStream::SetListener: `fn` runs on the engine thread after each new response.
  void SetListener(std::function<void()> fn);
  // Aborts the request; its remaining samples finish with FinishReason::kAbort and their KV
  // blocks are freed at the engine's next step.
  void Cancel();

 private:
  Delta Convert(Response r);

  Engine* engine_;
  std::shared_ptr<ResponseStream> stream_;
  int64_t request_id_;
  int32_t prompt_tokens_;
  int32_t n_;
  int32_t completion_tokens_ = 0;
  int32_t finished_ = 0;
  bool done_ = false;
};

class ModelPipeline {
 public:
  // Loads config.json, the weights, the tokenizer, the chat template and the generation
  // defaults from `model_dir`, builds the backend, sizes the KV pool and starts the engine.
  static Result<std::unique_ptr<ModelPipeline>> Create(const std::string& model_dir,
                                                       const PipelineOptions& options);
  ~ModelPipeline();  // stops the engine (aborting what is unfinished)

  // Validates, templates, tokenizes and submits. Errors: InvalidArgument / OutOfRange (HTTP
  // 400: bad parameter, prompt over the model length naming the limit), Unavailable (503:
  // shutting down).
  Result<std::unique_ptr<Generation>> Submit(const GenerateInput& input,
                                             const GenerateParams& params);
  // The prompt token ids Submit would run for `input` (template applied).
  Result<std::vector<int32_t>> Tokenize(const GenerateInput& input) const;

  const ModelInfo& info() const { return info_; }
  const tokenizer::Tokenizer& tokenizer() const { return *tokenizer_; }
  std::shared_ptr<const tokenizer::Tokenizer> tokenizer_ptr() const { return tokenizer_; }
  const ModelConfig& model_config() const { return config_; }
  EngineStats stats() const { return engine_->stats(); }
  Engine& engine() { return *engine_; }
  // Text of one token for logprobs ("bytes" as UTF-8, lossy when a token is a partial char).
  std::string TokenText(int32_t id) const;

  // Stops the engine: unfinished requests end with FinishReason::kAbort; Submit then fails
  // with Unavailable.
  void Shutdown();

  // The backend's Health(): an error once it can run no more steps (a tensor-parallel rank lost).
  Status BackendHealth() const { return backend_->Health(); }

 private:
  ModelPipeline() = default;

  ModelConfig config_;
  ModelInfo info_;
  std::shared_ptr<const tokenizer::Tokenizer> tokenizer_;
  std::unique_ptr<Backend> backend_;
  std::unique_ptr<Engine> engine_;
  std::optional<int32_t> im_end_id_;  // ChatML's end of turn: a stop token for chat requests
};

// HTTP status for a Status code: 400 InvalidArgument/OutOfRange, 404 NotFound, 429
// ResourceExhausted, 503 Unavailable, 501 Unimplemented, 500 otherwise.
int HttpStatusFor(const Status& status);

}  // namespace qilin::pipeline
