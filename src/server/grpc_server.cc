#include "server/grpc_server.h"

#include <grpcpp/grpcpp.h>

#include <deque>
#include <map>
#include <mutex>
#include <set>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "grpc_service.grpc.pb.h"

namespace qilin::server {

int GrpcCodeFor(StatusCode code) {
  switch (code) {
    case StatusCode::kOk:
      return grpc::StatusCode::OK;
    case StatusCode::kInvalidArgument:
      return grpc::StatusCode::INVALID_ARGUMENT;
    case StatusCode::kNotFound:
      return grpc::StatusCode::NOT_FOUND;
    case StatusCode::kOutOfRange:
      return grpc::StatusCode::OUT_OF_RANGE;
    case StatusCode::kResourceExhausted:
      return grpc::StatusCode::RESOURCE_EXHAUSTED;
    case StatusCode::kUnavailable:
      return grpc::StatusCode::UNAVAILABLE;
    case StatusCode::kFailedPrecondition:
      return grpc::StatusCode::FAILED_PRECONDITION;
    case StatusCode::kUnimplemented:
      return grpc::StatusCode::UNIMPLEMENTED;
    case StatusCode::kCancelled:
      return grpc::StatusCode::CANCELLED;
    case StatusCode::kDataLoss:
      return grpc::StatusCode::DATA_LOSS;
    default:
      return grpc::StatusCode::INTERNAL;
  }
}

namespace {

grpc::Status ToGrpc(const Status& s) {
  return grpc::Status(static_cast<grpc::StatusCode>(GrpcCodeFor(s.code())), s.message());
}

Result<InferRequest> FromProto(const inference::ModelInferRequest& req) {
  InferRequest r;
  r.model_name = req.model_name();
  r.id = req.id();
  if (!req.model_version().empty() && req.model_version() != "1") {
    return NotFound("model '{}' has no version '{}' (versions: 1)", req.model_name(),
                    req.model_version());
  }
  QILIN_ASSIGN_OR_RETURN(r.inputs, InputsFromProto(req));
  for (const auto& o : req.outputs()) r.requested_outputs.push_back(o.name());
  return r;
}

}  // namespace

// ---- ModelStreamInfer: one reactor per stream ----------------------------------------------

class StreamReactor : public grpc::ServerBidiReactor<inference::ModelInferRequest,
                                                     inference::ModelStreamInferResponse> {
 public:
  StreamReactor(TritonModels* models) : models_(models) { StartRead(&request_); }

  void OnReadDone(bool ok) override {
    if (!ok) {
      std::lock_guard<std::mutex> lock(mu_);
      reading_done_ = true;
      MaybeFinishLocked();
      return;
    }
    Handle(request_);
    request_.Clear();
    StartRead(&request_);
  }

  void OnWriteDone(bool ok) override {
    std::lock_guard<std::mutex> lock(mu_);
    writing_ = false;
    if (!queue_.empty()) queue_.pop_front();
    if (!ok) {
      broken_ = true;  // the client is gone; OnCancel / OnDone follow
      queue_.clear();
    }
    WriteNextLocked();
    MaybeFinishLocked();
  }

  void OnCancel() override { CancelAll(); }

  void OnDone() override {
    CancelAll();
    delete this;
  }

 private:
  struct Pending {
    bool decoupled = false;
    bool empty_final = false;
  };

  void Handle(const inference::ModelInferRequest& req) {
    auto parsed = FromProto(req);
    const RepositoryModel* m = models_->Find(req.model_name());
    Pending p;
    p.decoupled = m && models_->Decoupled(*m);
    p.empty_final = WantsEmptyFinalResponse(req);
    const uint64_t key = next_key_++;
    {
      std::lock_guard<std::mutex> lock(mu_);
      ++active_;
    }
    if (!parsed.ok()) {
      SendError(req.id(), req.model_name(), parsed.status(), key);
      return;
    }
    InferRequest r = std::move(parsed).value();
    auto call = models_->Infer(
        std::move(r), [this, p, key](InferResponse resp) { OnResponse(p, key, std::move(resp)); });
    if (!call.ok()) {
      SendError(req.id(), req.model_name(), call.status(), key);
      return;
    }
    std::shared_ptr<InferCall> c = std::move(call).value();
    bool cancel_now;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (finished_keys_.erase(key)) return;
      cancel_now = broken_;  // the stream was cancelled while Infer ran
      if (!cancel_now) calls_[key] = c;
    }
    if (cancel_now) {
      c->Cancel();
      std::lock_guard<std::mutex> lock(mu_);
      --active_;
    }
  }

