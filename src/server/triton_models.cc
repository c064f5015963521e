#include "server/triton_models.h"

#include <algorithm>
#include <chrono>
#include <map>
#include <optional>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

namespace qilin::server {
namespace {

using Clock = std::chrono::steady_clock;

const Tensor* FindInput(const InferRequest& r, std::string_view name) {
  for (const auto& t : r.inputs) {
    if (t.name == name) return &t;
  }
  return nullptr;
}

// Inputs must be ones the model declares, with a datatype of the same family (integers of any
// width are accepted for integer inputs: clients send UINT32 or INT32 for max_tokens alike),
// and the required ones must be there.
Status CheckInputs(const RepositoryModel& m, const InferRequest& r) {
  for (const auto& t : r.inputs) {
    const inference::ModelInput* decl = nullptr;
    for (const auto& in : m.config.input()) {
      if (in.name() == t.name) decl = &in;
    }
    if (!decl) {
      std::vector<std::string> names;
      for (const auto& in : m.config.input()) names.push_back(in.name());
      return InvalidArgument("model '{}' has no input '{}' (inputs: {})", m.name, t.name,
                             fmt::join(names, ", "));
    }
    const std::string want = DatatypeName(decl->data_type());
    const bool want_int = want.find("INT") != std::string::npos;
    const bool have_int = t.datatype.find("INT") != std::string::npos;
    const bool ok = t.datatype == want || (want_int && have_int) ||
                    (want == "FP32" && t.is_float()) ||
                    (want == "BOOL" && (t.datatype == "BOOL" || have_int));
    if (!ok) {
      return InvalidArgument("model '{}' input '{}' has datatype {}, expected {}", m.name, t.name,
                             t.datatype, want);
    }
  }
  for (const auto& in : m.config.input()) {
    if (!in.optional() && !FindInput(r, in.name())) {
      return InvalidArgument("model '{}' needs input '{}' ({})", m.name, in.name(),
                             DatatypeName(in.data_type()));
    }
  }
  return Status::Ok();
}

Result<std::optional<int64_t>> OptInt(const InferRequest& r, const char* name, int64_t lo,
                                      int64_t hi) {
  const Tensor* t = FindInput(r, name);
  if (!t) return std::optional<int64_t>();
  if (t->size() != 1) {
    return InvalidArgument("input '{}' must hold one value (batch size 1), it holds {}", name,
                           t->size());
  }
  int64_t v = t->is_float() ? static_cast<int64_t>(t->floats[0]) : t->ints[0];
  if (t->datatype == "UINT64" && v < 0) v = hi;  // over any limit below
  if (v < lo || v > hi) return OutOfRange("input '{}' = {} is outside [{}, {}]", name, v, lo, hi);
  return std::optional<int64_t>(v);
}

Result<std::optional<double>> OptFloat(const InferRequest& r, const char* name, double lo,
                                       double hi) {
  const Tensor* t = FindInput(r, name);
  if (!t) return std::optional<double>();
  if (t->size() != 1) {
    return InvalidArgument("input '{}' must hold one value (batch size 1), it holds {}", name,
                           t->size());
  }
  double v = t->is_float() ? t->floats[0] : static_cast<double>(t->ints[0]);
  if (!(v >= lo && v <= hi))
    return OutOfRange("input '{}' = {} is outside [{}, {}]", name, v, lo, hi);
  return std::optional<double>(v);
}

Result<bool> OptBool(const InferRequest& r, const char* name) {
  const Tensor* t = FindInput(r, name);
  if (!t) return false;
  if (t->size() != 1) {
    return InvalidArgument("input '{}' must hold one value (batch size 1), it holds {}", name,
                           t->size());
  }
  return t->is_float() ? t->floats[0] != 0 : t->ints[0] != 0;
}

// Names of the sampling inputs of each model kind.
struct Names {
  const char *top_k, *top_p, *length_penalty, *stream;
};
constexpr Names kEnsembleNames{"top_k", "top_p", "length_penalty", "stream"};
constexpr Names kLlmNames{"runtime_top_k", "runtime_top_p", "len_penalty", "streaming"};

// TensorRT-LLM's sampling semantics: top_k 0 and top_p 0 are "off", and with both off (and
// no temperature given) decoding is greedy.
Status FillSampling(const InferRequest& r, const Names& n, int64_t max_beam, SamplingParams* s,
                    bool* stream, bool* logprobs) {
  QILIN_ASSIGN_OR_RETURN(auto top_k, OptInt(r, n.top_k, 0, 1 << 20));
  QILIN_ASSIGN_OR_RETURN(auto top_p, OptFloat(r, n.top_p, 0.0, 1.0));
  QILIN_ASSIGN_OR_RETURN(auto temp, OptFloat(r, "temperature", 0.0, 100.0));
  s->top_k = static_cast<int32_t>(top_k.value_or(0));
  s->top_p = top_p && *top_p > 0 ? static_cast<float>(*top_p) : 1.0f;
  s->temperature = static_cast<float>(temp.value_or(1.0));
  if (s->top_k == 0 && !(top_p && *top_p > 0) && !temp) s->top_k = 1;
  QILIN_ASSIGN_OR_RETURN(auto rep, OptFloat(r, "repetition_penalty", 1e-3, 100.0));
  if (rep) s->repetition_penalty = static_cast<float>(*rep);
  QILIN_ASSIGN_OR_RETURN(auto pres, OptFloat(r, "presence_penalty", -2.0, 2.0));
  if (pres) s->presence_penalty = static_cast<float>(*pres);
  QILIN_ASSIGN_OR_RETURN(auto freq, OptFloat(r, "frequency_penalty", -2.0, 2.0));
  if (freq) s->frequency_penalty = static_cast<float>(*freq);
  QILIN_ASSIGN_OR_RETURN(auto lp, OptFloat(r, n.length_penalty, -10.0, 10.0));
  if (lp) s->length_penalty = static_cast<float>(*lp);
  QILIN_ASSIGN_OR_RETURN(auto minlen, OptInt(r, "min_length", 0, 1 << 20));
  if (minlen) s->min_tokens = static_cast<int32_t>(*minlen);
  const Tensor* seed = FindInput(r, "random_seed");
  if (seed) {
    if (seed->size() != 1) return InvalidArgument("input 'random_seed' must hold one value");
    s->seed = static_cast<uint64_t>(seed->is_float() ? int64_t(seed->floats[0]) : seed->ints[0]);
  }
  QILIN_ASSIGN_OR_RETURN(auto beam, OptInt(r, "beam_width", 1, max_beam));
  if (beam) s->beam_width = static_cast<int32_t>(*beam);
  QILIN_ASSIGN_OR_RETURN(*stream, OptBool(r, n.stream));
  QILIN_ASSIGN_OR_RETURN(*logprobs, OptBool(r, "return_log_probs"));
  if (*logprobs) s->logprobs = 0;
  QILIN_ASSIGN_OR_RETURN(auto end_id, OptInt(r, "end_id", 0, int64_t{1} << 31));
  if (end_id) {
    s->stop_token_ids.push_back(static_cast<int32_t>(*end_id));
    s->ignore_eos = true;  // end_id replaces the model's end token, as in TensorRT-LLM
  }
  if (*stream && s->beam_width > 1) {
    return InvalidArgument(
        "streaming with beam_width {} > 1 is not supported (beams are only "
        "known at the end)",
        s->beam_width);
  }
  return Status::Ok();
}

}  // namespace

std::vector<int64_t> ToWordListFormat(const std::vector<std::vector<int32_t>>& words,
                                      int64_t pad_to) {
  std::vector<int64_t> ids, offsets;
  for (const auto& w : words) {
    ids.insert(ids.end(), w.begin(), w.end());
    offsets.push_back(static_cast<int64_t>(ids.size()));
  }
  const int64_t k = std::max<int64_t>({1, pad_to, static_cast<int64_t>(ids.size())});
  ids.resize(k, 0);
  offsets.resize(k, -1);
  ids.insert(ids.end(), offsets.begin(), offsets.end());
  return ids;
}

Result<std::vector<std::vector<int32_t>>> FromWordListFormat(const int64_t* ids,
                                                             const int64_t* offsets, int64_t k) {
  std::vector<std::vector<int32_t>> words;
  int64_t start = 0;
  for (int64_t i = 0; i < k; ++i) {
    const int64_t end = offsets[i];
    if (end < 0) break;
    if (end < start || end > k) {
      return InvalidArgument("word list offset {} at {} is not in [{}, {}]", end, i, start, k);
    }
    if (end == start) return InvalidArgument("word list has an empty word at {}", i);
    std::vector<int32_t> w;
    for (int64_t j = start; j < end; ++j) w.push_back(static_cast<int32_t>(ids[j]));
    words.push_back(std::move(w));
    start = end;
  }
  return words;
}

void ToProto(const InferResponse& r, inference::ModelInferResponse* out) {
  out->set_model_name(r.model_name);
  out->set_model_version("1");
  out->set_id(r.id);
  for (const auto& t : r.outputs) AddOutputToProto(t, out);
}

// ---- A generation in flight -----------------------------------------------------------------

struct TritonModels::Call : InferCall {
  TritonModels* owner = nullptr;
  std::string model;
  TritonModelKind kind;
  std::string id;
  std::shared_ptr<ResponseStream> stream;
  int64_t request_id = -1;
  ResponseFn fn;
  std::mutex mu;  // guards fn against Cancel
  bool cancelled = false;
  bool done = false;
  bool streaming = false;
  bool logprobs = false;
  bool exclude_input = true;
  std::vector<std::string> requested;
  std::vector<int32_t> prompt;
  std::unique_ptr<tokenizer::StreamDecoder> decoder;  // ensemble: text deltas, stop strings
  // Accumulated (non-streaming) or pending (streaming) output.
  std::string text;
  std::vector<int32_t> ids;
  std::vector<double> token_logprobs;
  double cum_logprob = 0;
  Status error;
  Clock::time_point start = Clock::now();

