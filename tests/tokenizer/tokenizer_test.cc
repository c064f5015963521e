// Encoding and decoding against Hugging Face's ids (qwen-golden.jsonl, made by HF tokenizers
// 0.23.2 in Rust) and against Unicode's rules (NFC from utf8proc; U+FFFD per maximal subpart).
#include "tokenizer/tokenizer.h"

#include <gtest/gtest.h>
#include <utf8proc.h>

#include <cstdlib>
#include <random>

#include "tokenizer/unicode.h"
#include "tokenizer_test_util.h"

namespace qilin::tokenizer {
namespace {

using testing::DataDir;
using testing::JsonTokenizer;
using testing::ReadGolden;
using testing::TiktokenTokenizer;

std::string Nfc(const std::string& s) {
  utf8proc_uint8_t* out = nullptr;
  utf8proc_ssize_t n = utf8proc_map(
      reinterpret_cast<const utf8proc_uint8_t*>(s.data()), static_cast<utf8proc_ssize_t>(s.size()),
      &out, static_cast<utf8proc_option_t>(UTF8PROC_STABLE | UTF8PROC_COMPOSE));
  if (n < 0) return "<utf8proc error>";
  std::string r(reinterpret_cast<char*>(out), static_cast<size_t>(n));
  std::free(out);
  return r;
}

TEST(TokenizerTest, GoldenVectorsWithTokenizerJson) {
  auto tok = JsonTokenizer();
  ASSERT_TRUE(tok);
  auto rows = ReadGolden(DataDir() + "/qwen-golden.jsonl");
  ASSERT_EQ(rows.size(), 215u);
  int ok = 0;
  for (size_t i = 0; i < rows.size(); ++i) {
    auto ids = tok->Encode(rows[i].text);
    ASSERT_TRUE(ids.ok()) << ids.status().ToString();
    EXPECT_EQ(*ids, rows[i].ids) << "row " << i + 1 << ": " << nlohmann::json(rows[i].text).dump();
    ok += *ids == rows[i].ids;
  }
  EXPECT_EQ(ok, 215);
}

TEST(TokenizerTest, GoldenVectorsWithTiktoken) {
  auto v1 = TiktokenTokenizer();
  auto q3 = JsonTokenizer();
  ASSERT_TRUE(v1 && q3);
  auto rows = ReadGolden(DataDir() + "/qwen-golden.jsonl");
  int compared = 0;
  for (size_t i = 0; i < rows.size(); ++i) {
    // Qwen3's own added tokens (ids from 151646: <think>, <tool_call>, ...) are not Qwen v1's.
    bool has_qwen3_token = false;
    for (TokenId id = 151646; id < q3->vocab_size(); ++id) {
      if (rows[i].text.find(q3->TokenBytes(id)) != std::string::npos) has_qwen3_token = true;
    }
    if (has_qwen3_token) continue;
    ++compared;
    auto ids = v1->Encode(rows[i].text);
    ASSERT_TRUE(ids.ok()) << ids.status().ToString();
    EXPECT_EQ(*ids, rows[i].ids) << "row " << i + 1 << ": " << nlohmann::json(rows[i].text).dump();
  }
  EXPECT_GT(compared, 150);
}

TEST(TokenizerTest, DecodeGivesNfcOfTheText) {
  auto tok = JsonTokenizer();
  ASSERT_TRUE(tok);
  for (const auto& row : ReadGolden(DataDir() + "/qwen-golden.jsonl")) {
    auto text = tok->Decode(row.ids);
    ASSERT_TRUE(text.ok());
    EXPECT_EQ(*text, Nfc(row.text));
  }
}

TEST(TokenizerTest, VocabAndSpecialTokens) {
  auto tok = JsonTokenizer();
  ASSERT_TRUE(tok);
  EXPECT_EQ(tok->vocab_size(), 151669);
  EXPECT_EQ(tok->TokenToId("<|im_end|>"), 151645);
  EXPECT_EQ(tok->TokenToId("<|endoftext|>"), 151643);
  EXPECT_EQ(tok->TokenToId("Hello"), 9707);
  EXPECT_EQ(tok->TokenToId("Ġworld"), 1879);  // byte-level spelling of " world"
  EXPECT_EQ(tok->IdToToken(1879).value(), "Ġworld");
  EXPECT_EQ(tok->IdToToken(151644).value(), "<|im_start|>");
  EXPECT_TRUE(tok->IsSpecial(151645));
  EXPECT_FALSE(tok->IsSpecial(9707));
  EXPECT_FALSE(tok->TokenToId("no such token at all").has_value());

  auto v1 = TiktokenTokenizer();
  ASSERT_TRUE(v1);
  EXPECT_EQ(v1->vocab_size(), 151851);
  EXPECT_EQ(v1->TokenToId("<|im_end|>"), 151645);
  EXPECT_EQ(v1->TokenToId("<|extra_0|>"), 151646);
  EXPECT_EQ(v1->TokenToId("<|extra_204|>"), 151850);
}

TEST(TokenizerTest, SpecialTokensAllowedOrText) {
  auto tok = JsonTokenizer();
  ASSERT_TRUE(tok);
  const std::string text = "hi<|im_end|>\n<think>x</think>";
  auto with = tok->Encode(text, /*allow_special=*/true).value();
  auto without = tok->Encode(text, /*allow_special=*/false).value();
  EXPECT_NE(std::find(with.begin(), with.end(), 151645), with.end());
  EXPECT_EQ(std::find(without.begin(), without.end(), 151645), without.end());
  // <think> is an added token that is not special: matched either way.
  auto think = tok->TokenToId("<think>");
  ASSERT_TRUE(think.has_value());
  EXPECT_NE(std::find(without.begin(), without.end(), *think), without.end());
  EXPECT_EQ(tok->Decode(without).value(), text);
  EXPECT_EQ(tok->Decode(with).value(), text);
  EXPECT_EQ(tok->Decode(with, /*skip_special=*/true).value(), "hi\n<think>x</think>");
}

// Byte token ids of the tokenizer (the id whose bytes are exactly b).
std::vector<TokenId> ByteIds(const Tokenizer& tok) {
  std::vector<TokenId> ids(256, -1);
  for (TokenId id = 0; id < tok.vocab_size(); ++id) {
    auto b = tok.TokenBytes(id);
    if (b.size() == 1 && !tok.IsAdded(id)) ids[static_cast<uint8_t>(b[0])] = id;
  }
  return ids;
}

std::vector<TokenId> IdsOfBytes(const std::vector<TokenId>& byte_ids, const std::string& bytes) {
  std::vector<TokenId> ids;
  for (unsigned char c : bytes) ids.push_back(byte_ids[c]);
  return ids;
}

TEST(TokenizerTest, DecodeReplacesInvalidUtf8PerMaximalSubpart) {
  auto tok = JsonTokenizer();
  ASSERT_TRUE(tok);
  auto byte_ids = ByteIds(*tok);
  const std::string R = "\xEF\xBF\xBD";
  // Unicode 15 §3.9 "U+FFFD substitution of maximal subparts" (what from_utf8_lossy does).
  struct Case {
    std::string in, want;
  } cases[] = {
      {"\x80", R},
      {"\xC0\xAF", R + R},  // C0 is never valid
      {"\xE2\x82", R},      // truncated at the end: one U+FFFD
      {"\xE2\x82"
       "A",
       R + "A"},
      {"\xF0\x80\x80", R + R + R},          // F0 80 is not a valid prefix
      {"\xED\xA0\x80", R + R + R},          // surrogate
      {"\xF4\x90\x80\x80", R + R + R + R},  // above U+10FFFF
      {"\xF0\x9F\x98", R},                  // 3 of 4 bytes of an emoji
      {"a\xF0\x9F\x98\x80z", "a\xF0\x9F\x98\x80z"},
      {"\xE6\x97\xA5\xFF\xE6", "\xE6\x97\xA5" + R + R},
  };
  for (const auto& c : cases) {
    EXPECT_EQ(tok->Decode(IdsOfBytes(byte_ids, c.in)).value(), c.want)
        << nlohmann::json(c.want).dump();
  }
}

TEST(TokenizerTest, BadInputGivesClearErrors) {
  auto tok = JsonTokenizer();
  ASSERT_TRUE(tok);
  auto r = tok->Encode("ok \xFF bad");
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("byte offset 3"), std::string::npos) << r.status().ToString();
  std::vector<TokenId> bad = {9707, 999999};
  auto d = tok->Decode(bad);
  ASSERT_FALSE(d.ok());
  EXPECT_NE(d.status().message().find("999999"), std::string::npos);
  std::vector<TokenId> neg = {-1};
  EXPECT_FALSE(tok->Decode(neg).ok());
  auto missing = Tokenizer::Load("/nonexistent/tokenizer/dir");
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.status().message().find("/nonexistent/tokenizer/dir"), std::string::npos);
}