  void SendError(const std::string& id, const std::string& model, const Status& s, uint64_t key) {
    inference::ModelStreamInferResponse out;
    out.set_error_message(s.message());
    out.mutable_infer_response()->set_id(id);
    out.mutable_infer_response()->set_model_name(model);
    SetFinalFlag(out.mutable_infer_response(), true);
    std::lock_guard<std::mutex> lock(mu_);
    EnqueueLocked(std::move(out));
    DoneLocked(key);
  }

  // From the models' dispatcher thread (or this thread for immediate models).
  void OnResponse(const Pending& p, uint64_t key, InferResponse r) {
    std::lock_guard<std::mutex> lock(mu_);
    if (!r.error.ok()) {
      inference::ModelStreamInferResponse out;
      out.set_error_message(r.error.message());
      out.mutable_infer_response()->set_id(r.id);
      out.mutable_infer_response()->set_model_name(r.model_name);
      SetFinalFlag(out.mutable_infer_response(), true);
      EnqueueLocked(std::move(out));
    } else {
      inference::ModelStreamInferResponse out;
      ToProto(r, out.mutable_infer_response());
      if (p.decoupled) {
        SetFinalFlag(out.mutable_infer_response(), r.final && !p.empty_final);
      }
      EnqueueLocked(std::move(out));
      if (r.final && p.decoupled && p.empty_final) {
        inference::ModelStreamInferResponse empty;
        empty.mutable_infer_response()->set_id(r.id);
        empty.mutable_infer_response()->set_model_name(r.model_name);
        empty.mutable_infer_response()->set_model_version("1");
        SetFinalFlag(empty.mutable_infer_response(), true);
        EnqueueLocked(std::move(empty));
      }
    }
    if (r.final) DoneLocked(key);
  }

  void DoneLocked(uint64_t key) {
    if (!calls_.erase(key)) finished_keys_.insert(key);
    --active_;
    MaybeFinishLocked();
  }

  void EnqueueLocked(inference::ModelStreamInferResponse r) {
    if (broken_ || finishing_) return;
    queue_.push_back(std::move(r));
    WriteNextLocked();
  }

  void WriteNextLocked() {
    if (writing_ || queue_.empty() || broken_ || finishing_) return;
    writing_ = true;
    StartWrite(&queue_.front());
  }

  void MaybeFinishLocked() {
    if (finishing_ || writing_ || !queue_.empty() || active_ > 0) return;
    if (!reading_done_ && !broken_) return;
    finishing_ = true;
    Finish(grpc::Status::OK);
  }

  void CancelAll() {
    std::map<uint64_t, std::shared_ptr<InferCall>> calls;
    {
      std::lock_guard<std::mutex> lock(mu_);
      broken_ = true;
      calls.swap(calls_);
    }
    // Outside mu_: a call's callback takes mu_ while holding its own lock.
    for (auto& [k, c] : calls) c->Cancel();
    std::lock_guard<std::mutex> lock(mu_);
    active_ -= static_cast<int64_t>(calls.size());
    queue_.clear();
    if (!writing_ && !finishing_) {
      finishing_ = true;
      Finish(grpc::Status::CANCELLED);
    }
  }

  TritonModels* models_;
  inference::ModelInferRequest request_;
  std::atomic<uint64_t> next_key_{1};
  std::mutex mu_;
  std::deque<inference::ModelStreamInferResponse> queue_;
  std::map<uint64_t, std::shared_ptr<InferCall>> calls_;
  std::set<uint64_t> finished_keys_;  // finished before Infer returned
  int64_t active_ = 0;
  bool writing_ = false;
  bool reading_done_ = false;
  bool broken_ = false;
  bool finishing_ = false;
};

// ---- ModelInfer: one reactor per call; a client that goes away cancels the generation ------

