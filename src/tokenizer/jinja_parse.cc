// Jinja subset: template text -> syntax tree. Lexing works per tag: the template is split into
// text / {{ }} / {% %} / {# #} segments (whitespace control applied), then each tag's content is
// tokenized and parsed by recursive descent with Jinja2's operator precedence.
#include <algorithm>
#include <cstdlib>
#include <cstring>

#include <fmt/format.h>

#include "tokenizer/jinja_ast.h"

namespace qilin::tokenizer::jinja {
namespace {

constexpr int kMaxDepth = 200;       // nesting of blocks and parser recursion
constexpr int kMaxExprHeight = 256;  // height of an expression tree (bounds evaluation)

[[noreturn]] void Fail(int line, const std::string& msg) {
  throw JinjaError(fmt::format("line {}: {}", line, msg));
}

// ---- segmentation ----

struct Segment {
  enum Type { kText, kVar, kBlock, kComment } type;
  std::string content;
  int line;
  bool at_line_start = false;  // kText: the source char before it is '\n' or it starts the source
  char left = 0, right = 0;    // '-' or '+' modifiers
};

int LineAt(const std::string& s, size_t pos, size_t* cached_pos, int* cached_line) {
  for (size_t i = *cached_pos; i < pos; ++i) {
    if (s[i] == '\n') ++*cached_line;
  }
  *cached_pos = pos;
  return *cached_line;
}

// Finds the closing delimiter of a {{ or {% tag, skipping string literals.
size_t FindClose(const std::string& s, size_t from, const char* close) {
  char quote = 0;
  for (size_t i = from; i + 1 < s.size(); ++i) {
    char c = s[i];
    if (quote) {
      if (c == '\\') {
        ++i;
      } else if (c == quote) {
        quote = 0;
      }
      continue;
    }
    if (c == '\'' || c == '"') {
      quote = c;
      continue;
    }
    if (c == close[0] && s[i + 1] == close[1]) return i;
  }
  return std::string::npos;
}

std::string Trim(std::string_view s) {
  size_t a = 0, b = s.size();
  while (a < b && std::strchr(" \t\r\n", s[a])) ++a;
  while (b > a && std::strchr(" \t\r\n", s[b - 1])) --b;
  return std::string(s.substr(a, b - a));
}

std::vector<Segment> Segment_(const std::string& src) {
  std::vector<Segment> segs;
  size_t pos = 0, cpos = 0;
  int cline = 1;
  while (pos < src.size()) {
    size_t open = src.find('{', pos);
    while (open != std::string::npos && open + 1 < src.size() && src[open + 1] != '{' &&
           src[open + 1] != '%' && src[open + 1] != '#') {
      open = src.find('{', open + 1);
    }
    if (open == std::string::npos || open + 1 >= src.size()) {
      segs.push_back({Segment::kText, src.substr(pos), LineAt(src, pos, &cpos, &cline),
                      pos == 0 || src[pos - 1] == '\n'});
      break;
    }
    if (open > pos) {
      segs.push_back({Segment::kText, src.substr(pos, open - pos), LineAt(src, pos, &cpos, &cline),
                      pos == 0 || src[pos - 1] == '\n'});
    }
    int line = LineAt(src, open, &cpos, &cline);
    char kind = src[open + 1];
    size_t body = open + 2;
    Segment seg{kind == '{'   ? Segment::kVar
                : kind == '%' ? Segment::kBlock
                              : Segment::kComment,
                "", line};
    if (body < src.size() && (src[body] == '-' || src[body] == '+')) seg.left = src[body++];
    size_t close;
    if (kind == '#') {
      close = src.find("#}", body);
    } else {
      close = FindClose(src, body, kind == '{' ? "}}" : "%}");
    }
    if (close == std::string::npos) {
      Fail(line, kind == '#' ? "unclosed comment" : kind == '{' ? "unclosed {{" : "unclosed {%");
    }
    size_t content_end = close;
    if (content_end > body && (src[content_end - 1] == '-' || src[content_end - 1] == '+')) {
      seg.right = src[--content_end];
    }
    seg.content = src.substr(body, content_end - body);
    pos = close + 2;
    // {% raw %} ... {% endraw %}: the text between is literal.
    if (seg.type == Segment::kBlock && Trim(seg.content) == "raw") {
      size_t search = pos;
      while (true) {
        size_t e = src.find("{%", search);
        if (e == std::string::npos) Fail(line, "{% raw %} without {% endraw %}");
        size_t ce = FindClose(src, e + 2, "%}");
        if (ce == std::string::npos) Fail(line, "unclosed {%");
        std::string inner = src.substr(e + 2, ce - e - 2);
        char l = 0, r = 0;
        if (!inner.empty() && (inner[0] == '-' || inner[0] == '+')) l = inner[0];
        if (!inner.empty() && (inner.back() == '-' || inner.back() == '+')) r = inner.back();
        std::string_view iv(inner);
        if (l) iv.remove_prefix(1);
        if (r && !iv.empty()) iv.remove_suffix(1);
        if (Trim(iv) == "endraw") {
          segs.push_back(seg);  // the raw tag itself (applies whitespace rules, emits nothing)
          segs.back().content = "__raw__";
          segs.push_back({Segment::kText, src.substr(pos, e - pos), line, false});
          Segment end{Segment::kBlock, "__endraw__", line};
          end.left = l;
          end.right = r;
          segs.push_back(end);
          pos = ce + 2;
          break;
        }
        search = ce + 2;
      }
      continue;
    }
    segs.push_back(std::move(seg));
  }
  // Whitespace control: '-' strips all whitespace on that side; otherwise block and comment
  // tags get lstrip_blocks (spaces/tabs from the line start) and trim_blocks (one newline after).
  for (size_t k = 0; k < segs.size(); ++k) {
    Segment& t = segs[k];
    if (t.type == Segment::kText) continue;
    bool block_like = t.type != Segment::kVar;
    if (k > 0 && segs[k - 1].type == Segment::kText) {
      std::string& prev = segs[k - 1].content;
      if (t.left == '-') {
        size_t e = prev.size();
        while (e > 0 && std::strchr(" \t\r\n\v\f", prev[e - 1])) --e;
        prev.resize(e);
      } else if (block_like && t.left != '+') {
        size_t e = prev.size();
        while (e > 0 && (prev[e - 1] == ' ' || prev[e - 1] == '\t')) --e;
        bool line_start = e == 0 ? segs[k - 1].at_line_start : prev[e - 1] == '\n';
        if (line_start) prev.resize(e);
      }
    }
    if (k + 1 < segs.size() && segs[k + 1].type == Segment::kText) {
      std::string& next = segs[k + 1].content;
      if (t.right == '-') {
        size_t b = 0;
        while (b < next.size() && std::strchr(" \t\r\n\v\f", next[b])) ++b;
        next.erase(0, b);
      } else if (block_like && t.right != '+') {
        if (next.rfind("\r\n", 0) == 0) {
          next.erase(0, 2);
        } else if (!next.empty() && next[0] == '\n') {
          next.erase(0, 1);
        }
      }
    }
  }
  return segs;
}

// ---- expression tokens ----

struct Tok {
  enum Type { kEnd, kName, kInt, kFloat, kString, kOp } type;
  std::string text;
  int64_t i = 0;
  double f = 0;
};

std::vector<Tok> Lex(const std::string& s, int line) {
  std::vector<Tok> out;
  size_t i = 0;
  while (i < s.size()) {
    char c = s[i];
    if (std::strchr(" \t\r\n", c)) {
      ++i;
      continue;
    }
    if (std::isalpha(static_cast<unsigned char>(c)) || c == '_') {
      size_t j = i;
      while (j < s.size() && (std::isalnum(static_cast<unsigned char>(s[j])) || s[j] == '_')) ++j;
      out.push_back({Tok::kName, s.substr(i, j - i)});
      i = j;
      continue;
    }
    if (std::isdigit(static_cast<unsigned char>(c))) {
      size_t j = i;
      while (j < s.size() && (std::isdigit(static_cast<unsigned char>(s[j])) || s[j] == '_')) ++j;
      bool is_float = false;
      if (j + 1 < s.size() && s[j] == '.' && std::isdigit(static_cast<unsigned char>(s[j + 1]))) {
        is_float = true;
        ++j;
        while (j < s.size() && std::isdigit(static_cast<unsigned char>(s[j]))) ++j;
      }
      if (j < s.size() && (s[j] == 'e' || s[j] == 'E')) {
        size_t k = j + 1;
        if (k < s.size() && (s[k] == '+' || s[k] == '-')) ++k;
        if (k < s.size() && std::isdigit(static_cast<unsigned char>(s[k]))) {
          is_float = true;
          j = k;
          while (j < s.size() && std::isdigit(static_cast<unsigned char>(s[j]))) ++j;
        }
      }
      std::string num;
      for (size_t k = i; k < j; ++k) {
        if (s[k] != '_') num += s[k];
      }
      Tok t{is_float ? Tok::kFloat : Tok::kInt, num};
      if (is_float) {
        t.f = std::strtod(num.c_str(), nullptr);
      } else {
        errno = 0;
        t.i = std::strtoll(num.c_str(), nullptr, 10);
        if (errno == ERANGE) Fail(line, fmt::format("integer literal {} is too large", num));
      }
      out.push_back(t);
      i = j;
      continue;
    }
    if (c == '\'' || c == '"') {
      std::string v;
      size_t j = i + 1;
      bool closed = false;
      while (j < s.size()) {
        char d = s[j];
        if (d == c) {
          closed = true;
          ++j;
          break;
        }
        if (d == '\\' && j + 1 < s.size()) {
          char e = s[j + 1];
          j += 2;
          switch (e) {
            case 'n':
              v += '\n';
              break;
            case 't':
              v += '\t';
              break;
            case 'r':
              v += '\r';
              break;
            case 'b':
              v += '\b';
              break;
            case 'f':
              v += '\f';
              break;
            case '\\':
              v += '\\';
              break;
            case '\'':
              v += '\'';
              break;
            case '"':
              v += '"';
              break;
            case '\n':
              break;
            default:
              v += '\\';
              v += e;
              break;
          }
          continue;
        }
        v += d;
        ++j;
      }
      if (!closed) Fail(line, "unterminated string literal");
      out.push_back({Tok::kString, std::move(v)});
      i = j;
      continue;
    }
    static const char* kOps2[] = {"//", "**", "==", "!=", "<=", ">="};
    bool matched = false;
    for (const char* op : kOps2) {
      if (s.compare(i, 2, op) == 0) {
        out.push_back({Tok::kOp, op});
        i += 2;
        matched = true;
        break;
      }
    }
    if (matched) continue;
    if (std::strchr("+-*/%~<>=()[]{},.:|", c)) {
      out.push_back({Tok::kOp, std::string(1, c)});
      ++i;
      continue;
    }
    Fail(line, fmt::format("unexpected character '{}'", c));
  }
  out.push_back({Tok::kEnd, ""});
  return out;
}

// ---- expression parser ----

class ExprParser {
 public:
  ExprParser(std::vector<Tok> toks, int line) : t_(std::move(toks)), line_(line) {}