  void Cancel() override {
    bool first = false;
    {
      std::lock_guard<std::mutex> lock(mu);
      first = !cancelled && !done;
      cancelled = true;
      fn = nullptr;
    }
    if (first && request_id >= 0) owner->engine_->Cancel(request_id);
  }

  bool Wants(const std::string& name) const {
    return requested.empty() ||
           std::find(requested.begin(), requested.end(), name) != requested.end();
  }

  // Builds a response from what is pending and clears it.
  InferResponse Take(bool final) {
    InferResponse r;
    r.model_name = model;
    r.id = id;
    r.final = final;
    const int64_t n = static_cast<int64_t>(ids.size());
    if (kind == TritonModelKind::kEnsemble) {
      if (Wants("text_output")) r.outputs.push_back(Tensor::Bytes("text_output", {text}, {1, 1}));
    } else {
      std::vector<int64_t> out_ids;
      if (!exclude_input && !streaming) out_ids.assign(prompt.begin(), prompt.end());
      out_ids.insert(out_ids.end(), ids.begin(), ids.end());
      const int64_t len = static_cast<int64_t>(out_ids.size());
      if (Wants("output_ids"))
        r.outputs.push_back(Tensor::Int32("output_ids", out_ids, {1, 1, len}));
      if (Wants("sequence_length")) {
        r.outputs.push_back(Tensor::Int32("sequence_length", {len}, {1, 1}));
      }
    }
    if (logprobs) {
      if (Wants("cum_log_probs"))
        r.outputs.push_back(Tensor::Fp32("cum_log_probs", {cum_logprob}, {1, 1}));
      if (Wants("output_log_probs")) {
        r.outputs.push_back(Tensor::Fp32("output_log_probs", token_logprobs, {1, 1, n}));
      }
    }
    text.clear();
    if (streaming) {
      ids.clear();
      token_logprobs.clear();
    }
    return r;
  }

