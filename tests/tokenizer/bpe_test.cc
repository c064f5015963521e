// BPE on a small synthetic tokenizer.json: merges stored as ["a", "b"] pairs and as "a b"
// strings load alike, and encodings equal a naive reference BPE written here (lowest-rank
// adjacent pair first, leftmost on ties), for short and long (> 64 byte) pieces.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <random>

#include "tokenizer/tokenizer.h"

namespace qilin::tokenizer {
namespace {

namespace fs = std::filesystem;

// GPT-2's byte -> character table (as HF's ByteLevel spells tokens).
std::string ByteChar(int b) {
  static std::vector<std::string> table = [] {
    std::vector<std::string> t(256);
    int n = 0;
    for (int c = 0; c < 256; ++c) {
      bool printable = (c >= '!' && c <= '~') || (c >= 0xA1 && c <= 0xAC) || c >= 0xAE;
      int cp = printable ? c : 256 + n++;
      std::string s;
      if (cp < 0x80) {
        s.push_back(static_cast<char>(cp));
      } else {
        s.push_back(static_cast<char>(0xC0 | (cp >> 6)));
        s.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
      }
      t[c] = s;
    }
    return t;
  }();
  return table[b];
}

struct Synthetic {
  std::vector<std::pair<std::string, std::string>> merges;  // raw bytes
  nlohmann::json Json(bool string_merges) const {
    nlohmann::json vocab = nlohmann::json::object();
    for (int b = 0; b < 256; ++b) vocab[ByteChar(b)] = b;
    nlohmann::json m = nlohmann::json::array();
    int id = 256;
    auto spell = [](const std::string& raw) {
      std::string s;
      for (unsigned char c : raw) s += ByteChar(c);
      return s;
    };
    for (const auto& [a, b] : merges) {
      vocab[spell(a + b)] = id++;
      if (string_merges) {
        m.push_back(spell(a) + " " + spell(b));
      } else {
        m.push_back({spell(a), spell(b)});
      }
    }
    return {
        {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", m}}},
        {"normalizer", nullptr},
        {"pre_tokenizer",
         {{"type", "Sequence"},
          {"pretokenizers",
           {{{"type", "Split"},
             {"pattern",
              {{"Regex",
                R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)"}}},
             {"behavior", "Isolated"}},
            {{"type", "ByteLevel"}, {"use_regex", false}}}}}},
        {"added_tokens", {{{"id", 100000}, {"content", "<|end|>"}, {"special", true}}}}};
  }
  // Naive reference on one piece: raw byte strings merged by rank.
  std::vector<std::string> Reference(const std::string& piece) const {
    std::vector<std::string> parts;
    for (char c : piece) parts.push_back(std::string(1, c));
    while (true) {
      size_t best = parts.size();
      size_t best_rank = merges.size();
      for (size_t i = 0; i + 1 < parts.size(); ++i) {
        for (size_t r = 0; r < best_rank; ++r) {
          if (merges[r].first == parts[i] && merges[r].second == parts[i + 1]) {
            best_rank = r;
            best = i;
            break;
          }
        }
      }
      if (best == parts.size()) return parts;
      parts[best] += parts[best + 1];
      parts.erase(parts.begin() + static_cast<long>(best) + 1);
    }
  }
};

std::shared_ptr<Tokenizer> LoadJson(const nlohmann::json& j, const std::string& name) {
  fs::path p = fs::temp_directory_path() / (name + std::to_string(::getpid()) + ".json");
  std::ofstream(p) << j.dump();
  auto r = Tokenizer::FromTokenizerJson(p.string());
  fs::remove(p);
  EXPECT_TRUE(r.ok()) << r.status().ToString();
  return r.ok() ? r.value() : nullptr;
}

TEST(BpeTest, PairAndStringMergesMatchNaiveReference) {
  Synthetic syn;
  syn.merges = {{"a", "a"},    {"b", "b"},  {"aa", "aa"}, {"a", "b"},   {"ab", "ab"},
                {"aaaa", "b"}, {"bb", "a"}, {"h", "e"},   {"l", "l"},   {"he", "ll"},
                {"hell", "o"}, {" ", "w"},  {"o", "r"},   {" w", "or"}, {"ab", "a"},
                {"aba", "bb"}, {"b", "a"}};
  auto pairs = LoadJson(syn.Json(false), "bpe_pairs");
  auto strings = LoadJson(syn.Json(true), "bpe_strings");
  ASSERT_TRUE(pairs && strings);
  auto id_of = [&](const std::string& raw) {
    std::string spelled;
    for (unsigned char c : raw) spelled += ByteChar(c);
    return pairs->TokenToId(spelled).value_or(-1);
  };
  EXPECT_EQ(pairs->Encode("hello world").value(),
            std::vector<TokenId>({id_of("hello"), id_of(" wor"), id_of("l"), id_of("d")}));
  std::mt19937 rng(5);
  for (int iter = 0; iter < 400; ++iter) {
    // One letter run (one piece), up to 200 bytes: exercises the short and long merge paths.
    std::string piece;
    int len = 1 + static_cast<int>(rng() % 200);
    for (int i = 0; i < len; ++i) piece.push_back("ab"[rng() % 2]);
    std::vector<TokenId> want;
    for (const auto& part : syn.Reference(piece)) want.push_back(id_of(part));
    auto got = pairs->Encode(piece).value();
    ASSERT_EQ(got, want) << piece;
    ASSERT_EQ(strings->Encode(piece).value(), want) << piece;
  }
  EXPECT_EQ(pairs->Encode("ab<|end|>ab").value(),
            std::vector<TokenId>({id_of("ab"), 100000, id_of("ab")}));
}

TEST(BpeTest, BadMergesAreClearErrors) {
  Synthetic syn;
  syn.merges = {{"a", "b"}};
  auto j = syn.Json(true);
  j["model"]["merges"].push_back("x y z");
  fs::path p = fs::temp_directory_path() / ("bpe_bad" + std::to_string(::getpid()) + ".json");
  std::ofstream(p) << j.dump();
  auto r = Tokenizer::FromTokenizerJson(p.string());
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("merge 1"), std::string::npos) << r.status().ToString();
  j = syn.Json(false);
  j["model"]["merges"].push_back({"q", "zz"});
  std::ofstream(p) << j.dump();
  r = Tokenizer::FromTokenizerJson(p.string());
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("not in the vocab"), std::string::npos);
  fs::remove(p);
}

}  // namespace
}  // namespace qilin::tokenizer
