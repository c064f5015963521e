#include "server/infer_tensor.h"

#include <cstring>
#include <limits>

#include "common/dtype.h"

namespace qilin::server {
namespace {

enum class Family { kBool, kSigned, kUnsigned, kFloat, kBytes, kUnknown };

Family FamilyOf(const std::string& dt) {
  if (dt == "BOOL") return Family::kBool;
  if (dt == "INT8" || dt == "INT16" || dt == "INT32" || dt == "INT64") return Family::kSigned;
  if (dt == "UINT8" || dt == "UINT16" || dt == "UINT32" || dt == "UINT64") {
    return Family::kUnsigned;
  }
  if (dt == "FP16" || dt == "BF16" || dt == "FP32" || dt == "FP64") return Family::kFloat;
  if (dt == "BYTES") return Family::kBytes;
  return Family::kUnknown;
}

// Range of an integer datatype, for checking typed/JSON contents.
void IntRange(const std::string& dt, int64_t* lo, uint64_t* hi) {
  int bits = DatatypeSize(dt) * 8;
  if (FamilyOf(dt) == Family::kSigned) {
    *lo = bits == 64 ? std::numeric_limits<int64_t>::min() : -(int64_t{1} << (bits - 1));
    *hi = bits == 64 ? uint64_t(std::numeric_limits<int64_t>::max())
                     : (uint64_t{1} << (bits - 1)) - 1;
  } else {
    *lo = 0;
    *hi = bits == 64 ? std::numeric_limits<uint64_t>::max() : (uint64_t{1} << bits) - 1;
  }
}

Status DecodeRaw(const std::string& raw, Tensor* t, int64_t n) {
  const std::string& dt = t->datatype;
  if (dt == "BYTES") {
    size_t pos = 0;
    while (pos < raw.size()) {
      if (raw.size() - pos < 4) {
        return InvalidArgument(
            "input '{}': raw BYTES contents end inside a 4-byte length at "
            "offset {}",
            t->name, pos);
      }
      uint32_t len;
      std::memcpy(&len, raw.data() + pos, 4);
      pos += 4;
      if (len > raw.size() - pos) {
        return InvalidArgument("input '{}': raw BYTES element {} claims {} bytes, {} are left",
                               t->name, t->bytes.size(), len, raw.size() - pos);
      }
      t->bytes.emplace_back(raw.data() + pos, len);
      pos += len;
    }
    if (static_cast<int64_t>(t->bytes.size()) != n) {
      return InvalidArgument("input '{}': raw contents hold {} BYTES elements, shape needs {}",
                             t->name, t->bytes.size(), n);
    }
    return Status::Ok();
  }
  const int size = DatatypeSize(dt);
  if (static_cast<int64_t>(raw.size()) != n * size) {
    return InvalidArgument("input '{}': raw contents are {} bytes, {} elements of {} need {}",
                           t->name, raw.size(), n, dt, n * size);
  }
  const char* p = raw.data();
  for (int64_t i = 0; i < n; ++i, p += size) {
    if (dt == "BOOL" || dt == "UINT8") {
      t->ints.push_back(static_cast<uint8_t>(*p));
    } else if (dt == "INT8") {
      t->ints.push_back(static_cast<int8_t>(*p));
    } else if (dt == "INT16" || dt == "UINT16") {
      uint16_t v;
      std::memcpy(&v, p, 2);
      t->ints.push_back(dt == "INT16" ? int64_t(int16_t(v)) : int64_t(v));
    } else if (dt == "INT32" || dt == "UINT32") {
      uint32_t v;
      std::memcpy(&v, p, 4);
      t->ints.push_back(dt == "INT32" ? int64_t(int32_t(v)) : int64_t(v));
    } else if (dt == "INT64" || dt == "UINT64") {
      int64_t v;
      std::memcpy(&v, p, 8);
      t->ints.push_back(v);
    } else if (dt == "FP16" || dt == "BF16") {
      uint16_t v;
      std::memcpy(&v, p, 2);
      t->floats.push_back(dt == "FP16" ? F16ToF32(v) : Bf16ToF32(v));
    } else if (dt == "FP32") {
      float v;
      std::memcpy(&v, p, 4);
      t->floats.push_back(v);
    } else {
      double v;
      std::memcpy(&v, p, 8);
      t->floats.push_back(v);
    }
  }
  return Status::Ok();
}

std::string EncodeRaw(const Tensor& t) {
  std::string out;
  const std::string& dt = t.datatype;
  if (dt == "BYTES") {
    for (const auto& s : t.bytes) {
      uint32_t len = static_cast<uint32_t>(s.size());
      out.append(reinterpret_cast<const char*>(&len), 4);
      out.append(s);
    }
    return out;
  }
  const int size = DatatypeSize(dt);
  out.resize(t.size() * size);
  char* p = out.data();
  if (FamilyOf(dt) == Family::kFloat) {
    for (double v : t.floats) {
      if (dt == "FP32") {
        float f = static_cast<float>(v);
        std::memcpy(p, &f, 4);
      } else if (dt == "FP64") {
        std::memcpy(p, &v, 8);
      } else {
        uint16_t h = dt == "FP16" ? F32ToF16(float(v)) : F32ToBf16(float(v));
        std::memcpy(p, &h, 2);
      }
      p += size;
    }
  } else {
    for (int64_t v : t.ints) {
      std::memcpy(p, &v, size);  // little-endian: the low bytes
      p += size;
    }
  }
  return out;
}

Status DecodeContents(const inference::InferTensorContents& c, Tensor* t, int64_t n) {
  const std::string& dt = t->datatype;
  int64_t got = 0;
  switch (FamilyOf(dt)) {
    case Family::kBool:
      for (bool b : c.bool_contents()) t->ints.push_back(b);
      got = c.bool_contents_size();
      break;
    case Family::kSigned:
      if (dt == "INT64") {
        t->ints.assign(c.int64_contents().begin(), c.int64_contents().end());
        got = c.int64_contents_size();
      } else {
        t->ints.assign(c.int_contents().begin(), c.int_contents().end());
        got = c.int_contents_size();
      }
      break;
    case Family::kUnsigned:
      if (dt == "UINT64") {
        for (uint64_t v : c.uint64_contents()) t->ints.push_back(static_cast<int64_t>(v));
        got = c.uint64_contents_size();
      } else {
        t->ints.assign(c.uint_contents().begin(), c.uint_contents().end());
        got = c.uint_contents_size();
      }
      break;
    case Family::kFloat:
      if (dt == "FP32") {
        t->floats.assign(c.fp32_contents().begin(), c.fp32_contents().end());
        got = c.fp32_contents_size();
      } else if (dt == "FP64") {
        t->floats.assign(c.fp64_contents().begin(), c.fp64_contents().end());
        got = c.fp64_contents_size();
      } else {
        return InvalidArgument(
            "input '{}': {} has no typed contents field; send it in "
            "raw_input_contents",
            t->name, dt);
      }
      break;
    case Family::kBytes:
      t->bytes.assign(c.bytes_contents().begin(), c.bytes_contents().end());
      got = c.bytes_contents_size();
      break;
    case Family::kUnknown:
      break;
  }
  if (got != n) {
    return InvalidArgument("input '{}': contents hold {} {} elements, shape needs {}", t->name, got,
                           dt, n);
  }
  if (FamilyOf(dt) == Family::kSigned || FamilyOf(dt) == Family::kUnsigned) {
    int64_t lo;
    uint64_t hi;
    IntRange(dt, &lo, &hi);
    for (int64_t v : t->ints) {
      if (dt != "UINT64" && (v < lo || (v >= 0 && uint64_t(v) > hi))) {
        return OutOfRange("input '{}': value {} is outside {}'s range", t->name, v, dt);
      }
    }
  }
  return Status::Ok();
}

Status JsonElements(const nlohmann::json& j, Tensor* t) {
  if (j.is_array()) {
    for (const auto& e : j) {
      QILIN_RETURN_IF_ERROR(JsonElements(e, t));
      if (t->size() > kMaxTensorElements) {
        return OutOfRange("input '{}': more than {} elements", t->name, kMaxTensorElements);
      }
    }
    return Status::Ok();
  }
  switch (FamilyOf(t->datatype)) {
    case Family::kBool:
      if (!j.is_boolean())
        return InvalidArgument("input '{}': {} is not a BOOL", t->name, j.dump());
      t->ints.push_back(j.get<bool>());
      return Status::Ok();
    case Family::kSigned:
    case Family::kUnsigned: {
      if (!j.is_number_integer()) {
        return InvalidArgument("input '{}': {} is not an integer ({})", t->name, j.dump(),
                               t->datatype);
      }
      int64_t lo;
      uint64_t hi;
      IntRange(t->datatype, &lo, &hi);
      if (j.is_number_unsigned()) {
        uint64_t v = j.get<uint64_t>();
        if (v > hi) return OutOfRange("input '{}': {} is over {}'s range", t->name, v, t->datatype);
        t->ints.push_back(static_cast<int64_t>(v));
      } else {
        int64_t v = j.get<int64_t>();
        if (v < lo || (v >= 0 && uint64_t(v) > hi)) {
          return OutOfRange("input '{}': {} is outside {}'s range", t->name, v, t->datatype);
        }
        t->ints.push_back(v);
      }
      return Status::Ok();
    }
    case Family::kFloat:
      if (!j.is_number())
        return InvalidArgument("input '{}': {} is not a number", t->name, j.dump());
      t->floats.push_back(j.get<double>());
      return Status::Ok();
    case Family::kBytes:
      if (!j.is_string()) {
        return InvalidArgument("input '{}': {} is not a string (BYTES)", t->name, j.dump());
      }
      t->bytes.push_back(j.get<std::string>());
      return Status::Ok();
    case Family::kUnknown:
      break;
  }
  return InvalidArgument("input '{}': unknown datatype {}", t->name, t->datatype);
}

}  // namespace

int64_t Tensor::size() const {
  return static_cast<int64_t>(ints.size() + floats.size() + bytes.size());
}
bool Tensor::is_float() const { return FamilyOf(datatype) == Family::kFloat; }

Tensor Tensor::Bytes(std::string name, std::vector<std::string> values,
                     std::vector<int64_t> shape) {
  Tensor t;
  t.name = std::move(name);
  t.datatype = "BYTES";
  t.shape = std::move(shape);
  t.bytes = std::move(values);
  return t;
}
Tensor Tensor::Int32(std::string name, std::vector<int64_t> values, std::vector<int64_t> shape) {
  Tensor t;
  t.name = std::move(name);
  t.datatype = "INT32";
  t.shape = std::move(shape);
  t.ints = std::move(values);
  return t;
}
Tensor Tensor::Fp32(std::string name, std::vector<double> values, std::vector<int64_t> shape) {
  Tensor t;
  t.name = std::move(name);
  t.datatype = "FP32";
  t.shape = std::move(shape);
  t.floats = std::move(values);
  return t;
}

int DatatypeSize(const std::string& dt) {
  if (dt == "BOOL" || dt == "INT8" || dt == "UINT8") return 1;
  if (dt == "INT16" || dt == "UINT16" || dt == "FP16" || dt == "BF16") return 2;
  if (dt == "INT32" || dt == "UINT32" || dt == "FP32") return 4;
  if (dt == "INT64" || dt == "UINT64" || dt == "FP64") return 8;
  if (dt == "BYTES") return 0;
  return -1;
}

Result<int64_t> ShapeElements(const std::vector<int64_t>& shape, const std::string& what) {
  if (shape.size() > static_cast<size_t>(kMaxTensorRank)) {
    return OutOfRange("{}: rank {} is over the limit {}", what, shape.size(), kMaxTensorRank);
  }
  int64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0) return InvalidArgument("{}: shape has the negative dimension {}", what, d);
    if (d > 0 && n > kMaxTensorElements / d) {
      return OutOfRange("{}: shape holds more than {} elements", what, kMaxTensorElements);
    }
    n *= d;
  }
  if (n > kMaxTensorElements) {
    return OutOfRange("{}: shape holds {} elements, over the limit {}", what, n,
                      kMaxTensorElements);
  }
  return n;
}