  // Runs the callback under `mu`, so that Cancel() returning means no callback runs or will.
  void Send(InferResponse r) {
    std::lock_guard<std::mutex> lock(mu);
    if (cancelled || done) return;
    if (r.final) done = true;
    if (fn) fn(std::move(r));
  }
};

TritonModels::TritonModels(Engine* engine, std::shared_ptr<const tokenizer::Tokenizer> tokenizer,
                           ModelRepository repo, TritonModelsOptions options)
    : engine_(engine), tokenizer_(std::move(tokenizer)), repo_(std::move(repo)) {
  max_queued_ = options.max_queued_requests > 0
                    ? options.max_queued_requests
                    : static_cast<int64_t>(repo_.settings.max_queue_size);
  loop_ = std::thread([this] { Loop(); });
}

TritonModels::~TritonModels() {
  std::vector<std::shared_ptr<Call>> calls;
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
    calls = calls_;
  }
  cv_.notify_all();
  for (auto& c : calls) c->Cancel();
  if (loop_.joinable()) loop_.join();
}

bool TritonModels::Decoupled(const RepositoryModel& m) const {
  if (m.kind == TritonModelKind::kPreprocessing || m.kind == TritonModelKind::kPostprocessing) {
    return m.config.model_transaction_policy().decoupled();
  }
  return repo_.settings.decoupled || m.config.model_transaction_policy().decoupled();
}

