// qilin's tokenizer: Qwen's byte-level BPE (from tokenizer.json, or qwen.tiktoken for Qwen v1),
// a streaming detokenizer, chat templates and the generation defaults (eos/pad/bos) of a model
// folder. Ids are exactly Hugging Face tokenizers' (and tiktoken's for qwen.tiktoken).
//
//   QILIN_ASSIGN_OR_RETURN(auto tok, Tokenizer::Load("models/Qwen3-0.6B"));
//   QILIN_ASSIGN_OR_RETURN(std::string prompt, tok->chat_template().Render(messages, {}));
//   QILIN_ASSIGN_OR_RETURN(std::vector<TokenId> ids, tok->Encode(prompt));
//   StreamDecoder::Options opts;  // skips special tokens by default
//   opts.stop = {"\n\n"};
//   StreamDecoder dec(tok, opts);
//   for (TokenId id : generated) out += dec.Push(id).value();  out += dec.Finish();
//
// Thread safety: a loaded Tokenizer is immutable; Encode/Decode/Render may run on any number of
// threads at once. A StreamDecoder belongs to one request (one thread at a time).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/status.h"
#include "tokenizer/bpe.h"

namespace qilin::tokenizer {

namespace jinja {
class Template;
}

// Special ids a model folder declares (generation_config.json, config.json,
// tokenizer_config.json; Qwen v1's `chat_format`).
struct GenerationDefaults {
  std::vector<TokenId> eos_token_ids;  // generation stops at any of these
  std::optional<TokenId> pad_token_id;
  std::optional<TokenId> bos_token_id;
};

struct ChatTemplateOptions {
  bool add_generation_prompt = true;
  nlohmann::ordered_json tools;  // null, or an array of tool (function) schemas
  // Further template variables, e.g. {"enable_thinking": false} for Qwen3.
  nlohmann::ordered_json extra = nlohmann::ordered_json::object();
};

// A chat template: a Jinja template from tokenizer_config.json (rendered as Hugging Face's
// apply_chat_template does), or the built-in ChatML used when a model ships none (Qwen v1).
class ChatTemplate {
 public:
  // The built-in ChatML: "<|im_start|>{role}\n{content}<|im_end|>\n" per message, a default
  // system message "You are a helpful assistant." when the first message is not a system one
  // (as Qwen-7B-Chat's make_context), and "<|im_start|>assistant\n" as the generation prompt.
  static ChatTemplate ChatML();
  // Parses a Jinja chat template (a subset of Jinja2 covering Qwen's templates). bos/eos are
  // the bos_token/eos_token variables the template sees.
  static Result<ChatTemplate> FromJinja(std::string_view source, std::string bos_token = "",
                                        std::string eos_token = "");

  // messages: an array of {"role": ..., "content": ..., ["tool_calls": ...]} objects. Ordered
  // JSON keeps the keys' order, which |tojson writes out (as Python's dicts do).
  Result<std::string> Render(const nlohmann::ordered_json& messages,
                             const ChatTemplateOptions& options = {}) const;
  bool is_builtin_chatml() const { return tmpl_ == nullptr; }

 private:
  std::shared_ptr<const jinja::Template> tmpl_;  // null: built-in ChatML
  std::string bos_token_, eos_token_;
};

class Tokenizer {
 public:
  // Loads a folder holding tokenizer.json (Qwen2/2.5/3) or qwen.tiktoken (Qwen v1), plus the
  // optional tokenizer_config.json, generation_config.json and config.json.
  static Result<std::shared_ptr<const Tokenizer>> Load(const std::string& dir);
  // The loaders Load uses, for one file each.
  static Result<std::shared_ptr<Tokenizer>> FromTokenizerJson(const std::string& path);
  // Qwen v1: base64 token bytes + rank per line; specials <|endoftext|>, <|im_start|>,
  // <|im_end|>, <|extra_0|>..<|extra_204|> follow the last rank; NFC applies first.
  static Result<std::shared_ptr<Tokenizer>> FromTiktoken(const std::string& path);

  // Text -> ids. allow_special: added tokens in the text (e.g. "<|im_end|>") become their ids;
  // when false, special added tokens are encoded as plain text (non-special added tokens such
  // as Qwen3's <think> are still matched, as Hugging Face's split_special_tokens does).
  // Fails only on invalid UTF-8 (naming the byte offset).
  Result<std::vector<TokenId>> Encode(std::string_view text, bool allow_special = true) const;
  // Encodes many texts over num_threads threads (0: all cores). Output order = input order.
  Result<std::vector<std::vector<TokenId>>> EncodeBatch(const std::vector<std::string>& texts,
                                                        bool allow_special = true,
                                                        int num_threads = 0) const;
  // Ids -> text. Bytes that are not valid UTF-8 become U+FFFD as Hugging Face's decode does
  // (String::from_utf8_lossy). Fails on an id outside [0, vocab_size()) or unassigned.
  Result<std::string> Decode(std::span<const TokenId> ids, bool skip_special = false) const;

