#include "tokenizer/tokenizer.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "tokenizer/pretokenizer.h"
#include "tokenizer/unicode.h"

namespace qilin::tokenizer {
namespace {

namespace fs = std::filesystem;

// Qwen's pre-tokenizer pattern, as tokenizer.json's Split pre-tokenizer and Qwen v1 spell it.
constexpr std::string_view kQwenPattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

// GPT-2's byte <-> printable character table used by ByteLevel.
struct ByteLevelTable {
  uint32_t byte_to_cp[256];
  int16_t cp_to_byte[324];  // code points 0..323; -1 when not a byte's character
  ByteLevelTable() {
    std::fill(std::begin(cp_to_byte), std::end(cp_to_byte), int16_t{-1});
    int n = 0;
    for (int b = 0; b < 256; ++b) {
      bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
      byte_to_cp[b] = printable ? static_cast<uint32_t>(b) : static_cast<uint32_t>(256 + n++);
      cp_to_byte[byte_to_cp[b]] = static_cast<int16_t>(b);
    }
  }
};
const ByteLevelTable& ByteLevel() {
  static const ByteLevelTable table;
  return table;
}

// "Ġhello" (byte-level characters) -> " hello" (raw bytes); false if a character is not one of
// the 256 byte characters.
bool ByteLevelToBytes(std::string_view s, std::string* out) {
  out->clear();
  const auto* p = reinterpret_cast<const uint8_t*>(s.data());
  const auto* end = p + s.size();
  const ByteLevelTable& t = ByteLevel();
  while (p < end) {
    uint32_t cp;
    size_t n = DecodeUtf8(p, end, &cp);
    if (cp >= 324 || t.cp_to_byte[cp] < 0 || (cp == 0xFFFD && n == 1)) return false;
    out->push_back(static_cast<char>(t.cp_to_byte[cp]));
    p += n;
  }
  return true;
}

std::string BytesToByteLevel(std::string_view bytes) {
  std::string out;
  for (unsigned char b : bytes) AppendUtf8(ByteLevel().byte_to_cp[b], &out);
  return out;
}

Result<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return NotFound("cannot open {}", path);
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) return DataLoss("cannot read {}", path);
  return ss.str();
}

Result<nlohmann::json> ReadJson(const std::string& path) {
  QILIN_ASSIGN_OR_RETURN(std::string text, ReadFile(path));
  nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return DataLoss("{} is not valid JSON", path);
  return j;
}

bool Base64Decode(std::string_view in, std::string* out) {
  out->clear();
  uint32_t acc = 0;
  int bits = 0;
  for (char ch : in) {
    int v;
    if (ch >= 'A' && ch <= 'Z')
      v = ch - 'A';
    else if (ch >= 'a' && ch <= 'z')
      v = ch - 'a' + 26;
    else if (ch >= '0' && ch <= '9')
      v = ch - '0' + 52;
    else if (ch == '+')
      v = 62;
    else if (ch == '/')
      v = 63;
    else if (ch == '=')
      break;
    else
      return false;
    acc = (acc << 6) | static_cast<uint32_t>(v);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out->push_back(static_cast<char>((acc >> bits) & 0xFF));
    }
  }
  return true;
}

uint64_t NextInstanceId() {
  static std::atomic<uint64_t> next{1};
  return next.fetch_add(1);
}

// Per-thread cache of piece -> ids for one tokenizer instance (pieces repeat a lot in text).
struct PieceCache {
  struct Hash {
    using is_transparent = void;
    size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
  };
  uint64_t owner = 0;
  std::unordered_map<std::string, std::vector<TokenId>, Hash, std::equal_to<>> map;
  static constexpr size_t kCapacity = 1 << 16;
  static constexpr size_t kMaxPieceBytes = 64;
};

}  // namespace

Status Tokenizer::AddToken(TokenId id, std::string bytes, uint8_t flags) {
  if (id < 0 || id > 10'000'000) return DataLoss("token id {} is out of range [0, 10000000]", id);
  if (static_cast<size_t>(id) >= id_bytes_.size()) {
    id_bytes_.resize(static_cast<size_t>(id) + 1);
    flags_.resize(static_cast<size_t>(id) + 1, 0);
  }
  id_bytes_[id] = bytes;
  flags_[id] = flags | 4;  // 4: assigned
  if (flags & kAdded) {
    added_.push_back(Added{std::move(bytes), id, (flags & kSpecial) != 0});
  } else {
    bytes_to_id_.emplace(std::move(bytes), id);
  }
  return Status::Ok();
}

