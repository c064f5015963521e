// `qilin generate`: token ids in, generated ids out, one JSON line per prompt on stdout in input
// order. All prompts run concurrently through the inflight batching engine.
#include <algorithm>
#include <charconv>
#include <fstream>
#include <iostream>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <spdlog/spdlog.h>
#include <nlohmann/json.hpp>

#include "cli/command.h"
#include "cli/tp_flags.h"
#include "engine/engine.h"
#include "engine/tokenizer_detokenizer.h"
#include "model/config.h"
#include "model/weights.h"
#include "runtime/backend_factory.h"
#include "runtime/tp_factory.h"
#include "tokenizer/tokenizer.h"

namespace qilin::cli {
namespace {

struct GenerateOptions {
  std::string model_dir;
  bool dummy_weights = false;
  uint64_t seed = 0;
  std::string prompt_ids;
  bool prompt_ids_given = false;
  std::string prompts_jsonl;
  std::string prompt_text;  // --prompt: text, encoded with the model folder's tokenizer
  bool prompt_text_given = false;
  bool chat = false;  // render --prompt as a user message with the chat template
  std::string system;
  bool system_given = false;
  int64_t max_tokens = 16;
  std::string device = "auto";
  TpFlags tpf;  // tensor parallel ranks and where they run
  bool ignore_eos = false;
  // Engine.
  int32_t block_size = 32;
  int32_t max_batch_size = 64;
  int32_t max_num_tokens = 2048;
  int64_t kv_cache_tokens = 0;
  bool no_prefix_cache = false;
  std::string tokenizer_dir;
  // Default sampling (per-line fields override); temperature 0 is greedy.
  float temperature = 0.0f;
  int32_t top_k = 0;
  float top_p = 1.0f;
  float min_p = 0.0f;
};

template <typename T>
T OrThrow(Result<T> r) {
  if (!r.ok()) throw Error(r.status());
  return std::move(r).value();
}

int32_t ParseId(const std::string& text, const std::string& what) {
  int64_t v = 0;
  const char* end = text.data() + text.size();
  auto [ptr, ec] = std::from_chars(text.data(), end, v);
  if (ec != std::errc() || ptr != end || v < INT32_MIN || v > INT32_MAX) {
    throw Error(InvalidArgument("{}: '{}' is not a token id", what, text));
  }
  return static_cast<int32_t>(v);
}

int32_t CheckedInt(int64_t v, int64_t lo, const std::string& what, const char* field) {
  if (v < lo || v > INT32_MAX) {
    throw Error(InvalidArgument("{}: {} = {} must be in [{}, {}]", what, field, v, lo, INT32_MAX));
  }
  return static_cast<int32_t>(v);
}

struct Prompt {
  Request request;
  std::string what;  // names the prompt in messages
};

Request DefaultRequest(const GenerateOptions& o) {
  Request r;
  r.sampling.temperature = o.temperature;
  r.sampling.top_k = o.top_k;
  r.sampling.top_p = o.top_p;
  r.sampling.min_p = o.min_p;
  r.sampling.ignore_eos = o.ignore_eos;
  r.sampling.max_tokens = CheckedInt(o.max_tokens, 1, "--max-tokens", "max_tokens");
  return r;
}

float JsonFloat(const nlohmann::json& j, const char* key, const std::string& what) {
  if (!j[key].is_number()) {
    throw Error(InvalidArgument("{}: {} = {} is not a number", what, key, j[key].dump()));
  }
  return j[key].get<float>();
}

int64_t JsonInt(const nlohmann::json& j, const char* key, const std::string& what) {
  if (!j[key].is_number_integer()) {
    throw Error(InvalidArgument("{}: {} = {} is not an integer", what, key, j[key].dump()));
  }
  return j[key].get<int64_t>();
}

// --prompt: the text itself, or with --chat the chat template's rendering of [system,] user
// with the generation prompt, encoded with special tokens matched (the template writes them).
Prompt TextPrompt(const GenerateOptions& o, const tokenizer::Tokenizer& tok) {
  Prompt p{DefaultRequest(o), "--prompt"};
  if (o.prompt_text.empty()) throw Error(InvalidArgument("--prompt: the prompt is empty"));
  std::string text = o.prompt_text;
  if (o.chat) {
    nlohmann::ordered_json messages = nlohmann::ordered_json::array();
    if (o.system_given) messages.push_back({{"role", "system"}, {"content", o.system}});
    messages.push_back({{"role", "user"}, {"content", o.prompt_text}});
    tokenizer::ChatTemplateOptions opts;
    opts.add_generation_prompt = true;
    Result<std::string> rendered = tok.chat_template().Render(messages, opts);
    if (!rendered.ok()) throw Error(rendered.status().WithContext("--chat: chat template"));
    text = std::move(rendered).value();
  }
  p.request.prompt = OrThrow(tok.Encode(text, /*allow_special=*/true));
  return p;
}

std::vector<Prompt> ReadPrompts(const GenerateOptions& o) {
  std::vector<Prompt> out;
  if (o.prompt_ids_given) {
    Prompt p{DefaultRequest(o), "--prompt-ids"};
    if (o.prompt_ids.find_first_not_of(" \t") == std::string::npos) {
      throw Error(InvalidArgument("--prompt-ids: the prompt is empty"));
    }
    size_t start = 0;
    while (start <= o.prompt_ids.size()) {
      size_t comma = o.prompt_ids.find(',', start);
      if (comma == std::string::npos) comma = o.prompt_ids.size();
      std::string item = o.prompt_ids.substr(start, comma - start);
      item.erase(0, item.find_first_not_of(" \t"));
      item.erase(item.find_last_not_of(" \t") + 1);
      p.request.prompt.push_back(ParseId(item, "--prompt-ids"));
      start = comma + 1;
    }
    out.push_back(std::move(p));
    return out;
  }
  std::ifstream f(o.prompts_jsonl);
  if (!f) throw Error(NotFound("--prompts-jsonl: cannot open '{}'", o.prompts_jsonl));
  std::string line;
  for (int64_t lineno = 1; std::getline(f, line); ++lineno) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    Prompt p{DefaultRequest(o), fmt::format("{} line {}", o.prompts_jsonl, lineno)};
    const std::string& what = p.what;
    nlohmann::json j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded() || !j.is_object()) {
      throw Error(InvalidArgument("{}: not a JSON object", what));
    }
    if (!j.contains("prompt_ids") || !j["prompt_ids"].is_array()) {
      throw Error(InvalidArgument("{}: \"prompt_ids\" must be an array of token ids", what));
    }
    for (const auto& id : j["prompt_ids"]) {
      if (!id.is_number_integer() || id.get<int64_t>() < INT32_MIN ||
          id.get<int64_t>() > INT32_MAX) {
        throw Error(InvalidArgument("{}: prompt_ids holds {}, not a token id", what, id.dump()));
      }
      p.request.prompt.push_back(static_cast<int32_t>(id.get<int64_t>()));
    }
    SamplingParams& s = p.request.sampling;
    if (j.contains("max_tokens")) {
      s.max_tokens = CheckedInt(JsonInt(j, "max_tokens", what), 1, what, "max_tokens");
    }
    if (j.contains("temperature")) s.temperature = JsonFloat(j, "temperature", what);
    if (j.contains("top_k")) s.top_k = CheckedInt(JsonInt(j, "top_k", what), 0, what, "top_k");
    if (j.contains("top_p")) s.top_p = JsonFloat(j, "top_p", what);
    if (j.contains("min_p")) s.min_p = JsonFloat(j, "min_p", what);
    if (j.contains("n")) s.n = CheckedInt(JsonInt(j, "n", what), 1, what, "n");
    if (j.contains("seed")) {
      if (!j["seed"].is_number_unsigned()) {
        throw Error(
            InvalidArgument("{}: seed = {} must be an integer >= 0", what, j["seed"].dump()));
      }
      s.seed = j["seed"].get<uint64_t>();
    }
    if (j.contains("stop")) {
      // A string, or a list of strings (stop strings, need --tokenizer) and token ids.
      const nlohmann::json stop =
          j["stop"].is_array() ? j["stop"] : nlohmann::json::array({j["stop"]});
      for (const auto& x : stop) {
        if (x.is_string()) {
          s.stop.push_back(x.get<std::string>());
        } else if (x.is_number_integer() && x.get<int64_t>() >= 0 &&
                   x.get<int64_t>() <= INT32_MAX) {
          s.stop_token_ids.push_back(static_cast<int32_t>(x.get<int64_t>()));
        } else {
          throw Error(
              InvalidArgument("{}: stop holds {}, not a string or token id", what, x.dump()));
        }
      }
    }
    out.push_back(std::move(p));
  }
  if (out.empty()) throw Error(InvalidArgument("{}: no prompts", o.prompts_jsonl));
  return out;
}