TEST(TokenizerTest, BatchEncodeMatchesSequential) {
  auto tok = JsonTokenizer();
  ASSERT_TRUE(tok);
  std::vector<std::string> texts;
  for (const auto& row : ReadGolden(DataDir() + "/qwen-golden.jsonl")) texts.push_back(row.text);
  auto batch = tok->EncodeBatch(texts, true, 4);
  ASSERT_TRUE(batch.ok());
  for (size_t i = 0; i < texts.size(); ++i) EXPECT_EQ((*batch)[i], tok->Encode(texts[i]).value());
  texts.push_back("bad \xC3");
  auto err = tok->EncodeBatch(texts, true, 2);
  ASSERT_FALSE(err.ok());
  EXPECT_NE(err.status().message().find("text 215"), std::string::npos) << err.status().ToString();
}

// ---- property tests over random text ----

uint32_t RandomCodePoint(std::mt19937& rng) {
  std::uniform_int_distribution<int> kind(0, 11);
  auto in = [&](uint32_t a, uint32_t b) {
    return std::uniform_int_distribution<uint32_t>(a, b)(rng);
  };
  switch (kind(rng)) {
    case 0:
      return in(0x20, 0x7E);  // ASCII
    case 1:
      return in(0x300, 0x36F);  // combining marks
    case 2: {                   // whitespace of all kinds
      static const uint32_t ws[] = {' ',    '\t',   '\n',   '\r',   0x0B,   0x0C,
                                    0x85,   0xA0,   0x1680, 0x2000, 0x2028, 0x2029,
                                    0x202F, 0x3000, 0xFEFF, 0x200B, 0x1C};
      return ws[in(0, sizeof(ws) / sizeof(ws[0]) - 1)];
    }
    case 3:
      return in('0', '9');
    case 4: {  // other digits and numbers
      static const uint32_t nums[] = {0x660, 0x6F5, 0x966, 0xFF11, 0x2460, 0x2167, 0xB2, 0x1D7CE};
      return nums[in(0, 7)];
    }
    case 5:
      return in(0x4E00, 0x9FFF);  // CJK
    case 6:
      return in(0xAC00, 0xD7A3);  // Hangul syllables
    case 7:
      return in(0x1100, 0x11FF);  // conjoining jamo
    case 8: {                     // apostrophe + contraction letters
      static const uint32_t c[] = {'\'', 's', 'S', 't', 'l', 'L', 'r', 'e', 'v', 'd', 'm', 0x17F};
      return c[in(0, 11)];
    }
    case 9:
      return in(0x1F300, 0x1FAFF);  // emoji
    case 10: {                      // any plane, no surrogates
      uint32_t cp = in(0x80, 0x10FFFF);
      return (cp >= 0xD800 && cp <= 0xDFFF) ? 0xE000 : cp;
    }
    default:
      return in(0xA0, 0x24F);  // Latin-1, Latin Extended
  }
}

