// KServe v2 over HTTP for the Triton models: GET /v2 (server metadata), GET /v2/models/{m},
// /v2/models/{m}/ready, /v2/models/{m}/config, POST /v2/models/{m}/infer (JSON tensors), and
// Triton's generate extension: POST /v2/models/{m}/generate and /generate_stream (SSE).
// (/v2/health/live and /v2/health/ready are the OpenAI service's.)
#pragma once

#include "server/http_server.h"
#include "server/triton_models.h"

namespace qilin::server {

void RegisterKserveRoutes(TritonModels* models, Router* router);

// The generate extension's request body -> an InferRequest for `model`: every top-level key
// except "id" and "parameters" is an input of that name (its datatype from the model config,
// shape [1, n] for batched models), "parameters" entries too when the model has such an input.
Result<InferRequest> GenerateRequestFromJson(const RepositoryModel& model,
                                             const nlohmann::json& body);
// A response as the generate extension writes it: {"model_name","model_version","id",
// <output>: value (a one-element tensor as a scalar)}.
nlohmann::json GenerateResponseToJson(const InferResponse& r);

}  // namespace qilin::server