inference::ModelMetadataResponse TritonModels::Metadata(const RepositoryModel& m) const {
  inference::ModelMetadataResponse md;
  md.set_name(m.name);
  md.add_versions()->assign(1, '1');  // (not add_versions("1"): a GCC 12 -Wrestrict false positive)
  md.set_platform(m.config.platform().empty() ? m.config.backend() : m.config.platform());
  const bool batched = m.config.max_batch_size() > 0;
  for (const auto& in : m.config.input()) {
    auto* t = md.add_inputs();
    t->set_name(in.name());
    t->set_datatype(DatatypeName(in.data_type()));
    if (batched) t->add_shape(-1);
    for (int64_t d : in.dims()) t->add_shape(d);
  }
  for (const auto& out : m.config.output()) {
    auto* t = md.add_outputs();
    t->set_name(out.name());
    t->set_datatype(DatatypeName(out.data_type()));
    if (batched) t->add_shape(-1);
    for (int64_t d : out.dims()) t->add_shape(d);
  }
  return md;
}

ModelStats TritonModels::stats(const std::string& model) const {
  std::lock_guard<std::mutex> lock(stats_mu_);
  auto it = stats_.find(model);
  return it == stats_.end() ? ModelStats{} : it->second;
}

void TritonModels::Record(const std::string& model, bool ok, int64_t ns) {
  std::lock_guard<std::mutex> lock(stats_mu_);
  ModelStats& s = stats_[model];
  (ok ? s.success : s.fail) += 1;
  (ok ? s.success_ns : s.fail_ns) += ns;
  s.last_inference_ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                            std::chrono::system_clock::now().time_since_epoch())
                            .count();
}

Result<std::shared_ptr<InferCall>> TritonModels::Infer(InferRequest request, ResponseFn fn) {
  const RepositoryModel* m = Find(request.model_name);
  if (!m) {
    std::vector<std::string> names;
    for (const auto& x : repo_.models) names.push_back(x.name);
    return NotFound("unknown model '{}' (models: {})", request.model_name, fmt::join(names, ", "));
  }
  for (const auto& name : request.requested_outputs) {
    bool found = std::any_of(m->config.output().begin(), m->config.output().end(),
                             [&](const auto& o) { return o.name() == name; });
    if (!found) return InvalidArgument("model '{}' has no output '{}'", m->name, name);
  }
  QILIN_RETURN_IF_ERROR(CheckInputs(*m, request));
  const auto start = Clock::now();
  if (m->kind == TritonModelKind::kPreprocessing || m->kind == TritonModelKind::kPostprocessing) {
    auto r =
        m->kind == TritonModelKind::kPreprocessing ? Preprocess(request) : Postprocess(request);
    Record(m->name, r.ok(), (Clock::now() - start).count());
    if (!r.ok()) return r.status();
    InferResponse resp = std::move(r).value();
    resp.model_name = m->name;
    resp.id = request.id;
    resp.final = true;
    if (!request.requested_outputs.empty()) {
      std::erase_if(resp.outputs, [&](const Tensor& t) {
        return std::find(request.requested_outputs.begin(), request.requested_outputs.end(),
                         t.name) == request.requested_outputs.end();
      });
    }
    fn(std::move(resp));
    struct Done : InferCall {
      void Cancel() override {}
    };
    return std::shared_ptr<InferCall>(std::make_shared<Done>());
  }
  return StartGeneration(*m, request, std::move(fn));
}

