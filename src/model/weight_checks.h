// Checks every backend runs before it trusts a ModelConfig and a ModelWeights: dimensions positive,
// heads grouping evenly, tensors present with the expected dtype and shape. The errors name the
// config key or the tensor, the value found and the value expected.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"
#include "model/config.h"
#include "model/weights.h"

namespace qilin {

// vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
// num_key_value_heads and head_dim all positive.
Status CheckModelDims(const ModelConfig& c);

// CheckModelDims, plus what any of qilin's backends needs: num_attention_heads a multiple of
// num_key_value_heads, head_dim even and at least 4 (rope), vocab_size within int32 token ids.
Status CheckBackendConfig(const ModelConfig& c);

// `t` present, BF16/F16/F32, and of shape `shape`; `what` names it (e.g. "layers.3.q_proj") and
// `backend` the backend in the dtype error ("CPU", "CUDA").
Status CheckWeightTensor(const TensorView& t, const std::string& what,
                         const std::vector<int64_t>& shape, std::string_view backend);

}  // namespace qilin
