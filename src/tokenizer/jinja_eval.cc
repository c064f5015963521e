// Jinja subset: evaluation with Python/Jinja2 semantics, filters, tests and methods.
//   Filters: abs, capitalize, count, d/default, dictsort, first, float, indent, int, items, join,
//   last, length, list, lower, map, max, min, reject, rejectattr, replace, reverse, round, safe,
//   select, selectattr, sort, string, sum, title, tojson, trim, unique, upper, wordcount.
//   Tests: boolean, callable, defined, divisibleby, eq/equalto/==, even, false, float, ge, gt, in,
//   integer, iterable, le, lower, lt, mapping, ne, none, number, odd, sameas, sequence, string,
//   true, undefined, upper.
//   Methods: str.startswith/endswith/strip/lstrip/rstrip/split/splitlines/upper/lower/title/
//   capitalize/replace/find/count/join, dict.items/keys/values/get.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <ctime>
#include <unordered_map>

#include <fmt/format.h>

#include "tokenizer/jinja.h"
#include "tokenizer/jinja_ast.h"
#include "tokenizer/jinja_value.h"
#include "tokenizer/unicode.h"

namespace qilin::tokenizer::jinja {
namespace {

constexpr size_t kMaxOutput = 16u << 20;   // bytes a render may produce
constexpr int64_t kMaxSteps = 50'000'000;  // evaluation steps (bounds loops)
constexpr int64_t kMaxRange = 1'000'000;

[[noreturn]] void Fail(int line, const std::string& msg) {
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

// ---- conversions ----

Value FromJson(const nlohmann::ordered_json& j) {
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
      Value v = Value::MakeList();
      for (const auto& x : j) v.list->push_back(FromJson(x));
      return v;
    }
    case nlohmann::ordered_json::value_t::object: {
      Value v = Value::MakeDict();
      for (const auto& [k, x] : j.items()) v.dict->items.emplace_back(k, FromJson(x));
      return v;
    }
    default:
      return Value::None();
  }
}

nlohmann::ordered_json ToJsonValue(const Value& v, int line, int depth = 0) {
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

std::string PyRepr(const Value& v);

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

class Evaluator {
 public:
  explicit Evaluator(std::string* out) : out_(out) {}

  void PushScope() { scopes_.emplace_back(); }
  void PopScope() { scopes_.pop_back(); }
  void SetVar(const std::string& name, Value v) { scopes_.back()[name] = std::move(v); }

  Value Lookup(const std::string& name) const {
    for (auto it = scopes_.rbegin(); it != scopes_.rend(); ++it) {
      auto f = it->find(name);
      if (f != it->end()) return f->second;
    }
    return Value();
  }

  enum class Flow { kNormal, kBreak, kContinue };

  Flow Exec(const Node& n) {
    Step(n.line);
    switch (n.kind) {
      case Node::Kind::kBody:
        for (const auto& c : n.children) {
          Flow f = Exec(*c);
          if (f != Flow::kNormal) return f;
        }
        return Flow::kNormal;
      case Node::Kind::kText:
        Emit(n.text, n.line);
        return Flow::kNormal;
      case Node::Kind::kOutput:
        Emit(Str(Eval(*n.expr)), n.line);
        return Flow::kNormal;
      case Node::Kind::kIf:
        for (size_t k = 0; k < n.conds.size(); ++k) {
          if (Truthy(Eval(*n.conds[k]))) return Exec(*n.bodies[k]);
        }
        if (n.bodies.size() > n.conds.size()) return Exec(*n.bodies.back());
        return Flow::kNormal;
      case Node::Kind::kFor:
        return ExecFor(n);
      case Node::Kind::kSet: {
        Value v = Eval(*n.expr);
        if (!n.attr.empty()) {
          Value ns = Lookup(n.targets[0]);
          if (ns.t != Value::T::kDict || !ns.is_namespace) {
            Fail(n.line, fmt::format("cannot set attribute '{}' of '{}': not a namespace", n.attr,
                                     n.targets[0]));
          }
          ns.dict->Set(n.attr, std::move(v));
        } else if (n.targets.size() == 1) {
          SetVar(n.targets[0], std::move(v));
        } else {
          List items = Iterate(v, n.line);
          if (items.size() != n.targets.size()) {
            Fail(n.line, fmt::format("cannot unpack {} values into {} names", items.size(),
                                     n.targets.size()));
          }
          for (size_t k = 0; k < items.size(); ++k) SetVar(n.targets[k], items[k]);
        }
        return Flow::kNormal;
      }
      case Node::Kind::kSetBlock: {
        std::string captured;
        std::string* saved = out_;
        out_ = &captured;
        Exec(*n.body);
        out_ = saved;
        SetVar(n.targets[0], Value::Str(std::move(captured)));
        return Flow::kNormal;
      }
      case Node::Kind::kBreak:
        return Flow::kBreak;
      case Node::Kind::kContinue:
        return Flow::kContinue;
    }
    return Flow::kNormal;
  }

 private:
  void Step(int line) {
    if (++steps_ > kMaxSteps) Fail(line, fmt::format("template ran more than {} steps", kMaxSteps));
  }
  void Emit(const std::string& s, int line) {
    if (out_->size() + s.size() > kMaxOutput) {
      Fail(line, fmt::format("template output exceeds {} bytes", kMaxOutput));
    }
    *out_ += s;
  }

  List Iterate(const Value& v, int line) {
    switch (v.t) {
      case Value::T::kUndefined:
        return {};
      case Value::T::kList:
        return *v.list;
      case Value::T::kDict: {
        List keys;
        for (const auto& kv : v.dict->items) keys.push_back(Value::Str(kv.first));
        return keys;
      }
      case Value::T::kString: {
        List chars;
        for (auto c : Chars(v.s)) chars.push_back(Value::Str(std::string(c)));
        return chars;
      }
      default:
        Fail(line, fmt::format("'{}' object is not iterable", TypeName(v)));
    }
  }

  Flow ExecFor(const Node& n) {
    Value seq = Eval(*n.expr);
    List items = Iterate(seq, n.line);
    PushScope();
    if (n.filter) {
      List kept;
      for (auto& it : items) {
        BindTargets(n, it);
        if (Truthy(Eval(*n.filter))) kept.push_back(it);
      }
      items = std::move(kept);
    }
    const int64_t len = static_cast<int64_t>(items.size());
    for (int64_t k = 0; k < len; ++k) {
      Value loop = Value::MakeDict();
      Dict& d = *loop.dict;
      d.Set("index", Value::Int(k + 1));
      d.Set("index0", Value::Int(k));
      d.Set("revindex", Value::Int(len - k));
      d.Set("revindex0", Value::Int(len - k - 1));
      d.Set("first", Value::Bool(k == 0));
      d.Set("last", Value::Bool(k == len - 1));
      d.Set("length", Value::Int(len));
      d.Set("previtem", k > 0 ? items[k - 1] : Value());
      d.Set("nextitem", k + 1 < len ? items[k + 1] : Value());
      d.Set("cycle", Value::Function([k](std::vector<Value>& args, Kwargs&) {
              if (args.empty()) return Value();
              return args[static_cast<size_t>(k) % args.size()];
            }));
      SetVar("loop", loop);
      BindTargets(n, items[k]);
      Flow f = Exec(*n.body);
      if (f == Flow::kBreak) break;
    }
    if (len == 0 && n.else_body) Exec(*n.else_body);
    PopScope();
    return Flow::kNormal;
  }

  void BindTargets(const Node& n, const Value& item) {
    if (n.targets.size() == 1) {
      SetVar(n.targets[0], item);
      return;
    }
    List parts = Iterate(item, n.line);
    if (parts.size() != n.targets.size()) {
      Fail(n.line, fmt::format("cannot unpack {} values into {} loop variables", parts.size(),
                               n.targets.size()));
    }
    for (size_t k = 0; k < parts.size(); ++k) SetVar(n.targets[k], parts[k]);
  }

  Value Eval(const Expr& e) {
    Step(e.line);
    switch (e.kind) {
      case Expr::Kind::kLiteral:
        switch (e.lit) {
          case Expr::LitKind::kNone:
            return Value::None();
          case Expr::LitKind::kBool:
            return Value::Bool(e.b);
          case Expr::LitKind::kInt:
            return Value::Int(e.i);
          case Expr::LitKind::kFloat:
            return Value::Float(e.f);
          case Expr::LitKind::kString:
            return Value::Str(e.str);
        }
        return Value();
      case Expr::Kind::kName:
        return Lookup(e.str);
      case Expr::Kind::kList:
      case Expr::Kind::kTuple: {
        Value v = Value::MakeList();
        for (const auto& x : e.items) v.list->push_back(Eval(*x));
        return v;
      }
      case Expr::Kind::kDict: {
        Value v = Value::MakeDict();
        for (size_t k = 0; k + 1 < e.items.size(); k += 2) {
          Value key = Eval(*e.items[k]);
          if (key.t != Value::T::kString) Fail(e.line, "dict keys must be strings here");
          v.dict->Set(key.s, Eval(*e.items[k + 1]));
        }
        return v;
      }
      case Expr::Kind::kAttr:
        return GetAttr(Eval(*e.a), e.str);
      case Expr::Kind::kIndex:
        return GetItem(Eval(*e.a), Eval(*e.b2), e.line);
      case Expr::Kind::kSlice:
        return Slice(e);
      case Expr::Kind::kCall:
        return Call(e);
      case Expr::Kind::kFilter:
        return Filter(e);
      case Expr::Kind::kTest: {
        bool r = Test(e);
        return Value::Bool(e.negate ? !r : r);
      }
      case Expr::Kind::kUnary: {
        Value v = Eval(*e.a);
        if (e.str == "not") return Value::Bool(!Truthy(v));
        if (v.t == Value::T::kInt || v.t == Value::T::kBool) {
          return Value::Int(e.str == "-" ? -AsInt(v) : AsInt(v));
        }
        if (v.t == Value::T::kFloat) return Value::Float(e.str == "-" ? -v.f : v.f);
        Fail(e.line, fmt::format("bad operand type for unary {}: '{}'", e.str, TypeName(v)));
      }
      case Expr::Kind::kBinary:
        return Binary(e);
      case Expr::Kind::kCond:
        if (Truthy(Eval(*e.a))) return Eval(*e.b2);
        return e.c ? Eval(*e.c) : Value();
    }
    return Value();
  }

  static Value GetAttr(const Value& obj, const std::string& name) {
    if (obj.t == Value::T::kDict) {
      const Value* v = obj.dict->Find(name);
      if (v) return *v;
    }
    return Value();
  }

  Value GetItem(const Value& obj, const Value& key, int line) {
    if (obj.t == Value::T::kDict) {
      if (key.t != Value::T::kString) return Value();
      const Value* v = obj.dict->Find(key.s);
      return v ? *v : Value();
    }
    if (obj.t == Value::T::kList || obj.t == Value::T::kString) {
      if (key.t == Value::T::kString) return Value();
      if (key.t != Value::T::kInt && key.t != Value::T::kBool) {
        Fail(line, fmt::format("indices must be integers, not {}", TypeName(key)));
      }
      int64_t k = AsInt(key);
      if (obj.t == Value::T::kList) {
        int64_t n = static_cast<int64_t>(obj.list->size());
        if (k < 0) k += n;
        if (k < 0 || k >= n) return Value();
        return (*obj.list)[static_cast<size_t>(k)];
      }
      std::vector<std::string_view> cs = Chars(obj.s);
      int64_t n = static_cast<int64_t>(cs.size());
      if (k < 0) k += n;
      if (k < 0 || k >= n) return Value();
      return Value::Str(std::string(cs[static_cast<size_t>(k)]));
    }
    return Value();
  }

  Value Slice(const Expr& e) {
    Value obj = Eval(*e.a);
    Value parts[3];
    for (int k = 0; k < 3; ++k) {
      if (e.items[k]) parts[k] = Eval(*e.items[k]);
    }
    auto run = [&](int64_t len, auto&& take) {
      int64_t a, b, st;
      SliceIndices(len, &parts[0], &parts[1], &parts[2], &a, &b, &st, e.line);
      if (st > 0) {
        for (int64_t k = a; k < b; k += st) take(k);
      } else {
        for (int64_t k = a; k > b; k += st) take(k);
      }
    };
    if (obj.t == Value::T::kList) {
      Value out = Value::MakeList();
      run(static_cast<int64_t>(obj.list->size()),
          [&](int64_t k) { out.list->push_back((*obj.list)[static_cast<size_t>(k)]); });
      return out;
    }
    if (obj.t == Value::T::kString) {
      std::vector<std::string_view> cs = Chars(obj.s);
      std::string out;
      run(static_cast<int64_t>(cs.size()), [&](int64_t k) { out += cs[static_cast<size_t>(k)]; });
      return Value::Str(out);
    }
    if (obj.t == Value::T::kUndefined) return Value();
    Fail(e.line, fmt::format("'{}' object is not subscriptable", TypeName(obj)));
  }

  void EvalArgs(const Expr& e, std::vector<Value>* args, Kwargs* kw) {
    for (const auto& a : e.items) args->push_back(Eval(*a));
    for (const auto& [k, v] : e.kwargs) kw->items.emplace_back(k, Eval(*v));
  }

  static const Value* Arg(std::vector<Value>& args, Kwargs& kw, size_t pos, const char* name) {
    for (const auto& [k, v] : kw.items) {
      if (k == name) return &v;
    }
    return pos < args.size() ? &args[pos] : nullptr;
  }

  std::string StrArg(std::vector<Value>& args, Kwargs& kw, size_t pos, const char* name,
                     const char* fn, int line) {
    const Value* v = Arg(args, kw, pos, name);
    if (!v || v->t != Value::T::kString) {
      Fail(line, fmt::format("{}() needs a string argument '{}'", fn, name));
    }
    return v->s;
  }

  Value Call(const Expr& e) {
    std::vector<Value> args;
    Kwargs kw;
    if (e.a->kind == Expr::Kind::kAttr) {
      Value obj = Eval(*e.a->a);
      const std::string& m = e.a->str;
      if (obj.t == Value::T::kString ||
          (obj.t == Value::T::kDict && !obj.is_namespace &&
           (m == "items" || m == "keys" || m == "values" || m == "get"))) {
        EvalArgs(e, &args, &kw);
        return Method(obj, m, args, kw, e.line);
      }
      Value fn = GetAttr(obj, m);
      if (fn.t != Value::T::kFunc) {
        Fail(e.line, fmt::format("'{}' object has no method '{}'", TypeName(obj), m));
      }
      EvalArgs(e, &args, &kw);
      return (*fn.fn)(args, kw);
    }
    if (e.a->kind == Expr::Kind::kName) {
      const std::string& name = e.a->str;
      Value fn = Lookup(name);
      EvalArgs(e, &args, &kw);
      if (fn.t == Value::T::kFunc) return (*fn.fn)(args, kw);
      return Builtin(name, args, kw, e.line);
    }
    Value fn = Eval(*e.a);
    if (fn.t != Value::T::kFunc)
      Fail(e.line, fmt::format("'{}' object is not callable", TypeName(fn)));
    EvalArgs(e, &args, &kw);
    return (*fn.fn)(args, kw);
  }

  Value Builtin(const std::string& name, std::vector<Value>& args, Kwargs& kw, int line) {
    if (name == "raise_exception") {
      Fail(line, fmt::format("raise_exception: {}", args.empty() ? "" : Str(args[0])));
    }
    if (name == "namespace" || name == "dict") {
      Value ns = Value::MakeDict();
      ns.is_namespace = name == "namespace";
      if (!args.empty() && args[0].t == Value::T::kDict) {
        for (const auto& kv : args[0].dict->items) ns.dict->Set(kv.first, kv.second);
      }
      for (auto& [k, v] : kw.items) ns.dict->Set(k, v);
      return ns;
    }
    if (name == "range") {
      int64_t a = 0, b = 0, st = 1;
      for (const auto& v : args) {
        if (v.t != Value::T::kInt && v.t != Value::T::kBool) Fail(line, "range() needs integers");
      }
      if (args.size() == 1) {
        b = AsInt(args[0]);
      } else if (args.size() >= 2) {
        a = AsInt(args[0]);
        b = AsInt(args[1]);
        if (args.size() >= 3) st = AsInt(args[2]);
      } else {
        Fail(line, "range() needs 1 to 3 arguments");
      }
      if (st == 0) Fail(line, "range() step must not be zero");
      Value out = Value::MakeList();
      for (int64_t k = a; st > 0 ? k < b : k > b; k += st) {
        if (static_cast<int64_t>(out.list->size()) >= kMaxRange) {
          Fail(line, fmt::format("range() longer than {}", kMaxRange));
        }
        out.list->push_back(Value::Int(k));
      }
      return out;
    }
    if (name == "strftime_now") {
      std::string f = StrArg(args, kw, 0, "format", "strftime_now", line);
      std::time_t now = std::time(nullptr);
      std::tm tm{};
      localtime_r(&now, &tm);
      char buf[256];
      size_t n = std::strftime(buf, sizeof buf, f.c_str(), &tm);
      return Value::Str(std::string(buf, n));
    }
    Fail(line, fmt::format("'{}' is undefined or not callable", name));
  }

  Value Method(const Value& obj, const std::string& m, std::vector<Value>& args, Kwargs& kw,
               int line) {
    if (obj.t == Value::T::kDict) {
      if (m == "items") {
        Value out = Value::MakeList();
        for (const auto& [k, v] : obj.dict->items) {
          out.list->push_back(Value::MakeList({Value::Str(k), v}));
        }
        return out;
      }
      if (m == "keys" || m == "values") {
        Value out = Value::MakeList();
        for (const auto& [k, v] : obj.dict->items) {
          out.list->push_back(m == "keys" ? Value::Str(k) : v);
        }
        return out;
      }
      // get
      const Value* key = Arg(args, kw, 0, "key");
      if (!key) Fail(line, "get() needs a key");
      if (key->t == Value::T::kString) {
        if (const Value* v = obj.dict->Find(key->s)) return *v;
      }
      const Value* def = Arg(args, kw, 1, "default");
      return def ? *def : Value::None();
    }
    const std::string& s = obj.s;
    if (m == "startswith" || m == "endswith") {
      const Value* p = Arg(args, kw, 0, "prefix");
      if (!p) Fail(line, fmt::format("{}() needs an argument", m));
      List options = p->t == Value::T::kList ? *p->list : List{*p};
      for (const auto& o : options) {
        if (o.t != Value::T::kString) Fail(line, fmt::format("{}() needs strings", m));
        bool hit = m == "startswith" ? s.compare(0, o.s.size(), o.s) == 0 && s.size() >= o.s.size()
                                     : s.size() >= o.s.size() &&
                                           s.compare(s.size() - o.s.size(), o.s.size(), o.s) == 0;
        if (hit) return Value::Bool(true);
      }
      return Value::Bool(false);
    }
    if (m == "strip" || m == "lstrip" || m == "rstrip") {
      const Value* chars = Arg(args, kw, 0, "chars");
      if (chars && chars->t == Value::T::kNone) chars = nullptr;
      return Value::Str(Strip(s, chars, m != "rstrip", m != "lstrip"));
    }
    if (m == "split") {
      const Value* sep = Arg(args, kw, 0, "sep");
      if (sep && sep->t == Value::T::kNone) sep = nullptr;
      const Value* mx = Arg(args, kw, 1, "maxsplit");
      return Split(s, sep, mx && mx->t == Value::T::kInt ? mx->i : -1, line);
    }
    if (m == "splitlines") {
      Value out = Value::MakeList();
      size_t pos = 0;
      while (pos < s.size()) {
        size_t e = s.find_first_of("\r\n", pos);
        if (e == std::string::npos) {
          out.list->push_back(Value::Str(s.substr(pos)));
          break;
        }
        out.list->push_back(Value::Str(s.substr(pos, e - pos)));
        pos = e + ((s[e] == '\r' && e + 1 < s.size() && s[e + 1] == '\n') ? 2 : 1);
      }
      return out;
    }
    if (m == "upper") return Value::Str(Upper(s));
    if (m == "lower") return Value::Str(Lower(s));
    if (m == "title") return Value::Str(Title(s));
    if (m == "capitalize") return Value::Str(Capitalize(s));
    if (m == "replace") {
      std::string a = StrArg(args, kw, 0, "old", "replace", line);
      std::string b = StrArg(args, kw, 1, "new", "replace", line);
      const Value* c = Arg(args, kw, 2, "count");
      std::string r = Replace(s, a, b, c && c->t == Value::T::kInt ? c->i : -1);
      if (r.size() > kMaxOutput) Fail(line, "replace() result too large");
      return Value::Str(std::move(r));
    }
    if (m == "find" || m == "count") {
      std::string sub = StrArg(args, kw, 0, "sub", m.c_str(), line);
      if (m == "find") {
        size_t at = s.find(sub);
        return Value::Int(at == std::string::npos ? -1 : CharCount(s.substr(0, at)));
      }
      if (sub.empty()) return Value::Int(CharCount(s) + 1);
      int64_t n = 0;
      for (size_t at = s.find(sub); at != std::string::npos; at = s.find(sub, at + sub.size())) ++n;
      return Value::Int(n);
    }
    if (m == "join") {
      const Value* it = Arg(args, kw, 0, "iterable");
      if (!it) Fail(line, "join() needs an argument");
      std::string out;
      bool first = true;
      for (const auto& x : Iterate(*it, line)) {
        if (!first) out += s;
        first = false;
        if (x.t != Value::T::kString) Fail(line, "join() needs strings");
        out += x.s;
      }
      return Value::Str(out);
    }
    Fail(line, fmt::format("'str' object has no method '{}'", m));
  }

  Value Binary(const Expr& e) {
    const std::string& op = e.str;
    if (op == "and") {
      Value a = Eval(*e.a);
      return Truthy(a) ? Eval(*e.b2) : a;
    }
    if (op == "or") {
      Value a = Eval(*e.a);
      return Truthy(a) ? a : Eval(*e.b2);
    }
    Value a = Eval(*e.a);
    Value b = Eval(*e.b2);
    const int line = e.line;
    if (op == "==") return Value::Bool(Equal(a, b));
    if (op == "!=") return Value::Bool(!Equal(a, b));
    if (op == "<") return Value::Bool(Compare(a, b, line, op) < 0);
    if (op == "<=") return Value::Bool(Compare(a, b, line, op) <= 0);
    if (op == ">") return Value::Bool(Compare(a, b, line, op) > 0);
    if (op == ">=") return Value::Bool(Compare(a, b, line, op) >= 0);
    if (op == "in" || op == "not in") {
      bool r = Contains(b, a, line);
      return Value::Bool(op == "in" ? r : !r);
    }
    if (op == "~") {
      std::string s = Str(a) + Str(b);
      if (s.size() > kMaxOutput) Fail(line, "string too large");
      return Value::Str(std::move(s));
    }
    if (op == "+") {
      if (a.t == Value::T::kString && b.t == Value::T::kString) {
        if (a.s.size() + b.s.size() > kMaxOutput) Fail(line, "string too large");
        return Value::Str(a.s + b.s);
      }
      if (a.t == Value::T::kList && b.t == Value::T::kList) {
        List out = *a.list;
        out.insert(out.end(), b.list->begin(), b.list->end());
        return Value::MakeList(std::move(out));
      }
    }
    if (op == "*") {
      const Value* seq = a.t == Value::T::kString || a.t == Value::T::kList ? &a : &b;
      const Value* num = seq == &a ? &b : &a;
      if ((seq->t == Value::T::kString || seq->t == Value::T::kList) &&
          (num->t == Value::T::kInt || num->t == Value::T::kBool)) {
        int64_t n = std::max<int64_t>(0, AsInt(*num));
        size_t unit = seq->t == Value::T::kString ? seq->s.size() : seq->list->size();
        if (unit && static_cast<uint64_t>(n) > kMaxOutput / unit)
          Fail(line, "repetition too large");
        if (seq->t == Value::T::kString) {
          std::string out;
          for (int64_t k = 0; k < n; ++k) out += seq->s;
          return Value::Str(out);
        }
        List out;
        for (int64_t k = 0; k < n; ++k) out.insert(out.end(), seq->list->begin(), seq->list->end());
        return Value::MakeList(std::move(out));
      }
    }
    if (!a.is_number() || !b.is_number()) {
      Fail(line, fmt::format("unsupported operand types for {}: '{}' and '{}'", op, TypeName(a),
                             TypeName(b)));
    }
    bool flt = a.t == Value::T::kFloat || b.t == Value::T::kFloat;
    if (op == "/") {
      if (AsDouble(b) == 0) Fail(line, "division by zero");
      return Value::Float(AsDouble(a) / AsDouble(b));
    }
    if (op == "**") {
      if (!flt && AsInt(b) >= 0) {
        double r = std::pow(AsDouble(a), AsDouble(b));
        if (std::fabs(r) < 9.0e18) {
          int64_t out = 1;
          for (int64_t k = 0; k < AsInt(b); ++k) out *= AsInt(a);
          return Value::Int(out);
        }
        Fail(line, "integer power too large");
      }
      return Value::Float(std::pow(AsDouble(a), AsDouble(b)));
    }
    if (flt) {
      double x = AsDouble(a), y = AsDouble(b);
      if (op == "+") return Value::Float(x + y);
      if (op == "-") return Value::Float(x - y);
      if (op == "*") return Value::Float(x * y);
      if (y == 0) Fail(line, "division by zero");
      if (op == "//") return Value::Float(std::floor(x / y));
      double r = std::fmod(x, y);
      if (r != 0 && ((r < 0) != (y < 0))) r += y;
      return Value::Float(r);
    }
    int64_t x = AsInt(a), y = AsInt(b);
    int64_t r;
    if (op == "+") {
      if (__builtin_add_overflow(x, y, &r)) Fail(line, "integer overflow");
      return Value::Int(r);
    }
    if (op == "-") {
      if (__builtin_sub_overflow(x, y, &r)) Fail(line, "integer overflow");
      return Value::Int(r);
    }
    if (op == "*") {
      if (__builtin_mul_overflow(x, y, &r)) Fail(line, "integer overflow");
      return Value::Int(r);
    }
    if (y == 0) Fail(line, "division by zero");
    if (x == INT64_MIN && y == -1) Fail(line, "integer overflow");
    int64_t q = x / y, m = x % y;
    if (m != 0 && ((m < 0) != (y < 0))) {
      --q;
      m += y;
    }
    return Value::Int(op == "//" ? q : m);
  }

  bool Contains(const Value& container, const Value& item, int line) {
    switch (container.t) {
      case Value::T::kString:
        if (item.t != Value::T::kString) {
          Fail(line, fmt::format("'in <string>' requires a string, not {}", TypeName(item)));
        }
        return container.s.find(item.s) != std::string::npos;
      case Value::T::kList:
        for (const auto& x : *container.list) {
          if (Equal(x, item)) return true;
        }
        return false;
      case Value::T::kDict:
        return item.t == Value::T::kString && container.dict->Find(item.s) != nullptr;
      case Value::T::kUndefined:
        return false;
      default:
        Fail(line, fmt::format("argument of type '{}' is not iterable", TypeName(container)));
    }
  }

  bool Test(const Expr& e) {
    const std::string& name = e.str;
    Value v = Eval(*e.a);
    std::vector<Value> args;
    Kwargs kw;
    EvalArgs(e, &args, &kw);
    auto arg0 = [&]() -> const Value& {
      if (args.empty()) Fail(e.line, fmt::format("test '{}' needs an argument", name));
      return args[0];
    };
    if (name == "defined") return v.defined();
    if (name == "undefined") return !v.defined();
    if (name == "none") return v.t == Value::T::kNone;
    if (name == "boolean") return v.t == Value::T::kBool;
    if (name == "true") return v.t == Value::T::kBool && v.b;
    if (name == "false") return v.t == Value::T::kBool && !v.b;
    if (name == "string") return v.t == Value::T::kString;
    if (name == "number") return v.t == Value::T::kInt || v.t == Value::T::kFloat;
    if (name == "integer") return v.t == Value::T::kInt;
    if (name == "float") return v.t == Value::T::kFloat;
    if (name == "mapping") return v.t == Value::T::kDict;
    if (name == "iterable") {
      return v.t == Value::T::kList || v.t == Value::T::kDict || v.t == Value::T::kString;
    }
    if (name == "sequence") {
      return v.t == Value::T::kList || v.t == Value::T::kString || v.t == Value::T::kDict;
    }
    if (name == "callable") return v.t == Value::T::kFunc;
    if (name == "odd" || name == "even") {
      if (v.t != Value::T::kInt) Fail(e.line, fmt::format("test '{}' needs an integer", name));
      return (((v.i % 2) + 2) % 2 == 1) == (name == "odd");
    }
    if (name == "divisibleby") {
      const Value& d = arg0();
      if (v.t != Value::T::kInt || d.t != Value::T::kInt || d.i == 0) {
        Fail(e.line, "test 'divisibleby' needs non-zero integers");
      }
      return v.i % d.i == 0;
    }
    if (name == "eq" || name == "equalto" || name == "==") return Equal(v, arg0());
    if (name == "ne" || name == "!=") return !Equal(v, arg0());
    if (name == "lt" || name == "<") return Compare(v, arg0(), e.line, "<") < 0;
    if (name == "le" || name == "<=") return Compare(v, arg0(), e.line, "<=") <= 0;
    if (name == "gt" || name == ">") return Compare(v, arg0(), e.line, ">") > 0;
    if (name == "ge" || name == ">=") return Compare(v, arg0(), e.line, ">=") >= 0;
    if (name == "in") return Contains(arg0(), v, e.line);
    if (name == "sameas") {
      const Value& o = arg0();
      if (v.t != o.t) return false;
      if (v.t == Value::T::kList) return v.list == o.list;
      if (v.t == Value::T::kDict) return v.dict == o.dict;
      return Equal(v, o);
    }
    if (name == "lower") return v.t == Value::T::kString && Lower(v.s) == v.s;
    if (name == "upper") return v.t == Value::T::kString && Upper(v.s) == v.s;
    Fail(e.line, fmt::format("unknown test '{}'", name));
  }

  // Applies test `name` (as select/reject use it) to v.
  bool ApplyTest(const std::string& name, const Value& v, std::vector<Value> extra, int line) {
    Expr fake;
    fake.kind = Expr::Kind::kTest;
    fake.line = line;
    fake.str = name;
    // Evaluate through a temporary scope so Test() can read the value and arguments.
    PushScope();
    SetVar("\x01v", v);
    auto nm = std::make_unique<Expr>();
    nm->kind = Expr::Kind::kName;
    nm->str = "\x01v";
    nm->line = line;
    fake.a = std::move(nm);
    for (size_t k = 0; k < extra.size(); ++k) {
      std::string var = fmt::format("\x01a{}", k);
      SetVar(var, extra[k]);
      auto an = std::make_unique<Expr>();
      an->kind = Expr::Kind::kName;
      an->str = var;
      an->line = line;
      fake.items.push_back(std::move(an));
    }
    bool r = Test(fake);
    PopScope();
    return r;
  }

  Value Filter(const Expr& e) {
    const std::string& name = e.str;
    Value v = Eval(*e.a);
    std::vector<Value> args;
    Kwargs kw;
    EvalArgs(e, &args, &kw);
    const int line = e.line;
    auto need_str = [&]() -> const std::string& {
      if (v.t != Value::T::kString)
        Fail(line, fmt::format("filter '{}' needs a string, got {}", name, TypeName(v)));
      return v.s;
    };
    if (name == "length" || name == "count") {
      switch (v.t) {
        case Value::T::kString:
          return Value::Int(CharCount(v.s));
        case Value::T::kList:
          return Value::Int(static_cast<int64_t>(v.list->size()));
        case Value::T::kDict:
          return Value::Int(static_cast<int64_t>(v.dict->items.size()));
        case Value::T::kUndefined:
          return Value::Int(0);
        default:
          Fail(line, fmt::format("object of type '{}' has no len()", TypeName(v)));
      }
    }
    if (name == "tojson") {
      const Value* ind = Arg(args, kw, 0, "indent");
      int indent = ind && ind->t == Value::T::kInt
                       ? static_cast<int>(std::clamp<int64_t>(ind->i, 0, 64))
                       : -1;
      nlohmann::ordered_json j = ToJsonValue(v, line);
      const Value* sk = Arg(args, kw, 99, "sort_keys");
      if (sk && Truthy(*sk)) j = nlohmann::ordered_json::parse(nlohmann::json(j).dump());
      return Value::Str(ToJson(j, indent));
    }
    if (name == "string") return Value::Str(Str(v));
    if (name == "safe" || name == "e" || name == "escape") {
      if (name == "safe") return v;
      std::string s = Str(v), out;
      for (char c : s) {
        switch (c) {
          case '&':
            out += "&amp;";
            break;
          case '<':
            out += "&lt;";
            break;
          case '>':
            out += "&gt;";
            break;
          case '"':
            out += "&#34;";
            break;
          case '\'':
            out += "&#39;";
            break;
          default:
            out += c;
        }
      }
      return Value::Str(out);
    }
    if (name == "trim") {
      const Value* chars = Arg(args, kw, 0, "chars");
      return Value::Str(Strip(need_str(), chars, true, true));
    }
    if (name == "upper") return Value::Str(Upper(need_str()));
    if (name == "lower") return Value::Str(Lower(need_str()));
    if (name == "title") return Value::Str(Title(need_str()));
    if (name == "capitalize") return Value::Str(Capitalize(need_str()));
    if (name == "replace") {
      std::string a = StrArg(args, kw, 0, "old", "replace", line);
      std::string b = StrArg(args, kw, 1, "new", "replace", line);
      const Value* c = Arg(args, kw, 2, "count");
      std::string r = Replace(Str(v), a, b, c && c->t == Value::T::kInt ? c->i : -1);
      if (r.size() > kMaxOutput) Fail(line, "replace result too large");
      return Value::Str(std::move(r));
    }
    if (name == "default" || name == "d") {
      const Value* dv = Arg(args, kw, 0, "default_value");
      const Value* boolean = Arg(args, kw, 1, "boolean");
      bool use = !v.defined() || (boolean && Truthy(*boolean) && !Truthy(v));
      if (use) return dv ? *dv : Value::Str("");
      return v;
    }
    if (name == "int") {
      if (v.t == Value::T::kInt || v.t == Value::T::kBool) return Value::Int(AsInt(v));
      if (v.t == Value::T::kFloat && std::isfinite(v.f) && std::fabs(v.f) < 9e18)
        return Value::Int(static_cast<int64_t>(v.f));
      if (v.t == Value::T::kString) {
        char* end = nullptr;
        std::string t = Strip(v.s, nullptr, true, true);
        long long x = std::strtoll(t.c_str(), &end, 10);
        if (!t.empty() && *end == '\0') return Value::Int(x);
      }
      const Value* dv = Arg(args, kw, 0, "default");
      return dv ? *dv : Value::Int(0);
    }
    if (name == "float") {
      if (v.is_number()) return Value::Float(AsDouble(v));
      if (v.t == Value::T::kString) {
        char* end = nullptr;
        std::string t = Strip(v.s, nullptr, true, true);
        double x = std::strtod(t.c_str(), &end);
        if (!t.empty() && *end == '\0') return Value::Float(x);
      }
      return Value::Float(0);
    }
    if (name == "abs") {
      if (v.t == Value::T::kInt) return Value::Int(v.i < 0 ? -v.i : v.i);
      if (v.t == Value::T::kFloat) return Value::Float(std::fabs(v.f));
      Fail(line, "abs needs a number");
    }
    if (name == "round") {
      const Value* prec = Arg(args, kw, 0, "precision");
      int64_t p = prec && prec->t == Value::T::kInt ? std::clamp<int64_t>(prec->i, 0, 15) : 0;
      double scale = std::pow(10.0, static_cast<double>(p));
      return Value::Float(std::round(AsDouble(v) * scale) / scale);
    }
    if (name == "first" || name == "last") {
      List items = Iterate(v, line);
      if (items.empty()) return Value();
      return name == "first" ? items.front() : items.back();
    }
    if (name == "list") return Value::MakeList(Iterate(v, line));
    if (name == "reverse") {
      if (v.t == Value::T::kString) {
        std::vector<std::string_view> cs = Chars(v.s);
        std::string out;
        for (auto it = cs.rbegin(); it != cs.rend(); ++it) out += *it;
        return Value::Str(out);
      }
      List items = Iterate(v, line);
      std::reverse(items.begin(), items.end());
      return Value::MakeList(std::move(items));
    }
    if (name == "join") {
      const Value* sep = Arg(args, kw, 0, "d");
      const Value* attr = Arg(args, kw, 1, "attribute");
      std::string out;
      bool first = true;
      for (const auto& x : Iterate(v, line)) {
        if (!first) out += sep ? Str(*sep) : "";
        first = false;
        out += Str(attr ? GetAttr(x, Str(*attr)) : x);
        if (out.size() > kMaxOutput) Fail(line, "join result too large");
      }
      return Value::Str(out);
    }
    if (name == "items") {
      if (v.t == Value::T::kUndefined) return Value::MakeList();
      if (v.t != Value::T::kDict) Fail(line, "filter 'items' needs a mapping");
      std::vector<Value> none;
      Kwargs nokw;
      return Method(v, "items", none, nokw, line);
    }
    if (name == "dictsort") {
      if (v.t != Value::T::kDict) Fail(line, "filter 'dictsort' needs a mapping");
      auto items = v.dict->items;
      std::stable_sort(items.begin(), items.end(),
                       [](const auto& a, const auto& b) { return a.first < b.first; });
      Value out = Value::MakeList();
      for (auto& [k, x] : items) out.list->push_back(Value::MakeList({Value::Str(k), x}));
      return out;
    }
    if (name == "unique") {
      List out;
      for (const auto& x : Iterate(v, line)) {
        bool seen = false;
        for (const auto& y : out) seen = seen || Equal(x, y);
        if (!seen) out.push_back(x);
      }
      return Value::MakeList(std::move(out));
    }
    if (name == "sort") {
      List items = Iterate(v, line);
      const Value* rev = Arg(args, kw, 0, "reverse");
      const Value* attr = Arg(args, kw, 2, "attribute");
      auto key = [&](const Value& x) { return attr ? GetAttr(x, Str(*attr)) : x; };
      std::stable_sort(items.begin(), items.end(), [&](const Value& a, const Value& b) {
        return Compare(key(a), key(b), line, "<") < 0;
      });
      if (rev && Truthy(*rev)) std::reverse(items.begin(), items.end());
      return Value::MakeList(std::move(items));
    }
    if (name == "sum" || name == "min" || name == "max") {
      List items = Iterate(v, line);
      if (name == "sum") {
        Value acc = Value::Int(0);
        for (const auto& x : items) {
          if (!x.is_number()) Fail(line, "sum needs numbers");
          acc = (acc.t == Value::T::kFloat || x.t == Value::T::kFloat)
                    ? Value::Float(AsDouble(acc) + AsDouble(x))
                    : Value::Int(AsInt(acc) + AsInt(x));
        }
        return acc;
      }
      if (items.empty()) return Value();
      Value best = items[0];
      for (const auto& x : items) {
        int c = Compare(x, best, line, "<");
        if (name == "min" ? c < 0 : c > 0) best = x;
      }
      return best;
    }
    if (name == "map") {
      List out;
      const Value* attr = Arg(args, kw, 99, "attribute");
      for (const auto& x : Iterate(v, line)) {
        if (attr) {
          Value got = GetAttr(x, Str(*attr));
          if (!got.defined()) {
            const Value* dv = Arg(args, kw, 99, "default");
            if (dv) got = *dv;
          }
          out.push_back(got);
        } else {
          if (args.empty() || args[0].t != Value::T::kString)
            Fail(line, "map needs a filter name or attribute=");
          Expr fe;
          fe.kind = Expr::Kind::kFilter;
          fe.line = line;
          fe.str = args[0].s;
          PushScope();
          SetVar("\x01v", x);
          auto nm = std::make_unique<Expr>();
          nm->kind = Expr::Kind::kName;
          nm->str = "\x01v";
          fe.a = std::move(nm);
          out.push_back(Filter(fe));
          PopScope();
        }
      }
      return Value::MakeList(std::move(out));
    }
    if (name == "select" || name == "reject" || name == "selectattr" || name == "rejectattr") {
      bool attr_mode = name == "selectattr" || name == "rejectattr";
      bool keep_if = name == "select" || name == "selectattr";
      size_t k0 = attr_mode ? 1 : 0;
      std::string attr;
      if (attr_mode) {
        if (args.empty() || args[0].t != Value::T::kString)
          Fail(line, fmt::format("{} needs an attribute name", name));
        attr = args[0].s;
      }
      List out;
      for (const auto& x : Iterate(v, line)) {
        Value subject = attr_mode ? GetAttr(x, attr) : x;
        bool r;
        if (args.size() <= k0) {
          r = Truthy(subject);
        } else {
          if (args[k0].t != Value::T::kString)
            Fail(line, fmt::format("{}: test name must be a string", name));
          std::vector<Value> extra(args.begin() + static_cast<long>(k0) + 1, args.end());
          r = ApplyTest(args[k0].s, subject, extra, line);
        }
        if (r == keep_if) out.push_back(x);
      }
      return Value::MakeList(std::move(out));
    }
    if (name == "indent") {
      const Value* w = Arg(args, kw, 0, "width");
      const Value* first = Arg(args, kw, 1, "first");
      const Value* blank = Arg(args, kw, 2, "blank");
      std::string pad =
          w && w->t == Value::T::kString
              ? w->s
              : std::string(static_cast<size_t>(w && w->t == Value::T::kInt
                                                    ? std::clamp<int64_t>(w->i, 0, 256)
                                                    : 4),
                            ' ');
      std::string s = Str(v), out;
      size_t pos = 0;
      bool first_line = true;
      while (true) {
        size_t e = s.find('\n', pos);
        std::string ln = s.substr(pos, e == std::string::npos ? std::string::npos : e - pos);
        bool do_pad = (first_line ? (first && Truthy(*first)) : true) &&
                      (!ln.empty() || (blank && Truthy(*blank)));
        if (do_pad) out += pad;
        out += ln;
        if (e == std::string::npos) break;
        out += '\n';
        pos = e + 1;
        first_line = false;
      }
      return Value::Str(out);
    }
    if (name == "wordcount") {
      Value parts = Split(Str(v), nullptr, -1, line);
      return Value::Int(static_cast<int64_t>(parts.list->size()));
    }
    Fail(line, fmt::format("unknown filter '{}'", name));
  }

  std::string* out_;
  std::vector<std::unordered_map<std::string, Value>> scopes_;
  int64_t steps_ = 0;
};

}  // namespace

std::string ToJson(const nlohmann::ordered_json& value, int indent) {
  std::string out;
  DumpJson(value, indent, 0, &out);
  return out;
}

Template::~Template() = default;

Result<std::shared_ptr<const Template>> Template::Parse(std::string_view source) {
  auto t = std::shared_ptr<Template>(new Template());
  try {
    t->root_ = ParseTemplate(std::string(source));
  } catch (const JinjaError& e) {
    return InvalidArgument("chat template syntax error: {}", e.what());
  }
  return std::shared_ptr<const Template>(std::move(t));
}

Result<std::string> Template::Render(const nlohmann::ordered_json& context) const {
  std::string out;
  Evaluator ev(&out);
  ev.PushScope();
  if (context.is_object()) {
    for (const auto& [k, v] : context.items()) ev.SetVar(k, FromJson(v));
  }
  ev.PushScope();
  try {
    ev.Exec(*root_);
  } catch (const JinjaError& e) {
    return InvalidArgument("chat template error: {}", e.what());
  }
  return out;
}

}  // namespace qilin::tokenizer::jinja