  // Number of ids, added tokens included (one past the largest id).
  int vocab_size() const { return static_cast<int>(id_bytes_.size()); }
  // Token string as tokenizer.json spells it (byte-level characters) or an added token's text.
  std::optional<TokenId> TokenToId(std::string_view token) const;
  Result<std::string> IdToToken(TokenId id) const;
  // The raw bytes of a token (empty for an unassigned or out-of-range id).
  std::string_view TokenBytes(TokenId id) const {
    return (id >= 0 && id < vocab_size()) ? std::string_view(id_bytes_[id]) : std::string_view();
  }
  bool IsSpecial(TokenId id) const {
    return id >= 0 && id < vocab_size() && (flags_[id] & kSpecial);
  }
  bool IsAdded(TokenId id) const { return id >= 0 && id < vocab_size() && (flags_[id] & kAdded); }

  const GenerationDefaults& generation_defaults() const { return defaults_; }
  const ChatTemplate& chat_template() const { return chat_template_; }

  // Reads eos/pad/bos from a folder's generation_config.json, config.json and
  // tokenizer_config.json (that order of precedence), with Qwen v1's chat_format rule:
  // "chatml" -> eos {<|im_end|>, <|endoftext|>}; "raw" -> eos/pad from generation_config.
  Result<GenerationDefaults> ReadGenerationDefaults(const std::string& dir) const;

 private:
  struct Added {
    std::string content;
    TokenId id;
    bool special;
  };
  static constexpr uint8_t kSpecial = 1, kAdded = 2;

  Status AddToken(TokenId id, std::string bytes, uint8_t flags);
  Status Finish();  // builds the added-token matcher; checks the byte tokens
  // Leftmost-longest added token in text[from:]; returns false when none.
  bool FindAdded(std::string_view text, size_t from, bool allow_special, size_t* pos,
                 const Added** match) const;
  Status EncodeOrdinary(std::string_view text, std::vector<TokenId>* out) const;
  void EncodeNormalized(std::string_view text, std::vector<TokenId>* out) const;

  BpeModel bpe_;
  bool nfc_ = false;
  bool whole_piece_lookup_ = false;  // tiktoken / ignore_merges: a piece in the vocab is one token
  std::vector<std::string> id_bytes_;
  std::vector<uint8_t> flags_;
  std::vector<Added> added_;  // sorted by length, longest first
  bool added_first_byte_[256] = {};
  struct StringHash {
    using is_transparent = void;
    size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
  };
  std::unordered_map<std::string, TokenId, StringHash, std::equal_to<>> bytes_to_id_;
  uint64_t instance_id_ = 0;
  GenerationDefaults defaults_;
  ChatTemplate chat_template_ = ChatTemplate::ChatML();
};

// Incremental detokenizer for one generated sequence: Push ids one at a time and get text
// deltas whose concatenation equals Decode(all ids) (up to a stop string). A character whose
// bytes span several tokens is held until complete (never a U+FFFD mid-stream for it), and text
// that could be the start of a stop string is held until it is known not to be one.
class StreamDecoder {
 public:
  struct Options {
    bool skip_special_tokens = true;
    // Stop strings, matched across token boundaries (empty or invalid UTF-8 ones never match).
    std::vector<std::string> stop;
    bool include_stop_str_in_output = false;
  };
  StreamDecoder(std::shared_ptr<const Tokenizer> tokenizer, Options options);

  // Text that became final with this id (often empty). After a stop string: always empty.
  Result<std::string> Push(TokenId id);
  // End of generation: returns all held text (incomplete bytes become U+FFFD).
  std::string Finish();
  bool stopped() const { return stopped_; }
  // The stop string that ended the stream (empty when none).
  const std::string& matched_stop() const { return matched_stop_; }

 private:
  std::string Release(std::string text, bool final);

  std::shared_ptr<const Tokenizer> tok_;
  Options opts_;
  std::string pending_bytes_;  // an incomplete UTF-8 character
  std::string held_text_;      // decoded text that may begin a stop string
  size_t max_stop_ = 0;
  bool stopped_ = false;
  std::string matched_stop_;
};

}  // namespace qilin::tokenizer
