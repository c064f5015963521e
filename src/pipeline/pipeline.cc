#include "pipeline/pipeline.h"

#include <algorithm>
#include <chrono>
#include <filesystem>

#include <spdlog/spdlog.h>

#include "common/meminfo.h"
#include "runtime/backend_factory.h"
#include "runtime/tp_factory.h"

namespace qilin::pipeline {
namespace {

class RequestDetokenizer : public IncrementalDetokenizer {
 public:
  RequestDetokenizer(std::shared_ptr<const tokenizer::Tokenizer> tok, bool skip_special)
      : decoder_(std::move(tok), Options(skip_special)) {}
  std::string Push(int32_t id) override {
    // Ids the model has but the tokenizer lacks (padded vocabularies) decode to nothing.
    Result<std::string> text = decoder_.Push(id);
    return text.ok() ? std::move(text).value() : std::string();
  }
  std::string Flush() override { return decoder_.Finish(); }

 private:
  static tokenizer::StreamDecoder::Options Options(bool skip_special) {
    tokenizer::StreamDecoder::Options o;
    o.skip_special_tokens = skip_special;  // stop strings are matched by the engine
    return o;
  }
  tokenizer::StreamDecoder decoder_;
};

}  // namespace

int HttpStatusFor(const Status& status) {
  switch (status.code()) {
    case StatusCode::kOk:
      return 200;
    case StatusCode::kInvalidArgument:
    case StatusCode::kOutOfRange:
      return 400;
    case StatusCode::kNotFound:
      return 404;
    case StatusCode::kResourceExhausted:
      return 429;
    case StatusCode::kUnavailable:
      return 503;
    case StatusCode::kUnimplemented:
      return 501;
    default:
      return 500;
  }
}

// ---------------------------------------------------------------------------------------------
// Generation

Generation::Generation(Engine* engine, std::shared_ptr<ResponseStream> stream,
                       int32_t prompt_tokens, int32_t n)
    : engine_(engine),
      stream_(std::move(stream)),
      request_id_(stream_->request_id()),
      prompt_tokens_(prompt_tokens),
      n_(n) {}

Generation::~Generation() {
  stream_->SetListener(nullptr);
  if (!stream_->closed()) engine_->Cancel(request_id_);
}

Delta Generation::Convert(Response r) {
  Delta d;
  d.index = r.seq_index;
  d.text = std::move(r.text);
  d.token_ids = std::move(r.token_ids);
  d.logprobs = std::move(r.logprobs);
  d.finish_reason = r.finish_reason;
  d.error = std::move(r.error);
  completion_tokens_ += static_cast<int32_t>(d.token_ids.size());
  if (d.finished()) ++finished_;
  return d;
}

std::optional<Delta> Generation::Next() {
  if (done_) return std::nullopt;
  std::optional<Response> r = stream_->Pop();
  if (!r) {
    done_ = true;
    return std::nullopt;
  }
  return Convert(std::move(*r));
}

std::optional<Delta> Generation::NextFor(std::chrono::milliseconds timeout) {
  if (done_) return std::nullopt;
  std::optional<Response> r = stream_->PopFor(timeout);
  if (!r) {
    if (stream_->closed()) done_ = true;
    return std::nullopt;
  }
  return Convert(std::move(*r));
}

std::vector<Delta> Generation::Poll() {
  std::vector<Delta> out;
  while (std::optional<Response> r = stream_->TryPop()) out.push_back(Convert(std::move(*r)));
  if (stream_->closed()) {
    // Responses pushed between the last TryPop and closed() are still queued: drain them.
    while (std::optional<Response> r = stream_->TryPop()) out.push_back(Convert(std::move(*r)));
    done_ = true;
  }
  return out;
}

void Generation::SetListener(std::function<void()> fn) { stream_->SetListener(std::move(fn)); }

void Generation::Cancel() { engine_->Cancel(request_id_); }

// ---------------------------------------------------------------------------------------------
// ModelPipeline

Result<std::unique_ptr<ModelPipeline>> ModelPipeline::Create(const std::string& model_dir,
                                                             const PipelineOptions& options) {
  std::unique_ptr<ModelPipeline> p(new ModelPipeline());
  QILIN_ASSIGN_OR_RETURN(p->config_, LoadModelConfig(model_dir));
  if (options.max_model_len < 0) {
    return InvalidArgument("max_model_len {} must be >= 0 (0: from config.json)",
                           options.max_model_len);
  }
  if (options.max_model_len > 0) p->config_.max_model_len = options.max_model_len;
  QILIN_ASSIGN_OR_RETURN(p->tokenizer_, tokenizer::Tokenizer::Load(options.tokenizer_dir.empty()
                                                                       ? model_dir
                                                                       : options.tokenizer_dir));

  if (options.tp < 1) return InvalidArgument("tp {} must be >= 1", options.tp);
  if (options.tp > 1) {
    // Ranks as threads, or processes that each make their own shard (runtime/tp_launch.h).
    TpModelSource source;
    source.model_dir = model_dir;
    source.dummy_weights = options.dummy_weights;
    source.max_model_len = options.max_model_len;
    QILIN_ASSIGN_OR_RETURN(p->backend_, LaunchTpBackend(ResolveDevice(options.device), p->config_,
                                                        source, options.tp, options.tp_launch));
  } else if (options.dummy_weights) {
    // Random weights made where they run: on the GPU no host copy of 15 GB is ever built.
    const std::string device = ResolveDevice(options.device);
    QILIN_ASSIGN_OR_RETURN(p->backend_,
                           MakeDummyTpBackend(device, p->config_, DType::kBF16, 0, options.tp));
  } else {
    QILIN_ASSIGN_OR_RETURN(ModelWeights weights, LoadModelWeights(p->config_, model_dir));
    if (options.device == "auto") {
      // A GPU when this build and machine have one, else the CPU.
      Result<std::unique_ptr<Backend>> cuda = MakeBackend("cuda", p->config_, weights);
      if (cuda.ok()) {
        p->backend_ = std::move(cuda).value();
      } else {
        spdlog::info("device auto: no CUDA backend ({}); using the CPU", cuda.status().message());
        QILIN_ASSIGN_OR_RETURN(p->backend_, MakeBackend("cpu", p->config_, std::move(weights)));
      }
    } else {
      QILIN_ASSIGN_OR_RETURN(p->backend_,
                             MakeBackend(options.device, p->config_, std::move(weights)));
    }
  }

  // eos: the union of generation_config.json's (the tokenizer's defaults) and config.json's.
  // Qwen2.5-Instruct, for one, says <|endoftext|> in config.json and adds <|im_end|> in
  // generation_config.json; both must stop a sequence.
  std::vector<int32_t> eos;
  for (int32_t id : p->tokenizer_->generation_defaults().eos_token_ids) eos.push_back(id);
  for (int64_t id : p->config_.eos_token_ids) eos.push_back(static_cast<int32_t>(id));
  std::sort(eos.begin(), eos.end());
  eos.erase(std::unique(eos.begin(), eos.end()), eos.end());
  eos.erase(std::remove_if(eos.begin(), eos.end(),
                           [&](int32_t id) { return id < 0 || id >= p->config_.vocab_size; }),
            eos.end());

  EngineConfig ec = options.engine;
  if (p->backend_->name() == "cpu" && ec.kv_cache_tokens == 0 &&
      options.cpu_kv_cache_memory_fraction > 0) {
    // Host memory is everyone's: the CPU pool takes a small share of what is available.
    const Result<int64_t> mem = MemAvailableBytes();
    const int64_t avail = mem.ok() ? mem.value() : -1;
    const int64_t per_token = std::max<int64_t>(1, p->backend_->KvBytesPerToken());
    if (avail > 0) {
      const double frac =
          std::min(ec.kv_cache_memory_fraction, options.cpu_kv_cache_memory_fraction);
      ec.kv_cache_tokens = std::max<int64_t>(
          ec.block_size, static_cast<int64_t>(static_cast<double>(avail) * frac / per_token));
    }
  }
  if (ec.eos_token_ids.empty()) ec.eos_token_ids = eos;
  const int64_t model_len = p->config_.MaxModelLen();
  if (ec.max_seq_len <= 0) {
    ec.max_seq_len = static_cast<int32_t>(std::min<int64_t>(model_len, INT32_MAX));
  }
  // The engine checks max_seq_len against max_position_embeddings; a longer max_model_len
  // (rope scaling) is the model's own statement that it works beyond that.
  if (p->config_.max_position_embeddings > 0 &&
      ec.max_seq_len > p->config_.max_position_embeddings) {
    if (options.max_model_len > 0 && options.max_model_len > model_len) {
      return InvalidArgument("max_model_len {} is over the model's limit {}", options.max_model_len,
                             model_len);
    }
    ec.max_seq_len = static_cast<int32_t>(p->config_.max_position_embeddings);
  }
  QILIN_ASSIGN_OR_RETURN(p->engine_, Engine::Create(*p->backend_, ec));
  std::shared_ptr<const tokenizer::Tokenizer> tok = p->tokenizer_;
  p->engine_->SetRequestDetokenizerFactory([tok](const Request& r) {
    return std::make_unique<RequestDetokenizer>(tok, r.sampling.skip_special_tokens);
  });
  if (auto id = p->tokenizer_->TokenToId("<|im_end|>")) p->im_end_id_ = *id;

  ModelInfo& info = p->info_;
  std::filesystem::path dir = std::filesystem::absolute(model_dir).lexically_normal();
  if (!dir.has_filename()) dir = dir.parent_path();
  info.name =
      options.served_model_name.empty() ? dir.filename().string() : options.served_model_name;
  info.model_dir = dir.string();
  info.architecture = p->config_.architecture;
  info.device = p->backend_->name();
  info.max_model_len = p->engine_->config().max_seq_len;
  info.vocab_size = p->config_.vocab_size;
  info.num_parameters = p->config_.NumParameters();
  info.eos_token_ids = p->engine_->config().eos_token_ids;
  const EngineStats st = p->engine_->stats();
  info.kv_blocks = st.kv_blocks_total;
  info.block_size = p->engine_->config().block_size;
  info.created_unix = std::chrono::duration_cast<std::chrono::seconds>(
                          std::chrono::system_clock::now().time_since_epoch())
                          .count();
  if (options.warm_up) {
    const auto t0 = std::chrono::steady_clock::now();
    QILIN_ASSIGN_OR_RETURN(const int64_t steps, p->engine_->WarmUp());
    if (steps > 0) {
      spdlog::info(
          "warm-up: {} steps in {:.2f} s (decode graphs and GEMM plans for batch sizes up "
          "to {}, a {}-token prefill)",
          steps, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(),
          ec.max_batch_size, ec.max_num_tokens);
    }
  }
  p->engine_->Start();
  return p;
}

ModelPipeline::~ModelPipeline() { Shutdown(); }

void ModelPipeline::Shutdown() {
  if (engine_) engine_->Stop();
}

Result<std::vector<int32_t>> ModelPipeline::Tokenize(const GenerateInput& input) const {
  switch (input.kind) {
    case GenerateInput::Kind::kTokens:
      if (input.token_ids.empty()) return InvalidArgument("the prompt is empty (no token ids)");
      for (size_t i = 0; i < input.token_ids.size(); ++i) {
        const int32_t t = input.token_ids[i];
        if (t < 0 || t >= config_.vocab_size) {
          return InvalidArgument(
              "prompt token id {} (at index {}) is outside the vocabulary [0, {})", t, i,
              config_.vocab_size);
        }
      }
      return input.token_ids;
    case GenerateInput::Kind::kText: {
      if (input.text.empty()) return InvalidArgument("the prompt is empty");
      // Text prompts are the user's: special-token text in them stays plain text.
      QILIN_ASSIGN_OR_RETURN(std::vector<int32_t> ids,
                             tokenizer_->Encode(input.text, /*allow_special=*/false));
      return ids;
    }
    case GenerateInput::Kind::kChat: {
      if (!input.messages.is_array() || input.messages.empty()) {
        return InvalidArgument("messages must be a non-empty array");
      }
      for (size_t i = 0; i < input.messages.size(); ++i) {
        const auto& m = input.messages[i];
        if (!m.is_object() || !m.contains("role") || !m["role"].is_string()) {
          return InvalidArgument("messages[{}] needs a string \"role\"", i);
        }
      }
      QILIN_ASSIGN_OR_RETURN(std::string prompt, tokenizer_->chat_template().Render(
                                                     input.messages, input.chat_options));
      // The template writes the special tokens; parse them as such.
      QILIN_ASSIGN_OR_RETURN(std::vector<int32_t> ids,
                             tokenizer_->Encode(prompt, /*allow_special=*/true));
      if (ids.empty()) return InvalidArgument("the chat template rendered an empty prompt");
      return ids;
    }
  }
  return Internal("unknown input kind");
}

Result<std::unique_ptr<Generation>> ModelPipeline::Submit(const GenerateInput& input,
                                                          const GenerateParams& params) {
  QILIN_ASSIGN_OR_RETURN(std::vector<int32_t> ids, Tokenize(input));
  const int64_t limit = info_.max_model_len;
  const int64_t prompt_len = static_cast<int64_t>(ids.size());
  if (prompt_len >= limit) {
    return InvalidArgument(
        "the prompt is {} tokens; this model's maximum context length is {} tokens (prompt + "
        "output), which leaves no room to generate",
        prompt_len, limit);
  }
  Request req;
  req.sampling = params.sampling;
  req.priority = params.priority;
  if (params.max_tokens_auto) {
    req.sampling.max_tokens = static_cast<int32_t>(limit - prompt_len);
  } else if (req.sampling.max_tokens < 1) {
    return InvalidArgument("max_tokens {} must be >= 1", req.sampling.max_tokens);
  } else if (prompt_len + req.sampling.max_tokens > limit) {
    return InvalidArgument(
        "this model's maximum context length is {} tokens; the prompt is {} tokens and "
        "max_tokens is {} ({} in all): reduce the prompt or max_tokens (at most {} here)",
        limit, prompt_len, req.sampling.max_tokens, prompt_len + req.sampling.max_tokens,
        limit - prompt_len);
  }
  // Chat: the template's end of turn ends the answer even when the model's eos ids (a base
  // model's <|endoftext|>) leave it out.
  if (input.kind == GenerateInput::Kind::kChat && im_end_id_ && !req.sampling.ignore_eos &&
      std::find(info_.eos_token_ids.begin(), info_.eos_token_ids.end(), *im_end_id_) ==
          info_.eos_token_ids.end()) {
    req.sampling.stop_token_ids.push_back(*im_end_id_);
  }
  const int32_t n = req.sampling.n;
  req.prompt = std::move(ids);
  QILIN_ASSIGN_OR_RETURN(std::shared_ptr<ResponseStream> stream, engine_->Submit(std::move(req)));
  return std::make_unique<Generation>(engine_.get(), std::move(stream),
                                      static_cast<int32_t>(prompt_len), n);
}

std::string ModelPipeline::TokenText(int32_t id) const {
  return std::string(tokenizer_->TokenBytes(id));
}

}  // namespace qilin::pipeline
