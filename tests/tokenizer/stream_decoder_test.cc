// StreamDecoder: deltas concatenate to the full decode, every delta is valid UTF-8 (no U+FFFD for
// a character split over tokens), specials are skipped, stop strings are caught across tokens.
#include <gtest/gtest.h>
#include <utf8proc.h>

#include <random>

#include "tokenizer/tokenizer.h"
#include "tokenizer_test_util.h"

namespace qilin::tokenizer {
namespace {

StreamDecoder::Options Opts(bool skip, std::vector<std::string> stop = {}, bool include = false) {
  StreamDecoder::Options o;
  o.skip_special_tokens = skip;
  o.stop = std::move(stop);
  o.include_stop_str_in_output = include;
  return o;
}

bool ValidUtf8(const std::string& s) {
  const auto* p = reinterpret_cast<const utf8proc_uint8_t*>(s.data());
  utf8proc_ssize_t left = static_cast<utf8proc_ssize_t>(s.size());
  while (left > 0) {
    utf8proc_int32_t cp;
    utf8proc_ssize_t n = utf8proc_iterate(p, left, &cp);
    if (n <= 0) return false;
    p += n;
    left -= n;
  }
  return true;
}

std::vector<std::string> StreamAll(std::shared_ptr<const Tokenizer> tok,
                                   const std::vector<TokenId>& ids, StreamDecoder::Options opts,
                                   std::string* joined, StreamDecoder** out_dec = nullptr) {
  static thread_local std::unique_ptr<StreamDecoder> keep;
  keep = std::make_unique<StreamDecoder>(tok, opts);
  std::vector<std::string> deltas;
  for (TokenId id : ids) deltas.push_back(keep->Push(id).value());
  deltas.push_back(keep->Finish());
  joined->clear();
  for (const auto& d : deltas) *joined += d;
  if (out_dec) *out_dec = keep.get();
  return deltas;
}

TEST(StreamDecoderTest, DeltasConcatenateToDecodeOnGoldenRows) {
  auto tok = testing::JsonTokenizer();
  ASSERT_TRUE(tok);
  for (const auto& row : testing::ReadGolden(testing::DataDir() + "/qwen-golden.jsonl")) {
    for (bool skip : {false, true}) {
      std::string joined;
      auto deltas = StreamAll(tok, row.ids, Opts(skip), &joined);
      const std::string full = tok->Decode(row.ids, skip).value();
      for (const auto& d : deltas) {
        ASSERT_TRUE(ValidUtf8(d));
        if (full.find("\xEF\xBF\xBD") == std::string::npos) {
          ASSERT_EQ(d.find("\xEF\xBF\xBD"), std::string::npos) << "U+FFFD mid-stream";
        }
      }
      EXPECT_EQ(joined, full);
    }
  }
}

// A character whose bytes the tokenizer splits over several tokens.
std::string SplitChar(const Tokenizer& tok) {
  for (const char* c : {"🌏", "𝌆", "ꙮ", "🫠", "𓀀", "𣬉"}) {
    std::vector<TokenId> ids = tok.Encode(c).value();
    for (TokenId id : ids) {
      if (!ValidUtf8(std::string(tok.TokenBytes(id)))) return c;
    }
  }
  return "";
}

TEST(StreamDecoderTest, CharacterSplitOverTokensIsHeld) {
  auto tok = testing::JsonTokenizer();
  ASSERT_TRUE(tok);
  const std::string c = SplitChar(*tok);
  ASSERT_FALSE(c.empty());
  auto ids = tok->Encode("a" + c + "b").value();
  StreamDecoder dec(tok, Opts(true));
  std::string got;
  for (TokenId id : ids) {
    std::string d = dec.Push(id).value();
    EXPECT_TRUE(ValidUtf8(d));
    got += d;
  }
  got += dec.Finish();
  EXPECT_EQ(got, "a" + c + "b");
}

TEST(StreamDecoderTest, IncompleteTailBecomesReplacementAtFinish) {
  auto tok = testing::JsonTokenizer();
  ASSERT_TRUE(tok);
  auto ids = tok->Encode(SplitChar(*tok)).value();
  ASSERT_GT(ids.size(), 1u);
  ids.pop_back();  // drop the last piece of the character
  std::string joined;
  StreamAll(tok, ids, Opts(true), &joined);
  EXPECT_EQ(joined, tok->Decode(ids).value());
  EXPECT_EQ(joined, "\xEF\xBF\xBD");
}

TEST(StreamDecoderTest, StopStringAcrossTokens) {
  auto tok = testing::JsonTokenizer();
  ASSERT_TRUE(tok);
  const std::string text = "The answer is 42.\nObservation: done and more text";
  auto ids = tok->Encode(text).value();
  for (const std::string stop : {"\nObservation:", "Obs", "42.\n", "answer is", "s 4"}) {
    StreamDecoder* dec = nullptr;
    std::string joined;
    auto deltas = StreamAll(tok, ids, Opts(true, {stop, "never matches"}), &joined, &dec);
    EXPECT_EQ(joined, text.substr(0, text.find(stop))) << stop;
    EXPECT_TRUE(dec->stopped());
    EXPECT_EQ(dec->matched_stop(), stop);
    auto with = StreamAll(tok, ids, Opts(true, {stop}, true), &joined);
    EXPECT_EQ(joined, text.substr(0, text.find(stop) + stop.size()));
  }
  // A prefix of a stop string that does not complete is released in the end.
  std::string joined;
  StreamAll(tok, tok->Encode("ends with Obs").value(), Opts(true, {"Observation"}), &joined);
  EXPECT_EQ(joined, "ends with Obs");
}

TEST(StreamDecoderTest, RandomSplitsAndStops) {
  auto tok = testing::JsonTokenizer();
  ASSERT_TRUE(tok);
  std::mt19937 rng(7);
  auto rows = testing::ReadGolden(testing::DataDir() + "/qwen-golden.jsonl");
  for (int iter = 0; iter < 300; ++iter) {
    const auto& row = rows[rng() % rows.size()];
    std::string full = tok->Decode(row.ids).value();
    if (full.size() < 4) continue;
    size_t a = rng() % (full.size() - 2);
    size_t len = 1 + rng() % std::min<size_t>(6, full.size() - a);
    std::string stop = full.substr(a, len);
    if (!ValidUtf8(stop)) continue;
    std::string joined;
    auto deltas = StreamAll(tok, row.ids, Opts(false, {stop}), &joined);
    for (const auto& d : deltas) ASSERT_TRUE(ValidUtf8(d));
    // Independent reference: the full decode cut at the first occurrence of the stop string.
    EXPECT_EQ(joined, full.substr(0, full.find(stop)));
  }
}

TEST(StreamDecoderTest, BadIdIsAnError) {
  auto tok = testing::JsonTokenizer();
  ASSERT_TRUE(tok);
  StreamDecoder dec(tok, Opts(true));
  auto r = dec.Push(1 << 30);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find(std::to_string(1 << 30)), std::string::npos);
}

}  // namespace
}  // namespace qilin::tokenizer
