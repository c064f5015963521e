#include "server/openai_api.h"

#include <chrono>
#include <cmath>
#include <limits>
#include <mutex>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

namespace qilin::server {

using json = nlohmann::json;
using ojson = nlohmann::ordered_json;

std::string ApiError::Body() const { return OpenAiErrorBody(status, message, "", param, code); }

std::string DumpJson(const json& j) {
  return j.dump(-1, ' ', false, json::error_handler_t::replace);
}

std::string SseData(const json& j) { return "data: " + DumpJson(j) + "\n\n"; }

std::string FinishReasonText(FinishReason r) {
  switch (r) {
    case FinishReason::kStop:
      return "stop";
    case FinishReason::kLength:
      return "length";
    case FinishReason::kAbort:
      return "abort";
    default:
      return "";
  }
}

// ---------------------------------------------------------------------------------------------
// Parsing

namespace {

const char* TypeName(const ojson& v) {
  if (v.is_null()) return "null";
  if (v.is_boolean()) return "boolean";
  if (v.is_number_integer() || v.is_number_unsigned()) return "integer";
  if (v.is_number()) return "number";
  if (v.is_string()) return "string";
  if (v.is_array()) return "array";
  return "object";
}

struct Parser {
  const ojson& body;
  ApiError* err;

  bool Fail(const std::string& param, std::string message) {
    err->status = 400;
    err->param = param;
    err->message = std::move(message);
    return false;
  }
  // Present and not null.
  const ojson* Get(const std::string& key) const {
    auto it = body.find(key);
    if (it == body.end() || it->is_null()) return nullptr;
    return &*it;
  }
  bool Number(const std::string& key, double lo, double hi, float* out) {
    const ojson* v = Get(key);
    if (!v) return true;
    if (!v->is_number()) {
      return Fail(key, fmt::format("'{}' must be a number, got {}", key, TypeName(*v)));
    }
    const double d = v->get<double>();
    if (!std::isfinite(d) || d < lo || d > hi) {
      return Fail(key, fmt::format("'{}' = {} must be in [{}, {}]", key, d, lo, hi));
    }
    *out = static_cast<float>(d);
    return true;
  }
  // Integers (a float with no fraction, e.g. 16.0, is accepted as OpenAI's server does).
  bool Integer(const std::string& key, int64_t lo, int64_t hi, int64_t* out, bool* given) {
    const ojson* v = Get(key);
    if (given) *given = v != nullptr;
    if (!v) return true;
    int64_t x = 0;
    if (v->is_number_unsigned()) {
      const uint64_t u = v->get<uint64_t>();
      if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        return Fail(key, fmt::format("'{}' = {} must be in [{}, {}]", key, u, lo, hi));
      }
      x = static_cast<int64_t>(u);
    } else if (v->is_number_integer()) {
      x = v->get<int64_t>();
    } else if (v->is_number_float()) {
      const double d = v->get<double>();
      if (!std::isfinite(d) || d != std::floor(d) || std::fabs(d) > 9e18) {
        return Fail(key, fmt::format("'{}' must be an integer, got {}", key, DumpJson(*v)));
      }
      x = static_cast<int64_t>(d);
    } else {
      return Fail(key, fmt::format("'{}' must be an integer, got {}", key, TypeName(*v)));
    }
    if (x < lo || x > hi) {
      return Fail(key, fmt::format("'{}' = {} must be in [{}, {}]", key, x, lo, hi));
    }
    *out = x;
    return true;
  }
  bool Bool(const std::string& key, bool* out) {
    const ojson* v = Get(key);
    if (!v) return true;
    if (!v->is_boolean()) {
      return Fail(key, fmt::format("'{}' must be a boolean, got {}", key, TypeName(*v)));
    }
    *out = v->get<bool>();
    return true;
  }
  bool TokenIds(const ojson& v, const std::string& key, std::vector<int32_t>* out) {
    for (const auto& t : v) {
      if (!t.is_number_integer() || t.get<int64_t>() < 0 ||
          t.get<int64_t>() > std::numeric_limits<int32_t>::max()) {
        return Fail(key, fmt::format("'{}' holds {}, which is not a token id", key, DumpJson(t)));
      }
      out->push_back(static_cast<int32_t>(t.get<int64_t>()));
    }
    return true;
  }
};

bool ParseMessages(Parser& p, const ojson& v, ojson* out) {
  if (!v.is_array()) {
    return p.Fail("messages", fmt::format("'messages' must be an array, got {}", TypeName(v)));
  }
  if (v.empty()) return p.Fail("messages", "'messages' must hold at least one message");
  *out = ojson::array();
  for (size_t i = 0; i < v.size(); ++i) {
    const auto& m = v[i];
    const std::string where = fmt::format("messages[{}]", i);
    if (!m.is_object()) {
      return p.Fail(where, fmt::format("'{}' must be an object, got {}", where, TypeName(m)));
    }
    auto role = m.find("role");
    if (role == m.end() || !role->is_string()) {
      return p.Fail(where + ".role", fmt::format("'{}.role' must be a string", where));
    }
    const std::string r = role->get<std::string>();
    if (r != "system" && r != "user" && r != "assistant" && r != "tool" && r != "developer") {
      return p.Fail(where + ".role",
                    fmt::format("'{}.role' = '{}' is not one of system, user, assistant, tool, "
                                "developer",
                                where, r));
    }
    ojson msg = m;
    msg["role"] = r == "developer" ? "system" : r;
    auto content = m.find("content");
    if (content == m.end() || content->is_null()) {
      if (r != "assistant") {
        return p.Fail(where + ".content", fmt::format("'{}.content' is required", where));
      }
      msg["content"] = "";
    } else if (content->is_array()) {
      // Content parts: text only (this model reads no images or audio).
      std::string text;
      for (size_t k = 0; k < content->size(); ++k) {
        const auto& part = (*content)[k];
        const std::string pw = fmt::format("{}.content[{}]", where, k);
        if (!part.is_object() || !part.contains("type") || !part["type"].is_string()) {
          return p.Fail(pw, fmt::format("'{}' must be an object with a 'type'", pw));
        }
        if (part["type"] != "text") {
          return p.Fail(pw, fmt::format("'{}' has type '{}'; only 'text' parts are supported", pw,
                                        part["type"].get<std::string>()));
        }
        if (!part.contains("text") || !part["text"].is_string()) {
          return p.Fail(pw, fmt::format("'{}.text' must be a string", pw));
        }
        text += part["text"].get<std::string>();
      }
      msg["content"] = text;
    } else if (!content->is_string()) {
      return p.Fail(where + ".content",
                    fmt::format("'{}.content' must be a string or an array of parts, got {}", where,
                                TypeName(*content)));
    }
    out->push_back(std::move(msg));
  }
  return true;
}

bool ParsePrompt(Parser& p, const ojson& v, std::vector<pipeline::GenerateInput>* out) {
  if (v.is_string()) {
    out->push_back(pipeline::GenerateInput::Text(v.get<std::string>()));
    return true;
  }
  if (!v.is_array() || v.empty()) {
    return p.Fail("prompt",
                  "'prompt' must be a string, an array of strings, an array of token ids or an "
                  "array of token id arrays (non-empty)");
  }
  if (v[0].is_number()) {
    std::vector<int32_t> ids;
    if (!p.TokenIds(v, "prompt", &ids)) return false;
    out->push_back(pipeline::GenerateInput::Tokens(std::move(ids)));
    return true;
  }
  for (size_t i = 0; i < v.size(); ++i) {
    if (v[i].is_string()) {
      out->push_back(pipeline::GenerateInput::Text(v[i].get<std::string>()));
    } else if (v[i].is_array() && !v[i].empty()) {
      std::vector<int32_t> ids;
      if (!p.TokenIds(v[i], fmt::format("prompt[{}]", i), &ids)) return false;
      out->push_back(pipeline::GenerateInput::Tokens(std::move(ids)));
    } else {
      return p.Fail("prompt", fmt::format("'prompt[{}]' must be a string or a non-empty array of "
                                          "token ids, got {}",
                                          i, TypeName(v[i])));
    }
  }
  return true;
}

}  // namespace