Result<std::vector<Tensor>> InputsFromProto(const inference::ModelInferRequest& request) {
  const bool raw = request.raw_input_contents_size() > 0;
  if (raw && request.raw_input_contents_size() != request.inputs_size()) {
    return InvalidArgument("raw_input_contents has {} entries for {} inputs (one per input)",
                           request.raw_input_contents_size(), request.inputs_size());
  }
  std::vector<Tensor> out;
  for (int i = 0; i < request.inputs_size(); ++i) {
    const auto& in = request.inputs(i);
    Tensor t;
    t.name = in.name();
    t.datatype = in.datatype();
    if (DatatypeSize(t.datatype) < 0) {
      return InvalidArgument("input '{}': unknown datatype \"{}\"", t.name, t.datatype);
    }
    t.shape.assign(in.shape().begin(), in.shape().end());
    QILIN_ASSIGN_OR_RETURN(int64_t n, ShapeElements(t.shape, "input '" + t.name + "'"));
    for (const auto& o : out) {
      if (o.name == t.name) return InvalidArgument("input '{}' is given twice", t.name);
    }
    if (raw) {
      if (in.has_contents()) {
        return InvalidArgument(
            "input '{}' has contents while the request uses "
            "raw_input_contents (use one or the other)",
            t.name);
      }
      QILIN_RETURN_IF_ERROR(DecodeRaw(request.raw_input_contents(i), &t, n));
    } else {
      QILIN_RETURN_IF_ERROR(DecodeContents(in.contents(), &t, n));
    }
    out.push_back(std::move(t));
  }
  return out;
}

