// ModelPipeline on the bundled demo model: tokenization and templating against hand-built
// references, greedy output against the runtime's plain greedy loop (no engine, no batching),
// stop strings, limits and cancellation.
#include "pipeline/pipeline.h"

#include <chrono>
#include <filesystem>
#include <thread>

#include <gtest/gtest.h>

#include "model/weights.h"
#include "runtime/backend_factory.h"
#include "runtime/greedy_generate.h"

namespace qilin::pipeline {
namespace {

const std::string kDemo = std::string(QILIN_SOURCE_DIR) + "/models/demo";

class PipelineTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    PipelineOptions o;
    o.device = "cpu";
    o.engine.kv_cache_tokens = 8192;
    o.served_model_name = "austen";
    auto p = ModelPipeline::Create(kDemo, o);
    ASSERT_TRUE(p.ok()) << p.status().ToString();
    pipe_ = std::move(p).value().release();
  }
  static void TearDownTestSuite() {
    delete pipe_;
    pipe_ = nullptr;
  }

  struct Out {
    std::vector<std::string> text;
    std::vector<std::vector<int32_t>> tokens;
    std::vector<FinishReason> finish;
  };
  static Out Collect(Generation& g) {
    Out o;
    o.text.resize(g.n());
    o.tokens.resize(g.n());
    o.finish.resize(g.n());
    while (auto d = g.Next()) {
      o.text[d->index] += d->text;
      o.tokens[d->index].insert(o.tokens[d->index].end(), d->token_ids.begin(), d->token_ids.end());
      if (d->finished()) o.finish[d->index] = d->finish_reason;
    }
    return o;
  }
  // 16 greedy tokens of one prompt from `a` and `b`: the same ids and text.
  static void ExpectSameGreedyText(ModelPipeline& a, ModelPipeline& b) {
    GenerateParams params;
    params.sampling.temperature = 0;
    params.sampling.max_tokens = 16;
    params.sampling.ignore_eos = true;
    auto ga = a.Submit(GenerateInput::Text("Miss Bennet"), params);
    auto gb = b.Submit(GenerateInput::Text("Miss Bennet"), params);
    ASSERT_TRUE(ga.ok() && gb.ok());
    const Out oa = Collect(*ga.value()), ob = Collect(*gb.value());
    ASSERT_EQ(ob.tokens[0].size(), 16u);
    EXPECT_EQ(oa.tokens[0], ob.tokens[0]);
    EXPECT_EQ(oa.text[0], ob.text[0]);
  }

  static ModelPipeline* pipe_;
};
ModelPipeline* PipelineTest::pipe_ = nullptr;

TEST_F(PipelineTest, Info) {
  const ModelInfo& info = pipe_->info();
  EXPECT_EQ(info.name, "austen");
  EXPECT_EQ(info.max_model_len, 512);  // config.json max_position_embeddings
  EXPECT_EQ(info.vocab_size, 151936);
  // <|endoftext|> from both generation_config.json and config.json, once.
  EXPECT_EQ(info.eos_token_ids, std::vector<int32_t>{151643});
  EXPECT_EQ(info.kv_blocks * info.block_size, 8192);
}

TEST_F(PipelineTest, ChatTemplateMatchesHandWrittenChatML) {
  nlohmann::ordered_json messages = nlohmann::ordered_json::array();
  messages.push_back({{"role", "system"}, {"content", "Be brief."}});
  messages.push_back({{"role", "user"}, {"content", "Hi"}});
  auto ids = pipe_->Tokenize(GenerateInput::Chat(messages));
  ASSERT_TRUE(ids.ok()) << ids.status().ToString();
  // Qwen's ChatML: 151644 <|im_start|>, 151645 <|im_end|>, 198 "\n".
  const std::string reference =
      "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
      "<|im_start|>assistant\n";
  auto want = pipe_->tokenizer().Encode(reference, /*allow_special=*/true);
  ASSERT_TRUE(want.ok());
  EXPECT_EQ(ids.value(), want.value());
  EXPECT_EQ(ids.value().front(), 151644);
  // A text prompt keeps special-token text as plain text.
  auto plain = pipe_->Tokenize(GenerateInput::Text("<|im_end|>"));
  ASSERT_TRUE(plain.ok());
  EXPECT_GT(plain.value().size(), 1u);
}