Result<std::shared_ptr<InferCall>> TritonModels::StartGeneration(const RepositoryModel& m,
                                                                 InferRequest& req, ResponseFn fn) {
  auto call = std::make_shared<Call>();
  call->owner = this;
  call->model = m.name;
  call->kind = m.kind;
  call->id = req.id;
  call->requested = req.requested_outputs;
  call->exclude_input = repo_.settings.exclude_input_in_output;
  Request er;
  const bool ensemble = m.kind == TritonModelKind::kEnsemble;
  QILIN_RETURN_IF_ERROR(FillSampling(req, ensemble ? kEnsembleNames : kLlmNames,
                                     repo_.settings.max_beam_width, &er.sampling, &call->streaming,
                                     &call->logprobs));
  if (call->streaming && !Decoupled(m)) {
    return InvalidArgument(
        "model '{}' is not decoupled: streaming needs "
        "model_transaction_policy {{ decoupled: true }}",
        m.name);
  }
  std::vector<std::string> stop_strings;
  if (ensemble) {
    const Tensor* text = FindInput(req, "text_input");
    if (text->size() != 1) {
      return InvalidArgument("input 'text_input' must hold one string (batch size 1), it holds {}",
                             text->size());
    }
    QILIN_ASSIGN_OR_RETURN(er.prompt, tokenizer_->Encode(text->bytes[0]));
    QILIN_ASSIGN_OR_RETURN(auto max_tokens, OptInt(req, "max_tokens", 1, 1 << 24));
    er.sampling.max_tokens = static_cast<int32_t>(*max_tokens);
    if (const Tensor* sw = FindInput(req, "stop_words")) {
      for (const auto& w : sw->bytes) {
        if (!w.empty()) stop_strings.push_back(w);
      }
    }
    if (const Tensor* bw = FindInput(req, "bad_words")) {
      for (const auto& w : bw->bytes) {
        if (w.empty()) continue;
        QILIN_ASSIGN_OR_RETURN(auto ids, tokenizer_->Encode(w));
        if (!ids.empty()) er.sampling.bad_words.push_back(std::move(ids));
      }
    }
  } else {
    const Tensor* ids = FindInput(req, "input_ids");
    QILIN_ASSIGN_OR_RETURN(auto len, OptInt(req, "input_lengths", 1, ids->size()));
    for (int64_t i = 0; i < *len; ++i) {
      const int64_t v = ids->ints[i];
      if (v < 0 || v >= tokenizer_->vocab_size() * 4) {
        return OutOfRange("input_ids[{}] = {} is not a token id", i, v);
      }
      er.prompt.push_back(static_cast<int32_t>(v));
    }
    QILIN_ASSIGN_OR_RETURN(auto out_len, OptInt(req, "request_output_len", 1, 1 << 24));
    er.sampling.max_tokens = static_cast<int32_t>(*out_len);
    for (const char* name : {"stop_words_list", "bad_words_list"}) {
      const Tensor* t = FindInput(req, name);
      if (!t) continue;
      if (t->size() % 2 != 0 || t->ints.empty()) {
        return InvalidArgument("input '{}' must be [1, 2, K] (ids and offsets), it has {} values",
                               name, t->size());
      }
      const int64_t k = t->size() / 2;
      QILIN_ASSIGN_OR_RETURN(auto words, FromWordListFormat(t->ints.data(), t->ints.data() + k, k));
      for (auto& w : words) {
        if (std::string(name) == "bad_words_list") {
          er.sampling.bad_words.push_back(std::move(w));
        } else if (w.size() == 1) {
          er.sampling.stop_token_ids.push_back(w[0]);
        } else {
          QILIN_ASSIGN_OR_RETURN(auto s, tokenizer_->Decode(w));
          stop_strings.push_back(std::move(s));
        }
      }
    }
  }
  call->prompt = er.prompt;
  // Text deltas and stop strings are ours (a StreamDecoder per request); the engine's
  // detokenizer, when attached, is not needed.
  if (ensemble || !stop_strings.empty()) {
    tokenizer::StreamDecoder::Options o;
    o.skip_special_tokens = repo_.settings.skip_special_tokens;
    o.stop = stop_strings;
    call->decoder = std::make_unique<tokenizer::StreamDecoder>(tokenizer_, o);
  }
  if (max_queued_ > 0 && in_flight_.load() >= max_queued_) {
    return ResourceExhausted("queue full: {} requests in flight (limit {}; max_queue_size)",
                             in_flight_.load(), max_queued_);
  }
  QILIN_ASSIGN_OR_RETURN(call->stream, engine_->Submit(std::move(er)));
  call->request_id = call->stream->request_id();
  call->fn = std::move(fn);
  ++in_flight_;
  {
    std::lock_guard<std::mutex> lock(mu_);
    calls_.push_back(call);
  }
  cv_.notify_all();
  return std::shared_ptr<InferCall>(call);
}