void AddOutputToProto(const Tensor& t, inference::ModelInferResponse* response) {
  auto* out = response->add_outputs();
  out->set_name(t.name);
  out->set_datatype(t.datatype);
  for (int64_t d : t.shape) out->add_shape(d);
  response->add_raw_output_contents(EncodeRaw(t));
}

Result<std::vector<Tensor>> OutputsFromProto(const inference::ModelInferResponse& response) {
  const bool raw = response.raw_output_contents_size() > 0;
  std::vector<Tensor> out;
  for (int i = 0; i < response.outputs_size(); ++i) {
    const auto& o = response.outputs(i);
    Tensor t;
    t.name = o.name();
    t.datatype = o.datatype();
    if (DatatypeSize(t.datatype) < 0) {
      return InvalidArgument("output '{}': unknown datatype \"{}\"", t.name, t.datatype);
    }
    t.shape.assign(o.shape().begin(), o.shape().end());
    QILIN_ASSIGN_OR_RETURN(int64_t n, ShapeElements(t.shape, "output '" + t.name + "'"));
    if (raw) {
      if (i >= response.raw_output_contents_size()) {
        return InvalidArgument("output '{}' has no raw_output_contents entry", t.name);
      }
      QILIN_RETURN_IF_ERROR(DecodeRaw(response.raw_output_contents(i), &t, n));
    } else {
      QILIN_RETURN_IF_ERROR(DecodeContents(o.contents(), &t, n));
    }
    out.push_back(std::move(t));
  }
  return out;
}

