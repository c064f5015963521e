// What the engine needs from a streaming detokenizer (tokenizer/ implements it; tests use a
// table): token ids in, text deltas out that never split a UTF-8 character.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

namespace qilin {

class IncrementalDetokenizer {
 public:
  virtual ~IncrementalDetokenizer() = default;
  // The text that token `id` completes (may be empty while a character is incomplete).
  virtual std::string Push(int32_t id) = 0;
  // Whatever is held back at the end of the sequence.
  virtual std::string Flush() = 0;
};

// Makes one detokenizer per sequence; `prompt` primes it (its text is not returned).
using DetokenizerFactory =
    std::function<std::unique_ptr<IncrementalDetokenizer>(const std::vector<int32_t>& prompt)>;

struct Request;
// As DetokenizerFactory, seeing the whole request (e.g. its skip_special_tokens).
using RequestDetokenizerFactory =
    std::function<std::unique_ptr<IncrementalDetokenizer>(const Request& request)>;

}  // namespace qilin