bool ParseOpenAiRequest(const std::string& body, bool chat, const ParseLimits& limits,
                        OpenAiRequest* out, ApiError* error) {
  *error = ApiError{};
  ojson j;
  try {
    j = ojson::parse(body);
  } catch (const ojson::parse_error& e) {
    error->status = 400;
    error->message = fmt::format("the request body is not valid JSON: {}", e.what());
    return false;
  }
  if (!j.is_object()) {
    error->status = 400;
    error->message = fmt::format("the request body must be a JSON object, got {}", TypeName(j));
    return false;
  }
  Parser p{j, error};
  OpenAiRequest r;
  r.chat = chat;
  SamplingParams& s = r.params.sampling;
  if (const ojson* m = p.Get("model")) {
    if (!m->is_string()) return p.Fail("model", "'model' must be a string");
    r.model = m->get<std::string>();
  }
  if (chat) {
    const ojson* m = p.Get("messages");
    if (!m) return p.Fail("messages", "'messages' is required");
    ojson messages;
    if (!ParseMessages(p, *m, &messages)) return false;
    pipeline::GenerateInput in = pipeline::GenerateInput::Chat(std::move(messages));
    if (const ojson* tools = p.Get("tools")) {
      if (!tools->is_array()) return p.Fail("tools", "'tools' must be an array");
      in.chat_options.tools = *tools;
    }
    if (const ojson* kw = p.Get("chat_template_kwargs")) {
      if (!kw->is_object()) return p.Fail("chat_template_kwargs", "must be an object");
      in.chat_options.extra = *kw;
    }
    r.inputs.push_back(std::move(in));
  } else {
    const ojson* prompt = p.Get("prompt");
    if (!prompt) return p.Fail("prompt", "'prompt' is required");
    if (!ParsePrompt(p, *prompt, &r.inputs)) return false;
    if (p.Get("suffix")) return p.Fail("suffix", "'suffix' is not supported");
    if (!p.Bool("echo", &r.echo)) return false;
  }

  int64_t v = 0;
  bool given = false;
  const int64_t kMaxInt = std::numeric_limits<int32_t>::max();
  const char* max_key =
      chat && p.Get("max_completion_tokens") ? "max_completion_tokens" : "max_tokens";
  if (!p.Integer(max_key, 1, kMaxInt, &v, &given)) return false;
  if (given) {
    s.max_tokens = static_cast<int32_t>(v);
  } else if (chat) {
    r.params.max_tokens_auto = true;  // chat: up to the model length, as OpenAI does
  } else {
    s.max_tokens = 16;  // completions: OpenAI's default
  }
  if (!p.Integer("min_tokens", 0, kMaxInt, &v, &given)) return false;
  if (given) s.min_tokens = static_cast<int32_t>(v);
  s.temperature = 1.0f;
  if (!p.Number("temperature", 0, 2, &s.temperature)) return false;
  if (!p.Number("top_p", 0, 1, &s.top_p)) return false;
  if (p.Get("top_p") && s.top_p <= 0) return p.Fail("top_p", "'top_p' must be > 0");
  if (!p.Integer("top_k", -1, kMaxInt, &v, &given)) return false;
  if (given) s.top_k = v < 0 ? 0 : static_cast<int32_t>(v);
  if (!p.Number("min_p", 0, 1, &s.min_p)) return false;
  if (!p.Number("presence_penalty", -2, 2, &s.presence_penalty)) return false;
  if (!p.Number("frequency_penalty", -2, 2, &s.frequency_penalty)) return false;
  if (!p.Number("repetition_penalty", 1e-3, 100, &s.repetition_penalty)) return false;
  if (!p.Integer("n", 1, limits.max_n, &v, &given)) return false;
  if (given) s.n = static_cast<int32_t>(v);
  if (!p.Integer("best_of", 1, limits.max_n, &v, &given)) return false;
  if (given && v != s.n) return p.Fail("best_of", "'best_of' other than n is not supported");
  if (const ojson* seed = p.Get("seed")) {
    if (seed->is_number_unsigned()) {
      s.seed = seed->get<uint64_t>();
    } else if (seed->is_number_integer()) {
      s.seed = static_cast<uint64_t>(seed->get<int64_t>());
    } else {
      return p.Fail("seed", fmt::format("'seed' must be an integer, got {}", TypeName(*seed)));
    }
  }
  if (const ojson* stop = p.Get("stop")) {
    if (stop->is_string()) {
      s.stop.push_back(stop->get<std::string>());
    } else if (stop->is_array()) {
      for (const auto& x : *stop) {
        if (!x.is_string()) return p.Fail("stop", "'stop' must be a string or array of strings");
        s.stop.push_back(x.get<std::string>());
      }
    } else {
      return p.Fail("stop", fmt::format("'stop' must be a string or an array of strings, got {}",
                                        TypeName(*stop)));
    }
    if (static_cast<int32_t>(s.stop.size()) > limits.max_stop) {
      return p.Fail("stop", fmt::format("'stop' holds {} strings; at most {} are allowed",
                                        s.stop.size(), limits.max_stop));
    }
    for (const auto& x : s.stop) {
      if (x.empty()) return p.Fail("stop", "'stop' holds an empty string");
    }
  }
  if (const ojson* ids = p.Get("stop_token_ids")) {
    if (!ids->is_array()) return p.Fail("stop_token_ids", "'stop_token_ids' must be an array");
    if (!p.TokenIds(*ids, "stop_token_ids", &s.stop_token_ids)) return false;
  }
  if (!p.Bool("ignore_eos", &s.ignore_eos)) return false;
  if (!p.Bool("skip_special_tokens", &s.skip_special_tokens)) return false;

  if (chat) {
    if (!p.Bool("logprobs", &r.logprobs)) return false;
    if (!p.Integer("top_logprobs", 0, limits.max_logprobs, &v, &given)) return false;
    if (given) {
      if (!r.logprobs) return p.Fail("top_logprobs", "'top_logprobs' needs 'logprobs': true");
      r.top_logprobs = static_cast<int32_t>(v);
    }
  } else {
    if (!p.Integer("logprobs", 0, limits.max_logprobs, &v, &given)) return false;
    if (given) {
      r.logprobs = true;
      r.top_logprobs = static_cast<int32_t>(v);
    }
  }
  if (r.logprobs) s.logprobs = r.top_logprobs;

  if (!p.Bool("stream", &r.stream)) return false;
  if (const ojson* so = p.Get("stream_options")) {
    if (!so->is_object()) return p.Fail("stream_options", "'stream_options' must be an object");
    if (!r.stream) {
      return p.Fail("stream_options", "'stream_options' is only allowed when 'stream' is true");
    }
    auto iu = so->find("include_usage");
    if (iu != so->end() && !iu->is_null()) {
      if (!iu->is_boolean()) {
        return p.Fail("stream_options.include_usage", "'include_usage' must be a boolean");
      }
      r.include_usage = iu->get<bool>();
    }
  }
  if (r.inputs.size() * static_cast<size_t>(s.n) > static_cast<size_t>(limits.max_n)) {
    return p.Fail("n", fmt::format("{} prompts x n={} is over the limit of {} choices",
                                   r.inputs.size(), s.n, limits.max_n));
  }
  *out = std::move(r);
  return true;
}