std::string RandomText(std::mt19937& rng, int max_len) {
  std::string s;
  int len = std::uniform_int_distribution<int>(0, max_len)(rng);
  for (int i = 0; i < len; ++i) {
    uint32_t cp = RandomCodePoint(rng);
    int run = std::uniform_int_distribution<int>(0, 9)(rng) == 0 ? 4 : 1;  // runs of a kind
    for (int k = 0; k < run; ++k) {
      utf8proc_uint8_t buf[4];
      auto n = utf8proc_encode_char(static_cast<utf8proc_int32_t>(cp), buf);
      s.append(reinterpret_cast<char*>(buf), static_cast<size_t>(n));
    }
  }
  return s;
}

TEST(TokenizerPropertyTest, DecodeEncodeIsNfcOnRandomUnicode) {
  auto tok = JsonTokenizer();
  auto v1 = TiktokenTokenizer();
  ASSERT_TRUE(tok && v1);
  std::mt19937 rng(1234);
  for (int iter = 0; iter < 3000; ++iter) {
    std::string s = RandomText(rng, 40);
    auto ids = tok->Encode(s);
    ASSERT_TRUE(ids.ok()) << ids.status().ToString();
    ASSERT_EQ(tok->Decode(*ids).value(), Nfc(s)) << nlohmann::json(s).dump();
    // Qwen v1's rank BPE must agree with the merge-list BPE (no Qwen3 tokens in random text
    // except by chance: none of them is made of these code points' pieces).
    ASSERT_EQ(v1->Encode(s).value(), *ids) << nlohmann::json(s).dump();
  }
}

