// libFuzzer: encode/decode/stream-decode arbitrary bytes with Qwen's tokenizer.json.
// Checks: no crash or sanitizer report; valid UTF-8 input encodes and decodes back to its NFC;
// invalid input is refused; decoding any ids in range never fails; stream deltas concatenate
// to Decode cut at the stop string. The tokenizer folder: $QILIN_TOKENIZER_DATA or
// ../shared/data/tokenizer beside the source tree.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "tokenizer/tokenizer.h"
#include "tokenizer/unicode.h"

using namespace qilin::tokenizer;

static std::shared_ptr<const Tokenizer> g_tok;

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  const char* env = std::getenv("QILIN_TOKENIZER_DATA");
  std::string dir = env ? env : std::string(QILIN_SOURCE_DIR) + "/../shared/data/tokenizer";
  auto r = Tokenizer::Load(dir);
  if (!r.ok()) {
    std::fprintf(stderr, "fuzz_tokenizer: %s\n", r.status().ToString().c_str());
    std::abort();
  }
  g_tok = r.value();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const bool allow_special = data[0] & 1;
  std::string text(reinterpret_cast<const char*>(data) + 1, size - 1);
  auto ids = g_tok->Encode(text, allow_special);
  const bool valid = FindInvalidUtf8(text) == std::string_view::npos;
  if (ids.ok() != valid) __builtin_trap();
  if (valid) {
    std::string nfc;
    auto changed = NormalizeNfc(text, &nfc);
    if (!changed.ok()) __builtin_trap();
    auto back = g_tok->Decode(*ids);
    if (!back.ok() || *back != (*changed ? nfc : text)) __builtin_trap();
  }
  // The input bytes as token ids (3 bytes each), decoded whole and streamed.
  std::vector<TokenId> raw;
  for (size_t i = 0; i + 3 <= size; i += 3) {
    raw.push_back(static_cast<TokenId>((data[i] | data[i + 1] << 8 | data[i + 2] << 16) %
                                       g_tok->vocab_size()));
  }
  const bool skip = size & 1;
  auto full = g_tok->Decode(raw, skip);
  if (!full.ok()) __builtin_trap();
  StreamDecoder::Options opts;
  opts.skip_special_tokens = skip;
  if (size > 4) opts.stop.push_back(std::string(reinterpret_cast<const char*>(data) + 1, 2));
  StreamDecoder dec(g_tok, opts);
  std::string joined;
  for (TokenId id : raw) {
    auto d = dec.Push(id);
    if (!d.ok()) __builtin_trap();
    joined += *d;
  }
  joined += dec.Finish();
  // Reference: the whole decode cut at the first occurrence of a (valid UTF-8) stop string.
  std::string expect = *full;
  if (!opts.stop.empty() && FindInvalidUtf8(opts.stop[0]) == std::string_view::npos) {
    size_t at = full->find(opts.stop[0]);
    if (at != std::string::npos) expect.resize(at);
  }
  if (joined != expect) __builtin_trap();
  return 0;
}