// Takes what the engine produced for `call`; true when the call is over.
bool TritonModels::Pump(Call& c) {
  bool finished = false;
  bool any = false;
  while (auto r = c.stream->TryPop()) {
    any = true;
    if (r->seq_index != 0) continue;  // beams: the best is index 0
    for (size_t i = 0; i < r->token_ids.size(); ++i) {
      const int32_t id = r->token_ids[i];
      bool keep = true;
      if (c.decoder) {
        if (c.decoder->stopped()) {
          keep = false;
        } else {
          auto delta = c.decoder->Push(id);
          if (!delta.ok()) {
            c.error = delta.status();
          } else {
            c.text += *delta;
          }
          if (c.decoder->stopped()) {
            engine_->Cancel(c.request_id);
            finished = true;
          }
        }
      }
      if (keep) {
        c.ids.push_back(id);
        if (i < r->logprobs.size()) {
          c.token_logprobs.push_back(r->logprobs[i].logprob);
          c.cum_logprob += r->logprobs[i].logprob;
        }
      }
    }
    if (r->finished()) {
      if (!r->error.ok()) c.error = r->error;
      finished = true;
      if (r->finish_reason == FinishReason::kAbort && c.error.ok() &&
          !(c.decoder && c.decoder->stopped())) {
        c.error = Status(StatusCode::kCancelled, "the request was aborted");
      }
    }
    if (finished) break;
  }
  if (!finished && c.stream->closed() && !any) finished = true;
  if (finished) {
    if (c.decoder && !c.decoder->stopped()) c.text += c.decoder->Finish();
    if (!c.error.ok()) {
      InferResponse r;
      r.model_name = c.model;
      r.id = c.id;
      r.final = true;
      r.error = c.error;
      c.Send(std::move(r));
    } else {
      if (!c.exclude_input && !c.streaming && c.kind == TritonModelKind::kEnsemble) {
        auto prompt_text = tokenizer_->Decode(c.prompt);
        if (prompt_text.ok()) c.text = *prompt_text + c.text;
      }
      c.Send(c.Take(true));
    }
    Record(c.model, c.error.ok(), (Clock::now() - c.start).count());
    return true;
  }
  if (c.streaming && any && (!c.text.empty() || (!c.decoder && !c.ids.empty()))) {
    c.Send(c.Take(false));
  }
  return false;
}

void TritonModels::Loop() {
  std::vector<std::shared_ptr<Call>> calls;
  while (true) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return stopping_ || !calls_.empty(); });
      if (stopping_ && calls_.empty()) return;
      calls = calls_;
    }
    std::vector<Call*> over;
    for (auto& c : calls) {
      bool cancelled;
      {
        std::lock_guard<std::mutex> lock(c->mu);
        cancelled = c->cancelled;
      }
      if (Pump(*c) || (cancelled && c->stream->closed())) over.push_back(c.get());
    }
    if (!over.empty()) {
      std::lock_guard<std::mutex> lock(mu_);
      std::erase_if(calls_, [&](const std::shared_ptr<Call>& c) {
        return std::find(over.begin(), over.end(), c.get()) != over.end();
      });
      in_flight_ -= static_cast<int64_t>(over.size());
      if (stopping_ && calls_.empty()) return;
    }
    // The engine answers per step (milliseconds); poll at 1 ms.
    std::this_thread::sleep_for(std::chrono::microseconds(1000));
  }
}

// ---- preprocessing / postprocessing ----------------------------------------------------------