// ---------------------------------------------------------------------------------------------
// The service

namespace {

int64_t NowUnix() {
  return std::chrono::duration_cast<std::chrono::seconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

json BytesOf(const std::string& s) {
  json a = json::array();
  for (unsigned char c : s) a.push_back(static_cast<int>(c));
  return a;
}

}  // namespace

// One generation request in flight: its Generations, what was sent, and the responder. Lives
// (self_) until every sample finished; everything runs on the connection's strand.
class OpenAiService::Job : public std::enable_shared_from_this<Job> {
 public:
  struct Choice {
    std::string text;
    std::vector<int32_t> tokens;
    std::vector<TokenLogprob> logprobs;
    std::string finish;
    bool started = false;  // chat stream: role chunk sent
    std::chrono::steady_clock::time_point last_token;
    bool got_token = false;
  };

  Job(OpenAiService* svc, OpenAiRequest req, ResponderPtr res, std::string id)
      : svc_(svc), req_(std::move(req)), res_(std::move(res)), id_(std::move(id)) {
    created_ = NowUnix();
    arrival_ = std::chrono::steady_clock::now();
  }

  ~Job() { --svc_->active_; }

  void Start(std::vector<std::unique_ptr<pipeline::Generation>> gens) {
    gens_ = std::move(gens);
    const int32_t n = req_.params.sampling.n;
    choices_.resize(gens_.size() * n);
    for (auto& g : gens_) prompt_tokens_ += g->prompt_tokens();
    self_ = shared_from_this();
    std::weak_ptr<Job> weak = self_;
    ResponderPtr res = res_;
    res_->OnClose([weak] {
      if (auto j = weak.lock()) j->CancelAll();
    });
    if (req_.stream) {
      res_->StartStream(200, "text/event-stream", {{"X-Accel-Buffering", "no"}});
    }
    for (auto& g : gens_) {
      g->SetListener([weak, res] {
        auto j = weak.lock();
        if (!j) return;
        if (j->pump_posted_.exchange(true)) return;
        res->Post([weak] {
          if (auto j = weak.lock()) {
            j->pump_posted_ = false;
            j->Pump();
          }
        });
      });
    }
  }