TEST_F(PipelineTest, GreedyMatchesThePlainGreedyLoop) {
  const std::string prompt = "It is a truth universally acknowledged";
  GenerateParams params;
  params.sampling.temperature = 0;
  params.sampling.max_tokens = 24;
  params.sampling.ignore_eos = true;
  auto g = pipe_->Submit(GenerateInput::Text(prompt), params);
  ASSERT_TRUE(g.ok()) << g.status().ToString();
  Out out = Collect(*g.value());
  EXPECT_EQ(out.finish[0], FinishReason::kLength);
  EXPECT_EQ(g.value()->completion_tokens(), 24);

  // Reference: the runtime's one-sequence greedy loop on a separate backend.
  auto config = LoadModelConfig(kDemo);
  ASSERT_TRUE(config.ok());
  auto weights = LoadModelWeights(config.value(), kDemo);
  ASSERT_TRUE(weights.ok());
  auto backend = MakeBackend("cpu", config.value(), std::move(weights).value());
  ASSERT_TRUE(backend.ok());
  GreedyRequest req;
  req.prompt_ids = pipe_->Tokenize(GenerateInput::Text(prompt)).value();
  EXPECT_EQ(g.value()->prompt_tokens(), static_cast<int32_t>(req.prompt_ids.size()));
  req.max_tokens = 24;
  req.ignore_eos = true;
  ASSERT_TRUE(backend.value()->AllocateKvCache({GreedyBlocksNeeded(req, 32), 32}).ok());
  auto ref = GenerateGreedy(*backend.value(), req);
  ASSERT_TRUE(ref.ok()) << ref.status().ToString();
  std::vector<int32_t> ref_tokens = ref.value();
  if (ref_tokens.size() > 24) {  // some loops return prompt + output
    ref_tokens.erase(ref_tokens.begin(), ref_tokens.end() - 24);
  }
  EXPECT_EQ(out.tokens[0], ref_tokens);
  EXPECT_EQ(out.text[0], pipe_->tokenizer().Decode(out.tokens[0], true).value());
}

TEST_F(PipelineTest, StopStringCutsTheText) {
  GenerateParams params;
  params.sampling.temperature = 0;
  params.sampling.max_tokens = 40;
  params.sampling.ignore_eos = true;
  auto full = pipe_->Submit(GenerateInput::Text("Mr. Darcy said that"), params);
  ASSERT_TRUE(full.ok());
  const std::string text = Collect(*full.value()).text[0];
  ASSERT_GT(text.size(), 10u);
  // A stop string taken from the middle of the greedy text.
  const std::string stop = text.substr(text.size() / 2, 3);
  const std::string want = text.substr(0, text.find(stop));
  params.sampling.stop = {stop};
  auto cut = pipe_->Submit(GenerateInput::Text("Mr. Darcy said that"), params);
  ASSERT_TRUE(cut.ok());
  Out out = Collect(*cut.value());
  EXPECT_EQ(out.text[0], want);
  EXPECT_EQ(out.finish[0], FinishReason::kStop);
}

TEST_F(PipelineTest, SeededSamplesRepeatAndNGivesNSamples) {
  GenerateParams params;
  params.sampling.temperature = 1.0;
  params.sampling.max_tokens = 12;
  params.sampling.seed = 1234;
  params.sampling.n = 3;
  auto a = pipe_->Submit(GenerateInput::Text("Emma"), params);
  auto b = pipe_->Submit(GenerateInput::Text("Emma"), params);
  ASSERT_TRUE(a.ok() && b.ok());
  Out oa = Collect(*a.value()), ob = Collect(*b.value());
  ASSERT_EQ(oa.tokens.size(), 3u);
  EXPECT_EQ(oa.tokens, ob.tokens);
  for (const auto& t : oa.tokens) EXPECT_FALSE(t.empty());
}

TEST_F(PipelineTest, LimitsAreClearErrors) {
  GenerateParams params;
  params.sampling.max_tokens = 16;
  std::vector<int32_t> long_prompt(600, 100);
  auto r = pipe_->Submit(GenerateInput::Tokens(long_prompt), params);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(HttpStatusFor(r.status()), 400);
  EXPECT_NE(r.status().message().find("512"), std::string::npos) << r.status().message();
  EXPECT_NE(r.status().message().find("600"), std::string::npos);

  params.sampling.max_tokens = 510;
  r = pipe_->Submit(GenerateInput::Tokens({1, 2, 3, 4}), params);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("at most 508"), std::string::npos) << r.status().message();

  params.sampling.max_tokens = 4;
  r = pipe_->Submit(GenerateInput::Tokens({1, 999999}), params);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("999999"), std::string::npos);
  r = pipe_->Submit(GenerateInput::Text(""), params);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(HttpStatusFor(r.status()), 400);
  r = pipe_->Submit(GenerateInput::Text(std::string("a\xff", 2)), params);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(HttpStatusFor(r.status()), 400);

  params.max_tokens_auto = true;  // chat without max_tokens: up to the model length
  auto g = pipe_->Submit(GenerateInput::Tokens({1, 2, 3, 4}), params);
  ASSERT_TRUE(g.ok());
  g.value()->Cancel();
  Collect(*g.value());
}