Status Tokenizer::Finish() {
  for (int b = 0; b < 256; ++b) {
    auto it = bytes_to_id_.find(std::string(1, static_cast<char>(b)));
    if (it == bytes_to_id_.end()) {
      return DataLoss("the vocabulary has no token for the single byte 0x{:02X}", b);
    }
    bpe_.SetByteToken(static_cast<uint8_t>(b), it->second);
  }
  std::erase_if(added_, [](const Added& a) { return a.content.empty(); });
  std::stable_sort(added_.begin(), added_.end(), [](const Added& a, const Added& b) {
    return a.content.size() > b.content.size();
  });
  for (const Added& a : added_) added_first_byte_[static_cast<uint8_t>(a.content[0])] = true;
  instance_id_ = NextInstanceId();
  return Status::Ok();
}

Result<std::shared_ptr<Tokenizer>> Tokenizer::FromTokenizerJson(const std::string& path) {
  QILIN_ASSIGN_OR_RETURN(nlohmann::json j, ReadJson(path));
  auto tok = std::make_shared<Tokenizer>();
  auto bad = [&](const std::string& what) { return DataLoss("{}: {}", path, what); };
  if (!j.is_object() || !j.contains("model") || !j["model"].is_object()) {
    return bad("no \"model\" object");
  }
  const nlohmann::json& model = j["model"];
  if (model.value("type", std::string("BPE")) != "BPE") {
    return Unimplemented("{}: model type \"{}\" is not supported (only BPE)", path,
                         model.value("type", std::string()));
  }
  // Normalizer: none or NFC.
  if (j.contains("normalizer") && !j["normalizer"].is_null()) {
    std::string type = j["normalizer"].value("type", std::string());
    if (type != "NFC") {
      return Unimplemented("{}: normalizer \"{}\" is not supported (only NFC or none)", path, type);
    }
    tok->nfc_ = true;
  }
  // Pre-tokenizer: Qwen's Split regex + ByteLevel(use_regex=false).
  {
    const nlohmann::json& pre = j.value("pre_tokenizer", nlohmann::json());
    std::vector<nlohmann::json> steps;
    if (pre.is_object() && pre.value("type", std::string()) == "Sequence" &&
        pre.contains("pretokenizers") && pre["pretokenizers"].is_array()) {
      for (const auto& s : pre["pretokenizers"]) steps.push_back(s);
    } else if (pre.is_object()) {
      steps.push_back(pre);
    }
    bool has_split = false;
    for (const auto& s : steps) {
      std::string type = s.is_object() ? s.value("type", std::string()) : std::string();
      if (type == "Split") {
        std::string pattern;
        if (s.contains("pattern") && s["pattern"].is_object() && s["pattern"].contains("Regex") &&
            s["pattern"]["Regex"].is_string()) {
          pattern = s["pattern"]["Regex"].get<std::string>();
        }
        if (pattern != kQwenPattern) {
          return Unimplemented("{}: Split pattern {} is not Qwen's; only Qwen's is supported", path,
                               nlohmann::json(pattern).dump());
        }
        has_split = true;
      } else if (type == "ByteLevel") {
        if (s.value("use_regex", false) && !has_split) {
          return Unimplemented("{}: ByteLevel with GPT-2's regex is not supported", path);
        }
      } else {
        return Unimplemented("{}: pre-tokenizer \"{}\" is not supported", path, type);
      }
    }
    if (!has_split) return Unimplemented("{}: no Split pre-tokenizer with Qwen's pattern", path);
  }
  if (model.contains("dropout") && model["dropout"].is_number() &&
      model["dropout"].get<double>() > 0) {
    return Unimplemented("{}: BPE dropout is not supported", path);
  }
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    if (model.contains(key) && model[key].is_string() && !model[key].get<std::string>().empty()) {
      return Unimplemented("{}: BPE {} \"{}\" is not supported", path, key,
                           model[key].get<std::string>());
    }
  }
  tok->whole_piece_lookup_ = model.value("ignore_merges", false);
  if (!model.contains("vocab") || !model["vocab"].is_object()) return bad("model.vocab missing");
  std::string bytes;
  for (const auto& [token, idv] : model["vocab"].items()) {
    if (!idv.is_number_integer())
      return bad(fmt::format("vocab entry {} has no integer id", token));
    if (!ByteLevelToBytes(token, &bytes)) {
      return bad(
          fmt::format("vocab token {} is not byte-level text", nlohmann::json(token).dump()));
    }
    QILIN_RETURN_IF_ERROR(tok->AddToken(idv.get<TokenId>(), bytes, 0));
  }
  if (!model.contains("merges") || !model["merges"].is_array()) return bad("model.merges missing");
  const auto& merges = model["merges"];
  tok->bpe_.Reserve(merges.size());
  std::string left, right;
  int32_t rank = 0;
  for (const auto& m : merges) {
    std::string a, b;
    if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
      a = m[0].get<std::string>();
      b = m[1].get<std::string>();
    } else if (m.is_string()) {
      const std::string& s = m.get_ref<const std::string&>();
      size_t sp = s.find(' ');
      if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos) {
        return bad(
            fmt::format("merge {} \"{}\" is not two tokens separated by one space", rank, s));
      }
      a = s.substr(0, sp);
      b = s.substr(sp + 1);
    } else {
      return bad(fmt::format("merge {} is neither [\"a\", \"b\"] nor \"a b\"", rank));
    }
    if (!ByteLevelToBytes(a, &left) || !ByteLevelToBytes(b, &right)) {
      return bad(fmt::format("merge {} has a non byte-level token", rank));
    }
    auto il = tok->bytes_to_id_.find(left), ir = tok->bytes_to_id_.find(right);
    auto im = tok->bytes_to_id_.find(left + right);
    if (il == tok->bytes_to_id_.end() || ir == tok->bytes_to_id_.end() ||
        im == tok->bytes_to_id_.end()) {
      return bad(fmt::format("merge {} (\"{}\" \"{}\") uses a token not in the vocab", rank, a, b));
    }
    tok->bpe_.AddMerge(il->second, ir->second, rank, im->second);
    ++rank;
  }
  if (j.contains("added_tokens") && j["added_tokens"].is_array()) {
    for (const auto& a : j["added_tokens"]) {
      if (!a.is_object() || !a.contains("id") || !a["id"].is_number_integer() ||
          !a.contains("content") || !a["content"].is_string()) {
        return bad("an added_tokens entry lacks an integer id or a string content");
      }
      uint8_t flags = kAdded | (a.value("special", false) ? kSpecial : 0);
      QILIN_RETURN_IF_ERROR(tok->AddToken(a["id"].get<TokenId>(), a["content"], flags));
    }
  }
  QILIN_RETURN_IF_ERROR(tok->Finish());
  return tok;
}