  void CancelAll() {
    for (auto& g : gens_) g->Cancel();
  }

 private:
  std::string Model() const { return svc_->pipeline_->info().name; }

  void Pump() {
    if (done_) return;
    const int32_t n = req_.params.sampling.n;
    json stream_choices = json::array();
    const auto now = std::chrono::steady_clock::now();
    for (size_t gi = 0; gi < gens_.size(); ++gi) {
      // Deltas of one sample that arrived together become one (a chunk holds each index once).
      std::vector<pipeline::Delta> merged;
      for (pipeline::Delta& d : gens_[gi]->Poll()) {
        pipeline::Delta* m = nullptr;
        for (auto& x : merged) {
          if (x.index == d.index) m = &x;
        }
        if (!m) {
          merged.push_back(std::move(d));
          continue;
        }
        m->text += d.text;
        m->token_ids.insert(m->token_ids.end(), d.token_ids.begin(), d.token_ids.end());
        for (auto& lp : d.logprobs) m->logprobs.push_back(std::move(lp));
        if (d.finished()) m->finish_reason = d.finish_reason;
        if (!d.error.ok()) m->error = d.error;
      }
      for (pipeline::Delta& d : merged) {
        const size_t ci = gi * n + d.index;
        if (ci >= choices_.size()) continue;
        Choice& c = choices_[ci];
        if (!d.token_ids.empty()) {
          if (!first_token_seen_) {
            first_token_seen_ = true;
            svc_->metrics_->ObserveTimeToFirstToken(
                std::chrono::duration<double>(now - arrival_).count());
          } else if (c.got_token) {
            // Tokens of one step arrive together; spread the gap over them.
            const double gap = std::chrono::duration<double>(now - c.last_token).count();
            for (size_t k = 0; k < d.token_ids.size(); ++k) {
              svc_->metrics_->ObserveInterTokenLatency(gap / d.token_ids.size());
            }
          }
          c.got_token = true;
          c.last_token = now;
        }
        if (!d.error.ok() && error_.ok()) error_ = d.error;
        if (d.finished()) c.finish = FinishReasonText(d.finish_reason);
        if (req_.stream) {
          json chunk_choice = StreamChoice(ci, c, d);
          if (!chunk_choice.is_null()) stream_choices.push_back(std::move(chunk_choice));
        }
        c.text += d.text;
        c.tokens.insert(c.tokens.end(), d.token_ids.begin(), d.token_ids.end());
        for (auto& lp : d.logprobs) c.logprobs.push_back(std::move(lp));
      }
    }
    if (req_.stream && !stream_choices.empty()) {
      json chunk = ChunkEnvelope();
      chunk["choices"] = std::move(stream_choices);
      if (req_.include_usage) chunk["usage"] = nullptr;
      res_->Write(SseData(chunk));
    }
    bool all_done = true;
    for (auto& g : gens_) all_done = all_done && g->done();
    if (all_done) Finish();
  }

