#include "tokenizer/bpe.h"

#include <climits>
#include <queue>

namespace qilin::tokenizer {

bool BpeModel::HasAllBytes() const {
  for (bool b : byte_set_) {
    if (!b) return false;
  }
  return true;
}

void BpeModel::Reserve(size_t merges) {
  size_t cap = 16;
  while (cap < merges * 2) cap <<= 1;
  if (cap <= slots_.size()) return;
  std::vector<Slot> old = std::move(slots_);
  slots_.assign(cap, Slot{kEmpty, 0, 0});
  mask_ = cap - 1;
  size_ = 0;
  for (const Slot& s : old) {
    if (s.key != kEmpty)
      AddMerge(TokenId(s.key >> 32), TokenId(s.key & 0xFFFFFFFFu), s.rank, s.merged);
  }
}

void BpeModel::Grow() { Reserve(slots_.empty() ? 16 : slots_.size()); }

void BpeModel::AddMerge(TokenId left, TokenId right, int32_t rank, TokenId merged) {
  if ((size_ + 1) * 2 > slots_.size()) Grow();
  uint64_t key = (uint64_t(uint32_t(left)) << 32) | uint32_t(right);
  size_t i = Hash(key) & mask_;
  while (slots_[i].key != kEmpty) {
    if (slots_[i].key == key) {
      if (rank < slots_[i].rank) slots_[i] = Slot{key, rank, merged};
      return;
    }
    i = (i + 1) & mask_;
  }
  slots_[i] = Slot{key, rank, merged};
  ++size_;
}

// Linear scan: O(n^2) in the piece's length, fastest for the short pieces that dominate text.
void BpeModel::MergeSmall(std::vector<TokenId>* ids_ptr) const {
  std::vector<TokenId>& ids = *ids_ptr;
  size_t n = ids.size();
  // ranks[i]: rank of the pair (ids[i], ids[i+1]); merged[i]: its result.
  int32_t ranks[64];
  TokenId merged[64];
  for (size_t i = 0; i + 1 < n; ++i) {
    const Slot* s = Find(ids[i], ids[i + 1]);
    ranks[i] = s ? s->rank : INT32_MAX;
    merged[i] = s ? s->merged : 0;
  }
  while (n > 1) {
    size_t best = 0;
    int32_t best_rank = INT32_MAX;
    for (size_t i = 0; i + 1 < n; ++i) {
      if (ranks[i] < best_rank) {
        best_rank = ranks[i];
        best = i;
      }
    }
    if (best_rank == INT32_MAX) break;
    ids[best] = merged[best];
    for (size_t i = best + 1; i + 1 < n; ++i) {
      ids[i] = ids[i + 1];
      ranks[i] = ranks[i + 1];
      merged[i] = merged[i + 1];
    }
    --n;
    auto update = [&](size_t i) {
      const Slot* s = Find(ids[i], ids[i + 1]);
      ranks[i] = s ? s->rank : INT32_MAX;
      merged[i] = s ? s->merged : 0;
    };
    if (best > 0) update(best - 1);
    if (best + 1 < n) update(best);
  }
  ids.resize(n);
}

// Heap of candidate merges over a doubly linked list of symbols; stale entries are skipped when
// popped (the pair at a position changed since it was pushed). O(n log n).
void BpeModel::MergeLarge(std::vector<TokenId>* ids_ptr) const {
  std::vector<TokenId>& ids = *ids_ptr;
  const int n = static_cast<int>(ids.size());
  std::vector<int> prev(n), next(n);
  std::vector<bool> alive(n, true);
  for (int i = 0; i < n; ++i) {
    prev[i] = i - 1;
    next[i] = i + 1 < n ? i + 1 : -1;
  }
  struct Cand {
    int32_t rank;
    int pos;
    TokenId left, right, merged;
    bool operator>(const Cand& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> heap;
  auto push = [&](int i) {
    int j = next[i];
    if (j < 0) return;
    const Slot* s = Find(ids[i], ids[j]);
    if (s) heap.push(Cand{s->rank, i, ids[i], ids[j], s->merged});
  };
  for (int i = 0; i + 1 < n; ++i) push(i);
  while (!heap.empty()) {
    Cand c = heap.top();
    heap.pop();
    int i = c.pos;
    if (!alive[i]) continue;
    int j = next[i];
    if (j < 0 || ids[i] != c.left || ids[j] != c.right) continue;
    ids[i] = c.merged;
    alive[j] = false;
    next[i] = next[j];
    if (next[j] >= 0) prev[next[j]] = i;
    if (prev[i] >= 0) push(prev[i]);
    push(i);
  }
  size_t out = 0;
  for (int i = 0; i >= 0 && i < n; i = next[i]) ids[out++] = ids[i];
  ids.resize(out);
}

void BpeModel::EncodePiece(std::string_view piece, std::vector<TokenId>* out) const {
  if (piece.empty()) return;
  if (piece.size() == 1) {
    out->push_back(byte_ids_[static_cast<uint8_t>(piece[0])]);
    return;
  }
  thread_local std::vector<TokenId> ids;
  ids.resize(piece.size());
  for (size_t i = 0; i < piece.size(); ++i) ids[i] = byte_ids_[static_cast<uint8_t>(piece[i])];
  if (ids.size() <= 64) {
    MergeSmall(&ids);
  } else {
    MergeLarge(&ids);
  }
  out->insert(out->end(), ids.begin(), ids.end());
}

}  // namespace qilin::tokenizer