TEST_F(PipelineTest, CancelFreesTheBlocks) {
  GenerateParams params;
  params.sampling.max_tokens = 400;
  params.sampling.ignore_eos = true;
  auto g = pipe_->Submit(GenerateInput::Text("Elizabeth"), params);
  ASSERT_TRUE(g.ok());
  auto first = g.value()->Next();
  ASSERT_TRUE(first.has_value());
  g.value()->Cancel();
  Out out = Collect(*g.value());
  EXPECT_EQ(out.finish[0], FinishReason::kAbort);
  EXPECT_LT(g.value()->completion_tokens(), 400);
  // The engine publishes its stats after each step: wait for an idle one.
  for (int i = 0; i < 200 && pipe_->stats().kv_blocks_used != 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_EQ(pipe_->stats().kv_blocks_used, 0);
  EXPECT_EQ(pipe_->stats().running, 0);
}

// `serve --tp 2`: the demo sharded over two CPU ranks answers as the unsharded pipeline does.
TEST_F(PipelineTest, TensorParallelTwoRanksGivesTheSameGreedyText) {
  PipelineOptions o;
  o.device = "cpu";
  o.engine.kv_cache_tokens = 2048;
  o.tp = 2;
  auto tp = ModelPipeline::Create(kDemo, o);
  ASSERT_TRUE(tp.ok()) << tp.status().ToString();
  ExpectSameGreedyText(*pipe_, *tp.value());

  o.tp = 3;  // 4 heads, 2 KV heads: does not divide
  auto bad = ModelPipeline::Create(kDemo, o);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("3"), std::string::npos) << bad.status().message();
}

// `serve --tp 2 --tp-launch process`: rank 1 is a `qilin tp-worker` process; the answers are the
// unsharded pipeline's. A worker that cannot start fails the pipeline with its rank.
TEST_F(PipelineTest, TensorParallelProcessRanksGiveTheSameGreedyText) {
  const std::string qilin = std::string(QILIN_BINARY_DIR) + "/qilin";
  if (!std::filesystem::exists(qilin)) GTEST_SKIP() << "the qilin binary is not built";
  PipelineOptions o;
  o.device = "cpu";
  o.engine.kv_cache_tokens = 2048;
  o.tp = 2;
  o.tp_launch.mode = "process";
  o.tp_launch.worker_binary = qilin;
  auto tp = ModelPipeline::Create(kDemo, o);
  ASSERT_TRUE(tp.ok()) << tp.status().ToString();
  ExpectSameGreedyText(*pipe_, *tp.value());
  tp.value().reset();  // shuts the worker down and reaps it

  o.tp_launch.worker_binary = "/nonexistent/qilin";
  const auto t0 = std::chrono::steady_clock::now();
  auto bad = ModelPipeline::Create(kDemo, o);
  ASSERT_FALSE(bad.ok());
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 10.0);
  EXPECT_NE(bad.status().message().find("tensor parallel rank 1 (tp-worker process) exited"),
            std::string::npos)
      << bad.status().message();
}

TEST(PipelineCreate, BadDirectoryNamesIt) {
  auto p = ModelPipeline::Create("/nonexistent/model", {});
  ASSERT_FALSE(p.ok());
  EXPECT_NE(p.status().message().find("/nonexistent/model"), std::string::npos);
}

// A folder with config.json alone (like configs/qwen2.5-7b) serves random weights with the demo's
// tokenizer: the output is the plain greedy loop's over the same seed-0 random weights.
TEST(PipelineCreate, DummyWeightsWithAnotherFoldersTokenizer) {
  const std::filesystem::path dir =
      std::filesystem::path(::testing::TempDir()) / "qilin_pipeline_config_only";
  std::filesystem::create_directories(dir);
  std::filesystem::copy_file(kDemo + "/config.json", dir / "config.json",
                             std::filesystem::copy_options::overwrite_existing);
  PipelineOptions o;
  o.device = "cpu";
  o.engine.kv_cache_tokens = 1024;
  o.dummy_weights = true;
  auto no_tok = ModelPipeline::Create(dir.string(), o);
  ASSERT_FALSE(no_tok.ok());
  EXPECT_NE(no_tok.status().message().find(dir.string()), std::string::npos)
      << no_tok.status().message();

  o.tokenizer_dir = kDemo;
  auto p = ModelPipeline::Create(dir.string(), o);
  ASSERT_TRUE(p.ok()) << p.status().ToString();
  GenerateParams params;
  params.sampling.temperature = 0;
  params.sampling.max_tokens = 6;
  params.sampling.ignore_eos = true;
  auto g = p.value()->Submit(GenerateInput::Text("Emma Woodhouse"), params);
  ASSERT_TRUE(g.ok()) << g.status().ToString();
  std::vector<int32_t> got;
  while (auto d = g.value()->Next())
    got.insert(got.end(), d->token_ids.begin(), d->token_ids.end());
  ASSERT_EQ(got.size(), 6u);

  auto config = LoadModelConfig(dir.string());
  ASSERT_TRUE(config.ok());
  auto backend = MakeDummyBackend("cpu", config.value(), DType::kBF16, 0);
  ASSERT_TRUE(backend.ok()) << backend.status().ToString();
  GreedyRequest req;
  req.prompt_ids = p.value()->Tokenize(GenerateInput::Text("Emma Woodhouse")).value();
  req.max_tokens = 6;
  req.ignore_eos = true;
  ASSERT_TRUE(backend.value()->AllocateKvCache({GreedyBlocksNeeded(req, 32), 32}).ok());
  auto ref = GenerateGreedy(*backend.value(), req);
  ASSERT_TRUE(ref.ok()) << ref.status().ToString();
  std::vector<int32_t> want = ref.value();
  if (want.size() > 6) want.erase(want.begin(), want.end() - 6);
  EXPECT_EQ(got, want);
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace qilin::pipeline
