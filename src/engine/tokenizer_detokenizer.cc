#include "engine/tokenizer_detokenizer.h"

namespace qilin {
namespace {

tokenizer::StreamDecoder::Options DecoderOptions(bool skip_special) {
  tokenizer::StreamDecoder::Options o;
  o.skip_special_tokens = skip_special;  // stop strings: matched by the engine
  return o;
}

class TokenizerDetokenizer : public IncrementalDetokenizer {
 public:
  TokenizerDetokenizer(std::shared_ptr<const tokenizer::Tokenizer> tok, bool skip_special)
      : decoder_(std::move(tok), DecoderOptions(skip_special)) {}
  std::string Push(int32_t id) override {
    // Ids the model has but the tokenizer does not (padded vocabularies) decode to nothing.
    Result<std::string> text = decoder_.Push(id);
    return text.ok() ? std::move(text).value() : std::string();
  }
  std::string Flush() override { return decoder_.Finish(); }

 private:
  tokenizer::StreamDecoder decoder_;
};

}  // namespace

DetokenizerFactory MakeTokenizerDetokenizerFactory(
    std::shared_ptr<const tokenizer::Tokenizer> tokenizer, bool skip_special_tokens) {
  return [tokenizer, skip_special_tokens](const std::vector<int32_t>&) {
    return std::make_unique<TokenizerDetokenizer>(tokenizer, skip_special_tokens);
  };
}

}  // namespace qilin
