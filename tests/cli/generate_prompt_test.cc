// `qilin generate --prompt` (with and without --chat) on the demo model: the prompt ids are the
// tokenizer's encoding of the text (or of the ChatML rendering written out here), the greedy
// continuation equals the one from --prompt-ids with those ids, and "text" decodes the output.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <string>

#include <nlohmann/json.hpp>

#include "tokenizer/tokenizer.h"

namespace qilin {
namespace {

namespace fs = std::filesystem;

struct RunResult {
  int status;
  std::string out;
};

// stdout (or with `errors`, stderr) of `qilin generate --model models/demo ARGS`.
RunResult RunGenerate(const std::string& args, bool errors = false) {
  std::string cmd = std::string(QILIN_BINARY_DIR) + "/qilin generate --model " + QILIN_SOURCE_DIR +
                    "/models/demo " + args + (errors ? " 2>&1 >/dev/null" : " 2>/dev/null");
  FILE* p = popen(cmd.c_str(), "r");
  std::string out;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  return {pclose(p), out};
}

std::string Join(const std::vector<int32_t>& ids) {
  std::string s;
  for (size_t i = 0; i < ids.size(); ++i) {
    if (i > 0) s += ',';
    s += std::to_string(ids[i]);
  }
  return s;
}

class GeneratePromptTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!fs::exists(std::string(QILIN_BINARY_DIR) + "/qilin")) {
      GTEST_SKIP() << "the qilin binary is not built (build the `qilin` target)";
    }
    auto t = tokenizer::Tokenizer::Load(std::string(QILIN_SOURCE_DIR) + "/models/demo");
    ASSERT_TRUE(t.ok()) << t.status().ToString();
    tok_ = *t;
  }
  // Runs --prompt with `extra` flags and checks it against --prompt-ids of `want_prompt`.
  void Check(const std::string& prompt_flags, const std::vector<int32_t>& want_prompt) {
    RunResult r = RunGenerate(prompt_flags + " --max-tokens 12");
    ASSERT_EQ(r.status, 0) << r.out;
    nlohmann::json j = nlohmann::json::parse(r.out);
    EXPECT_EQ(j["prompt_token_ids"].get<std::vector<int32_t>>(), want_prompt);
    RunResult by_ids = RunGenerate("--prompt-ids " + Join(want_prompt) + " --max-tokens 12");
    ASSERT_EQ(by_ids.status, 0) << by_ids.out;
    const auto ids = j["token_ids"].get<std::vector<int32_t>>();
    EXPECT_EQ(ids, nlohmann::json::parse(by_ids.out)["token_ids"].get<std::vector<int32_t>>());
    // The engine's detokenizer skips special tokens (the closing <|endoftext|>).
    EXPECT_EQ(j["text"].get<std::string>(), tok_->Decode(ids, /*skip_special=*/true).value());
  }
  std::shared_ptr<const tokenizer::Tokenizer> tok_;
};

TEST_F(GeneratePromptTest, PlainText) {
  const std::string text = "It is a truth universally acknowledged";
  Check("--prompt '" + text + "'", tok_->Encode(text).value());
}

TEST_F(GeneratePromptTest, ChatWithSystem) {
  // Qwen3's template (models/demo/tokenizer_config.json) with a system message and the generation
  // prompt, as Hugging Face's apply_chat_template renders it.
  const std::string rendered =
      "<|im_start|>system\nYou write like Jane Austen.<|im_end|>\n"
      "<|im_start|>user\nWho is Mr. Darcy?<|im_end|>\n<|im_start|>assistant\n";
  const std::vector<int32_t> want = tok_->Encode(rendered).value();
  ASSERT_EQ(want[0], 151644);  // <|im_start|> as one id
  Check("--chat --system 'You write like Jane Austen.' --prompt 'Who is Mr. Darcy?'", want);
}

TEST_F(GeneratePromptTest, BadFlags) {
  struct Case {
    std::string args, error;
  };
  for (const Case& c : {
           Case{"--prompt x --prompt-ids 1,2", "give exactly one of --prompt, --prompt-ids"},
           Case{"--prompt-ids 1,2 --chat", "--chat applies to --prompt"},
           Case{"--prompt x --system s", "--system is the chat's system message: it needs --chat"},
           Case{"--prompt ''", "--prompt: the prompt is empty"},
       }) {
    RunResult r = RunGenerate(c.args, /*errors=*/true);
    EXPECT_NE(r.status, 0) << c.args;
    EXPECT_NE(r.out.find(c.error), std::string::npos) << c.args << ": " << r.out;
  }
}

}  // namespace
}  // namespace qilin
