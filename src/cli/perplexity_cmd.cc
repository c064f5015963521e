// `qilin perplexity`: held-out perplexity of a text file with the model folder's tokenizer, by the
// sliding windows of runtime/perplexity.h; prints {"ppl": ..., "tokens": ...}.
#include <fstream>
#include <iostream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include <spdlog/spdlog.h>
#include <nlohmann/json.hpp>

#include "cli/command.h"
#include "model/config.h"
#include "model/weights.h"
#include "runtime/backend_factory.h"
#include "runtime/perplexity.h"
#include "tokenizer/tokenizer.h"

namespace qilin::cli {
namespace {

struct PerplexityCmdOptions {
  std::string model_dir;
  std::string text_file;
  int64_t context = 0;  // 0: min(model maximum length, 512)
  std::string device = "cpu";
  int64_t batch_windows = 1;
};

template <typename T>
T OrThrow(Result<T> r) {
  if (!r.ok()) throw Error(r.status());
  return std::move(r).value();
}

int RunPerplexity(const PerplexityCmdOptions& o) {
  const ModelConfig config = OrThrow(LoadModelConfig(o.model_dir));
  const int64_t max_len = config.MaxModelLen();
  const int64_t context = o.context != 0 ? o.context : std::min<int64_t>(max_len, 512);
  if (context < 2 || context > max_len) {
    throw Error(InvalidArgument("--context = {} must be in [2, {}] (the model's maximum length)",
                                context, max_len));
  }
  if (o.batch_windows < 1 || o.batch_windows > 4096) {
    throw Error(InvalidArgument("--batch-windows = {} must be in [1, 4096]", o.batch_windows));
  }
  std::ifstream f(o.text_file, std::ios::binary);
  if (!f) throw Error(NotFound("--text: cannot open '{}'", o.text_file));
  std::ostringstream ss;
  ss << f.rdbuf();
  const std::string text = ss.str();
  if (text.empty()) throw Error(InvalidArgument("--text: '{}' is empty", o.text_file));

  auto tok = OrThrow(tokenizer::Tokenizer::Load(o.model_dir));
  // train.py encodes with tokenizers' Tokenizer.encode, which matches added (special) tokens in
  // the text: allow_special = true gives the same ids.
  const std::vector<tokenizer::TokenId> ids = OrThrow(tok->Encode(text, /*allow_special=*/true));
  if (ids.size() < 2) {
    throw Error(InvalidArgument("--text: '{}' has {} token(s); perplexity needs at least 2",
                                o.text_file, ids.size()));
  }
  spdlog::info("perplexity: {} tokens, context {}, stride {}", ids.size(), context, context / 2);
  ModelWeights weights = OrThrow(LoadModelWeights(config, o.model_dir));
  std::unique_ptr<Backend> backend = OrThrow(MakeBackend(o.device, config, std::move(weights)));
  PerplexityOptions po;
  po.context = context;
  po.batch_windows = static_cast<int32_t>(o.batch_windows);
  const PerplexityResult r = OrThrow(ComputePerplexity(*backend, ids, po));
  std::cout << nlohmann::json{{"ppl", r.ppl}, {"tokens", r.tokens}}.dump() << "\n";
  return 0;
}

RegisterCommand reg("perplexity", "perplexity of a text file (sliding windows, stride context/2)",
                    [](CLI::App& sub) {
                      auto o = std::make_shared<PerplexityCmdOptions>();
                      sub.add_option("--model", o->model_dir,
                                     "model directory (config.json, safetensors, tokenizer)")
                          ->required();
                      sub.add_option("--text", o->text_file, "UTF-8 text file")->required();
                      sub.add_option("--context", o->context,
                                     "window length (default: min(model maximum length, 512))");
                      sub.add_option("--device", o->device, "cpu or cuda")->capture_default_str();
                      sub.add_option("--batch-windows", o->batch_windows,
                                     "windows per forward pass")
                          ->capture_default_str();
                      return [o]() { return RunPerplexity(*o); };
                    });

}  // namespace
}  // namespace qilin::cli
