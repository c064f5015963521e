// StreamDecoder: ids in, final text deltas out; never splits a character, never emits text past a
// stop string.
#include "tokenizer/tokenizer.h"
#include "tokenizer/unicode.h"

namespace qilin::tokenizer {

StreamDecoder::StreamDecoder(std::shared_ptr<const Tokenizer> tokenizer, Options options)
    : tok_(std::move(tokenizer)), opts_(std::move(options)) {
  // Empty or invalid UTF-8 stop strings can never match decoded text at a character boundary.
  std::erase_if(opts_.stop, [](const std::string& s) {
    return s.empty() || FindInvalidUtf8(s) != std::string_view::npos;
  });
  for (const auto& s : opts_.stop) max_stop_ = std::max(max_stop_, s.size());
}

// text: newly final decoded text. Searches held + text for a stop string; returns what can be
// emitted and keeps the longest suffix that could still begin one.
std::string StreamDecoder::Release(std::string text, bool final) {
  if (opts_.stop.empty()) return text;
  size_t search_from = held_text_.size() >= max_stop_ ? held_text_.size() - max_stop_ + 1 : 0;
  std::string buf = std::move(held_text_);
  held_text_.clear();
  buf += text;
  // Earliest stop string occurrence (the first one the output reaches).
  size_t best = std::string::npos;
  const std::string* which = nullptr;
  for (const auto& s : opts_.stop) {
    size_t at = buf.find(s, search_from);
    if (at != std::string::npos &&
        (best == std::string::npos || at < best || (at == best && s.size() > which->size()))) {
      best = at;
      which = &s;
    }
  }
  if (which) {
    stopped_ = true;
    matched_stop_ = *which;
    size_t end = opts_.include_stop_str_in_output ? best + which->size() : best;
    buf.resize(end);
    return buf;
  }
  if (final) return buf;
  // Hold the longest suffix of buf that is a proper prefix of some stop string.
  size_t hold = 0;
  for (const auto& s : opts_.stop) {
    size_t max_len = std::min(s.size() - 1, buf.size());
    for (size_t len = max_len; len > hold; --len) {
      if (buf.compare(buf.size() - len, len, s, 0, len) == 0) {
        hold = len;
        break;
      }
    }
  }
  held_text_ = buf.substr(buf.size() - hold);
  buf.resize(buf.size() - hold);
  return buf;
}

Result<std::string> StreamDecoder::Push(TokenId id) {
  if (stopped_) return std::string();
  if (id < 0 || id >= tok_->vocab_size() || (tok_->TokenBytes(id).empty() && !tok_->IsAdded(id))) {
    return InvalidArgument("token id {} is not in the vocabulary (size {})", id,
                           tok_->vocab_size());
  }
  if (opts_.skip_special_tokens && tok_->IsSpecial(id)) return std::string();
  pending_bytes_ += tok_->TokenBytes(id);
  std::string text;
  size_t used = AppendUtf8Lossy(pending_bytes_, /*hold_incomplete_tail=*/true, &text);
  pending_bytes_.erase(0, used);
  return Release(std::move(text), /*final=*/false);
}

std::string StreamDecoder::Finish() {
  if (stopped_) return std::string();
  std::string text;
  AppendUtf8Lossy(pending_bytes_, /*hold_incomplete_tail=*/false, &text);
  pending_bytes_.clear();
  return Release(std::move(text), /*final=*/true);
}

}  // namespace qilin::tokenizer