Result<std::shared_ptr<Tokenizer>> Tokenizer::FromTiktoken(const std::string& path) {
  QILIN_ASSIGN_OR_RETURN(std::string text, ReadFile(path));
  auto tok = std::make_shared<Tokenizer>();
  tok->nfc_ = true;
  tok->whole_piece_lookup_ = true;  // tiktoken returns a piece found in the vocab as one token
  std::string bytes;
  size_t line_no = 0, pos = 0;
  TokenId max_rank = -1;
  while (pos < text.size()) {
    size_t eol = text.find('\n', pos);
    if (eol == std::string::npos) eol = text.size();
    std::string_view line(text.data() + pos, eol - pos);
    pos = eol + 1;
    ++line_no;
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (line.empty()) continue;
    size_t sp = line.find(' ');
    if (sp == std::string_view::npos) {
      return DataLoss("{}:{}: expected \"<base64> <rank>\"", path, line_no);
    }
    if (!Base64Decode(line.substr(0, sp), &bytes) || bytes.empty()) {
      return DataLoss("{}:{}: bad base64 token", path, line_no);
    }
    std::string rank_str(line.substr(sp + 1));
    char* endp = nullptr;
    long rank = std::strtol(rank_str.c_str(), &endp, 10);
    if (rank_str.empty() || *endp != '\0' || rank < 0 || rank > 10'000'000) {
      return DataLoss("{}:{}: bad rank \"{}\"", path, line_no, rank_str);
    }
    if (rank < static_cast<long>(tok->id_bytes_.size()) && !tok->id_bytes_[rank].empty()) {
      return DataLoss("{}:{}: rank {} appears twice", path, line_no, rank);
    }
    QILIN_RETURN_IF_ERROR(tok->AddToken(static_cast<TokenId>(rank), bytes, 0));
    max_rank = std::max<TokenId>(max_rank, static_cast<TokenId>(rank));
  }
  // tiktoken's merge rule: a pair merges when its concatenation is a token, ranked by it.
  tok->bpe_.Reserve(tok->bytes_to_id_.size() * 2);
  for (const auto& [tb, id] : tok->bytes_to_id_) {
    for (size_t cut = 1; cut < tb.size(); ++cut) {
      auto il = tok->bytes_to_id_.find(std::string_view(tb).substr(0, cut));
      if (il == tok->bytes_to_id_.end()) continue;
      auto ir = tok->bytes_to_id_.find(std::string_view(tb).substr(cut));
      if (ir == tok->bytes_to_id_.end()) continue;
      tok->bpe_.AddMerge(il->second, ir->second, id, id);
    }
  }
  TokenId next = max_rank + 1;
  for (const char* s : {"<|endoftext|>", "<|im_start|>", "<|im_end|>"}) {
    QILIN_RETURN_IF_ERROR(tok->AddToken(next++, s, kAdded | kSpecial));
  }
  for (int i = 0; i < 205; ++i) {
    QILIN_RETURN_IF_ERROR(tok->AddToken(next++, fmt::format("<|extra_{}|>", i), kAdded | kSpecial));
  }
  QILIN_RETURN_IF_ERROR(tok->Finish());
  return tok;
}