  json ChunkEnvelope() const {
    return json{{"id", id_},
                {"object", req_.chat ? "chat.completion.chunk" : "text_completion"},
                {"created", created_},
                {"model", Model()},
                {"system_fingerprint", nullptr}};
  }

  // The stream choice for a delta; null when there is nothing to say.
  json StreamChoice(size_t ci, Choice& c, const pipeline::Delta& d) {
    json finish = d.finished() ? json(FinishReasonText(d.finish_reason)) : json(nullptr);
    json lp =
        req_.logprobs && !d.logprobs.empty() ? Logprobs(d.logprobs, c.text.size()) : json(nullptr);
    if (req_.chat) {
      json delta = json::object();
      if (!c.started) {
        c.started = true;
        delta["role"] = "assistant";
        delta["content"] = d.text;
      } else if (!d.text.empty()) {
        delta["content"] = d.text;
      }
      if (delta.empty() && finish.is_null() && lp.is_null()) return nullptr;
      return json{{"index", ci}, {"delta", delta}, {"logprobs", lp}, {"finish_reason", finish}};
    }
    std::string text = d.text;
    if (req_.echo && !c.started) {
      c.started = true;
      text = PromptText(ci) + text;
    }
    if (text.empty() && finish.is_null() && lp.is_null()) return nullptr;
    return json{{"index", ci}, {"text", text}, {"logprobs", lp}, {"finish_reason", finish}};
  }