class UnaryInferReactor : public grpc::ServerUnaryReactor {
 public:
  UnaryInferReactor(TritonModels* models, const inference::ModelInferRequest& req,
                    inference::ModelInferResponse* resp)
      : resp_(resp) {
    auto parsed = FromProto(req);
    if (!parsed.ok()) {
      FinishOnce(ToGrpc(parsed.status()));
      return;
    }
    for (const auto& t : parsed->inputs) {
      if ((t.name == "stream" || t.name == "streaming") && t.size() == 1 &&
          (t.is_float() ? t.floats[0] != 0 : t.ints[0] != 0)) {
        FinishOnce(grpc::Status(
            grpc::StatusCode::INVALID_ARGUMENT,
            "input '" + t.name + "' is true: streaming needs the ModelStreamInfer RPC"));
        return;
      }
    }
    auto call = models->Infer(std::move(parsed).value(), [this](InferResponse r) {
      if (!r.final) return;  // not streamed: only the final response carries data
      if (!r.error.ok()) return FinishOnce(ToGrpc(r.error));
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (finished_) return;
        finished_ = true;
        ToProto(r, resp_);
      }
      // No lock held: OnDone (delete this) may follow Finish at once.
      Finish(grpc::Status::OK);
    });
    if (!call.ok()) {
      FinishOnce(ToGrpc(call.status()));
      return;
    }
    bool cancel_now;
    {
      std::lock_guard<std::mutex> lock(mu_);
      call_ = *call;
      cancel_now = cancelled_;
    }
    if (cancel_now) (*call)->Cancel();
  }

  // The client went away (or its deadline passed): stop the generation, free its KV blocks.
  void OnCancel() override {
    std::shared_ptr<InferCall> c;
    {
      std::lock_guard<std::mutex> lock(mu_);
      cancelled_ = true;
      c = call_;
    }
    // Outside mu_: the call's callback takes mu_ while holding the call's lock.
    if (c) c->Cancel();
    FinishOnce(grpc::Status(grpc::StatusCode::CANCELLED, "the client cancelled the request"));
  }

  void OnDone() override { delete this; }

 private:
  void FinishOnce(grpc::Status s) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (finished_) return;
      finished_ = true;
    }
    Finish(std::move(s));  // the last use of this (OnDone may follow at once)
  }

  inference::ModelInferResponse* resp_;
  std::mutex mu_;
  std::shared_ptr<InferCall> call_;
  bool cancelled_ = false;
  bool finished_ = false;
};

// ---- The service ----------------------------------------------------------------------------

class GrpcServer::Service : public inference::GRPCInferenceService::CallbackService {
 public:
  Service(GrpcServer* server) : server_(server), models_(server->models_) {}

  grpc::ServerUnaryReactor* ServerLive(grpc::CallbackServerContext* ctx,
                                       const inference::ServerLiveRequest*,
                                       inference::ServerLiveResponse* resp) override {
    resp->set_live(true);
    return Done(ctx, grpc::Status::OK);
  }
  grpc::ServerUnaryReactor* ServerReady(grpc::CallbackServerContext* ctx,
                                        const inference::ServerReadyRequest*,
                                        inference::ServerReadyResponse* resp) override {
    resp->set_ready(server_->ready());
    return Done(ctx, grpc::Status::OK);
  }
  grpc::ServerUnaryReactor* ModelReady(grpc::CallbackServerContext* ctx,
                                       const inference::ModelReadyRequest* req,
                                       inference::ModelReadyResponse* resp) override {
    const RepositoryModel* m = models_->Find(req->name());
    if (!m) return Done(ctx, NotFoundStatus(req->name()));
    resp->set_ready(server_->ready());
    return Done(ctx, grpc::Status::OK);
  }
  grpc::ServerUnaryReactor* ServerMetadata(grpc::CallbackServerContext* ctx,
                                           const inference::ServerMetadataRequest*,
                                           inference::ServerMetadataResponse* resp) override {
    resp->set_name(server_->options_.server_name);
    resp->set_version(server_->options_.server_version);
    for (const char* e : {"model_configuration", "statistics", "generate"}) {
      resp->add_extensions(e);
    }
    return Done(ctx, grpc::Status::OK);
  }
  grpc::ServerUnaryReactor* ModelMetadata(grpc::CallbackServerContext* ctx,
                                          const inference::ModelMetadataRequest* req,
                                          inference::ModelMetadataResponse* resp) override {
    const RepositoryModel* m = models_->Find(req->name());
    if (!m) return Done(ctx, NotFoundStatus(req->name()));
    *resp = models_->Metadata(*m);
    return Done(ctx, grpc::Status::OK);
  }
  grpc::ServerUnaryReactor* ModelConfig(grpc::CallbackServerContext* ctx,
                                        const inference::ModelConfigRequest* req,
                                        inference::ModelConfigResponse* resp) override {
    const RepositoryModel* m = models_->Find(req->name());
    if (!m) return Done(ctx, NotFoundStatus(req->name()));
    *resp->mutable_config() = m->config;
    return Done(ctx, grpc::Status::OK);
  }
  grpc::ServerUnaryReactor* ModelStatistics(grpc::CallbackServerContext* ctx,
                                            const inference::ModelStatisticsRequest* req,
                                            inference::ModelStatisticsResponse* resp) override {
    for (const auto& m : models_->repository().models) {
      if (!req->name().empty() && req->name() != m.name) continue;
      ModelStats s = models_->stats(m.name);
      auto* ms = resp->add_model_stats();
      ms->set_name(m.name);
      ms->set_version("1");
      ms->set_last_inference(s.last_inference_ms);
      ms->set_inference_count(s.success);
      ms->set_execution_count(s.success);
      ms->mutable_inference_stats()->mutable_success()->set_count(s.success);
      ms->mutable_inference_stats()->mutable_success()->set_ns(s.success_ns);
      ms->mutable_inference_stats()->mutable_fail()->set_count(s.fail);
      ms->mutable_inference_stats()->mutable_fail()->set_ns(s.fail_ns);
    }
    if (!req->name().empty() && resp->model_stats_size() == 0) {
      return Done(ctx, NotFoundStatus(req->name()));
    }
    return Done(ctx, grpc::Status::OK);
  }
  grpc::ServerUnaryReactor* RepositoryIndex(grpc::CallbackServerContext* ctx,
                                            const inference::RepositoryIndexRequest*,
                                            inference::RepositoryIndexResponse* resp) override {
    for (const auto& m : models_->repository().models) {
      auto* e = resp->add_models();
      e->set_name(m.name);
      e->set_version("1");
      e->set_state("READY");
    }
    return Done(ctx, grpc::Status::OK);
  }