TEST(TokenizerPropertyTest, FastNfcEqualsUtf8procNfc) {
  std::mt19937 rng(77);
  for (int iter = 0; iter < 20000; ++iter) {
    std::string s = RandomText(rng, 30);
    std::string out;
    auto changed = NormalizeNfc(s, &out);
    ASSERT_TRUE(changed.ok());
    ASSERT_EQ(*changed ? out : s, Nfc(s)) << nlohmann::json(s).dump();
  }
}

TEST(TokenizerPropertyTest, RandomBytes) {
  auto tok = JsonTokenizer();
  ASSERT_TRUE(tok);
  auto byte_ids = ByteIds(*tok);
  std::mt19937 rng(99);
  for (int iter = 0; iter < 3000; ++iter) {
    std::string s;
    int len = std::uniform_int_distribution<int>(0, 24)(rng);
    for (int i = 0; i < len; ++i) {
      // Mostly bytes that form UTF-8 pieces, so that valid strings occur too.
      static const uint8_t pool[] = {'a',  ' ',  '\n', 0xC3, 0xA9, 0xE4, 0xBD, 0xA0, 0xF0,
                                     0x9F, 0x98, 0x80, 0x80, 0xFF, 0xED, 0xA0, '\''};
      s.push_back(static_cast<char>(
          std::uniform_int_distribution<int>(0, 3)(rng) == 0
              ? std::uniform_int_distribution<int>(0, 255)(rng)
              : pool[std::uniform_int_distribution<size_t>(0, sizeof(pool) - 1)(rng)]));
    }
    bool valid = true;
    {
      const auto* p = reinterpret_cast<const utf8proc_uint8_t*>(s.data());
      utf8proc_ssize_t left = static_cast<utf8proc_ssize_t>(s.size());
      while (left > 0) {
        utf8proc_int32_t cp;
        utf8proc_ssize_t n = utf8proc_iterate(p, left, &cp);
        if (n <= 0) {
          valid = false;
          break;
        }
        p += n;
        left -= n;
      }
    }
    auto ids = tok->Encode(s);
    ASSERT_EQ(ids.ok(), valid) << s.size();
    if (valid) {
      ASSERT_EQ(tok->Decode(*ids).value(), Nfc(s));
    }
    // Decoding the raw bytes never fails and always yields valid UTF-8.
    auto text = tok->Decode(IdsOfBytes(byte_ids, s)).value();
    const auto* p = reinterpret_cast<const utf8proc_uint8_t*>(text.data());
    utf8proc_ssize_t left = static_cast<utf8proc_ssize_t>(text.size());
    while (left > 0) {
      utf8proc_int32_t cp;
      utf8proc_ssize_t n = utf8proc_iterate(p, left, &cp);
      ASSERT_GT(n, 0);
      p += n;
      left -= n;
    }
    if (valid) {
      ASSERT_EQ(text, s);
    }
  }
}

}  // namespace
}  // namespace qilin::tokenizer
