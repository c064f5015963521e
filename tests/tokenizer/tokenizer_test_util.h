// Shared by the tokenizer tests: where the Qwen tokenizer data lives, and tokenizers loaded once.
#pragma once

#include <cstdlib>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "tokenizer/tokenizer.h"

namespace qilin::tokenizer::testing {

// ../shared/data/tokenizer beside the source tree (CI clones shared/ there); QILIN_TOKENIZER_DATA
// overrides it.
inline std::string DataDir() {
  if (const char* env = std::getenv("QILIN_TOKENIZER_DATA")) return env;
  return std::string(QILIN_SOURCE_DIR) + "/../shared/data/tokenizer";
}

inline std::string FixtureDir() {
  return std::string(QILIN_SOURCE_DIR) + "/tests/fixtures/tokenizer";
}

inline std::string ReadText(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Qwen3's tokenizer.json (loaded once per test binary).
inline std::shared_ptr<const Tokenizer> JsonTokenizer() {
  static std::shared_ptr<const Tokenizer> tok = [] {
    auto r = Tokenizer::Load(DataDir());
    if (!r.ok()) {
      ADD_FAILURE() << "cannot load the Qwen tokenizer from " << DataDir() << ": "
                    << r.status().ToString();
      return std::shared_ptr<const Tokenizer>();
    }
    return r.value();
  }();
  return tok;
}

// Qwen v1's qwen.tiktoken (loaded once per test binary).
inline std::shared_ptr<const Tokenizer> TiktokenTokenizer() {
  static std::shared_ptr<const Tokenizer> tok = [] {
    auto r = Tokenizer::FromTiktoken(DataDir() + "/qwen.tiktoken");
    if (!r.ok()) {
      ADD_FAILURE() << "cannot load qwen.tiktoken: " << r.status().ToString();
      return std::shared_ptr<const Tokenizer>();
    }
    return std::shared_ptr<const Tokenizer>(std::move(r).value());
  }();
  return tok;
}

struct GoldenRow {
  std::string text;
  std::vector<TokenId> ids;
};

inline std::vector<GoldenRow> ReadGolden(const std::string& path) {
  std::vector<GoldenRow> rows;
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    auto j = nlohmann::json::parse(line);
    rows.push_back({j["text"].get<std::string>(), j["ids"].get<std::vector<TokenId>>()});
  }
  return rows;
}

}  // namespace qilin::tokenizer::testing
