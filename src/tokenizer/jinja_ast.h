// Internal to the Jinja subset: syntax tree shared by the parser and the evaluator.
#pragma once

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace qilin::tokenizer::jinja {

// Thrown inside the parser and evaluator only; Template::Parse/Render turn it into a Status.
struct JinjaError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Expr;
using ExprPtr = std::unique_ptr<Expr>;

struct Expr {
  enum class Kind {
    kLiteral,  // str / i / f / b / none (lit)
    kName,     // name
    kList,     // items
    kTuple,    // items
    kDict,     // items as key, value, key, value...
    kAttr,     // a.name
    kIndex,    // a[b]
    kSlice,    // a[b:c:d] (null parts absent)
    kCall,     // a(items, kw)
    kFilter,   // a | name(items, kw)
    kTest,     // a is [not] name(items)
    kUnary,    // op a  ("not", "-", "+")
    kBinary,   // a op b
    kCond,     // b if a else c   (a: condition, b: then, c: else, may be null)
  };
  enum class LitKind { kNone, kBool, kInt, kFloat, kString };
  Kind kind;
  int line = 0;
  int depth = 1;  // height of this subtree (bounded by the parser: evaluation recurses on it)
  LitKind lit = LitKind::kNone;
  bool b = false;
  int64_t i = 0;
  double f = 0;
  std::string str;      // string literal, name, attribute, filter/test name, operator
  bool negate = false;  // kTest with "is not"
  ExprPtr a, b2, c;
  std::vector<ExprPtr> items;
  std::vector<std::pair<std::string, ExprPtr>> kwargs;
};

struct Node {
  enum class Kind { kBody, kText, kOutput, kIf, kFor, kSet, kSetBlock, kBreak, kContinue };
  Kind kind;
  int line = 0;
  std::string text;                             // kText
  ExprPtr expr;                                 // kOutput, kFor (iterable), kSet (value)
  std::vector<std::unique_ptr<Node>> children;  // kBody
  // kIf: conds[i] guards bodies[i]; a trailing extra body is the else branch.
  std::vector<ExprPtr> conds;
  std::vector<std::unique_ptr<Node>> bodies;
  // kFor: targets (1 name or a tuple), body, else body, optional filter (for x in y if c).
  // kSet: targets; attr non-empty for `set ns.attr = ...`.
  std::vector<std::string> targets;
  std::string attr;
  ExprPtr filter;
  std::unique_ptr<Node> body, else_body;
};

std::unique_ptr<Node> ParseTemplate(const std::string& source);

}  // namespace qilin::tokenizer::jinja
