// The hand-written pre-tokenizer against PCRE2 running Qwen's regex (an independent engine with
// the same semantics here: leftmost-first alternation, backtracking, Unicode \s = White_Space,
// Unicode case folding under (?i)), on targeted strings and random text.
#include "tokenizer/pretokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <gtest/gtest.h>
#include <pcre2.h>
#include <utf8proc.h>

#include <random>
#include <string>
#include <vector>

namespace qilin::tokenizer {
namespace {

constexpr char kPattern[] =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

class Pcre2Splitter {
 public:
  Pcre2Splitter() {
    int err;
    PCRE2_SIZE off;
    code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(kPattern), PCRE2_ZERO_TERMINATED,
                          PCRE2_UTF | PCRE2_UCP, &err, &off, nullptr);
    match_ = pcre2_match_data_create_from_pattern(code_, nullptr);
  }
  ~Pcre2Splitter() {
    pcre2_match_data_free(match_);
    pcre2_code_free(code_);
  }
  bool ok() const { return code_ != nullptr; }
  // End offsets of successive matches (the regex matches every position of valid text).
  std::vector<uint32_t> Split(const std::string& s) {
    std::vector<uint32_t> ends;
    size_t pos = 0;
    while (pos < s.size()) {
      int rc = pcre2_match(code_, reinterpret_cast<PCRE2_SPTR>(s.data()), s.size(), pos, 0, match_,
                           nullptr);
      if (rc < 0) return {};
      PCRE2_SIZE* ov = pcre2_get_ovector_pointer(match_);
      if (ov[0] != pos || ov[1] <= pos) return {};  // a gap or an empty match: not expected
      ends.push_back(static_cast<uint32_t>(ov[1]));
      pos = ov[1];
    }
    return ends;
  }

 private:
  pcre2_code* code_ = nullptr;
  pcre2_match_data* match_ = nullptr;
};

std::vector<uint32_t> Ours(const std::string& s) {
  std::vector<uint32_t> ends;
  PreTokenize(s, &ends);
  return ends;
}

TEST(PreTokenizerTest, TargetedCasesMatchPcre2) {
  Pcre2Splitter re;
  ASSERT_TRUE(re.ok());
  const char* cases[] = {
      "Hello, world!",
      "I'm you'RE we'Ve they'LL he'D it'S don't",
      "'ſ 'ſup 'x 'sx",
      "  leading and trailing  ",
      "a\n\n  b",
      "x \r\n\r\n y",
      "\t\tindent",
      "12345 3.14 ٣٤",
      " !!! ?? \n\n",
      "end with spaces   ",
      "中文文本，标点。english",
      "a\u0085b c\u00a0d e\u3000f",
      "\u2028line\u2029para",
      "\ufeffbom \u200bzw",
      "emoji 🌏🫠 here",
      "tab\tsep\tvalues\n",
      " '",
      "''",
      "'",
      "   \n",
      "x\u0301\u0302y",
      "a\x1c b\x1f",
      "\u1680ogham",
      "Ǆǅǆ ǈ",
  };
  for (const char* c : cases) EXPECT_EQ(Ours(c), re.Split(c)) << c;
}

TEST(PreTokenizerTest, RandomTextMatchesPcre2) {
  Pcre2Splitter re;
  ASSERT_TRUE(re.ok());
  std::mt19937 rng(42);
  // Code points from classes that exercise every alternative (all assigned in Unicode <= 13,
  // so both engines' tables agree).
  const std::vector<uint32_t> pool = {
      'a',    'Z',   's',    'S',    't',    'l',     'L',     'e',     'r',    'v',
      'd',    'm',   '\'',   ' ',    ' ',    '\t',    '\n',    '\r',    0x0B,   0x0C,
      0x85,   0xA0,  0x1680, 0x2003, 0x2028, 0x2029,  0x202F,  0x3000,  0xFEFF, 0x200B,
      0x1C,   0x1F,  '0',    '7',    0x660,  0xB2,    0x2167,  0xFF11,  '.',    ',',
      '!',    '-',   '(',    '"',    0x3002, 0xFF0C,  0x4E2D,  0x6587,  0xAC00, 0x3042,
      0x30A2, 0x17F, 0x212A, 0xE9,   0x301,  0x1F30F, 0x1D400, 0x10400, 0x5D0,  0x627,
      0x915,  0x94D, 0x2C6,  0x2B0,  0xAA,   0x1C5,   0x24B6};
  for (int iter = 0; iter < 20000; ++iter) {
    std::string s;
    int len = std::uniform_int_distribution<int>(1, 24)(rng);
    for (int i = 0; i < len; ++i) {
      uint32_t cp = pool[rng() % pool.size()];
      utf8proc_uint8_t buf[4];
      auto n = utf8proc_encode_char(static_cast<utf8proc_int32_t>(cp), buf);
      s.append(reinterpret_cast<char*>(buf), static_cast<size_t>(n));
    }
    ASSERT_EQ(Ours(s), re.Split(s)) << "iteration " << iter;
  }
}

TEST(PreTokenizerTest, InvalidUtf8NeverReadsOutside) {
  // Not produced by Encode (it refuses invalid UTF-8), but PreTokenize must stay in bounds.
  std::string s = "a\xE4\xBD";
  auto ends = Ours(s);
  ASSERT_FALSE(ends.empty());
  EXPECT_EQ(ends.back(), s.size());
}

}  // namespace
}  // namespace qilin::tokenizer