  const Tok& Peek(size_t k = 0) const { return t_[std::min(p_ + k, t_.size() - 1)]; }
  bool AtEnd() const { return Peek().type == Tok::kEnd; }
  bool IsOp(const char* op, size_t k = 0) const {
    return Peek(k).type == Tok::kOp && Peek(k).text == op;
  }
  bool IsName(const char* name, size_t k = 0) const {
    return Peek(k).type == Tok::kName && Peek(k).text == name;
  }
  void Expect(const char* op) {
    if (!IsOp(op)) Fail(line_, fmt::format("expected '{}' but found '{}'", op, Describe()));
    ++p_;
  }
  std::string Describe() const { return AtEnd() ? "end of tag" : Peek().text; }
  std::string Name() {
    if (Peek().type != Tok::kName)
      Fail(line_, fmt::format("expected a name, found '{}'", Describe()));
    return t_[p_++].text;
  }
  void ExpectEnd() {
    if (!AtEnd()) Fail(line_, fmt::format("unexpected '{}'", Describe()));
  }
  void Skip() { ++p_; }

  ExprPtr Expression() {  // with a top-level tuple "a, b"
    ExprPtr e = CondExpr();
    if (!IsOp(",")) return e;
    auto t = Make(Expr::Kind::kTuple);
    t->items.push_back(std::move(e));
    while (IsOp(",")) {
      ++p_;
      if (AtEnd() || IsOp(")")) break;
      t->items.push_back(CondExpr());
    }
    return Done(std::move(t));
  }

