// `qilin tokenize`: JSON lines in and out, against the golden ids; bad lines name the line.
#include <gtest/gtest.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "tokenizer_test_util.h"

namespace qilin::tokenizer {
namespace {

namespace fs = std::filesystem;

struct RunResult {
  int status;
  std::string out;
};

RunResult RunQilin(const std::string& args) {
  std::string cmd = std::string(QILIN_BINARY_DIR) + "/qilin tokenize " + args + " 2>&1";
  FILE* p = popen(cmd.c_str(), "r");
  std::string out;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  return {pclose(p), out};
}

class TokenizeCmdTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!fs::exists(std::string(QILIN_BINARY_DIR) + "/qilin")) {
      GTEST_SKIP() << "the qilin binary is not built (build the `qilin` target)";
    }
    tmp_ = fs::temp_directory_path() / ("qilin_tokcmd_" + std::to_string(::getpid()));
    fs::create_directories(tmp_);
  }
  void TearDown() override { fs::remove_all(tmp_); }
  fs::path tmp_;
};

TEST_F(TokenizeCmdTest, EncodesAndDecodesGoldenRows) {
  auto rows = testing::ReadGolden(testing::DataDir() + "/qwen-golden.jsonl");
  {
    std::ofstream in(tmp_ / "in.jsonl");
    for (const auto& r : rows) in << nlohmann::json{{"text", r.text}}.dump() << "\n";
  }
  auto enc =
      RunQilin("--tokenizer " + testing::DataDir() + " --jsonl " + (tmp_ / "in.jsonl").string());
  ASSERT_EQ(enc.status, 0) << enc.out;
  std::istringstream lines(enc.out);
  std::string line;
  size_t i = 0;
  std::ofstream ids_file(tmp_ / "ids.jsonl");
  while (std::getline(lines, line)) {
    ASSERT_LT(i, rows.size());
    auto ids = nlohmann::json::parse(line)["ids"].get<std::vector<TokenId>>();
    EXPECT_EQ(ids, rows[i].ids) << "line " << i + 1;
    ids_file << line << "\n";
    ++i;
  }
  ids_file.close();
  EXPECT_EQ(i, rows.size());
  auto dec = RunQilin("--decode --tokenizer " + testing::DataDir() + " < " +
                      (tmp_ / "ids.jsonl").string());
  ASSERT_EQ(dec.status, 0) << dec.out.substr(0, 200);
  std::istringstream dlines(dec.out);
  i = 0;
  auto tok = testing::JsonTokenizer();
  while (std::getline(dlines, line)) {
    EXPECT_EQ(nlohmann::json::parse(line)["text"].get<std::string>(),
              tok->Decode(rows[i].ids).value());
    ++i;
  }
  EXPECT_EQ(i, rows.size());
}

TEST_F(TokenizeCmdTest, BadLinesNameTheLine) {
  std::ofstream(tmp_ / "bad.jsonl") << "{\"text\": \"ok\"}\n\n{\"txt\": 1}\n";
  auto r =
      RunQilin("--tokenizer " + testing::DataDir() + " --jsonl " + (tmp_ / "bad.jsonl").string());
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.out.find("line 3"), std::string::npos) << r.out;
  auto missing = RunQilin("--tokenizer /no/such/dir --jsonl " + (tmp_ / "bad.jsonl").string());
  EXPECT_NE(missing.status, 0);
  EXPECT_NE(missing.out.find("/no/such/dir"), std::string::npos) << missing.out;
}

}  // namespace
}  // namespace qilin::tokenizer