  grpc::ServerUnaryReactor* ModelInfer(grpc::CallbackServerContext* ctx,
                                       const inference::ModelInferRequest* req,
                                       inference::ModelInferResponse* resp) override {
    return new UnaryInferReactor(models_, *req, resp);
  }

  grpc::ServerBidiReactor<inference::ModelInferRequest, inference::ModelStreamInferResponse>*
  ModelStreamInfer(grpc::CallbackServerContext*) override {
    return new StreamReactor(models_);
  }

 private:
  static grpc::ServerUnaryReactor* Done(grpc::CallbackServerContext* ctx, grpc::Status s) {
    auto* r = ctx->DefaultReactor();
    r->Finish(std::move(s));
    return r;
  }
  grpc::Status NotFoundStatus(const std::string& name) const {
    std::vector<std::string> names;
    for (const auto& m : models_->repository().models) names.push_back(m.name);
    return grpc::Status(grpc::StatusCode::NOT_FOUND, fmt::format("unknown model '{}' (models: {})",
                                                                 name, fmt::join(names, ", ")));
  }

  GrpcServer* server_;
  TritonModels* models_;
};

GrpcServer::GrpcServer(TritonModels* models, GrpcServerOptions options)
    : models_(models), options_(std::move(options)) {}

GrpcServer::~GrpcServer() { Stop(); }

Status GrpcServer::Start() {
  service_ = std::make_unique<Service>(this);
  grpc::ServerBuilder builder;
  int selected = 0;
  const std::string addr = options_.host + ":" + std::to_string(options_.port);
  builder.AddListeningPort(addr, grpc::InsecureServerCredentials(), &selected);
  builder.SetMaxReceiveMessageSize(static_cast<int>(options_.max_message_bytes));
  builder.SetMaxSendMessageSize(static_cast<int>(options_.max_message_bytes));
  // SO_REUSEPORT would let a second server share the port silently; a port in use must fail.
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  builder.RegisterService(service_.get());
  server_ = builder.BuildAndStart();
  if (!server_ || selected == 0) {
    server_.reset();
    return Unavailable(
        "gRPC port {} on {} is in use or cannot be bound; choose another with "
        "--grpc-port",
        options_.port, options_.host);
  }
  port_ = static_cast<uint16_t>(selected);
  spdlog::info("gRPC (KServe v2) listening on {}:{}", options_.host, port_);
  return Status::Ok();
}

void GrpcServer::Stop() {
  if (server_) {
    ready_ = false;
    server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
    server_->Wait();
    server_.reset();
  }
}

}  // namespace qilin::server