  ExprPtr CondExpr() {
    Guard g(this);
    ExprPtr e = Or();
    while (IsName("if")) {
      ++p_;
      auto c = Make(Expr::Kind::kCond);
      c->a = Or();
      c->b2 = std::move(e);
      if (IsName("else")) {
        ++p_;
        c->c = CondExpr();
      }
      e = Done(std::move(c));
    }
    return e;
  }

  ExprPtr OrExpr() { return Or(); }

 private:
  struct Guard {
    explicit Guard(ExprParser* p) : p(p) {
      if (++p->depth_ > kMaxDepth) Fail(p->line_, "expression nested too deeply");
    }
    ~Guard() { --p->depth_; }
    ExprParser* p;
  };

  // Sets e's height from its children; a tree too tall would overflow the evaluator's stack.
  ExprPtr Done(ExprPtr e) {
    int d = 0;
    auto see = [&](const ExprPtr& c) {
      if (c) d = std::max(d, c->depth);
    };
    see(e->a);
    see(e->b2);
    see(e->c);
    for (const auto& x : e->items) see(x);
    for (const auto& kv : e->kwargs) see(kv.second);
    e->depth = d + 1;
    if (e->depth > kMaxExprHeight) {
      Fail(line_,
           fmt::format("expression nested too deeply (more than {} levels)", kMaxExprHeight));
    }
    return e;
  }