  std::string PromptText(size_t ci) const {
    const auto& in = req_.inputs[ci / req_.params.sampling.n];
    if (in.kind == pipeline::GenerateInput::Kind::kText) return in.text;
    auto text = svc_->pipeline_->tokenizer().Decode(in.token_ids);
    return text.ok() ? text.value() : std::string();
  }

  json Logprobs(const std::vector<TokenLogprob>& lps, size_t text_offset) const {
    const auto& pipe = *svc_->pipeline_;
    if (req_.chat) {
      json content = json::array();
      for (const auto& lp : lps) {
        const std::string tok = pipe.TokenText(lp.token);
        json top = json::array();
        for (const auto& [id, l] : lp.top) {
          const std::string t = pipe.TokenText(id);
          top.push_back({{"token", t}, {"logprob", l}, {"bytes", BytesOf(t)}});
        }
        content.push_back({{"token", tok},
                           {"logprob", lp.logprob},
                           {"bytes", BytesOf(tok)},
                           {"top_logprobs", top}});
      }
      return json{{"content", content}, {"refusal", nullptr}};
    }
    json tokens = json::array(), token_lps = json::array(), tops = json::array(),
         offsets = json::array();
    size_t offset = text_offset;
    for (const auto& lp : lps) {
      const std::string tok = pipe.TokenText(lp.token);
      tokens.push_back(tok);
      token_lps.push_back(lp.logprob);
      json top = json::object();
      for (const auto& [id, l] : lp.top) top[pipe.TokenText(id)] = l;
      tops.push_back(top);
      offsets.push_back(offset);
      offset += tok.size();
    }
    return json{{"tokens", tokens},
                {"token_logprobs", token_lps},
                {"top_logprobs", tops},
                {"text_offset", offsets}};
  }