Result<Tensor> TensorFromJson(const nlohmann::json& j) {
  if (!j.is_object()) return InvalidArgument("an input tensor must be a JSON object");
  Tensor t;
  if (!j.contains("name") || !j["name"].is_string()) {
    return InvalidArgument("an input tensor has no string \"name\"");
  }
  t.name = j["name"].get<std::string>();
  if (!j.contains("datatype") || !j["datatype"].is_string()) {
    return InvalidArgument("input '{}': no string \"datatype\"", t.name);
  }
  t.datatype = j["datatype"].get<std::string>();
  if (DatatypeSize(t.datatype) < 0) {
    return InvalidArgument("input '{}': unknown datatype \"{}\"", t.name, t.datatype);
  }
  if (!j.contains("shape") || !j["shape"].is_array()) {
    return InvalidArgument("input '{}': no \"shape\" array", t.name);
  }
  for (const auto& d : j["shape"]) {
    if (!d.is_number_integer()) {
      return InvalidArgument("input '{}': shape entry {} is not an integer", t.name, d.dump());
    }
    t.shape.push_back(d.get<int64_t>());
  }
  QILIN_ASSIGN_OR_RETURN(int64_t n, ShapeElements(t.shape, "input '" + t.name + "'"));
  if (!j.contains("data")) return InvalidArgument("input '{}': no \"data\"", t.name);
  QILIN_RETURN_IF_ERROR(JsonElements(j["data"], &t));
  if (t.size() != n) {
    return InvalidArgument("input '{}': data holds {} elements, shape {} needs {}", t.name,
                           t.size(), nlohmann::json(t.shape).dump(), n);
  }
  return t;
}

