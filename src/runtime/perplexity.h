// Perplexity of a token sequence with sliding windows, exactly as tools/train-demo/train.py's
// windows()/perplexity() define it (the figure Hugging Face transformers reports for the demo
// model): windows of `context` tokens with stride context / 2, each window a fresh sequence that
// scores only the positions no earlier window scored, so every token after the first is scored
// once; log-softmax over the fp32 logits, the negative log-likelihood summed in double.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "common/status.h"
#include "runtime/backend.h"

namespace qilin {

struct PerplexityWindow {
  int64_t begin = 0;         // first token of the window
  int64_t end = 0;           // one past its last token
  int64_t first_scored = 0;  // first absolute position it scores (predicted by row p - 1 - begin)
};

// The windows of train.py's windows(n, context). Requires context >= 2 (checked by the caller).
std::vector<PerplexityWindow> PerplexityWindows(int64_t num_tokens, int64_t context);

struct PerplexityResult {
  double ppl = 0;      // exp(nll / tokens)
  double nll = 0;      // summed negative log-likelihood, nats
  int64_t tokens = 0;  // positions scored: num_tokens - 1
};

struct PerplexityOptions {
  int64_t context = 512;
  int32_t batch_windows = 1;  // windows packed into one Forward (independent sequences)
  int32_t block_size = 32;
};

// Runs every window through `backend` (whose KV cache it (re)allocates for batch_windows windows)
// and returns the perplexity. InvalidArgument for fewer than 2 ids, context < 2 or above the
// model's maximum length, batch_windows < 1, or an id outside the vocabulary.
Result<PerplexityResult> ComputePerplexity(Backend& backend, std::span<const int32_t> ids,
                                           const PerplexityOptions& options);

// log softmax(logits)[target] for one row of `vocab` fp32 logits (cpu::LogSumExp: max
// subtraction, e^x in f32, the sum of exponentials and the log in double).
double LogSoftmaxAt(const float* logits, int64_t vocab, int64_t target);

}  // namespace qilin
