#include "tokenizer/unicode.h"

#include <array>
#include <cstdlib>
#include <memory>

#include <utf8proc.h>

namespace qilin::tokenizer {
namespace {

CharClass ComputeClass(uint32_t cp) {
  if (cp == '\r' || cp == '\n') return CharClass::kNewline;
  // Oniguruma's \s: U+0009-000D, U+0085 and the separators Zs, Zl, Zp.
  if ((cp >= 0x09 && cp <= 0x0D) || cp == 0x85) return CharClass::kSpace;
  switch (utf8proc_category(static_cast<utf8proc_int32_t>(cp))) {
    case UTF8PROC_CATEGORY_LU:
    case UTF8PROC_CATEGORY_LL:
    case UTF8PROC_CATEGORY_LT:
    case UTF8PROC_CATEGORY_LM:
    case UTF8PROC_CATEGORY_LO:
      return CharClass::kLetter;
    case UTF8PROC_CATEGORY_ND:
    case UTF8PROC_CATEGORY_NL:
    case UTF8PROC_CATEGORY_NO:
      return CharClass::kNumber;
    case UTF8PROC_CATEGORY_ZS:
    case UTF8PROC_CATEGORY_ZL:
    case UTF8PROC_CATEGORY_ZP:
      return CharClass::kSpace;
    default:
      return CharClass::kOther;
  }
}

// True when cp can never take part in an NFC change: no canonical decomposition, combining
// class 0, not part of any canonical composition pair, not a conjoining Hangul jamo.
bool ComputeNfcInert(uint32_t cp) {
  if (cp < 0x300) return true;
  if (cp >= 0x1100 && cp <= 0x11FF) return false;  // jamo compose algorithmically
  const utf8proc_property_t* p = utf8proc_get_property(static_cast<utf8proc_int32_t>(cp));
  if (p->combining_class != 0) return false;
  if (p->decomp_seqindex != UINT16_MAX && p->decomp_type == 0) return false;
  if (p->comb_index != UINT16_MAX) return false;
  if (p->comp_exclusion) return false;
  return true;
}

struct BmpTables {
  std::array<CharClass, 0x10000> cls;
  std::array<bool, 0x10000> nfc_inert;
  BmpTables() {
    for (uint32_t cp = 0; cp < 0x10000; ++cp) {
      cls[cp] = ComputeClass(cp);
      nfc_inert[cp] = ComputeNfcInert(cp);
    }
  }
};

// Built during static initialization (about 1 ms); never destroyed.
const BmpTables* const g_tables = new BmpTables();
const BmpTables& Tables() { return *g_tables; }

}  // namespace

const CharClass* const kBmpClass = g_tables->cls.data();

CharClass ClassOfSlow(uint32_t cp) { return ComputeClass(cp); }

size_t FindInvalidUtf8(std::string_view s) {
  const auto* p = reinterpret_cast<const uint8_t*>(s.data());
  const auto* end = p + s.size();
  const auto* begin = p;
  while (p < end) {
    if (*p < 0x80) {
      ++p;
      continue;
    }
    uint32_t cp;
    size_t n = DecodeUtf8(p, end, &cp);
    if (cp == 0xFFFD && n == 1) return static_cast<size_t>(p - begin);
    p += n;
  }
  return std::string_view::npos;
}

namespace {

Status InvalidAt(std::string_view text, size_t off) {
  return InvalidArgument("text is not valid UTF-8: bad byte 0x{:02X} at byte offset {}",
                         static_cast<uint8_t>(text[off]), off);
}

Status AppendNfc(std::string_view span, std::string* out) {
  utf8proc_uint8_t* buf = nullptr;
  utf8proc_ssize_t len =
      utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(span.data()),
                   static_cast<utf8proc_ssize_t>(span.size()), &buf,
                   static_cast<utf8proc_option_t>(UTF8PROC_STABLE | UTF8PROC_COMPOSE));
  if (len < 0) return InvalidArgument("NFC normalization failed: {}", utf8proc_errmsg(len));
  std::unique_ptr<utf8proc_uint8_t, decltype(&std::free)> holder(buf, &std::free);
  out->append(reinterpret_cast<const char*>(buf), static_cast<size_t>(len));
  return Status::Ok();
}

}  // namespace

