#include "runtime/rope_tables.h"

#include <algorithm>
#include <map>

namespace qilin {

void BatchRopeTables(const ModelConfig& c, const cpu::RopeFreqs& base, const ForwardBatch& b,
                     std::vector<float>* cos, std::vector<float>* sin) {
  const int64_t half = c.head_dim / 2;
  const int64_t n = b.num_tokens();
  cos->resize(n * half);
  sin->resize(n * half);
  const bool dynamic = cpu::RopeDependsOnSeqLen(c);
  const int64_t dyn_max = c.rope_scaling.original_max_position_embeddings > 0
                              ? c.rope_scaling.original_max_position_embeddings
                              : c.max_position_embeddings;
  std::map<double, cpu::RopeFreqs> by_alpha;
  for (int32_t s = 0; s < b.num_seqs(); ++s) {
    const cpu::RopeFreqs* seq_freqs = &base;
    if (c.use_dynamic_ntk) {
      const double alpha = QwenV1NtkAlpha(c, b.prompt_lens[s]);
      if (alpha != 1.0) {
        auto it = by_alpha.find(alpha);
        if (it == by_alpha.end()) {
          it = by_alpha.emplace(alpha, cpu::ComputeRopeFreqs(c, 0, alpha)).first;
        }
        seq_freqs = &it->second;
      }
    }
    for (int32_t t = b.query_start[s]; t < b.query_start[s + 1]; ++t) {
      const int64_t seq_len = std::max<int64_t>(b.prompt_lens[s], b.positions[t] + 1);
      float* co = cos->data() + t * half;
      float* si = sin->data() + t * half;
      if (dynamic && seq_len > dyn_max) {
        cpu::RopeCosSin(cpu::ComputeRopeFreqs(c, seq_len, 1.0), b.positions[t], co, si);
      } else {
        cpu::RopeCosSin(*seq_freqs, b.positions[t], co, si);
      }
    }
  }
}

}  // namespace qilin