Result<InferResponse> TritonModels::Preprocess(const InferRequest& req) const {
  const Tensor* query = FindInput(req, "QUERY");
  const Tensor* out_len = FindInput(req, "REQUEST_OUTPUT_LEN");
  const int64_t batch = query->size();
  if (out_len->size() != batch) {
    return InvalidArgument("REQUEST_OUTPUT_LEN holds {} values for {} queries", out_len->size(),
                           batch);
  }
  std::vector<std::vector<int32_t>> ids;
  int64_t max_len = 0;
  for (const auto& q : query->bytes) {
    QILIN_ASSIGN_OR_RETURN(auto v, tokenizer_->Encode(q));
    max_len = std::max<int64_t>(max_len, v.size());
    ids.push_back(std::move(v));
  }
  std::vector<int64_t> flat, lens;
  for (const auto& v : ids) {
    flat.insert(flat.end(), v.begin(), v.end());
    flat.resize(flat.size() + (max_len - v.size()), 0);
    lens.push_back(static_cast<int64_t>(v.size()));
  }
  InferResponse r;
  r.outputs.push_back(Tensor::Int32("INPUT_ID", flat, {batch, max_len}));
  r.outputs.push_back(Tensor::Int32("REQUEST_INPUT_LEN", lens, {batch, 1}));
  // Word lists: one row of words per query (a [B, W] BYTES tensor, or [W] for one query).
  for (auto [in_name, out_name] : {std::pair{"BAD_WORDS_DICT", "BAD_WORDS_IDS"},
                                   std::pair{"STOP_WORDS_DICT", "STOP_WORDS_IDS"}}) {
    const Tensor* t = FindInput(req, in_name);
    std::vector<std::vector<std::vector<int32_t>>> per(batch);
    if (t && t->size() > 0) {
      if (t->size() % batch != 0) {
        return InvalidArgument("{} holds {} words, not a multiple of the batch {}", in_name,
                               t->size(), batch);
      }
      const int64_t w = t->size() / batch;
      for (int64_t b = 0; b < batch; ++b) {
        for (int64_t i = 0; i < w; ++i) {
          const std::string& word = t->bytes[b * w + i];
          if (word.empty()) continue;
          QILIN_ASSIGN_OR_RETURN(auto v, tokenizer_->Encode(word));
          if (!v.empty()) per[b].push_back(std::move(v));
        }
      }
    }
    int64_t k = 1;
    for (const auto& words : per) {
      int64_t total = 0;
      for (const auto& w : words) total += w.size();
      k = std::max(k, total);
    }
    std::vector<int64_t> flat_words;
    for (const auto& words : per) {
      auto row = ToWordListFormat(words, k);
      flat_words.insert(flat_words.end(), row.begin(), row.end());
    }
    r.outputs.push_back(Tensor::Int32(out_name, flat_words, {batch, 2, k}));
  }
  r.outputs.push_back(Tensor::Int32("REQUEST_OUTPUT_LEN", out_len->ints, {batch, 1}));
  return r;
}

Result<InferResponse> TritonModels::Postprocess(const InferRequest& req) const {
  const Tensor* tokens = FindInput(req, "TOKENS_BATCH");
  const Tensor* seq = FindInput(req, "SEQUENCE_LENGTH");
  // TOKENS_BATCH is [B, beams, L] (or [B, L]); SEQUENCE_LENGTH [B, beams] (or [B]).
  if (tokens->shape.size() < 2 || tokens->shape.size() > 3) {
    return InvalidArgument(
        "TOKENS_BATCH must be [batch, beams, length] or [batch, length], got "
        "rank {}",
        tokens->shape.size());
  }
  const int64_t len = tokens->shape.back();
  const int64_t rows = len > 0 ? tokens->size() / len : 0;
  if (seq->size() != rows) {
    return InvalidArgument("SEQUENCE_LENGTH holds {} values for {} token rows", seq->size(), rows);
  }
  std::vector<std::string> texts;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t n = seq->ints[r];
    if (n < 0 || n > len) {
      return OutOfRange("SEQUENCE_LENGTH[{}] = {} is outside [0, {}]", r, n, len);
    }
    std::vector<int32_t> ids;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t v = tokens->ints[r * len + i];
      if (v < 0 || v > INT32_MAX) return OutOfRange("TOKENS_BATCH value {} is not a token id", v);
      ids.push_back(static_cast<int32_t>(v));
    }
    QILIN_ASSIGN_OR_RETURN(auto text, tokenizer_->Decode(ids, repo_.settings.skip_special_tokens));
    texts.push_back(std::move(text));
  }
  std::vector<int64_t> out_shape(tokens->shape.begin(), tokens->shape.end() - 1);
  InferResponse resp;
  resp.outputs.push_back(Tensor::Bytes("OUTPUT", std::move(texts), out_shape));
  const Tensor* cum = FindInput(req, "CUM_LOG_PROBS");
  const Tensor* lp = FindInput(req, "OUTPUT_LOG_PROBS");
  Tensor c = Tensor::Fp32("OUT_CUM_LOG_PROBS", cum ? cum->floats : std::vector<double>(rows, 0.0),
                          cum ? cum->shape : out_shape);
  resp.outputs.push_back(std::move(c));
  std::vector<int64_t> lp_shape = out_shape;
  lp_shape.push_back(lp ? (lp->shape.empty() ? 0 : lp->shape.back()) : 0);
  resp.outputs.push_back(Tensor::Fp32(
      "OUT_OUTPUT_LOG_PROBS", lp ? lp->floats : std::vector<double>(), lp ? lp->shape : lp_shape));
  return resp;
}

}  // namespace qilin::server
