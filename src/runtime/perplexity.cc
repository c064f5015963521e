#include "runtime/perplexity.h"

#include <algorithm>
#include <cmath>

#include "kernels/cpu/elementwise.h"

namespace qilin {

std::vector<PerplexityWindow> PerplexityWindows(int64_t num_tokens, int64_t context) {
  std::vector<PerplexityWindow> out;
  const int64_t stride = context / 2;
  int64_t begin = 0, done = 1;
  while (done < num_tokens) {
    const int64_t end = std::min(begin + context, num_tokens);
    out.push_back({begin, end, done});
    done = end;
    begin += stride;
  }
  return out;
}

double LogSoftmaxAt(const float* logits, int64_t vocab, int64_t target) {
  return static_cast<double>(logits[target]) - cpu::LogSumExp(logits, vocab);
}

Result<PerplexityResult> ComputePerplexity(Backend& backend, std::span<const int32_t> ids,
                                           const PerplexityOptions& o) {
  const ModelConfig& c = backend.config();
  const int64_t n = static_cast<int64_t>(ids.size());
  if (n < 2) {
    return InvalidArgument("perplexity: the text has {} token(s); at least 2 are needed", n);
  }
  const int64_t max_len = c.MaxModelLen();
  if (o.context < 2 || o.context > max_len) {
    return InvalidArgument(
        "perplexity: context = {} must be in [2, {}] (the model's maximum length)", o.context,
        max_len);
  }
  if (o.batch_windows < 1) {
    return InvalidArgument("perplexity: batch_windows = {} must be at least 1", o.batch_windows);
  }
  if (o.block_size < 1) {
    return InvalidArgument("perplexity: block_size = {} must be positive", o.block_size);
  }
  for (int64_t i = 0; i < n; ++i) {
    if (ids[i] < 0 || ids[i] >= c.vocab_size) {
      return InvalidArgument("perplexity: token {} = {} is outside the vocabulary [0, {})", i,
                             ids[i], c.vocab_size);
    }
  }
  const std::vector<PerplexityWindow> windows = PerplexityWindows(n, o.context);
  const int32_t blocks_per_window =
      static_cast<int32_t>((o.context + o.block_size - 1) / o.block_size);
  const int32_t per_batch = static_cast<int32_t>(
      std::min<int64_t>(o.batch_windows, static_cast<int64_t>(windows.size())));
  QILIN_RETURN_IF_ERROR(backend.AllocateKvCache({blocks_per_window * per_batch, o.block_size}));

  PerplexityResult r;
  std::vector<float> logits;
  std::vector<int64_t> targets;
  for (size_t w0 = 0; w0 < windows.size(); w0 += per_batch) {
    const size_t w1 = std::min(windows.size(), w0 + per_batch);
    ForwardBatch b;
    b.query_start = {0};
    b.max_blocks_per_seq = blocks_per_window;
    targets.clear();
    for (size_t wi = w0; wi < w1; ++wi) {
      const PerplexityWindow& w = windows[wi];
      const int32_t slot_block = static_cast<int32_t>(wi - w0) * blocks_per_window;
      const int32_t row0 = b.num_tokens();
      for (int64_t p = w.begin; p < w.end; ++p) {
        const int32_t pos = static_cast<int32_t>(p - w.begin);
        b.token_ids.push_back(ids[p]);
        b.positions.push_back(pos);
        b.slot_mapping.push_back(static_cast<int64_t>(slot_block) * o.block_size + pos);
      }
      for (int64_t p = w.first_scored; p < w.end; ++p) {
        b.logits_indices.push_back(row0 + static_cast<int32_t>(p - 1 - w.begin));
        targets.push_back(ids[p]);
      }
      b.query_start.push_back(b.num_tokens());
      b.context_lens.push_back(static_cast<int32_t>(w.end - w.begin));
      b.prompt_lens.push_back(static_cast<int32_t>(w.end - w.begin));
      for (int32_t j = 0; j < blocks_per_window; ++j) b.block_tables.push_back(slot_block + j);
    }
    QILIN_RETURN_IF_ERROR(backend.Forward(b, &logits));
    const int64_t rows = static_cast<int64_t>(targets.size());
    double nll = 0;
#pragma omp parallel for schedule(static) reduction(+ : nll)
    for (int64_t i = 0; i < rows; ++i) {
      nll -= LogSoftmaxAt(&logits[i * c.vocab_size], c.vocab_size, targets[i]);
    }
    r.nll += nll;
    r.tokens += rows;
  }
  r.ppl = std::exp(r.nll / static_cast<double>(r.tokens));
  return r;
}

}  // namespace qilin