  json Usage() const {
    int64_t completion = 0;
    for (const auto& c : choices_) completion += static_cast<int64_t>(c.tokens.size());
    return json{{"prompt_tokens", prompt_tokens_},
                {"completion_tokens", completion},
                {"total_tokens", prompt_tokens_ + completion}};
  }

  void Finish() {
    done_ = true;
    int64_t completion = 0;
    for (const auto& c : choices_) completion += static_cast<int64_t>(c.tokens.size());
    const double secs =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - arrival_).count();
    const bool client_gone = res_->closed();
    svc_->metrics_->RecordGeneration(prompt_tokens_, completion, secs, error_.ok() && !client_gone);
    if (!error_.ok() && !req_.stream) {
      const int status = pipeline::HttpStatusFor(error_);
      res_->Respond(status, "application/json", ApiError{status, error_.message(), "", ""}.Body());
    } else if (req_.stream) {
      if (!error_.ok()) {
        ApiError e{pipeline::HttpStatusFor(error_), error_.message(), "", ""};
        res_->Write("data: " + e.Body() + "\n\n");
      }
      if (req_.include_usage) {
        json chunk = ChunkEnvelope();
        chunk["choices"] = json::array();
        chunk["usage"] = Usage();
        res_->Write(SseData(chunk));
      }
      res_->Write(SseDone());
      res_->End();
    } else {
      json choices = json::array();
      for (size_t i = 0; i < choices_.size(); ++i) {
        const Choice& c = choices_[i];
        json lp = req_.logprobs ? Logprobs(c.logprobs, 0) : json(nullptr);
        if (req_.chat) {
          choices.push_back(
              {{"index", i},
               {"message", {{"role", "assistant"}, {"content", c.text}, {"refusal", nullptr}}},
               {"logprobs", lp},
               {"finish_reason", c.finish}});
        } else {
          choices.push_back({{"index", i},
                             {"text", req_.echo ? PromptText(i) + c.text : c.text},
                             {"logprobs", lp},
                             {"finish_reason", c.finish}});
        }
      }
      json body{{"id", id_},
                {"object", req_.chat ? "chat.completion" : "text_completion"},
                {"created", created_},
                {"model", Model()},
                {"system_fingerprint", nullptr},
                {"choices", choices},
                {"usage", Usage()}};
      res_->Respond(200, "application/json", DumpJson(body));
    }
    for (auto& g : gens_) g->SetListener(nullptr);
    // Drop the generations (and with them the engine's streams) now; self_ goes last.
    auto keep = std::move(self_);
    gens_.clear();
  }

  OpenAiService* svc_;
  OpenAiRequest req_;
  ResponderPtr res_;
  std::string id_;
  int64_t created_ = 0;
  std::chrono::steady_clock::time_point arrival_;
  std::vector<std::unique_ptr<pipeline::Generation>> gens_;
  std::vector<Choice> choices_;
  int64_t prompt_tokens_ = 0;
  bool first_token_seen_ = false;
  bool done_ = false;
  Status error_;
  std::atomic<bool> pump_posted_{false};
  std::shared_ptr<Job> self_;
};

OpenAiService::OpenAiService(pipeline::ModelPipeline* pipeline, ServerMetrics* metrics,
                             OpenAiServiceOptions options)
    : pipeline_(pipeline), metrics_(metrics), options_(std::move(options)) {}

