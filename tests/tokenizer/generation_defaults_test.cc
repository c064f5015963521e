// GenerationDefaults from generation_config.json / config.json / tokenizer_config.json, and
// Qwen v1's chat_format. Expected ids are Qwen's published ones (<|endoftext|> 151643,
// <|im_start|> 151644, <|im_end|> 151645).
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "tokenizer/tokenizer.h"
#include "tokenizer_test_util.h"

namespace qilin::tokenizer {
namespace {

namespace fs = std::filesystem;

class GenerationDefaultsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("qilin_gen_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  void Write(const std::string& name, const std::string& text) {
    std::ofstream(dir_ / name) << text;
  }
  Result<GenerationDefaults> Read(std::shared_ptr<const Tokenizer> tok) {
    return tok->ReadGenerationDefaults(dir_.string());
  }
  fs::path dir_;
};

TEST_F(GenerationDefaultsTest, Qwen3TokenizerConfigOnly) {
  Write("tokenizer_config.json",
        R"({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": null})");
  auto d = Read(testing::JsonTokenizer()).value();
  EXPECT_EQ(d.eos_token_ids, std::vector<TokenId>({151645}));
  EXPECT_EQ(d.pad_token_id, 151643);
  EXPECT_FALSE(d.bos_token_id.has_value());
}

TEST_F(GenerationDefaultsTest, GenerationConfigWinsAndKeepsTheList) {
  Write("tokenizer_config.json", R"({"eos_token": {"content": "<|im_end|>"}})");
  Write("config.json", R"({"eos_token_id": 151643, "bos_token_id": 151643})");
  Write("generation_config.json", R"({"eos_token_id": [151645, 151643], "pad_token_id": 151643})");
  auto d = Read(testing::JsonTokenizer()).value();
  EXPECT_EQ(d.eos_token_ids, std::vector<TokenId>({151645, 151643}));
  EXPECT_EQ(d.pad_token_id, 151643);
  EXPECT_EQ(d.bos_token_id, 151643);  // from config.json
}

TEST_F(GenerationDefaultsTest, ConfigJsonOverTokenizerConfig) {
  Write("tokenizer_config.json", R"({"eos_token": "<|im_end|>"})");
  Write("config.json", R"({"eos_token_id": 151643})");
  EXPECT_EQ(Read(testing::JsonTokenizer())->eos_token_ids, std::vector<TokenId>({151643}));
}

TEST_F(GenerationDefaultsTest, QwenV1ChatFormat) {
  auto v1 = testing::TiktokenTokenizer();
  ASSERT_TRUE(v1);
  // Qwen-7B-Chat as published: chat_format chatml, eos/pad <|endoftext|>.
  Write("generation_config.json",
        R"({"chat_format": "chatml", "eos_token_id": 151643, "pad_token_id": 151643,
            "max_window_size": 6144})");
  auto d = Read(v1).value();
  EXPECT_EQ(d.eos_token_ids, std::vector<TokenId>({151645, 151643}));
  EXPECT_EQ(d.pad_token_id, 151643);
  // Patched by hand to stop at <|im_end|>: still both, no duplicates.
  Write("generation_config.json", R"({"chat_format": "chatml", "eos_token_id": 151645})");
  d = Read(v1).value();
  EXPECT_EQ(d.eos_token_ids, std::vector<TokenId>({151645, 151643}));
  EXPECT_EQ(d.pad_token_id, 151643);
  // raw (Qwen-7B base): what generation_config says.
  Write("generation_config.json",
        R"({"chat_format": "raw", "eos_token_id": 151643, "pad_token_id": 151643})");
  d = Read(v1).value();
  EXPECT_EQ(d.eos_token_ids, std::vector<TokenId>({151643}));
}

TEST_F(GenerationDefaultsTest, BadValuesNameKeyAndFile) {
  auto tok = testing::JsonTokenizer();
  Write("generation_config.json", R"({"chat_format": "xml"})");
  auto r = Read(tok);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("xml"), std::string::npos);
  Write("generation_config.json", R"({"eos_token_id": "abc"})");
  r = Read(tok);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("eos_token_id"), std::string::npos);
  EXPECT_NE(r.status().message().find("generation_config.json"), std::string::npos);
  Write("generation_config.json", "{not json");
  r = Read(tok);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("generation_config.json"), std::string::npos);
  fs::remove(dir_ / "generation_config.json");
  Write("tokenizer_config.json", R"({"eos_token": "<|no such token|>"})");
  r = Read(tok);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("<|no such token|>"), std::string::npos);
}

TEST_F(GenerationDefaultsTest, LoadQwenV1Folder) {
  fs::create_symlink(fs::path(testing::DataDir()) / "qwen.tiktoken", dir_ / "qwen.tiktoken");
  Write("generation_config.json", R"({"chat_format": "chatml", "eos_token_id": 151643})");
  auto tok = Tokenizer::Load(dir_.string());
  ASSERT_TRUE(tok.ok()) << tok.status().ToString();
  EXPECT_EQ((*tok)->generation_defaults().eos_token_ids, std::vector<TokenId>({151645, 151643}));
  EXPECT_TRUE((*tok)->chat_template().is_builtin_chatml());
  EXPECT_EQ((*tok)->Encode("Hello, world!").value(), std::vector<TokenId>({9707, 11, 1879, 0}));
}

TEST_F(GenerationDefaultsTest, CorruptTokenizerFilesAreClearErrors) {
  Write("tokenizer.json", R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []},
                              "pre_tokenizer": {"type": "Whitespace"}})");
  auto r = Tokenizer::Load(dir_.string());
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("Whitespace"), std::string::npos) << r.status().ToString();
  fs::remove(dir_ / "tokenizer.json");
  Write("qwen.tiktoken", "IQ== 0\nnot-base64!! 1\n");
  r = Tokenizer::Load(dir_.string());
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find(":2:"), std::string::npos) << r.status().ToString();
  Write("qwen.tiktoken", "IQ== 0\n");
  r = Tokenizer::Load(dir_.string());
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("0x00"), std::string::npos) << r.status().ToString();
}

}  // namespace
}  // namespace qilin::tokenizer
