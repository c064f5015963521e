#include "model/json_util.h"

#include <limits>
#include <set>
#include <vector>

namespace qilin {
namespace {

using nlohmann::json;

struct TooDeep {};
struct DuplicateKey {};

// A short rendering of a value for error messages.
std::string Brief(const json& j) {
  std::string s = j.dump(-1, ' ', false, json::error_handler_t::replace);
  if (s.size() > 60) s = s.substr(0, 57) + "...";
  return s;
}

}  // namespace

Result<json> ParseJsonText(std::string_view text, const std::string& source, int max_depth) {
  // Tracks the keys of every open object to reject duplicates (json::parse keeps the last one
  // silently); arrays push an unused set so that pops stay balanced.
  std::vector<std::set<std::string>> open_keys;
  std::string duplicate;
  json::parser_callback_t check = [&](int depth, json::parse_event_t event, json& parsed) {
    switch (event) {
      case json::parse_event_t::object_start:
      case json::parse_event_t::array_start:
        if (depth >= max_depth) throw TooDeep{};
        open_keys.emplace_back();
        break;
      case json::parse_event_t::object_end:
      case json::parse_event_t::array_end:
        if (!open_keys.empty()) open_keys.pop_back();
        break;
      case json::parse_event_t::key:
        if (!open_keys.empty() && parsed.is_string() &&
            !open_keys.back().insert(parsed.get<std::string>()).second) {
          duplicate = parsed.get<std::string>();
          throw DuplicateKey{};
        }
        break;
      default:
        break;
    }
    return true;
  };
  try {
    return json::parse(text.begin(), text.end(), check, /*allow_exceptions=*/true);
  } catch (const json::parse_error& e) {
    // e.byte counts from 1; what() starts with "[json.exception.parse_error.101] ".
    std::string_view what = e.what();
    if (size_t p = what.find("] "); p != std::string_view::npos) what.remove_prefix(p + 2);
    return InvalidArgument("{}: invalid JSON at byte offset {}: {}", source,
                           e.byte > 0 ? e.byte - 1 : 0, what);
  } catch (const TooDeep&) {
    return InvalidArgument("{}: JSON nested deeper than {} levels", source, max_depth);
  } catch (const DuplicateKey&) {
    return InvalidArgument("{}: key '{}' appears twice in one object", source, duplicate);
  } catch (const json::exception& e) {
    return InvalidArgument("{}: invalid JSON: {}", source, e.what());
  }
}

const char* JsonTypeName(const json& j) {
  switch (j.type()) {
    case json::value_t::string:
      return "string";
    case json::value_t::number_integer:
    case json::value_t::number_unsigned:
      return "integer";
    case json::value_t::number_float:
      return "number";
    case json::value_t::boolean:
      return "boolean";
    case json::value_t::object:
      return "object";
    case json::value_t::array:
      return "array";
    case json::value_t::null:
      return "null";
    default:
      return "binary";
  }
}

const json* JsonFields::Find(const std::string& key) const {
  if (!obj_.is_object()) return nullptr;
  auto it = obj_.find(key);
  if (it == obj_.end() || it->is_null()) return nullptr;
  return &*it;
}

std::string JsonFields::Where(const std::string& key) const {
  return fmt::format("{}: key '{}{}'", source_, prefix_, key);
}

Status JsonFields::Missing(const std::string& key) const {
  return InvalidArgument("{}: required key '{}{}' is missing", source_, prefix_, key);
}

Status JsonFields::WrongType(const std::string& key, const char* expected, const json& got) const {
  return InvalidArgument("{}: expected {}, got {} {}", Where(key), expected, JsonTypeName(got),
                         Brief(got));
}

Result<int64_t> JsonFields::Int(const std::string& key) const {
  const json* v = Find(key);
  if (v == nullptr) return Missing(key);
  if (v->is_number_unsigned()) {
    uint64_t u = v->get<uint64_t>();
    if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      return OutOfRange("{}: value {} does not fit in a 64-bit integer", Where(key), u);
    }
    return static_cast<int64_t>(u);
  }
  if (v->is_number_integer()) return v->get<int64_t>();
  return WrongType(key, "an integer", *v);
}

Result<int64_t> JsonFields::IntOr(const std::string& key, int64_t def) const {
  if (!Has(key)) return def;
  return Int(key);
}

Result<double> JsonFields::Double(const std::string& key) const {
  const json* v = Find(key);
  if (v == nullptr) return Missing(key);
  if (!v->is_number()) return WrongType(key, "a number", *v);
  return v->get<double>();
}

Result<double> JsonFields::DoubleOr(const std::string& key, double def) const {
  if (!Has(key)) return def;
  return Double(key);
}

Result<bool> JsonFields::BoolOr(const std::string& key, bool def) const {
  const json* v = Find(key);
  if (v == nullptr) return def;
  if (!v->is_boolean()) return WrongType(key, "a boolean", *v);
  return v->get<bool>();
}

Result<std::string> JsonFields::String(const std::string& key) const {
  const json* v = Find(key);
  if (v == nullptr) return Missing(key);
  if (!v->is_string()) return WrongType(key, "a string", *v);
  return v->get<std::string>();
}

Result<std::string> JsonFields::StringOr(const std::string& key, const std::string& def) const {
  if (!Has(key)) return def;
  return String(key);
}

}  // namespace qilin
