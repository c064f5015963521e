#include "bench/targets.h"

#include <grpcpp/grpcpp.h>

#include <fmt/format.h>
#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <nlohmann/json.hpp>

#include "grpc_service.grpc.pb.h"

namespace qilin::bench {

// ---- offline ---------------------------------------------------------------------------------

RequestRunner OfflineRunner(Engine* engine) {
  return [engine](const BenchRequest& br) {
    RequestRecord rec;
    rec.input_tokens = static_cast<int64_t>(br.prompt.size());
    Request req;
    req.prompt = br.prompt;
    req.sampling.temperature = 0;
    req.sampling.max_tokens = static_cast<int32_t>(br.output_len);
    req.sampling.ignore_eos = true;
    rec.start = Now();
    auto stream = engine->Submit(std::move(req));
    if (!stream.ok()) {
      rec.error = stream.status().ToString();
      rec.end = Now();
      return rec;
    }
    while (auto r = (*stream)->Pop()) {
      const double t = Now();
      if (!r->token_ids.empty()) {
        rec.chunk_times.push_back(t);
        rec.output_tokens += static_cast<int64_t>(r->token_ids.size());
      }
      if (!r->error.ok()) rec.error = r->error.ToString();
      if (r->finished()) {
        if (r->finish_reason == FinishReason::kAbort && rec.error.empty()) rec.error = "aborted";
        break;
      }
    }
    rec.end = Now();
    rec.ok = rec.error.empty();
    return rec;
  };
}

// ---- HTTP: OpenAI streaming completions --------------------------------------------------------

Result<HttpTarget> ParseHttpUrl(const std::string& url) {
  std::string rest = url;
  if (rest.rfind("http://", 0) == 0) {
    rest = rest.substr(7);
  } else if (rest.find("://") != std::string::npos) {
    return InvalidArgument("--url '{}': only http:// is supported", url);
  }
  HttpTarget t;
  const size_t slash = rest.find('/');
  const std::string hostport = rest.substr(0, slash);
  t.base_path = slash == std::string::npos ? "" : rest.substr(slash);
  while (!t.base_path.empty() && t.base_path.back() == '/') t.base_path.pop_back();
  if (t.base_path.size() >= 3 && t.base_path.substr(t.base_path.size() - 3) == "/v1") {
    t.base_path.resize(t.base_path.size() - 3);
  }
  const size_t colon = hostport.rfind(':');
  t.host = hostport.substr(0, colon);
  t.port = colon == std::string::npos ? "80" : hostport.substr(colon + 1);
  if (t.host.empty()) return InvalidArgument("--url '{}' has no host", url);
  if (t.port.empty() || t.port.find_first_not_of("0123456789") != std::string::npos) {
    return InvalidArgument("--url '{}': port '{}' is not a number", url, t.port);
  }
  return t;
}

RequestRunner HttpRunner(HttpTarget target) {
  namespace net = boost::asio;
  namespace beast = boost::beast;
  namespace http = beast::http;
  using tcp = net::ip::tcp;
  return [target](const BenchRequest& br) {
    RequestRecord rec;
    rec.input_tokens = static_cast<int64_t>(br.prompt.size());
    nlohmann::json body = {{"prompt", br.prompt}, {"max_tokens", br.output_len},
                           {"ignore_eos", true},  {"temperature", 0},
                           {"stream", true},      {"stream_options", {{"include_usage", true}}}};
    if (!target.model.empty()) body["model"] = target.model;
    auto fail = [&](std::string e) {
      rec.error = std::move(e);
      rec.end = Now();
      return rec;
    };
    rec.start = Now();
    net::io_context ioc;
    tcp::resolver resolver(ioc);
    beast::tcp_stream stream(ioc);
    beast::error_code ec;
    auto endpoints = resolver.resolve(target.host, target.port, ec);
    if (ec) return fail(fmt::format("resolve {}: {}", target.host, ec.message()));
    stream.connect(endpoints, ec);
    if (ec) return fail(fmt::format("connect {}:{}: {}", target.host, target.port, ec.message()));
    http::request<http::string_body> req{http::verb::post, target.base_path + "/v1/completions",
                                         11};
    req.set(http::field::host, target.host);
    req.set(http::field::content_type, "application/json");
    if (!target.api_key.empty()) req.set(http::field::authorization, "Bearer " + target.api_key);
    req.body() = body.dump();
    req.prepare_payload();
    http::write(stream, req, ec);
    if (ec) return fail(fmt::format("send: {}", ec.message()));
    beast::flat_buffer buffer;
    http::response_parser<http::string_body> parser;
    parser.body_limit(boost::none);
    http::read_header(stream, buffer, parser, ec);
    if (ec) return fail(fmt::format("read: {}", ec.message()));
    if (parser.get().result_int() != 200) {
      http::read(stream, buffer, parser, ec);
      return fail(fmt::format("HTTP {}: {}", parser.get().result_int(), parser.get().body()));
    }
    std::string pending;
    bool done = false;
    int64_t usage_tokens = -1, chunk_tokens = 0;
    while (!parser.is_done() && !done) {
      http::read_some(stream, buffer, parser, ec);
      if (ec) break;
      const double t = Now();
      pending += parser.get().body();
      parser.get().body().clear();
      size_t pos;
      while ((pos = pending.find("\n\n")) != std::string::npos) {
        const std::string event = pending.substr(0, pos);
        pending.erase(0, pos + 2);
        if (event.rfind("data: ", 0) != 0) continue;
        const std::string payload = event.substr(6);
        if (payload == "[DONE]") {
          done = true;
          break;
        }
        auto j = nlohmann::json::parse(payload, nullptr, false);
        if (j.is_discarded()) continue;
        if (j.contains("error")) rec.error = j["error"].value("message", "error");
        if (j.contains("usage") && j["usage"].is_object()) {
          usage_tokens = j["usage"].value("completion_tokens", int64_t{-1});
        }
        bool text = false;
        if (j.contains("choices")) {
          for (const auto& c : j["choices"]) {
            if (c.contains("text") && c["text"].is_string() &&
                !c["text"].get<std::string>().empty())
              text = true;
          }
        }
        if (text) {
          rec.chunk_times.push_back(t);
          ++chunk_tokens;
        }
      }
    }
    rec.end = Now();
    stream.socket().shutdown(tcp::socket::shutdown_both, ec);
    if (rec.error.empty() && !done) rec.error = "the stream ended without [DONE]";
    rec.output_tokens = usage_tokens >= 0 ? usage_tokens : chunk_tokens;
    rec.ok = rec.error.empty();
    return rec;
  };
}

// ---- gRPC: KServe v2 ModelStreamInfer on tensorrt_llm ----------------------------------------

namespace {

void AddInt32(inference::ModelInferRequest* req, const std::string& name,
              const std::vector<int32_t>& values, std::vector<int64_t> shape) {
  auto* in = req->add_inputs();
  in->set_name(name);
  in->set_datatype("INT32");
  for (int64_t d : shape) in->add_shape(d);
  for (int32_t v : values) in->mutable_contents()->add_int_contents(v);
}

// Elements of an INT32 output (raw or typed contents).
int64_t Int32Count(const inference::ModelInferResponse& r, const std::string& name) {
  for (int i = 0; i < r.outputs_size(); ++i) {
    if (r.outputs(i).name() != name) continue;
    if (i < r.raw_output_contents_size()) {
      return static_cast<int64_t>(r.raw_output_contents(i).size() / 4);
    }
    return r.outputs(i).contents().int_contents_size();
  }
  return 0;
}

}  // namespace

RequestRunner GrpcRunner(GrpcTarget target) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(64 << 20);
  // Many streams at once over one connection (HTTP/2 multiplexing).
  auto channel =
      grpc::CreateCustomChannel(target.address, grpc::InsecureChannelCredentials(), args);
  std::shared_ptr<inference::GRPCInferenceService::Stub> stub =
      inference::GRPCInferenceService::NewStub(channel);
  return [stub, target](const BenchRequest& br) {
    RequestRecord rec;
    rec.input_tokens = static_cast<int64_t>(br.prompt.size());
    const int32_t n = static_cast<int32_t>(br.output_len);
    inference::ModelInferRequest req;
    req.set_model_name(target.model);
    req.set_id("bench");
    AddInt32(&req, "input_ids", br.prompt, {1, static_cast<int64_t>(br.prompt.size())});
    AddInt32(&req, "input_lengths", {static_cast<int32_t>(br.prompt.size())}, {1, 1});
    AddInt32(&req, "request_output_len", {n}, {1, 1});
    AddInt32(&req, "min_length", {n}, {1, 1});  // end tokens masked: exactly n tokens
    auto* s = req.add_inputs();
    s->set_name("streaming");
    s->set_datatype("BOOL");
    s->add_shape(1);
    s->add_shape(1);
    s->mutable_contents()->add_bool_contents(true);

    grpc::ClientContext ctx;
    rec.start = Now();
    auto stream = stub->ModelStreamInfer(&ctx);
    bool final = false;
    if (stream->Write(req)) {
      inference::ModelStreamInferResponse resp;
      while (!final && stream->Read(&resp)) {
        const double t = Now();
        if (!resp.error_message().empty()) {
          rec.error = resp.error_message();
          break;
        }
        const auto& r = resp.infer_response();
        const int64_t k = Int32Count(r, "output_ids");
        if (k > 0) {
          rec.chunk_times.push_back(t);
          rec.output_tokens += k;
        }
        auto it = r.parameters().find("triton_final_response");
        final = it != r.parameters().end() && it->second.bool_param();
      }
    }
    rec.end = Now();
    stream->WritesDone();
    if (!final) ctx.TryCancel();
    grpc::Status st = stream->Finish();
    if (rec.error.empty() && !final) {
      rec.error = st.ok() ? "the stream ended without a final response"
                          : fmt::format("gRPC {}: {}", static_cast<int>(st.error_code()),
                                        st.error_message());
    }
    rec.ok = rec.error.empty();
    return rec;
  };
}

}  // namespace qilin::bench
