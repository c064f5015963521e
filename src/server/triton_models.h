// The Triton models of tensorrtllm_backend's inflight_batcher_llm, run natively: ensemble
// (text in, text out), tensorrt_llm (token ids in and out, the engine), preprocessing
// (text -> ids) and postprocessing (ids -> text). Shared by the gRPC service and the HTTP /v2
// routes: both turn their wire format into an InferRequest of Tensors and send back what
// comes to the ResponseFn.
//
// Responses: exactly one response per request has `final` set, and it is the last. A streamed
// request (input `stream` / `streaming` true, decoupled models only) gets one response per
// text delta / token batch; others get one response. A failed request gets one final response
// with `error` set. Responses come from the TritonModels dispatcher thread (engine work) or
// from the caller's thread (pre/postprocessing, and errors found before submitting).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "common/status.h"
#include "engine/engine.h"
#include "grpc_service.pb.h"
#include "server/infer_tensor.h"
#include "server/model_repository.h"
#include "tokenizer/tokenizer.h"

namespace qilin::server {

struct InferRequest {
  std::string model_name;
  std::string id;
  std::vector<Tensor> inputs;
  std::vector<std::string> requested_outputs;  // empty: all that apply
};

struct InferResponse {
  std::string model_name;
  std::string id;
  std::vector<Tensor> outputs;
  bool final = false;
  Status error;
};
using ResponseFn = std::function<void(InferResponse)>;

// A request in flight. Cancel() aborts it; no response is sent after Cancel returns.
class InferCall {
 public:
  virtual ~InferCall() = default;
  virtual void Cancel() = 0;
};

struct TritonModelsOptions {
  // Requests in the engine at once (running and queued); beyond, RESOURCE_EXHAUSTED. 0: the
  // repository's max_queue_size, and when that is 0 too, no limit.
  int64_t max_queued_requests = 0;
};

struct ModelStats {
  int64_t success = 0, fail = 0;
  int64_t success_ns = 0, fail_ns = 0;
  int64_t last_inference_ms = 0;
};

class TritonModels {
 public:
  TritonModels(Engine* engine, std::shared_ptr<const tokenizer::Tokenizer> tokenizer,
               ModelRepository repo, TritonModelsOptions options = {});
  ~TritonModels();  // cancels what is in flight, stops the dispatcher
  TritonModels(const TritonModels&) = delete;
  TritonModels& operator=(const TritonModels&) = delete;

  const ModelRepository& repository() const { return repo_; }
  const RepositoryModel* Find(std::string_view name) const { return repo_.Find(name); }
  // Is `name` decoupled (may answer a request with several responses)?
  bool Decoupled(const RepositoryModel& m) const;
  inference::ModelMetadataResponse Metadata(const RepositoryModel& m) const;

  // Validates and starts `request`. Errors before anything started are returned (NotFound:
  // no such model; InvalidArgument/OutOfRange: bad input naming the tensor and limit;
  // ResourceExhausted: queue full); after, they come as a final response with `error`.
  Result<std::shared_ptr<InferCall>> Infer(InferRequest request, ResponseFn fn);

  int64_t in_flight() const { return in_flight_.load(); }
  ModelStats stats(const std::string& model) const;

 private:
  struct Call;
  Result<std::shared_ptr<InferCall>> StartGeneration(const RepositoryModel& m, InferRequest& req,
                                                     ResponseFn fn);
  Result<InferResponse> Preprocess(const InferRequest& req) const;
  Result<InferResponse> Postprocess(const InferRequest& req) const;
  void Loop();
  bool Pump(Call& call);
  void Record(const std::string& model, bool ok, int64_t ns);

  Engine* engine_;
  std::shared_ptr<const tokenizer::Tokenizer> tokenizer_;
  ModelRepository repo_;
  int64_t max_queued_;
  std::vector<int32_t> eos_ids_;

  std::atomic<int64_t> in_flight_{0};
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::shared_ptr<Call>> calls_;
  bool stopping_ = false;
  std::thread loop_;

  mutable std::mutex stats_mu_;
  std::map<std::string, ModelStats> stats_;
};

// Token ids in TensorRT-LLM's word-list layout [2, K]: row 0 the concatenated ids of every
// word, row 1 the end offset of each word, both padded (ids with 0, offsets with -1) to K =
// max(1, total ids). Returns the two rows.
std::vector<int64_t> ToWordListFormat(const std::vector<std::vector<int32_t>>& words,
                                      int64_t pad_to);
// The inverse: the words of one [2, K] list (stops at the first negative offset).
Result<std::vector<std::vector<int32_t>>> FromWordListFormat(const int64_t* ids,
                                                             const int64_t* offsets, int64_t k);

// A gRPC-wire response for a model response (id, model name, outputs, final flag).
void ToProto(const InferResponse& r, inference::ModelInferResponse* out);

}  // namespace qilin::server
