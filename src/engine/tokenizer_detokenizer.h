// Attaches the tokenizer's streaming decoder to the engine: text deltas that never split a
// UTF-8 character. Stop strings are matched by the engine over these deltas.
#pragma once

#include <memory>

#include "engine/detokenizer.h"
#include "tokenizer/tokenizer.h"

namespace qilin {

DetokenizerFactory MakeTokenizerDetokenizerFactory(
    std::shared_ptr<const tokenizer::Tokenizer> tokenizer, bool skip_special_tokens = true);

}  // namespace qilin
