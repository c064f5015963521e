// Qwen's pre-tokenizer: splits text into pieces exactly as this regex does when Oniguruma (Hugging
// Face tokenizers) or Rust's regex (tiktoken) runs it, leftmost-first with backtracking:
//
//   (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|
//   \s*[\r\n]+|\s+(?!\S)|\s+
//
// Written as a hand-made state machine over code points (no regex engine): each alternative is
// resolved with at most one look past the current run, so a piece costs O(its length).
#pragma once

#include <cstdint>
#include <string_view>
#include <vector>

namespace qilin::tokenizer {

// Appends the end byte offset of every piece of text to ends (pieces are contiguous and cover
// text; the first starts at 0). Never reads outside text, even for invalid UTF-8 (an invalid byte
// is one "other" character).
void PreTokenize(std::string_view text, std::vector<uint32_t>* ends);

}  // namespace qilin::tokenizer