nlohmann::json TensorToJson(const Tensor& t) {
  nlohmann::json j = {{"name", t.name}, {"datatype", t.datatype}, {"shape", t.shape}};
  nlohmann::json data = nlohmann::json::array();
  switch (FamilyOf(t.datatype)) {
    case Family::kBool:
      for (int64_t v : t.ints) data.push_back(v != 0);
      break;
    case Family::kUnsigned:
      for (int64_t v : t.ints) data.push_back(static_cast<uint64_t>(v));
      break;
    case Family::kSigned:
      for (int64_t v : t.ints) data.push_back(v);
      break;
    case Family::kFloat:
      for (double v : t.floats) data.push_back(v);
      break;
    case Family::kBytes:
      for (const auto& s : t.bytes) data.push_back(s);
      break;
    case Family::kUnknown:
      break;
  }
  j["data"] = std::move(data);
  return j;
}

void SetFinalFlag(inference::ModelInferResponse* response, bool final) {
  (*response->mutable_parameters())[kFinalResponseParam].set_bool_param(final);
}

bool WantsEmptyFinalResponse(const inference::ModelInferRequest& request) {
  auto it = request.parameters().find(kEnableEmptyFinalParam);
  return it != request.parameters().end() &&
         it->second.parameter_choice_case() == inference::InferParameter::kBoolParam &&
         it->second.bool_param();
}

// KServe name of a model config datatype; "INVALID" for TYPE_INVALID and unknown values.
std::string DatatypeName(inference::DataType t) {
  switch (t) {
    case inference::TYPE_BOOL:
      return "BOOL";
    case inference::TYPE_UINT8:
      return "UINT8";
    case inference::TYPE_UINT16:
      return "UINT16";
    case inference::TYPE_UINT32:
      return "UINT32";
    case inference::TYPE_UINT64:
      return "UINT64";
    case inference::TYPE_INT8:
      return "INT8";
    case inference::TYPE_INT16:
      return "INT16";
    case inference::TYPE_INT32:
      return "INT32";
    case inference::TYPE_INT64:
      return "INT64";
    case inference::TYPE_FP16:
      return "FP16";
    case inference::TYPE_FP32:
      return "FP32";
    case inference::TYPE_FP64:
      return "FP64";
    case inference::TYPE_STRING:
      return "BYTES";
    case inference::TYPE_BF16:
      return "BF16";
    default:
      return "INVALID";
  }
}

}  // namespace qilin::server