  ExprPtr Make(Expr::Kind k) {
    auto e = std::make_unique<Expr>();
    e->kind = k;
    e->line = line_;
    return e;
  }
  ExprPtr Binary(std::string op, ExprPtr a, ExprPtr b) {
    auto e = Make(Expr::Kind::kBinary);
    e->str = std::move(op);
    e->a = std::move(a);
    e->b2 = std::move(b);
    return Done(std::move(e));
  }
  ExprPtr Or() {
    ExprPtr e = And();
    while (IsName("or")) {
      ++p_;
      e = Binary("or", std::move(e), And());
    }
    return e;
  }
  ExprPtr And() {
    ExprPtr e = Not();
    while (IsName("and")) {
      ++p_;
      e = Binary("and", std::move(e), Not());
    }
    return e;
  }
  ExprPtr Not() {
    Guard g(this);
    if (IsName("not")) {
      ++p_;
      auto e = Make(Expr::Kind::kUnary);
      e->str = "not";
      e->a = Not();
      return Done(std::move(e));
    }
    return Compare();
  }
  ExprPtr Compare() {
    ExprPtr e = Math1();
    while (true) {
      std::string op;
      if (Peek().type == Tok::kOp &&
          (Peek().text == "==" || Peek().text == "!=" || Peek().text == "<" ||
           Peek().text == "<=" || Peek().text == ">" || Peek().text == ">=")) {
        op = Peek().text;
        ++p_;
      } else if (IsName("in")) {
        op = "in";
        ++p_;
      } else if (IsName("not") && IsName("in", 1)) {
        op = "not in";
        p_ += 2;
      } else {
        return e;
      }
      e = Binary(op, std::move(e), Math1());
    }
  }
  ExprPtr Math1() {
    ExprPtr e = Concat();
    while (IsOp("+") || IsOp("-")) {
      std::string op = t_[p_++].text;
      e = Binary(op, std::move(e), Concat());
    }
    return e;
  }
  ExprPtr Concat() {
    ExprPtr e = Math2();
    while (IsOp("~")) {
      ++p_;
      e = Binary("~", std::move(e), Math2());
    }
    return e;
  }
  ExprPtr Math2() {
    ExprPtr e = Pow();
    while (IsOp("*") || IsOp("/") || IsOp("//") || IsOp("%")) {
      std::string op = t_[p_++].text;
      e = Binary(op, std::move(e), Pow());
    }
    return e;
  }
  ExprPtr Pow() {
    ExprPtr e = Unary();
    while (IsOp("**")) {
      ++p_;
      e = Binary("**", std::move(e), Unary());
    }
    return e;
  }
  ExprPtr Unary() {
    Guard g(this);
    if (IsOp("-") || IsOp("+")) {
      auto e = Make(Expr::Kind::kUnary);
      e->str = t_[p_++].text;
      e->a = Unary();
      return FilterTail(Done(std::move(e)));
    }
    return FilterTail(Postfix(Primary()));
  }
  void Args(Expr* call) {
    Expect("(");
    while (!IsOp(")")) {
      if (Peek().type == Tok::kName && IsOp("=", 1)) {
        std::string key = Name();
        ++p_;
        call->kwargs.emplace_back(key, CondExpr());
      } else {
        call->items.push_back(CondExpr());
      }
      if (!IsOp(",")) break;
      ++p_;
    }
    Expect(")");
  }
  ExprPtr Postfix(ExprPtr e) {
    while (true) {
      if (IsOp(".")) {
        ++p_;
        auto a = Make(Expr::Kind::kAttr);
        if (Peek().type == Tok::kInt) {  // x.0 as x[0]
          auto idx = Make(Expr::Kind::kIndex);
          auto lit = Make(Expr::Kind::kLiteral);
          lit->lit = Expr::LitKind::kInt;
          lit->i = t_[p_++].i;
          idx->a = std::move(e);
          idx->b2 = std::move(lit);
          e = Done(std::move(idx));
          continue;
        }
        a->str = Name();
        a->a = std::move(e);
        e = Done(std::move(a));
      } else if (IsOp("[")) {
        ++p_;
        ExprPtr parts[3];
        int n = 0;
        bool slice = false;
        while (true) {
          if (!IsOp(":") && !IsOp("]")) parts[n] = CondExpr();
          if (IsOp(":")) {
            slice = true;
            ++p_;
            if (++n > 2) Fail(line_, "a slice has at most two ':'");
            continue;
          }
          break;
        }
        Expect("]");
        if (slice) {
          auto s = Make(Expr::Kind::kSlice);
          s->a = std::move(e);
          for (int k = 0; k < 3; ++k) s->items.push_back(std::move(parts[k]));
          e = Done(std::move(s));
        } else {
          if (!parts[0]) Fail(line_, "empty subscript []");
          auto s = Make(Expr::Kind::kIndex);
          s->a = std::move(e);
          s->b2 = std::move(parts[0]);
          e = Done(std::move(s));
        }
      } else if (IsOp("(")) {
        auto c = Make(Expr::Kind::kCall);
        c->a = std::move(e);
        Args(c.get());
        e = Done(std::move(c));
      } else {
        return e;
      }
    }
  }
  ExprPtr FilterTail(ExprPtr e) {
    while (true) {
      if (IsOp("|")) {
        ++p_;
        auto f = Make(Expr::Kind::kFilter);
        f->str = Name();
        while (IsOp(".")) {  // dotted filter names are not supported; report clearly
          Fail(line_, fmt::format("unknown filter '{}.'", f->str));
        }
        f->a = std::move(e);
        if (IsOp("(")) Args(f.get());
        e = Done(std::move(f));
      } else if (IsName("is")) {
        ++p_;
        auto t = Make(Expr::Kind::kTest);
        if (IsName("not")) {
          ++p_;
          t->negate = true;
        }
        t->str = Name();
        t->a = std::move(e);
        if (IsOp("(")) {
          Args(t.get());
        } else if (Peek().type == Tok::kInt || Peek().type == Tok::kFloat ||
                   Peek().type == Tok::kString ||
                   (Peek().type == Tok::kName && !IsName("and") && !IsName("or") &&
                    !IsName("else") && !IsName("if") && !IsName("in") && !IsName("not") &&
                    !IsName("is"))) {
          t->items.push_back(Postfix(Primary()));  // "is sameas false", "is divisibleby 3"
        }
        e = Done(std::move(t));
      } else {
        return e;
      }
    }
  }
  ExprPtr Primary() {
    Guard g(this);
    const Tok& t = Peek();
    if (t.type == Tok::kEnd) Fail(line_, "expected an expression, found end of tag");
    if (t.type == Tok::kString) {
      auto e = Make(Expr::Kind::kLiteral);
      e->lit = Expr::LitKind::kString;
      e->str = t.text;
      ++p_;
      while (Peek().type == Tok::kString) e->str += t_[p_++].text;  // "a" "b" concatenates
      return e;
    }
    if (t.type == Tok::kInt || t.type == Tok::kFloat) {
      auto e = Make(Expr::Kind::kLiteral);
      e->lit = t.type == Tok::kInt ? Expr::LitKind::kInt : Expr::LitKind::kFloat;
      e->i = t.i;
      e->f = t.f;
      ++p_;
      return e;
    }
    if (t.type == Tok::kName) {
      auto e = Make(Expr::Kind::kLiteral);
      if (t.text == "true" || t.text == "True" || t.text == "false" || t.text == "False") {
        e->lit = Expr::LitKind::kBool;
        e->b = t.text[0] == 't' || t.text[0] == 'T';
      } else if (t.text == "none" || t.text == "None") {
        e->lit = Expr::LitKind::kNone;
      } else {
        e->kind = Expr::Kind::kName;
        e->str = t.text;
      }
      ++p_;
      return e;
    }
    if (IsOp("(")) {
      ++p_;
      if (IsOp(")")) {
        ++p_;
        return Make(Expr::Kind::kTuple);
      }
      ExprPtr e = Expression();
      Expect(")");
      return e;
    }
    if (IsOp("[")) {
      ++p_;
      auto e = Make(Expr::Kind::kList);
      while (!IsOp("]")) {
        e->items.push_back(CondExpr());
        if (!IsOp(",")) break;
        ++p_;
      }
      Expect("]");
      return Done(std::move(e));
    }
    if (IsOp("{")) {
      ++p_;
      auto e = Make(Expr::Kind::kDict);
      while (!IsOp("}")) {
        e->items.push_back(CondExpr());
        Expect(":");
        e->items.push_back(CondExpr());
        if (!IsOp(",")) break;
        ++p_;
      }
      Expect("}");
      return Done(std::move(e));
    }
    Fail(line_, fmt::format("unexpected '{}'", t.text));
  }

