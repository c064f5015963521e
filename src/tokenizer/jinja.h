// A Jinja2 subset for chat templates: what Qwen's (and most Hugging Face) chat templates use.
// Rendered as transformers' apply_chat_template does (trim_blocks and lstrip_blocks on, Python
// semantics for strings, numbers, truthiness, `//` and `%`).
//
// Statements: if/elif/else, for (loop.index/index0/revindex/revindex0/first/last/length/
// previtem/nextitem, else, break/continue), set (name, ns.attr, tuple, block form),
// generation, raw, comments, whitespace control ({%- -%} {{- -}} {%+). Expressions: literals,
// lists, dicts, tuples, attribute/subscript/slice (negative steps), calls, filters, tests, `in`,
// `not in`, `~`, arithmetic, comparisons, and/or/not, `a if c else b`. Built-ins: namespace(),
// range(), raise_exception(), strftime_now(). Filters and methods are listed in jinja_eval.cc.
// Unsupported syntax (macro, call, include, ...) is an error naming the line, never ignored.
#pragma once

#include <memory>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "common/status.h"

namespace qilin::tokenizer::jinja {

struct Node;

class Template {
 public:
  static Result<std::shared_ptr<const Template>> Parse(std::string_view source);
  // context: an object of template variables (messages, tools, add_generation_prompt, ...).
  Result<std::string> Render(const nlohmann::ordered_json& context) const;
  ~Template();

 private:
  Template() = default;
  std::unique_ptr<Node> root_;
};

// Python's json.dumps(value, ensure_ascii=False) (separators ", " and ": "; with indent >= 0,
// newlines and "," / ": " as Python), as the tojson filter writes it.
std::string ToJson(const nlohmann::ordered_json& value, int indent = -1);

}  // namespace qilin::tokenizer::jinja