int RunGenerate(const GenerateOptions& o) {
  const int sources =
      int{o.prompt_ids_given} + int{!o.prompts_jsonl.empty()} + int{o.prompt_text_given};
  if (sources != 1) {
    throw Error(InvalidArgument("give exactly one of --prompt, --prompt-ids and --prompts-jsonl"));
  }
  if (o.chat && !o.prompt_text_given) {
    throw Error(InvalidArgument("--chat applies to --prompt (a text prompt); none was given"));
  }
  if (o.system_given && !o.chat) {
    throw Error(InvalidArgument("--system is the chat's system message: it needs --chat"));
  }
  const ModelConfig config = OrThrow(LoadModelConfig(o.model_dir));
  TpModelSource source;
  source.model_dir = o.model_dir;
  source.dummy_weights = o.dummy_weights;
  source.dtype =
      (config.dtype == DType::kF16 || config.dtype == DType::kF32) ? config.dtype : DType::kBF16;
  source.seed = o.seed;
  TpFlags tpf = o.tpf;
  // Under `mpirun -np N qilin generate ... --tp-launch mpi`, ranks > 0 follow rank 0 here.
  if (std::optional<int> rc = RunIfTpFollower(&tpf, o.device, source)) return *rc;
  // A text prompt needs a tokenizer: --tokenizer, else the model folder's.
  std::shared_ptr<const tokenizer::Tokenizer> tok;
  if (!o.tokenizer_dir.empty()) {
    tok = OrThrow(tokenizer::Tokenizer::Load(o.tokenizer_dir));
  } else if (o.prompt_text_given) {
    Result<std::shared_ptr<const tokenizer::Tokenizer>> t = tokenizer::Tokenizer::Load(o.model_dir);
    if (!t.ok()) {
      throw Error(t.status().WithContext(
          "--prompt needs a tokenizer (tokenizer.json or qwen.tiktoken) in the model folder or "
          "--tokenizer DIR"));
    }
    tok = *t;
  }
  std::vector<Prompt> prompts;
  if (o.prompt_text_given) {
    prompts.push_back(TextPrompt(o, *tok));
  } else {
    prompts = ReadPrompts(o);
  }
  // The checks that need only config.json, before the (slow) weights load; the engine checks
  // the rest (pool size, sampling parameters) at submit.
  for (const auto& p : prompts) {
    const auto& ids = p.request.prompt;
    if (ids.empty()) throw Error(InvalidArgument("{}: the prompt is empty", p.what));
    for (size_t i = 0; i < ids.size(); ++i) {
      if (ids[i] < 0 || ids[i] >= config.vocab_size) {
        throw Error(
            InvalidArgument("{}: prompt token {} (at index {}) is outside the vocabulary "
                            "[0, {})",
                            p.what, ids[i], i, config.vocab_size));
      }
    }
    const int64_t total = static_cast<int64_t>(ids.size()) + p.request.sampling.max_tokens;
    if (total > config.MaxModelLen()) {
      throw Error(OutOfRange(
          "{}: prompt ({} tokens) + max_tokens ({}) = {} is over the model's maximum length {}",
          p.what, ids.size(), p.request.sampling.max_tokens, total, config.MaxModelLen()));
    }
  }
  bool any_stop_strings = false;
  for (const auto& p : prompts) any_stop_strings |= !p.request.sampling.stop.empty();
  if (!tok && any_stop_strings) {
    throw Error(InvalidArgument("stop strings need a tokenizer: pass --tokenizer DIR"));
  }

  std::unique_ptr<Backend> backend;
  if (o.dummy_weights) {
    spdlog::info("generate: random weights for {} on {} (seed {})", config.architecture,
                 ResolveDevice(o.device), o.seed);
  }
  backend = OrThrow(LaunchTpBackend(o.device, config, source, tpf.tp, tpf.launch));

  EngineConfig ec;
  ec.block_size = o.block_size;
  ec.max_batch_size = o.max_batch_size;
  ec.max_num_tokens = o.max_num_tokens;
  ec.enable_prefix_caching = !o.no_prefix_cache;
  ec.kv_cache_tokens = o.kv_cache_tokens;
  if (tok) {
    // The folder's generation defaults (generation_config.json: e.g. <|im_end|> for chat models)
    // and config.json's eos ids both end a sequence.
    for (int64_t e : config.eos_token_ids) ec.eos_token_ids.push_back(static_cast<int32_t>(e));
    for (int32_t e : tok->generation_defaults().eos_token_ids) {
      if (e >= 0 && e < config.vocab_size &&
          std::find(ec.eos_token_ids.begin(), ec.eos_token_ids.end(), e) == ec.eos_token_ids.end())
        ec.eos_token_ids.push_back(e);
    }
  }
  if (ec.kv_cache_tokens <= 0) {
    // What this workload can use at once (never more than half the free memory): the engine
    // preempts and recomputes if it is less.
    int64_t want = 0;
    for (const auto& p : prompts) {
      const int64_t len =
          static_cast<int64_t>(p.request.prompt.size()) + p.request.sampling.max_tokens;
      want += p.request.sampling.n * ((len + o.block_size - 1) / o.block_size + 1) * o.block_size;
    }
    const Result<int32_t> cap =
        o.block_size > 0 ? backend->ProposeNumKvBlocks(o.block_size, 0.5, o.max_num_tokens)
                         : Result<int32_t>(0);
    if (cap.ok() && *cap > 0) want = std::min<int64_t>(want, int64_t{*cap} * o.block_size);
    ec.kv_cache_tokens = std::max<int64_t>(want, o.block_size);
  }
  std::unique_ptr<Engine> engine = OrThrow(Engine::Create(*backend, ec));
  if (tok) engine->SetDetokenizerFactory(MakeTokenizerDetokenizerFactory(tok));
  const EngineStats st0 = engine->stats();
  spdlog::info("generate: {} prompts, KV pool {} blocks x {} tokens, max batch {}, {} tokens/step",
               prompts.size(), st0.kv_blocks_total, ec.block_size, ec.max_batch_size,
               ec.max_num_tokens);

  // Every request is validated (and refused with its line named) before any runs.
  std::vector<std::shared_ptr<ResponseStream>> streams;
  for (auto& p : prompts) {
    Result<std::shared_ptr<ResponseStream>> s = engine->Submit(p.request);
    if (!s.ok()) throw Error(s.status().WithContext(p.what));
    streams.push_back(*s);
  }
  engine->Start();
  for (size_t i = 0; i < prompts.size(); ++i) {
    const int32_t n = prompts[i].request.sampling.n;
    std::vector<std::vector<int32_t>> ids(n);
    std::vector<std::string> text(n);
    while (std::optional<Response> r = streams[i]->Pop()) {
      if (!r->error.ok()) throw Error(r->error.WithContext(prompts[i].what));
      if (r->seq_index < 0 || r->seq_index >= n) continue;
      ids[r->seq_index].insert(ids[r->seq_index].end(), r->token_ids.begin(), r->token_ids.end());
      text[r->seq_index] += r->text;
    }
    nlohmann::json line;
    if (o.prompt_text_given) line["prompt_token_ids"] = prompts[i].request.prompt;
    if (n == 1) {
      line["token_ids"] = ids[0];
      if (tok) line["text"] = text[0];
    } else {
      line["token_ids"] = ids;
      if (tok) line["text"] = text;
    }
    std::cout << line.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << "\n"
              << std::flush;
  }
  engine->Stop();
  const EngineStats st = engine->stats();
  spdlog::info(
      "generate: {} steps, {} prefill + {} generated tokens, {} preemptions, prefix cache "
      "{}/{} blocks hit ({} prefill tokens saved)",
      st.steps, st.prefill_tokens, st.generated_tokens, st.preemptions, st.prefix_cache_hits,
      st.prefix_cache_queries, st.prefix_cache_hit_tokens);
  return 0;
}

