// Unicode helpers for the tokenizer: UTF-8 decoding, the character classes Qwen's pre-tokenizer
// regex uses (as Oniguruma defines them), NFC, and lossy UTF-8 repair as Rust's
// String::from_utf8_lossy does it (what Hugging Face's ByteLevel decoder returns).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "common/status.h"

namespace qilin::tokenizer {

// Class of a code point for the pre-tokenizer:
//   kLetter: \p{L} (Lu Ll Lt Lm Lo); kNumber: \p{N} (Nd Nl No);
//   kNewline: \r or \n (also whitespace); kSpace: other \s as Oniguruma has it
//   (U+0009-000D, U+0085, Zs, Zl, Zp); kOther: everything else.
enum class CharClass : uint8_t { kOther = 0, kLetter, kNumber, kSpace, kNewline };

inline CharClass ClassOf(uint32_t cp);

// Decodes one code point at p (p < end). Invalid or truncated UTF-8 decodes as one byte with
// cp = 0xFFFD so that callers never read past end. Returns the byte length (>= 1).
inline size_t DecodeUtf8(const uint8_t* p, const uint8_t* end, uint32_t* cp);

// Returns the byte offset of the first invalid UTF-8 sequence, or npos when s is valid.
size_t FindInvalidUtf8(std::string_view s);

// NFC of valid UTF-8 text. Fast path: text whose code points can never change under NFC is
// returned as is (out untouched, returns false); otherwise out receives NFC(text) (returns true).
Result<bool> NormalizeNfc(std::string_view text, std::string* out);

// Appends bytes to out, replacing each maximal invalid subsequence with U+FFFD exactly as
// Rust's String::from_utf8_lossy does. If hold_incomplete_tail is set, a trailing sequence that
// is a valid but incomplete prefix of a character is not consumed; returns the number of bytes
// consumed.
size_t AppendUtf8Lossy(std::string_view bytes, bool hold_incomplete_tail, std::string* out);

// Appends the UTF-8 encoding of cp.
void AppendUtf8(uint32_t cp, std::string* out);

// ---- inline ----
extern const CharClass* const kBmpClass;  // classes of U+0000..U+FFFF
CharClass ClassOfSlow(uint32_t cp);
inline CharClass ClassOf(uint32_t cp) { return cp < 0x10000 ? kBmpClass[cp] : ClassOfSlow(cp); }

inline size_t DecodeUtf8(const uint8_t* p, const uint8_t* end, uint32_t* cp) {
  uint8_t b0 = p[0];
  if (b0 < 0x80) {
    *cp = b0;
    return 1;
  }
  size_t avail = static_cast<size_t>(end - p);
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    if (avail >= 2 && (p[1] & 0xC0) == 0x80) {
      *cp = (uint32_t(b0 & 0x1F) << 6) | (p[1] & 0x3F);
      return 2;
    }
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    if (avail >= 3 && (p[1] & 0xC0) == 0x80 && (p[2] & 0xC0) == 0x80) {
      uint32_t c = (uint32_t(b0 & 0x0F) << 12) | (uint32_t(p[1] & 0x3F) << 6) | (p[2] & 0x3F);
      if (c >= 0x800 && (c < 0xD800 || c > 0xDFFF)) {
        *cp = c;
        return 3;
      }
    }
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    if (avail >= 4 && (p[1] & 0xC0) == 0x80 && (p[2] & 0xC0) == 0x80 && (p[3] & 0xC0) == 0x80) {
      uint32_t c = (uint32_t(b0 & 0x07) << 18) | (uint32_t(p[1] & 0x3F) << 12) |
                   (uint32_t(p[2] & 0x3F) << 6) | (p[3] & 0x3F);
      if (c >= 0x10000 && c <= 0x10FFFF) {
        *cp = c;
        return 4;
      }
    }
  }
  *cp = 0xFFFD;
  return 1;
}

}  // namespace qilin::tokenizer
