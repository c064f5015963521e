// Jinja subset: values with Python semantics (str/repr, truthiness, equality, ordering), JSON
// in and out, and Python's string operations.
#include <algorithm>
#include <cmath>

#include <fmt/format.h>

#include "tokenizer/jinja_ast.h"
#include "tokenizer/jinja_value.h"
#include "tokenizer/unicode.h"

namespace qilin::tokenizer::jinja {

void Fail(int line, const std::string& msg) {
  throw JinjaError(fmt::format("line {}: {}", line, msg));
}

const char* TypeName(const Value& v) {
  switch (v.t) {
    case Value::T::kUndefined:
      return "undefined";
    case Value::T::kNone:
      return "NoneType";
    case Value::T::kBool:
      return "bool";
    case Value::T::kInt:
      return "int";
    case Value::T::kFloat:
      return "float";
    case Value::T::kString:
      return "str";
    case Value::T::kList:
      return "list";
    case Value::T::kDict:
      return v.is_namespace ? "Namespace" : "dict";
    case Value::T::kFunc:
      return "function";
  }
  return "?";
}

// Sets a list's or dict's depth from its elements; fails beyond kMaxValueDepth. Namespaces (the
// only mutable values) cannot be elements, so depths never go stale and no cycle can form.
Value& Nest(Value& v, int line) {
  int d = 0;
  auto see = [&](const Value& x) {
    if (x.is_namespace) Fail(line, "a namespace cannot be put inside a list, dict or namespace");
    d = std::max(d, x.depth);
  };
  if (v.t == Value::T::kList) {
    for (const auto& x : *v.list) see(x);
  } else if (v.t == Value::T::kDict) {
    for (const auto& kv : v.dict->items) see(kv.second);
  }
  v.depth = d + 1;
  if (v.depth > kMaxValueDepth) {
    Fail(line, fmt::format("value nested more than {} levels deep", kMaxValueDepth));
  }
  return v;
}

// ---- conversions ----

Value FromJson(const nlohmann::ordered_json& j, int depth) {
  switch (j.type()) {
    case nlohmann::ordered_json::value_t::null:
      return Value::None();
    case nlohmann::ordered_json::value_t::boolean:
      return Value::Bool(j.get<bool>());
    case nlohmann::ordered_json::value_t::number_integer:
      return Value::Int(j.get<int64_t>());
    case nlohmann::ordered_json::value_t::number_unsigned: {
      uint64_t u = j.get<uint64_t>();
      if (u <= static_cast<uint64_t>(INT64_MAX)) return Value::Int(static_cast<int64_t>(u));
      return Value::Float(static_cast<double>(u));
    }
    case nlohmann::ordered_json::value_t::number_float:
      return Value::Float(j.get<double>());
    case nlohmann::ordered_json::value_t::string:
      return Value::Str(j.get<std::string>());
    case nlohmann::ordered_json::value_t::array: {
      if (depth > kMaxValueDepth) Fail(0, "input JSON nested too deeply");
      Value v = Value::MakeList();
      for (const auto& x : j) v.list->push_back(FromJson(x, depth + 1));
      return Nest(v, 0);
    }
    case nlohmann::ordered_json::value_t::object: {
      if (depth > kMaxValueDepth) Fail(0, "input JSON nested too deeply");
      Value v = Value::MakeDict();
      for (const auto& [k, x] : j.items()) v.dict->items.emplace_back(k, FromJson(x, depth + 1));
      return Nest(v, 0);
    }
    default:
      return Value::None();
  }
}

nlohmann::ordered_json ToJsonValue(const Value& v, int line, int depth) {
  if (depth > 100) Fail(line, "tojson: value nested too deeply");
  switch (v.t) {
    case Value::T::kUndefined:
    case Value::T::kNone:
      return nullptr;
    case Value::T::kBool:
      return v.b;
    case Value::T::kInt:
      return v.i;
    case Value::T::kFloat:
      return v.f;
    case Value::T::kString:
      return v.s;
    case Value::T::kList: {
      auto a = nlohmann::ordered_json::array();
      for (const auto& x : *v.list) a.push_back(ToJsonValue(x, line, depth + 1));
      return a;
    }
    case Value::T::kDict: {
      auto o = nlohmann::ordered_json::object();
      for (const auto& [k, x] : v.dict->items) o[k] = ToJsonValue(x, line, depth + 1);
      return o;
    }
    case Value::T::kFunc:
      Fail(line, "tojson: a function is not JSON serializable");
  }
  return nullptr;
}

std::string FloatRepr(double f) {
  if (std::isnan(f)) return "nan";
  if (std::isinf(f)) return f > 0 ? "inf" : "-inf";
  std::string s = fmt::format("{}", f);
  if (s.find_first_of(".e") == std::string::npos) s += ".0";
  return s;
}

void AppendJsonString(const std::string& s, std::string* out) {
  out->push_back('"');
  for (unsigned char c : s) {
    switch (c) {
      case '"':
        *out += "\\\"";
        break;
      case '\\':
        *out += "\\\\";
        break;
      case '\n':
        *out += "\\n";
        break;
      case '\r':
        *out += "\\r";
        break;
      case '\t':
        *out += "\\t";
        break;
      case '\b':
        *out += "\\b";
        break;
      case '\f':
        *out += "\\f";
        break;
      default:
        if (c < 0x20) {
          *out += fmt::format("\\u{:04x}", c);
        } else {
          out->push_back(static_cast<char>(c));
        }
    }
  }
  out->push_back('"');
}

void DumpJson(const nlohmann::ordered_json& j, int indent, int depth, std::string* out) {
  using VT = nlohmann::ordered_json::value_t;
  switch (j.type()) {
    case VT::null:
      *out += "null";
      return;
    case VT::boolean:
      *out += j.get<bool>() ? "true" : "false";
      return;
    case VT::number_integer:
      *out += std::to_string(j.get<int64_t>());
      return;
    case VT::number_unsigned:
      *out += std::to_string(j.get<uint64_t>());
      return;
    case VT::number_float: {
      double f = j.get<double>();
      *out += std::isnan(f)   ? "NaN"
              : std::isinf(f) ? (f > 0 ? "Infinity" : "-Infinity")
                              : FloatRepr(f);
      return;
    }
    case VT::string:
      AppendJsonString(j.get_ref<const std::string&>(), out);
      return;
    case VT::array:
    case VT::object: {
      bool arr = j.is_array();
      if (j.empty()) {
        *out += arr ? "[]" : "{}";
        return;
      }
      out->push_back(arr ? '[' : '{');
      bool first = true;
      auto newline = [&](int d) {
        out->push_back('\n');
        out->append(static_cast<size_t>(indent * d), ' ');
      };
      auto sep = [&]() {
        if (!first) *out += indent >= 0 ? "," : ", ";
        first = false;
        if (indent >= 0) newline(depth + 1);
      };
      if (arr) {
        for (const auto& x : j) {
          sep();
          DumpJson(x, indent, depth + 1, out);
        }
      } else {
        for (const auto& [k, x] : j.items()) {
          sep();
          AppendJsonString(k, out);
          *out += ": ";
          DumpJson(x, indent, depth + 1, out);
        }
      }
      if (indent >= 0) newline(depth);
      out->push_back(arr ? ']' : '}');
      return;
    }
    default:
      *out += "null";
  }
}

// str(v) as Jinja2 prints it.
std::string Str(const Value& v) {
  switch (v.t) {
    case Value::T::kUndefined:
      return "";
    case Value::T::kNone:
      return "None";
    case Value::T::kBool:
      return v.b ? "True" : "False";
    case Value::T::kInt:
      return std::to_string(v.i);
    case Value::T::kFloat:
      return FloatRepr(v.f);
    case Value::T::kString:
      return v.s;
    default:
      return PyRepr(v);
  }
}

std::string PyRepr(const Value& v) {
  switch (v.t) {
    case Value::T::kString: {
      bool dq = v.s.find('\'') != std::string::npos && v.s.find('"') == std::string::npos;
      char q = dq ? '"' : '\'';
      std::string out(1, q);
      for (unsigned char c : v.s) {
        if (c == '\\')
          out += "\\\\";
        else if (c == q)
          out += std::string("\\") + static_cast<char>(q);
        else if (c == '\n')
          out += "\\n";
        else if (c == '\r')
          out += "\\r";
        else if (c == '\t')
          out += "\\t";
        else if (c < 0x20 || c == 0x7F)
          out += fmt::format("\\x{:02x}", c);
        else
          out.push_back(static_cast<char>(c));
      }
      out.push_back(q);
      return out;
    }
    case Value::T::kList: {
      std::string out = "[";
      for (size_t k = 0; k < v.list->size(); ++k) {
        if (k) out += ", ";
        out += PyRepr((*v.list)[k]);
      }
      return out + "]";
    }
    case Value::T::kDict: {
      std::string out = v.is_namespace ? "<Namespace {" : "{";
      bool first = true;
      for (const auto& [k, x] : v.dict->items) {
        if (!first) out += ", ";
        first = false;
        out += PyRepr(Value::Str(k)) + ": " + PyRepr(x);
      }
      return out + (v.is_namespace ? "}>" : "}");
    }
    case Value::T::kFunc:
      return "<function>";
    default:
      return Str(v);
  }
}

bool Truthy(const Value& v) {
  switch (v.t) {
    case Value::T::kUndefined:
    case Value::T::kNone:
      return false;
    case Value::T::kBool:
      return v.b;
    case Value::T::kInt:
      return v.i != 0;
    case Value::T::kFloat:
      return v.f != 0;
    case Value::T::kString:
      return !v.s.empty();
    case Value::T::kList:
      return !v.list->empty();
    case Value::T::kDict:
      return v.is_namespace || !v.dict->items.empty();
    case Value::T::kFunc:
      return true;
  }
  return false;
}

double AsDouble(const Value& v) {
  return v.t == Value::T::kFloat  ? v.f
         : v.t == Value::T::kBool ? (v.b ? 1 : 0)
                                  : static_cast<double>(v.i);
}
int64_t AsInt(const Value& v) { return v.t == Value::T::kBool ? (v.b ? 1 : 0) : v.i; }

bool Equal(const Value& a, const Value& b) {
  if (a.is_number() && b.is_number()) {
    if (a.t == Value::T::kFloat || b.t == Value::T::kFloat) return AsDouble(a) == AsDouble(b);
    return AsInt(a) == AsInt(b);
  }
  if (a.t != b.t) return false;
  switch (a.t) {
    case Value::T::kUndefined:
    case Value::T::kNone:
      return true;
    case Value::T::kString:
      return a.s == b.s;
    case Value::T::kList: {
      if (a.list->size() != b.list->size()) return false;
      for (size_t k = 0; k < a.list->size(); ++k) {
        if (!Equal((*a.list)[k], (*b.list)[k])) return false;
      }
      return true;
    }
    case Value::T::kDict: {
      if (a.dict->items.size() != b.dict->items.size()) return false;
      for (const auto& [k, x] : a.dict->items) {
        const Value* y = b.dict->Find(k);
        if (!y || !Equal(x, *y)) return false;
      }
      return true;
    }
    case Value::T::kFunc:
      return a.fn == b.fn;
    default:
      return false;
  }
}

// Python's ordering for numbers and strings.
int Compare(const Value& a, const Value& b, int line, const std::string& op) {
  if (a.is_number() && b.is_number()) {
    double x = AsDouble(a), y = AsDouble(b);
    if (a.t != Value::T::kFloat && b.t != Value::T::kFloat) {
      return AsInt(a) < AsInt(b) ? -1 : AsInt(a) > AsInt(b) ? 1 : 0;
    }
    return x < y ? -1 : x > y ? 1 : 0;
  }
  if (a.t == Value::T::kString && b.t == Value::T::kString) {
    int c = a.s.compare(b.s);
    return c < 0 ? -1 : c > 0 ? 1 : 0;
  }
  Fail(line, fmt::format("'{}' not supported between '{}' and '{}'", op, TypeName(a), TypeName(b)));
}

// Code points of a UTF-8 string (for Python-style indexing, length and slicing).
std::vector<std::string_view> Chars(const std::string& s) {
  std::vector<std::string_view> out;
  const auto* p = reinterpret_cast<const uint8_t*>(s.data());
  const auto* end = p + s.size();
  const auto* begin = p;
  while (p < end) {
    uint32_t cp;
    size_t n = DecodeUtf8(p, end, &cp);
    out.emplace_back(s.data() + (p - begin), n);
    p += n;
  }
  return out;
}
int64_t CharCount(const std::string& s) {
  int64_t n = 0;
  for (unsigned char c : s) n += (c & 0xC0) != 0x80;
  return n;
}

bool IsPySpace(uint32_t cp) {
  return (cp >= 0x09 && cp <= 0x0D) || (cp >= 0x1C && cp <= 0x20) || cp == 0x85 || cp == 0xA0 ||
         cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 ||
         cp == 0x202F || cp == 0x205F || cp == 0x3000;
}

// str.strip / lstrip / rstrip: chars == nullptr strips Python whitespace.
std::string Strip(const std::string& s, const Value* chars, bool left, bool right) {
  std::vector<uint32_t> set;
  bool custom = chars && chars->t == Value::T::kString;
  if (custom) {
    const auto* p = reinterpret_cast<const uint8_t*>(chars->s.data());
    const auto* end = p + chars->s.size();
    while (p < end) {
      uint32_t cp;
      p += DecodeUtf8(p, end, &cp);
      set.push_back(cp);
    }
  }
  auto strip_it = [&](uint32_t cp) {
    return custom ? std::find(set.begin(), set.end(), cp) != set.end() : IsPySpace(cp);
  };
  std::vector<std::string_view> cs = Chars(s);
  std::vector<uint32_t> cps;
  for (auto c : cs) {
    uint32_t cp;
    DecodeUtf8(reinterpret_cast<const uint8_t*>(c.data()),
               reinterpret_cast<const uint8_t*>(c.data() + c.size()), &cp);
    cps.push_back(cp);
  }
  size_t a = 0, b = cs.size();
  if (left) {
    while (a < b && strip_it(cps[a])) ++a;
  }
  if (right) {
    while (b > a && strip_it(cps[b - 1])) --b;
  }
  std::string out;
  for (size_t k = a; k < b; ++k) out += cs[k];
  return out;
}

Value Split(const std::string& s, const Value* sep, int64_t maxsplit, int line) {
  Value out = Value::MakeList();
  if (sep && sep->t == Value::T::kString) {
    if (sep->s.empty()) Fail(line, "split: empty separator");
    size_t pos = 0;
    int64_t n = 0;
    while (maxsplit < 0 || n < maxsplit) {
      size_t at = s.find(sep->s, pos);
      if (at == std::string::npos) break;
      out.list->push_back(Value::Str(s.substr(pos, at - pos)));
      pos = at + sep->s.size();
      ++n;
    }
    out.list->push_back(Value::Str(s.substr(pos)));
    return out;
  }
  // Whitespace split: runs of whitespace separate, no empty strings.
  std::vector<std::string_view> cs = Chars(s);
  std::string cur;
  bool in_word = false;
  int64_t n = 0;
  for (size_t k = 0; k < cs.size(); ++k) {
    uint32_t cp;
    DecodeUtf8(reinterpret_cast<const uint8_t*>(cs[k].data()),
               reinterpret_cast<const uint8_t*>(cs[k].data() + cs[k].size()), &cp);
    if (IsPySpace(cp) && !(maxsplit >= 0 && n >= maxsplit)) {
      if (in_word) {
        out.list->push_back(Value::Str(cur));
        cur.clear();
        in_word = false;
        ++n;
      }
    } else {
      if (!in_word && maxsplit >= 0 && n >= maxsplit) {
        // remainder (Python keeps it, stripped on the left)
        std::string rest;
        for (size_t m = k; m < cs.size(); ++m) rest += cs[m];
        Value rs = Value::Str(rest);
        std::string r = Strip(rest, nullptr, false, true);
        out.list->push_back(Value::Str(r));
        return out;
      }
      cur += cs[k];
      in_word = true;
    }
  }
  if (in_word) out.list->push_back(Value::Str(cur));
  return out;
}

std::string Replace(const std::string& s, const std::string& from, const std::string& to,
                    int64_t count) {
  std::string out;
  if (from.empty()) {
    // Python inserts `to` between characters (and at both ends).
    std::vector<std::string_view> cs = Chars(s);
    int64_t n = 0;
    for (auto c : cs) {
      if (count < 0 || n < count) {
        out += to;
        ++n;
      }
      out += c;
    }
    if (count < 0 || n < count) out += to;
    return out;
  }
  size_t pos = 0;
  int64_t n = 0;
  while (count < 0 || n < count) {
    size_t at = s.find(from, pos);
    if (at == std::string::npos) break;
    out.append(s, pos, at - pos);
    out += to;
    pos = at + from.size();
    ++n;
  }
  out.append(s, pos, std::string::npos);
  return out;
}

std::string Capitalize(const std::string& s) {
  std::string out = s;
  bool first = true;
  for (char& c : out) {
    if (first) {
      c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
      first = false;
    } else {
      c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    }
  }
  return out;
}
std::string Title(const std::string& s) {
  std::string out = s;
  bool prev_alpha = false;
  for (char& c : out) {
    unsigned char u = static_cast<unsigned char>(c);
    if (std::isalpha(u)) {
      c = static_cast<char>(prev_alpha ? std::tolower(u) : std::toupper(u));
      prev_alpha = true;
    } else {
      prev_alpha = u >= 0x80 && prev_alpha;
    }
  }
  return out;
}
std::string Upper(std::string s) {
  for (char& c : s) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  return s;
}
std::string Lower(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

// Python slice index normalization.
void SliceIndices(int64_t len, const Value* start, const Value* stop, const Value* step,
                  int64_t* out_start, int64_t* out_stop, int64_t* out_step, int line) {
  auto get = [&](const Value* v, int64_t* dst) {
    if (!v || v->t == Value::T::kNone || v->t == Value::T::kUndefined) return false;
    if (v->t != Value::T::kInt && v->t != Value::T::kBool)
      Fail(line, "slice indices must be integers");
    *dst = AsInt(*v);
    return true;
  };
  int64_t st = 1;
  get(step, &st);
  if (st == 0) Fail(line, "slice step cannot be zero");
  int64_t a = 0, b = 0;
  bool has_a = get(start, &a), has_b = get(stop, &b);
  if (st > 0) {
    if (!has_a) a = 0;
    if (!has_b) b = len;
    if (a < 0) a = std::max<int64_t>(0, a + len);
    if (b < 0) b = std::max<int64_t>(0, b + len);
    a = std::min(a, len);
    b = std::min(b, len);
  } else {
    if (!has_a) a = len - 1;
    if (!has_b)
      b = -1;
    else if (b < 0)
      b = std::max<int64_t>(-1, b + len);
    else
      b = std::min(b, len - 1);
    if (has_a) {
      if (a < 0)
        a = std::max<int64_t>(-1, a + len);
      else
        a = std::min(a, len - 1);
    }
  }
  *out_start = a;
  *out_stop = b;
  *out_step = st;
}

}  // namespace qilin::tokenizer::jinja