std::vector<std::string> OpenAiService::ModelIds() const {
  std::vector<std::string> ids{pipeline_->info().name};
  for (const auto& x : options_.extra_model_ids) {
    if (x != ids[0]) ids.push_back(x);
  }
  return ids;
}

void OpenAiService::Register(Router& router) {
  router.Add("GET", "/v1/models",
             [this](HttpRequest& req, ResponderPtr res) { HandleModels(req, res); });
  router.Add("POST", "/v1/completions",
             [this](HttpRequest& req, ResponderPtr res) { HandleGenerate(false, req, res); });
  router.Add("POST", "/v1/chat/completions",
             [this](HttpRequest& req, ResponderPtr res) { HandleGenerate(true, req, res); });
  // Kubernetes probes: no api key.
  router.Add(
      "GET", "/v2/health/live",
      [](HttpRequest&, ResponderPtr res) { res->Respond(200, "text/plain", ""); }, false);
  router.Add(
      "GET", "/v2/health/ready",
      [this](HttpRequest&, ResponderPtr res) {
        if (!accepting_) {
          res->Respond(503, "text/plain", "draining");
        } else if (Status health = pipeline_->BackendHealth(); !health.ok()) {
          res->Respond(503, "text/plain", health.message());
        } else {
          res->Respond(200, "text/plain", "");
        }
      },
      false);
}

void OpenAiService::HandleModels(HttpRequest&, ResponderPtr res) {
  const auto& info = pipeline_->info();
  json data = json::array();
  for (const auto& id : ModelIds()) {
    data.push_back({{"id", id},
                    {"object", "model"},
                    {"created", info.created_unix},
                    {"owned_by", "qilin"},
                    {"root", info.name},
                    {"max_model_len", info.max_model_len}});
  }
  res->Respond(200, "application/json", DumpJson(json{{"object", "list"}, {"data", data}}));
}

void OpenAiService::HandleGenerate(bool chat, HttpRequest& req, ResponderPtr res) {
  OpenAiRequest r;
  ApiError err;
  auto fail = [&](const ApiError& e) { res->Respond(e.status, "application/json", e.Body()); };
  if (!ParseOpenAiRequest(req.body, chat, options_.limits, &r, &err)) return fail(err);
  if (!r.model.empty()) {
    const auto ids = ModelIds();
    if (std::find(ids.begin(), ids.end(), r.model) == ids.end()) {
      return fail({404,
                   fmt::format("the model '{}' does not exist; this server serves '{}'", r.model,
                               pipeline_->info().name),
                   "model", "model_not_found"});
    }
  }
  if (!accepting_) return fail({503, "the server is shutting down", "", ""});
  if (active_.fetch_add(1) >= options_.max_active) {
    --active_;
    metrics_->RequestRejected();
    return fail({429,
                 fmt::format("the server is at its limit of {} requests in flight (--max-queue); "
                             "retry later",
                             options_.max_active),
                 "", ""});
  }
  // From here on the Job owns the active slot (its destructor frees it).
  std::vector<std::unique_ptr<pipeline::Generation>> gens;
  for (const auto& in : r.inputs) {
    auto g = pipeline_->Submit(in, r.params);
    if (!g.ok()) {
      --active_;
      const int status = pipeline::HttpStatusFor(g.status());
      std::string param;
      const std::string& msg = g.status().message();
      if (msg.find("max_tokens") != std::string::npos) param = "max_tokens";
      if (msg.find("context length") != std::string::npos) param = chat ? "messages" : "prompt";
      return fail({status, msg, param, ""});
    }
    gens.push_back(std::move(g).value());
  }
  const std::string id = (chat ? "chatcmpl-" : "cmpl-") + req.request_id;
  auto job = std::make_shared<Job>(this, std::move(r), res, id);
  job->Start(std::move(gens));
}

}  // namespace qilin::server