RegisterCommand reg(
    "generate", "generation from token ids through the inflight batching engine",
    [](CLI::App& sub) {
      auto o = std::make_shared<GenerateOptions>();
      sub.add_option("--model", o->model_dir, "model directory (config.json + safetensors)")
          ->required();
      sub.add_flag("--dummy-weights", o->dummy_weights, "random weights from config.json only");
      sub.add_option("--seed", o->seed, "seed of --dummy-weights");
      CLI::Option* ids =
          sub.add_option("--prompt-ids", o->prompt_ids, "prompt token ids, e.g. 1,2,3");
      CLI::Option* text = sub.add_option("--prompt", o->prompt_text,
                                         "prompt text (encoded with the model folder's tokenizer)");
      sub.add_flag("--chat", o->chat,
                   "render --prompt as a user message with the model's chat template");
      CLI::Option* system = sub.add_option("--system", o->system, "system message for --chat");
      sub.add_option("--prompts-jsonl", o->prompts_jsonl,
                     "file of {\"prompt_ids\":[...], \"max_tokens\":N, \"temperature\", "
                     "\"top_k\", \"top_p\", \"min_p\", \"seed\", \"n\", \"stop\"} lines");
      sub.add_option("--max-tokens", o->max_tokens, "tokens to generate")->capture_default_str();
      sub.add_option("--device", o->device, "cpu, cuda or auto (cuda where a GPU is present)")
          ->capture_default_str();
      AddTpFlags(sub, &o->tpf,
                 "tensor parallel ranks (cpu: the model sharded over them; cuda: one GPU each)");
      sub.add_flag("--ignore-eos", o->ignore_eos, "do not stop at eos ids");
      sub.add_option("--block-size", o->block_size, "KV cache block size (tokens)")
          ->capture_default_str();
      sub.add_option("--max-batch-size", o->max_batch_size, "sequences running at once")
          ->capture_default_str();
      sub.add_option("--max-num-tokens", o->max_num_tokens, "tokens per engine step")
          ->capture_default_str();
      sub.add_option("--kv-cache-tokens", o->kv_cache_tokens,
                     "KV pool size in tokens (default: what the prompts need, at most half the "
                     "free memory)");
      sub.add_flag("--no-prefix-cache", o->no_prefix_cache, "disable prefix caching");
      sub.add_option("--tokenizer", o->tokenizer_dir,
                     "tokenizer folder: adds \"text\" to the output and enables stop strings");
      sub.add_option("--temperature", o->temperature, "default temperature (0: greedy)")
          ->capture_default_str();
      sub.add_option("--top-k", o->top_k, "default top-k (0: off)")->capture_default_str();
      sub.add_option("--top-p", o->top_p, "default top-p (1: off)")->capture_default_str();
      sub.add_option("--min-p", o->min_p, "default min-p (0: off)")->capture_default_str();
      return [o, ids, text, system]() {
        o->prompt_ids_given = ids->count() > 0;
        o->prompt_text_given = text->count() > 0;
        o->system_given = system->count() > 0;
        return RunGenerate(*o);
      };
    });

}  // namespace
}  // namespace qilin::cli
