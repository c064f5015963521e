// The KServe v2 gRPC service (inference.GRPCInferenceService, Triton's protocol) over the
// Triton models. gRPC's callback API: no thread per call or stream; a ModelStreamInfer stream
// carries any number of requests in flight, each answered by id, decoupled responses marked
// with `triton_final_response` as Triton marks them.
//
//   GrpcServer server(&models, {.port = 8001});
//   QILIN_RETURN_IF_ERROR(server.Start());  // a port in use: Unavailable naming --grpc-port
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "common/status.h"
#include "server/triton_models.h"

namespace grpc {
class Server;
class Status;
}  // namespace grpc

namespace qilin::server {

struct GrpcServerOptions {
  std::string host = "0.0.0.0";
  uint16_t port = 8001;  // 0: any free port (see GrpcServer::port())
  std::string server_name = "qilin";
  std::string server_version = "0.1.0";
  int64_t max_message_bytes = 64 << 20;
};

// gRPC status code for a Status code.
int GrpcCodeFor(StatusCode code);

class GrpcServer {
 public:
  GrpcServer(TritonModels* models, GrpcServerOptions options);
  ~GrpcServer();  // Stop()
  GrpcServer(const GrpcServer&) = delete;
  GrpcServer& operator=(const GrpcServer&) = delete;

  Status Start();
  void Stop();
  uint16_t port() const { return port_; }
  // Readiness (ServerReady / ModelReady): false while draining.
  void SetReady(bool ready) { ready_ = ready; }
  bool ready() const { return ready_; }

  class Service;

 private:
  TritonModels* models_;
  GrpcServerOptions options_;
  std::unique_ptr<Service> service_;
  std::unique_ptr<grpc::Server> server_;
  uint16_t port_ = 0;
  std::atomic<bool> ready_{true};
};

}  // namespace qilin::server
