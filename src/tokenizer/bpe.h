// Byte-level BPE over raw bytes: a piece's bytes start as single-byte tokens and adjacent pairs
// merge lowest rank first (leftmost on ties) until no pair has a merge, as Hugging Face's BPE and
// tiktoken both do. Pair ranks live in an open-addressing hash table; short pieces merge by a
// linear scan, long ones (Chinese runs, long identifiers) through a heap over a linked list.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace qilin::tokenizer {

using TokenId = int32_t;

class BpeModel {
 public:
  BpeModel() = default;

  // Single-byte tokens: byte b starts as token byte_ids[b] (all 256 must be set before Encode).
  void SetByteToken(uint8_t b, TokenId id) {
    byte_ids_[b] = id;
    byte_set_[b] = true;
  }
  bool HasAllBytes() const;
  // Pair (left, right) merges into `merged` with priority `rank` (lower first). A pair added twice
  // keeps its first (lowest-rank) entry.
  void AddMerge(TokenId left, TokenId right, int32_t rank, TokenId merged);
  void Reserve(size_t merges);
  size_t num_merges() const { return size_; }

  // Appends the ids of one pre-tokenized piece.
  void EncodePiece(std::string_view piece, std::vector<TokenId>* out) const;

 private:
  struct Slot {
    uint64_t key;  // kEmpty when free
    int32_t rank;
    TokenId merged;
  };
  static constexpr uint64_t kEmpty = ~uint64_t{0};

  const Slot* Find(TokenId left, TokenId right) const {
    uint64_t key = (uint64_t(uint32_t(left)) << 32) | uint32_t(right);
    size_t i = Hash(key) & mask_;
    while (true) {
      const Slot& s = slots_[i];
      if (s.key == key) return &s;
      if (s.key == kEmpty) return nullptr;
      i = (i + 1) & mask_;
    }
  }
  static size_t Hash(uint64_t key) {
    return static_cast<size_t>((key * 0x9E3779B97F4A7C15ull) >> 20);
  }
  void Grow();
  void MergeSmall(std::vector<TokenId>* ids) const;
  void MergeLarge(std::vector<TokenId>* ids) const;

  TokenId byte_ids_[256] = {};
  bool byte_set_[256] = {};
  std::vector<Slot> slots_;
  size_t mask_ = 0;
  size_t size_ = 0;
};

}  // namespace qilin::tokenizer
