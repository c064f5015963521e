// The rotary cos/sin tables of one packed batch, as the CPU backends apply them.
#pragma once

#include <vector>

#include "kernels/cpu/rope.h"
#include "model/config.h"
#include "runtime/forward_batch.h"

namespace qilin {

// cos/sin [num_tokens, head_dim / 2] of the batch's positions from `base` (the config's
// frequencies): Qwen v1's dynamic-NTK base from each prompt's length, HF dynamic scaling from
// the sequence length where it exceeds the original context.
void BatchRopeTables(const ModelConfig& config, const cpu::RopeFreqs& base, const ForwardBatch& b,
                     std::vector<float>* cos, std::vector<float>* sin);

}  // namespace qilin
