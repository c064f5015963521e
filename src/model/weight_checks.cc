#include "model/weight_checks.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

namespace qilin {

Status CheckModelDims(const ModelConfig& c) {
  struct Dim {
    const char* name;
    int64_t value;
  };
  for (const Dim& d :
       {Dim{"vocab_size", c.vocab_size}, Dim{"hidden_size", c.hidden_size},
        Dim{"intermediate_size", c.intermediate_size}, Dim{"num_hidden_layers", c.num_layers},
        Dim{"num_attention_heads", c.num_heads}, Dim{"num_key_value_heads", c.num_kv_heads},
        Dim{"head_dim", c.head_dim}}) {
    if (d.value <= 0) {
      return InvalidArgument("model config: {} = {} must be positive", d.name, d.value);
    }
  }
  return Status::Ok();
}

Status CheckBackendConfig(const ModelConfig& c) {
  QILIN_RETURN_IF_ERROR(CheckModelDims(c));
  if (c.num_heads % c.num_kv_heads != 0) {
    return InvalidArgument(
        "model config: num_attention_heads = {} is not a multiple of num_key_value_heads = {}",
        c.num_heads, c.num_kv_heads);
  }
  if (c.head_dim % 2 != 0 || c.head_dim < 4) {
    return InvalidArgument("model config: head_dim = {} must be even and at least 4 for rope",
                           c.head_dim);
  }
  if (c.vocab_size > INT32_MAX) {
    return InvalidArgument("model config: vocab_size = {} exceeds {}", c.vocab_size, INT32_MAX);
  }
  return Status::Ok();
}

Status CheckWeightTensor(const TensorView& t, const std::string& what,
                         const std::vector<int64_t>& shape, std::string_view backend) {
  if (t.empty()) return NotFound("weights: tensor {} is missing", what);
  if (t.dtype != DType::kBF16 && t.dtype != DType::kF16 && t.dtype != DType::kF32) {
    return InvalidArgument(
        "weights: tensor {} ({}) has dtype {}; the {} backend takes BF16, F16 "
        "or F32",
        what, t.name, DTypeName(t.dtype), backend);
  }
  if (t.shape != shape) {
    return InvalidArgument("weights: tensor {} ({}) has shape [{}], expected [{}]", what, t.name,
                           fmt::join(t.shape, ", "), fmt::join(shape, ", "));
  }
  return Status::Ok();
}

}  // namespace qilin
