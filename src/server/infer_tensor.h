// KServe v2 tensors: one in-memory form shared by gRPC (typed contents or raw bytes) and HTTP
// (JSON), with the conversions between them, and the decoupled-response flags Triton puts on
// streamed responses.
//
// Datatypes are KServe's names: BOOL, UINT8, UINT16, UINT32, UINT64, INT8, INT16, INT32, INT64,
// FP16, BF16, FP32, FP64, BYTES. Raw contents are little-endian, row-major; a BYTES element is
// a 4-byte little-endian length and then its bytes (Triton's layout).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/status.h"
#include "grpc_service.pb.h"

namespace qilin::server {

// Limits on what a request may carry (a tensor over them is refused, naming the limit).
inline constexpr int64_t kMaxTensorElements = int64_t{1} << 26;
inline constexpr int kMaxTensorRank = 8;

// The KServe name of a model config datatype (TYPE_STRING is "BYTES"); "INVALID" for others.
std::string DatatypeName(inference::DataType t);

struct Tensor {
  std::string name;
  std::string datatype;
  std::vector<int64_t> shape;
  // The elements, by datatype family (only one is used):
  std::vector<int64_t> ints;       // BOOL (0/1), INT*, UINT* (UINT64 as its bit pattern)
  std::vector<double> floats;      // FP16, BF16, FP32, FP64
  std::vector<std::string> bytes;  // BYTES

  int64_t size() const;  // elements held
  bool is_bytes() const { return datatype == "BYTES"; }
  bool is_float() const;

  static Tensor Bytes(std::string name, std::vector<std::string> values,
                      std::vector<int64_t> shape);
  static Tensor Int32(std::string name, std::vector<int64_t> values, std::vector<int64_t> shape);
  static Tensor Fp32(std::string name, std::vector<double> values, std::vector<int64_t> shape);
};

// Size in bytes of one element; 0 for BYTES; -1 for an unknown datatype.
int DatatypeSize(const std::string& datatype);
// Number of elements of `shape`, refusing negative dims, rank > kMaxTensorRank and products
// over kMaxTensorElements. `what` names the tensor in errors.
Result<int64_t> ShapeElements(const std::vector<int64_t>& shape, const std::string& what);

// The inputs of a gRPC request (contents or raw_input_contents), each checked against its
// shape and datatype.
Result<std::vector<Tensor>> InputsFromProto(const inference::ModelInferRequest& request);
// Appends `t` to `response` as an output with raw contents (as Triton does).
void AddOutputToProto(const Tensor& t, inference::ModelInferResponse* response);
// The outputs of a response (raw or typed contents), e.g. in a client.
Result<std::vector<Tensor>> OutputsFromProto(const inference::ModelInferResponse& response);

// KServe JSON: {"name","datatype","shape","data"} with data flat or nested row-major.
Result<Tensor> TensorFromJson(const nlohmann::json& j);
nlohmann::json TensorToJson(const Tensor& t);

// Decoupled responses, as Triton marks them.
inline constexpr char kFinalResponseParam[] = "triton_final_response";
inline constexpr char kEnableEmptyFinalParam[] = "triton_enable_empty_final_response";
void SetFinalFlag(inference::ModelInferResponse* response, bool final);
// True when the request has the bool parameter triton_enable_empty_final_response = true.
bool WantsEmptyFinalResponse(const inference::ModelInferRequest& request);

}  // namespace qilin::server
