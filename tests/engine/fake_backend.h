// A "KV-honest" fake backend for engine tests: Forward writes each new token (and its position)
// into its slot of a host KV array, and computes every sampled row's logits as a hash of ALL the
// sequence's tokens read back through its block table and context length. A wrong block table,
// slot, position, copy-on-write or preemption changes the output or fails the step.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "common/status.h"
#include "runtime/backend.h"

namespace qilin::test {

inline uint64_t FakeMix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// The reference: logits of the next token after `history` (independent of any paging).
inline void FakeLogits(const std::vector<int32_t>& history, int32_t vocab, int32_t eos,
                       float eos_bias, float* out) {
  uint64_t h = 0x1234;
  for (size_t p = 0; p < history.size(); ++p) {
    h = FakeMix(h ^ (static_cast<uint64_t>(history[p]) << 20) ^ p);
  }
  for (int32_t v = 0; v < vocab; ++v) {
    const uint64_t r = FakeMix(h ^ (static_cast<uint64_t>(v) * 0x632be59bd9b4e019ULL));
    out[v] = static_cast<float>(r >> 40) / static_cast<float>(1 << 24) * 8.0f - 4.0f;
  }
  if (eos >= 0 && eos < vocab) out[eos] += eos_bias;
}

class FakeBackend : public Backend {
 public:
  FakeBackend(int32_t vocab, int32_t max_len, int32_t eos = -1, float eos_bias = 0.0f)
      : vocab_(vocab), eos_(eos), eos_bias_(eos_bias) {
    config_.vocab_size = vocab;
    config_.max_position_embeddings = max_len;
    if (eos >= 0) config_.eos_token_ids = {eos};
  }

  std::string name() const override { return "fake"; }
  const ModelConfig& config() const override { return config_; }
  int64_t KvBytesPerToken() const override { return 8; }
  Result<int32_t> ProposeNumKvBlocks(int32_t block_size, double fraction, int32_t) const override {
    return static_cast<int32_t>(4096 * fraction / block_size);
  }
  Status AllocateKvCache(const KvCacheLayout& layout) override {
    layout_ = layout;
    cells_.assign(static_cast<size_t>(layout.num_blocks) * layout.block_size, {-1, -1});
    return Status::Ok();
  }
  const KvCacheLayout& kv_layout() const override { return layout_; }

  Status Forward(const ForwardBatch& b, std::vector<float>* logits) override {
    ++forward_calls;
    if (fail_next) {
      fail_next = false;
      return Internal("fake backend: injected failure");
    }
    const int32_t n = b.num_tokens();
    const int32_t ns = b.num_seqs();
    const int64_t pool = static_cast<int64_t>(cells_.size());
    if (b.positions.size() != static_cast<size_t>(n) ||
        b.slot_mapping.size() != static_cast<size_t>(n) ||
        b.context_lens.size() != static_cast<size_t>(ns) ||
        b.prompt_lens.size() != static_cast<size_t>(ns) ||
        b.block_tables.size() != static_cast<size_t>(ns) * b.max_blocks_per_seq ||
        b.query_start.back() != n) {
      return Internal("fake backend: inconsistent batch sizes");
    }
    tokens_seen += n;
    max_tokens_in_step = std::max(max_tokens_in_step, n);
    max_seqs_in_step = std::max(max_seqs_in_step, ns);
    for (int32_t s = 0; s < ns; ++s) {
      const int32_t q0 = b.query_start[s], q1 = b.query_start[s + 1];
      const int32_t ctx = b.context_lens[s];
      if (q1 <= q0 || ctx < q1 - q0) return Internal("fake backend: bad query/context lens");
      for (int32_t i = q0; i < q1; ++i) {
        const int32_t want_pos = ctx - (q1 - i);
        if (b.positions[i] != want_pos) {
          return Internal("fake backend: position {} != {}", b.positions[i], want_pos);
        }
        const int64_t slot = b.slot_mapping[i];
        if (slot < 0 || slot >= pool) return Internal("fake backend: slot {} out of pool", slot);
        const int32_t blk =
            b.block_tables[s * b.max_blocks_per_seq + want_pos / layout_.block_size];
        if (slot !=
            static_cast<int64_t>(blk) * layout_.block_size + want_pos % layout_.block_size) {
          return Internal("fake backend: slot {} disagrees with the block table", slot);
        }
        if (b.token_ids[i] < 0 || b.token_ids[i] >= vocab_) {
          return Internal("fake backend: token {} outside vocab", b.token_ids[i]);
        }
        cells_[slot] = {b.token_ids[i], want_pos};
      }
    }
    logits->assign(b.logits_indices.size() * static_cast<size_t>(vocab_), 0.0f);
    std::vector<int32_t> history;
    for (size_t r = 0; r < b.logits_indices.size(); ++r) {
      const int32_t idx = b.logits_indices[r];
      int32_t s = 0;
      while (s < ns && b.query_start[s + 1] <= idx) ++s;
      if (s == ns) return Internal("fake backend: logits index {} out of range", idx);
      const int32_t ctx = b.context_lens[s];
      if (idx != b.query_start[s + 1] - 1) {
        return Internal("fake backend: sampled row {} is not its sequence's last token", idx);
      }
      history.clear();
      for (int32_t p = 0; p < ctx; ++p) {
        const int32_t blk = b.block_tables[s * b.max_blocks_per_seq + p / layout_.block_size];
        if (blk < 0 || blk >= layout_.num_blocks) {
          return Internal("fake backend: block {} for position {} out of pool", blk, p);
        }
        const auto& cell =
            cells_[static_cast<size_t>(blk) * layout_.block_size + p % layout_.block_size];
        if (cell.second != p) {
          return Internal("fake backend: KV cell for position {} holds position {}", p,
                          cell.second);
        }
        history.push_back(cell.first);
      }
      FakeLogits(history, vocab_, eos_, eos_bias_, logits->data() + r * vocab_);
    }
    return Status::Ok();
  }

  Status CopyKvBlocks(const std::vector<std::pair<int32_t, int32_t>>& src_dst) override {
    for (auto [src, dst] : src_dst) {
      if (src < 0 || dst < 0 || src >= layout_.num_blocks || dst >= layout_.num_blocks) {
        return Internal("fake backend: copy {} -> {} out of pool", src, dst);
      }
      for (int32_t i = 0; i < layout_.block_size; ++i) {
        cells_[static_cast<size_t>(dst) * layout_.block_size + i] =
            cells_[static_cast<size_t>(src) * layout_.block_size + i];
      }
      ++blocks_copied;
    }
    return Status::Ok();
  }

  int64_t forward_calls = 0;
  int64_t tokens_seen = 0;
  int64_t blocks_copied = 0;
  int32_t max_tokens_in_step = 0;
  int32_t max_seqs_in_step = 0;
  bool fail_next = false;

 private:
  int32_t vocab_;
  int32_t eos_;
  float eos_bias_;
  ModelConfig config_;
  KvCacheLayout layout_;
  std::vector<std::pair<int32_t, int32_t>> cells_;  // (token, position) per slot
};

}  // namespace qilin::test