  std::vector<Tok> t_;
  size_t p_ = 0;
  int line_;
  int depth_ = 0;
};

// ---- statement parser ----

class Parser {
 public:
  explicit Parser(std::vector<Segment> segs) : segs_(std::move(segs)) {}

  std::unique_ptr<Node> Parse() {
    std::string end;
    auto body = Body({}, &end);
    if (i_ < segs_.size()) Fail(segs_[i_].line, fmt::format("unexpected {{% {} %}}", end));
    return body;
  }

 private:
  static std::string FirstWord(const std::string& content) {
    std::string s = Trim(content);
    size_t e = 0;
    while (e < s.size() && (std::isalnum(static_cast<unsigned char>(s[e])) || s[e] == '_')) ++e;
    return s.substr(0, e);
  }

  std::unique_ptr<Node> MakeNode(Node::Kind k, int line) {
    auto n = std::make_unique<Node>();
    n->kind = k;
    n->line = line;
    return n;
  }

  // Parses nodes until a block tag whose first word is in `ends` (left unconsumed; its word is
  // stored in *end) or the end of input (only allowed when ends is empty).
  std::unique_ptr<Node> Body(const std::vector<std::string>& ends, std::string* end) {
    if (++depth_ > kMaxDepth)
      Fail(i_ < segs_.size() ? segs_[i_].line : 0, "blocks nested too deeply");
    auto body = MakeNode(Node::Kind::kBody, i_ < segs_.size() ? segs_[i_].line : 0);
    while (i_ < segs_.size()) {
      const Segment& s = segs_[i_];
      if (s.type == Segment::kComment) {
        ++i_;
        continue;
      }
      if (s.type == Segment::kText) {
        if (!s.content.empty()) {
          auto n = MakeNode(Node::Kind::kText, s.line);
          n->text = s.content;
          body->children.push_back(std::move(n));
        }
        ++i_;
        continue;
      }
      if (s.type == Segment::kVar) {
        ExprParser p(Lex(s.content, s.line), s.line);
        auto n = MakeNode(Node::Kind::kOutput, s.line);
        n->expr = p.Expression();
        p.ExpectEnd();
        body->children.push_back(std::move(n));
        ++i_;
        continue;
      }
      std::string word = FirstWord(s.content);
      if (s.content == "__raw__" || s.content == "__endraw__") {
        ++i_;
        continue;
      }
      for (const auto& e : ends) {
        if (word == e) {
          *end = word;
          --depth_;
          return body;
        }
      }
      body->children.push_back(Statement(word));
    }
    if (!ends.empty()) {
      Fail(segs_.empty() ? 0 : segs_.back().line,
           fmt::format("missing {{% {} %}} before the end of the template", ends.back()));
    }
    --depth_;
    return body;
  }

