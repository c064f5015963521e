#include "tokenizer/pretokenizer.h"

#include "tokenizer/unicode.h"

namespace qilin::tokenizer {
namespace {

struct Cursor {
  const uint8_t* p;
  const uint8_t* end;
};

// One decoded code point: its class, value and byte length.
struct Cp {
  CharClass cls;
  uint32_t cp;
  uint32_t len;
};

inline Cp At(const uint8_t* p, const uint8_t* end) {
  uint32_t cp;
  uint32_t len = static_cast<uint32_t>(DecodeUtf8(p, end, &cp));
  if (len == 1 && cp == 0xFFFD && *p >= 0x80) return {CharClass::kOther, cp, 1};  // invalid byte
  return {ClassOf(cp), cp, len};
}

// Skips a run of code points of class `cls` (or, with two_classes, of cls or cls2).
inline const uint8_t* SkipRun(const uint8_t* p, const uint8_t* end, CharClass cls) {
  while (p < end) {
    Cp c = At(p, end);
    if (c.cls != cls) break;
    p += c.len;
  }
  return p;
}

inline bool IsWhitespace(CharClass c) { return c == CharClass::kSpace || c == CharClass::kNewline; }

// Length of a contraction at p (which holds '\''), or 0. Case-insensitive with Unicode simple
// folding: only U+017F (long s, folds to 's') adds to the ASCII cases here.
inline uint32_t ContractionLength(const uint8_t* p, const uint8_t* end) {
  const uint8_t* q = p + 1;
  if (q >= end) return 0;
  uint32_t c1;
  size_t l1 = DecodeUtf8(q, end, &c1);
  auto lower = [](uint32_t c) { return (c >= 'A' && c <= 'Z') ? c + 32 : c; };
  c1 = lower(c1);
  if (c1 == 's' || c1 == 0x17F || c1 == 't' || c1 == 'm' || c1 == 'd') {
    return 1 + static_cast<uint32_t>(l1);
  }
  if (c1 != 'r' && c1 != 'v' && c1 != 'l') return 0;
  const uint8_t* r = q + l1;
  if (r >= end) return 0;
  uint32_t c2 = lower(*r);
  if ((c1 == 'r' || c1 == 'v') && c2 == 'e') return 3;
  if (c1 == 'l' && c2 == 'l') return 3;
  return 0;
}

}  // namespace

void PreTokenize(std::string_view text, std::vector<uint32_t>* ends) {
  const auto* begin = reinterpret_cast<const uint8_t*>(text.data());
  const auto* end = begin + text.size();
  const uint8_t* p = begin;
  auto emit = [&](const uint8_t* e) {
    ends->push_back(static_cast<uint32_t>(e - begin));
    p = e;
  };
  while (p < end) {
    // ASCII fast paths for the most common shapes: " word" and "word".
    Cp c = At(p, end);
    const uint8_t* next = p + c.len;
    // 1. (?i:'s|'t|'re|'ve|'m|'ll|'d)
    if (c.cp == '\'') {
      uint32_t n = ContractionLength(p, end);
      if (n) {
        emit(p + n);
        continue;
      }
    }
    // 2. [^\r\n\p{L}\p{N}]?\p{L}+
    if (c.cls == CharClass::kLetter) {
      emit(SkipRun(next, end, CharClass::kLetter));
      continue;
    }
    if (c.cls != CharClass::kNewline && c.cls != CharClass::kNumber && next < end) {
      Cp d = At(next, end);
      if (d.cls == CharClass::kLetter) {
        emit(SkipRun(next + d.len, end, CharClass::kLetter));
        continue;
      }
    }
    // 3. \p{N}
    if (c.cls == CharClass::kNumber) {
      emit(next);
      continue;
    }
    // 4. ` ?[^\s\p{L}\p{N}]+[\r\n]*`
    const uint8_t* punct = nullptr;
    if (c.cls == CharClass::kOther) {
      punct = p;
    } else if (c.cp == ' ' && next < end && At(next, end).cls == CharClass::kOther) {
      punct = next;
    }
    if (punct) {
      const uint8_t* e = SkipRun(punct, end, CharClass::kOther);
      emit(SkipRun(e, end, CharClass::kNewline));
      continue;
    }
    // Whitespace: c is \s here. Scan the whole run, noting its last newline and last code point.
    const uint8_t* run_end = p;
    const uint8_t* last_nl_end = nullptr;
    const uint8_t* last_cp = p;
    int count = 0;
    while (run_end < end) {
      Cp w = At(run_end, end);
      if (!IsWhitespace(w.cls)) break;
      last_cp = run_end;
      run_end += w.len;
      ++count;
      if (w.cls == CharClass::kNewline) last_nl_end = run_end;
    }
    // 5. \s*[\r\n]+ : greedy \s* backs off to the last newline of the run.
    if (last_nl_end) {
      emit(last_nl_end);
      continue;
    }
    // 6. \s+(?!\S) : the whole run at end of text, else all but its last code point.
    if (run_end == end) {
      emit(run_end);
      continue;
    }
    if (count >= 2) {
      emit(last_cp);
      continue;
    }
    // 7. \s+
    emit(run_end);
  }
}

}  // namespace qilin::tokenizer