Result<std::shared_ptr<const Tokenizer>> Tokenizer::Load(const std::string& dir) {
  fs::path d(dir);
  std::error_code ec;
  if (!fs::is_directory(d, ec)) return NotFound("tokenizer folder {} does not exist", dir);
  std::shared_ptr<Tokenizer> tok;
  if (fs::exists(d / "tokenizer.json", ec)) {
    QILIN_ASSIGN_OR_RETURN(tok, FromTokenizerJson((d / "tokenizer.json").string()));
  } else if (fs::exists(d / "qwen.tiktoken", ec)) {
    QILIN_ASSIGN_OR_RETURN(tok, FromTiktoken((d / "qwen.tiktoken").string()));
  } else {
    return NotFound("{} holds neither tokenizer.json nor qwen.tiktoken", dir);
  }
  fs::path tc = d / "tokenizer_config.json";
  if (fs::exists(tc, ec)) {
    QILIN_ASSIGN_OR_RETURN(nlohmann::json cfg, ReadJson(tc.string()));
    auto token_text = [&](const char* key) -> std::string {
      if (!cfg.contains(key)) return "";
      const auto& v = cfg[key];
      if (v.is_string()) return v.get<std::string>();
      if (v.is_object() && v.contains("content") && v["content"].is_string()) {
        return v["content"].get<std::string>();
      }
      return "";
    };
    if (cfg.contains("chat_template")) {
      std::string source;
      const auto& ct = cfg["chat_template"];
      if (ct.is_string()) {
        source = ct.get<std::string>();
      } else if (ct.is_array()) {  // [{"name": "default", "template": ...}, ...]
        for (const auto& e : ct) {
          if (e.is_object() && e.value("name", std::string()) == "default" &&
              e.contains("template") && e["template"].is_string()) {
            source = e["template"].get<std::string>();
          }
        }
      }
      if (!source.empty()) {
        auto t = ChatTemplate::FromJinja(source, token_text("bos_token"), token_text("eos_token"));
        if (!t.ok()) return t.status().WithContext(tc.string() + ": chat_template");
        tok->chat_template_ = std::move(t).value();
      }
    }
  }
  QILIN_ASSIGN_OR_RETURN(tok->defaults_, tok->ReadGenerationDefaults(dir));
  return std::shared_ptr<const Tokenizer>(std::move(tok));
}

bool Tokenizer::FindAdded(std::string_view text, size_t from, bool allow_special, size_t* pos,
                          const Added** match) const {
  if (added_.empty()) return false;
  const auto* s = reinterpret_cast<const uint8_t*>(text.data());
  for (size_t i = from; i < text.size(); ++i) {
    if (!added_first_byte_[s[i]]) continue;
    std::string_view rest = text.substr(i);
    for (const Added& a : added_) {  // longest first
      if (!allow_special && a.special) continue;
      if (rest.size() >= a.content.size() &&
          std::memcmp(rest.data(), a.content.data(), a.content.size()) == 0) {
        *pos = i;
        *match = &a;
        return true;
      }
    }
  }
  return false;
}

void Tokenizer::EncodeNormalized(std::string_view text, std::vector<TokenId>* out) const {
  thread_local std::vector<uint32_t> ends;
  thread_local PieceCache cache;
  if (cache.owner != instance_id_) {
    cache.map.clear();
    cache.owner = instance_id_;
  }
  ends.clear();
  PreTokenize(text, &ends);
  uint32_t start = 0;
  for (uint32_t end : ends) {
    std::string_view piece = text.substr(start, end - start);
    start = end;
    if (piece.size() == 1) {
      bpe_.EncodePiece(piece, out);
      continue;
    }
    if (whole_piece_lookup_) {
      auto it = bytes_to_id_.find(piece);
      if (it != bytes_to_id_.end()) {
        out->push_back(it->second);
        continue;
      }
    }
    if (piece.size() > PieceCache::kMaxPieceBytes) {
      bpe_.EncodePiece(piece, out);
      continue;
    }
    auto it = cache.map.find(piece);
    if (it != cache.map.end()) {
      out->insert(out->end(), it->second.begin(), it->second.end());
      continue;
    }
    size_t before = out->size();
    bpe_.EncodePiece(piece, out);
    if (cache.map.size() >= PieceCache::kCapacity) cache.map.clear();
    cache.map.emplace(std::string(piece), std::vector<TokenId>(out->begin() + before, out->end()));
  }
}