  std::unique_ptr<Node> Statement(const std::string& word) {
    const Segment& s = segs_[i_];
    int line = s.line;
    ExprParser p(Lex(s.content, line), line);
    p.Skip();  // the keyword
    std::string end;
    if (word == "if") {
      auto n = MakeNode(Node::Kind::kIf, line);
      n->conds.push_back(p.CondExpr());
      p.ExpectEnd();
      ++i_;
      while (true) {
        n->bodies.push_back(Body({"elif", "else", "endif"}, &end));
        const Segment& t = segs_[i_];
        ExprParser q(Lex(t.content, t.line), t.line);
        q.Skip();
        ++i_;
        if (end == "elif") {
          n->conds.push_back(q.CondExpr());
          q.ExpectEnd();
          continue;
        }
        q.ExpectEnd();
        if (end == "else") {
          n->bodies.push_back(Body({"endif"}, &end));
          ExprParser r(Lex(segs_[i_].content, segs_[i_].line), segs_[i_].line);
          r.Skip();
          r.ExpectEnd();
          ++i_;
        }
        return n;
      }
    }
    if (word == "for") {
      auto n = MakeNode(Node::Kind::kFor, line);
      n->targets.push_back(p.Name());
      while (p.IsOp(",")) {
        p.Skip();
        n->targets.push_back(p.Name());
      }
      if (!p.IsName("in")) Fail(line, "expected 'in' in for loop");
      p.Skip();
      n->expr = p.OrExpr();  // no conditional here: "if" starts the loop filter
      if (p.IsName("if")) {  // for x in y if cond
        p.Skip();
        n->filter = p.CondExpr();
      }
      if (p.IsName("recursive")) Fail(line, "recursive for loops are not supported");
      p.ExpectEnd();
      ++i_;
      n->body = Body({"else", "endfor"}, &end);
      ++i_;
      if (end == "else") {
        n->else_body = Body({"endfor"}, &end);
        ++i_;
      }
      return n;
    }
    if (word == "set") {
      std::vector<std::string> targets{p.Name()};
      std::string attr;
      if (p.IsOp(".")) {
        p.Skip();
        attr = p.Name();
      }
      while (p.IsOp(",")) {
        p.Skip();
        targets.push_back(p.Name());
      }
      if (p.AtEnd()) {  // block set: {% set x %}...{% endset %}
        if (targets.size() != 1 || !attr.empty()) Fail(line, "block set takes one plain name");
        auto n = MakeNode(Node::Kind::kSetBlock, line);
        n->targets = targets;
        ++i_;
        n->body = Body({"endset"}, &end);
        ++i_;
        return n;
      }
      p.Expect("=");
      auto n = MakeNode(Node::Kind::kSet, line);
      n->targets = targets;
      n->attr = attr;
      n->expr = p.Expression();
      p.ExpectEnd();
      ++i_;
      return n;
    }
    if (word == "break" || word == "continue") {
      p.ExpectEnd();
      ++i_;
      return MakeNode(word == "break" ? Node::Kind::kBreak : Node::Kind::kContinue, line);
    }
    if (word == "generation") {  // transformers' assistant-mask marker: renders its body
      ++i_;
      auto body = Body({"endgeneration"}, &end);
      ++i_;
      return body;
    }
    Fail(line, fmt::format("unsupported or unexpected tag {{% {} %}}",
                           word.empty() ? Trim(s.content) : word));
  }

  std::vector<Segment> segs_;
  size_t i_ = 0;
  int depth_ = 0;
};

}  // namespace

std::unique_ptr<Node> ParseTemplate(const std::string& source) {
  Parser parser(Segment_(source));
  return parser.Parse();
}

}  // namespace qilin::tokenizer::jinja
