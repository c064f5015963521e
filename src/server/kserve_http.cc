#include "server/kserve_http.h"

#include <google/protobuf/util/json_util.h>

#include <memory>
#include <mutex>

#include <fmt/format.h>

#include "pipeline/pipeline.h"

namespace qilin::server {
namespace {

using nlohmann::json;

void SendJson(const ResponderPtr& res, int status, const json& body) {
  res->Respond(status, "application/json",
               body.dump(-1, ' ', false, json::error_handler_t::replace));
}
void SendError(const ResponderPtr& res, const Status& s) {
  SendJson(res, pipeline::HttpStatusFor(s), json{{"error", s.message()}});
}

// Holds a call so that a client going away cancels it, whichever comes first.
struct CallHolder {
  std::mutex mu;
  std::shared_ptr<InferCall> call;
  bool closed = false;
  void Set(std::shared_ptr<InferCall> c) {
    bool cancel;
    {
      std::lock_guard<std::mutex> lock(mu);
      call = c;
      cancel = closed;
    }
    if (cancel) c->Cancel();
  }
  void Close() {
    std::shared_ptr<InferCall> c;
    {
      std::lock_guard<std::mutex> lock(mu);
      closed = true;
      c = call;
    }
    if (c) c->Cancel();
  }
};

// Protobuf's JSON writes int64 fields as strings ("-1"); Triton's HTTP API writes shapes and
// dims as numbers, and clients index them as numbers.
void NumbersForInt64(nlohmann::ordered_json& j, bool in_int_array = false) {
  using json = nlohmann::ordered_json;
  if (j.is_object()) {
    for (auto& [k, v] : j.items()) {
      NumbersForInt64(v, k == "shape" || k == "dims" || k == "preferred_batch_size");
      if (v.is_string() && k.ends_with("_microseconds")) {
        json n = json::parse(v.get<std::string>(), nullptr, false);
        if (n.is_number_integer()) v = n;
      }
    }
  } else if (j.is_array()) {
    for (auto& v : j) {
      if (in_int_array && v.is_string()) {
        json n = json::parse(v.get<std::string>(), nullptr, false);
        if (n.is_number_integer()) v = n;
      } else {
        NumbersForInt64(v);
      }
    }
  }
}

std::string ProtoToJson(const google::protobuf::Message& m) {
  std::string s;
  google::protobuf::util::JsonPrintOptions o;
  o.preserve_proto_field_names = true;
  (void)google::protobuf::util::MessageToJsonString(m, &s, o);
  // Ordered: the fields keep the proto's order (name, versions, platform, inputs, ...).
  nlohmann::ordered_json j = nlohmann::ordered_json::parse(s, nullptr, false);
  if (j.is_discarded()) return s;
  NumbersForInt64(j);
  return j.dump();
}

Result<json> ParseBody(const HttpRequest& req) {
  json body = json::parse(req.body, nullptr, false);
  if (body.is_discarded()) return InvalidArgument("the request body is not valid JSON");
  if (!body.is_object()) return InvalidArgument("the request body must be a JSON object");
  return body;
}

void Infer(TritonModels* models, const RepositoryModel& m, HttpRequest& req, ResponderPtr res) {
  auto body = ParseBody(req);
  if (!body.ok()) return SendError(res, body.status());
  InferRequest r;
  r.model_name = m.name;
  if (body->contains("id")) {
    if (!(*body)["id"].is_string())
      return SendError(res, InvalidArgument("\"id\" must be a string"));
    r.id = (*body)["id"].get<std::string>();
  }
  if (!body->contains("inputs") || !(*body)["inputs"].is_array()) {
    return SendError(res, InvalidArgument("the request has no \"inputs\" array"));
  }
  for (const auto& in : (*body)["inputs"]) {
    auto t = TensorFromJson(in);
    if (!t.ok()) return SendError(res, t.status());
    if ((t->name == "stream" || t->name == "streaming") && t->size() == 1 &&
        (t->is_float() ? t->floats[0] != 0 : t->ints[0] != 0)) {
      return SendError(res, InvalidArgument("input '{}' is true: streaming needs "
                                            "/generate_stream or gRPC ModelStreamInfer",
                                            t->name));
    }
    r.inputs.push_back(std::move(t).value());
  }
  if (body->contains("outputs") && (*body)["outputs"].is_array()) {
    for (const auto& o : (*body)["outputs"]) {
      if (o.is_object() && o.contains("name") && o["name"].is_string()) {
        r.requested_outputs.push_back(o["name"].get<std::string>());
      }
    }
  }
  auto holder = std::make_shared<CallHolder>();
  res->OnClose([holder] { holder->Close(); });
  auto call = models->Infer(std::move(r), [res](InferResponse resp) {
    if (!resp.final) return;
    if (!resp.error.ok()) return SendError(res, resp.error);
    json out = {{"model_name", resp.model_name}, {"model_version", "1"}};
    if (!resp.id.empty()) out["id"] = resp.id;
    out["outputs"] = json::array();
    for (const auto& t : resp.outputs) out["outputs"].push_back(TensorToJson(t));
    SendJson(res, 200, out);
  });
  if (!call.ok()) return SendError(res, call.status());
  holder->Set(std::move(call).value());
}

void Generate(TritonModels* models, const RepositoryModel& m, HttpRequest& req, ResponderPtr res,
              bool stream) {
  auto body = ParseBody(req);
  if (!body.ok()) return SendError(res, body.status());
  auto r = GenerateRequestFromJson(m, *body);
  if (!r.ok()) return SendError(res, r.status());
  // The stream input follows the endpoint.
  const char* stream_name = m.kind == TritonModelKind::kTensorrtLlm ? "streaming" : "stream";
  std::erase_if(r->inputs, [&](const Tensor& t) { return t.name == stream_name; });
  if (stream) {
    Tensor t;
    t.name = stream_name;
    t.datatype = "BOOL";
    t.shape = {1, 1};
    t.ints = {1};
    r->inputs.push_back(std::move(t));
  }
  auto holder = std::make_shared<CallHolder>();
  res->OnClose([holder] { holder->Close(); });
  auto started = std::make_shared<bool>(false);
  auto call = models->Infer(std::move(r).value(), [res, stream, started](InferResponse resp) {
    if (!stream) {
      if (!resp.final) return;
      if (!resp.error.ok()) return SendError(res, resp.error);
      return SendJson(res, 200, GenerateResponseToJson(resp));
    }
    if (!*started) {
      *started = true;
      res->StartStream(200, "text/event-stream", {{"Cache-Control", "no-cache"}});
    }
    json j = resp.error.ok() ? GenerateResponseToJson(resp) : json{{"error", resp.error.message()}};
    res->Write("data: " + j.dump(-1, ' ', false, json::error_handler_t::replace) + "\n\n");
    if (resp.final) res->End();
  });
  if (!call.ok()) return SendError(res, call.status());
  holder->Set(std::move(call).value());
}

}  // namespace

Result<InferRequest> GenerateRequestFromJson(const RepositoryModel& model, const json& body) {
  InferRequest r;
  r.model_name = model.name;
  json fields = json::object();
  for (const auto& [k, v] : body.items()) {
    if (k == "id") {
      if (!v.is_string()) return InvalidArgument("\"id\" must be a string");
      r.id = v.get<std::string>();
    } else if (k == "parameters") {
      if (!v.is_object()) return InvalidArgument("\"parameters\" must be an object");
      for (const auto& [pk, pv] : v.items()) fields[pk] = pv;
    } else {
      fields[k] = v;
    }
  }
  const bool batched = model.config.max_batch_size() > 0;
  for (const auto& [k, v] : fields.items()) {
    const inference::ModelInput* decl = nullptr;
    for (const auto& in : model.config.input()) {
      if (in.name() == k) decl = &in;
    }
    if (!decl) {
      std::vector<std::string> names;
      for (const auto& in : model.config.input()) names.push_back(in.name());
      return InvalidArgument("model '{}' has no input '{}' (inputs: {})", model.name, k,
                             fmt::join(names, ", "));
    }
    json data = v.is_array() ? v : json::array({v});
    const int64_t n = static_cast<int64_t>(data.size());
    json tj = {{"name", k},
               {"datatype", DatatypeName(decl->data_type())},
               {"shape", batched ? std::vector<int64_t>{1, n} : std::vector<int64_t>{n}},
               {"data", data}};
    // JSON numbers for float inputs may be written as integers, and the reverse for ints given
    // as 1.0 is an error naming the input.
    QILIN_ASSIGN_OR_RETURN(Tensor t, TensorFromJson(tj));
    r.inputs.push_back(std::move(t));
  }
  return r;
}

json GenerateResponseToJson(const InferResponse& r) {
  json out = {{"model_name", r.model_name}, {"model_version", "1"}};
  if (!r.id.empty()) out["id"] = r.id;
  for (const auto& t : r.outputs) {
    json j = TensorToJson(t);
    out[t.name] = j["data"].size() == 1 ? j["data"][0] : j["data"];
  }
  return out;
}

void RegisterKserveRoutes(TritonModels* models, Router* router) {
  router->Add("GET", "/v2", [](HttpRequest&, ResponderPtr res) {
    SendJson(res, 200,
             json{{"name", "qilin"},
                  {"version", "0.1.0"},
                  {"extensions", {"model_configuration", "statistics", "generate"}}});
  });
  auto get = [models](HttpRequest& req, ResponderPtr res) {
    // /v2/models/{m}[/versions/{v}][/ready|/config]
    std::string rest = req.path.substr(std::string("/v2/models/").size());
    std::string name = rest.substr(0, rest.find('/'));
    std::string tail = rest.size() > name.size() ? rest.substr(name.size()) : "";
    if (tail.rfind("/versions/1", 0) == 0) tail = tail.substr(11);
    const RepositoryModel* m = models->Find(name);
    if (!m) return SendError(res, NotFound("unknown model '{}'", name));
    if (tail.empty() || tail == "/") {
      return res->Respond(200, "application/json", ProtoToJson(models->Metadata(*m)));
    }
    if (tail == "/ready") return res->Respond(200, "text/plain", "");
    if (tail == "/config") return res->Respond(200, "application/json", ProtoToJson(m->config));
    SendError(res, NotFound("no route GET {}", req.path));
  };
  auto post = [models](HttpRequest& req, ResponderPtr res) {
    std::string rest = req.path.substr(std::string("/v2/models/").size());
    std::string name = rest.substr(0, rest.find('/'));
    std::string tail = rest.size() > name.size() ? rest.substr(name.size()) : "";
    if (tail.rfind("/versions/1", 0) == 0) tail = tail.substr(11);
    const RepositoryModel* m = models->Find(name);
    if (!m) return SendError(res, NotFound("unknown model '{}'", name));
    if (tail == "/infer") return Infer(models, *m, req, res);
    if (tail == "/generate") return Generate(models, *m, req, res, false);
    if (tail == "/generate_stream") return Generate(models, *m, req, res, true);
    SendError(res, NotFound("no route POST {}", req.path));
  };
  router->AddPrefix("GET", "/v2/models/", get);
  router->AddPrefix("POST", "/v2/models/", post);
}

}  // namespace qilin::server