Status Tokenizer::EncodeOrdinary(std::string_view text, std::vector<TokenId>* out) const {
  if (text.empty()) return Status::Ok();
  if (text.size() > (uint32_t{1} << 31)) {  // pre-tokenizer offsets are 32-bit
    return OutOfRange("text of {} bytes is longer than the 2 GiB a single encode handles",
                      text.size());
  }
  if (nfc_) {
    thread_local std::string normalized;
    QILIN_ASSIGN_OR_RETURN(bool changed, NormalizeNfc(text, &normalized));
    if (changed) {
      std::string local = std::move(normalized);  // EncodeNormalized does not re-enter
      EncodeNormalized(local, out);
      normalized = std::move(local);
      return Status::Ok();
    }
  } else if (size_t bad = FindInvalidUtf8(text); bad != std::string_view::npos) {
    return InvalidArgument("text is not valid UTF-8: bad byte 0x{:02X} at byte offset {}",
                           static_cast<uint8_t>(text[bad]), bad);
  }
  EncodeNormalized(text, out);
  return Status::Ok();
}

Result<std::vector<TokenId>> Tokenizer::Encode(std::string_view text, bool allow_special) const {
  std::vector<TokenId> out;
  out.reserve(text.size() / 3 + 4);
  size_t pos = 0;
  while (pos < text.size()) {
    size_t at;
    const Added* match = nullptr;
    if (!FindAdded(text, pos, allow_special, &at, &match)) break;
    Status st = EncodeOrdinary(text.substr(pos, at - pos), &out);
    if (!st.ok())
      return Status(st.code(), fmt::format("{} (segment from byte {})", st.message(), pos));
    out.push_back(match->id);
    pos = at + match->content.size();
  }
  Status st = EncodeOrdinary(text.substr(pos), &out);
  if (!st.ok())
    return Status(st.code(), fmt::format("{} (segment from byte {})", st.message(), pos));
  return out;
}

Result<std::vector<std::vector<TokenId>>> Tokenizer::EncodeBatch(
    const std::vector<std::string>& texts, bool allow_special, int num_threads) const {
  std::vector<std::vector<TokenId>> out(texts.size());
  std::vector<Status> errors(texts.size());
  int threads = num_threads > 0
                    ? num_threads
                    : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  const long n = static_cast<long>(texts.size());
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (long i = 0; i < n; ++i) {
    auto r = Encode(texts[i], allow_special);
    if (r.ok()) {
      out[i] = std::move(r).value();
    } else {
      errors[i] = r.status();
    }
  }
  for (size_t i = 0; i < errors.size(); ++i) {
    if (!errors[i].ok()) return errors[i].WithContext(fmt::format("text {}", i));
  }
  return out;
}

Result<std::string> Tokenizer::Decode(std::span<const TokenId> ids, bool skip_special) const {
  std::string bytes;
  for (TokenId id : ids) {
    if (id < 0 || id >= vocab_size() || !(flags_[id] & 4)) {
      return InvalidArgument("token id {} is not in the vocabulary (size {})", id, vocab_size());
    }
    if (skip_special && (flags_[id] & kSpecial)) continue;
    bytes += id_bytes_[id];
  }
  std::string text;
  text.reserve(bytes.size());
  AppendUtf8Lossy(bytes, /*hold_incomplete_tail=*/false, &text);
  return text;
}

std::optional<TokenId> Tokenizer::TokenToId(std::string_view token) const {
  for (const Added& a : added_) {
    if (a.content == token) return a.id;
  }
  std::string bytes;
  if (!ByteLevelToBytes(token, &bytes)) return std::nullopt;
  auto it = bytes_to_id_.find(bytes);
  if (it == bytes_to_id_.end()) return std::nullopt;
  return it->second;
}

Result<std::string> Tokenizer::IdToToken(TokenId id) const {
  if (id < 0 || id >= vocab_size() || !(flags_[id] & 4)) {
    return InvalidArgument("token id {} is not in the vocabulary (size {})", id, vocab_size());
  }
  if (flags_[id] & kAdded) return id_bytes_[id];
  return BytesToByteLevel(id_bytes_[id]);
}

}  // namespace qilin::tokenizer
