// Jinja subset: evaluation (statements, expressions, filters, tests and methods).
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

constexpr size_t kMaxOutput = 16u << 20;  // bytes a render may produce
constexpr int64_t kMaxSteps = 5'000'000;  // evaluation steps (bounds loops)
constexpr int64_t kMaxRange = 100'000;

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
          Nest(ns, n.line);
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
      SetVar("loop", Nest(loop, n.line));
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
        return Nest(v, e.line);
      }
      case Expr::Kind::kDict: {
        Value v = Value::MakeDict();
        for (size_t k = 0; k + 1 < e.items.size(); k += 2) {
          Value key = Eval(*e.items[k]);
          if (key.t != Value::T::kString) Fail(e.line, "dict keys must be strings here");
          v.dict->Set(key.s, Eval(*e.items[k + 1]));
        }
        return Nest(v, e.line);
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
      return Nest(out, e.line);
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
      return Nest(ns, line);
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
          Value pair = Value::MakeList({Value::Str(k), v});
          out.list->push_back(Nest(pair, line));
        }
        return Nest(out, line);
      }
      if (m == "keys" || m == "values") {
        Value out = Value::MakeList();
        for (const auto& [k, v] : obj.dict->items) {
          out.list->push_back(m == "keys" ? Value::Str(k) : v);
        }
        return Nest(out, line);
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
      for (auto& [k, x] : items) {
        Value pair = Value::MakeList({Value::Str(k), x});
        out.list->push_back(Nest(pair, line));
      }
      return Nest(out, line);
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
  try {
    if (context.is_object()) {
      for (const auto& [k, v] : context.items()) ev.SetVar(k, FromJson(v));
    }
    ev.PushScope();
    ev.Exec(*root_);
  } catch (const JinjaError& e) {
    return InvalidArgument("chat template error: {}", e.what());
  }
  return out;
}

}  // namespace qilin::tokenizer::jinja