// Text splits safely before any NFC-inert code point (a starter that composes with nothing
// before it and decomposes to nothing), so only the spans from the inert code point before a
// non-inert run to the next inert one go through utf8proc.
Result<bool> NormalizeNfc(std::string_view text, std::string* out) {
  const auto* begin = reinterpret_cast<const uint8_t*>(text.data());
  const auto* end = begin + text.size();
  const BmpTables& t = Tables();
  const uint8_t* p = begin;
  const uint8_t* last_inert = begin;  // start of the last inert code point seen
  const uint8_t* copied = begin;      // text before this is in out
  bool changed = false;
  while (p < end) {
    if (*p < 0x80) {
      last_inert = p++;
      continue;
    }
    uint32_t cp;
    size_t n = DecodeUtf8(p, end, &cp);
    if (cp == 0xFFFD && n == 1) return InvalidAt(text, static_cast<size_t>(p - begin));
    if (cp < 0x10000 ? t.nfc_inert[cp] : ComputeNfcInert(cp)) {
      last_inert = p;
      p += n;
      continue;
    }
    // A non-inert run: extend to the next inert code point (or the end).
    const uint8_t* span_start = last_inert;
    const uint8_t* q = p + n;
    while (q < end) {
      if (*q < 0x80) break;
      uint32_t c2;
      size_t n2 = DecodeUtf8(q, end, &c2);
      if (c2 == 0xFFFD && n2 == 1) return InvalidAt(text, static_cast<size_t>(q - begin));
      if (c2 < 0x10000 ? t.nfc_inert[c2] : ComputeNfcInert(c2)) break;
      q += n2;
    }
    if (!changed) {
      out->clear();
      out->reserve(text.size() + 16);
      changed = true;
    }
    if (span_start < copied) span_start = copied;
    out->append(reinterpret_cast<const char*>(copied), static_cast<size_t>(span_start - copied));
    QILIN_RETURN_IF_ERROR(AppendNfc(std::string_view(reinterpret_cast<const char*>(span_start),
                                                     static_cast<size_t>(q - span_start)),
                                    out));
    copied = q;
    p = q;
    last_inert = q;
  }
  if (!changed) return false;
  out->append(reinterpret_cast<const char*>(copied), static_cast<size_t>(end - copied));
  return true;
}

void AppendUtf8(uint32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

size_t AppendUtf8Lossy(std::string_view bytes, bool hold_incomplete_tail, std::string* out) {
  static constexpr char kReplacement[] = "\xEF\xBF\xBD";
  const auto* s = reinterpret_cast<const uint8_t*>(bytes.data());
  const size_t n = bytes.size();
  size_t i = 0;
  size_t run_start = 0;  // start of valid bytes not yet copied
  while (i < n) {
    uint8_t b0 = s[i];
    if (b0 < 0x80) {
      ++i;
      continue;
    }
    size_t width = 0;
    uint8_t lo = 0x80, hi = 0xBF;  // allowed range of the second byte
    if (b0 >= 0xC2 && b0 <= 0xDF) {
      width = 2;
    } else if (b0 >= 0xE0 && b0 <= 0xEF) {
      width = 3;
      if (b0 == 0xE0) lo = 0xA0;
      if (b0 == 0xED) hi = 0x9F;
    } else if (b0 >= 0xF0 && b0 <= 0xF4) {
      width = 4;
      if (b0 == 0xF0) lo = 0x90;
      if (b0 == 0xF4) hi = 0x8F;
    }
    size_t k = 1;  // bytes of the longest valid prefix at i
    if (width > 0) {
      while (k < width && i + k < n) {
        uint8_t b = s[i + k];
        bool ok = (k == 1) ? (b >= lo && b <= hi) : (b >= 0x80 && b <= 0xBF);
        if (!ok) break;
        ++k;
      }
      if (k == width) {
        i += k;
        continue;
      }
      if (i + k == n && hold_incomplete_tail) {
        out->append(bytes.data() + run_start, i - run_start);
        return i;
      }
    }
    out->append(bytes.data() + run_start, i - run_start);
    out->append(kReplacement, 3);
    i += k;
    run_start = i;
  }
  out->append(bytes.data() + run_start, n - run_start);
  return n;
}

}  // namespace qilin::tokenizer
