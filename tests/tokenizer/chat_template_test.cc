// Chat templates: Qwen3's and Qwen2.5's Jinja templates rendered byte-for-byte as
// @huggingface/jinja renders them (fixture made by tools/tokenizer/render_templates.mjs), the
// built-in ChatML, and Jinja semantics checked against Python's.
#include <gtest/gtest.h>

#include "tokenizer/jinja.h"
#include "tokenizer/tokenizer.h"
#include "tokenizer_test_util.h"

namespace qilin::tokenizer {
namespace {

using testing::FixtureDir;
using testing::ReadText;

TEST(ChatTemplateTest, MatchesHuggingFaceRenderings) {
  auto rows =
      nlohmann::ordered_json::parse(ReadText(FixtureDir() + "/chat_template_renderings.json"));
  std::map<std::string, ChatTemplate> templates;
  for (const char* name : {"qwen3", "qwen2.5"}) {
    auto t = ChatTemplate::FromJinja(ReadText(FixtureDir() + "/" + name + "-chat_template.jinja"),
                                     "", "<|im_end|>");
    ASSERT_TRUE(t.ok()) << t.status().ToString();
    templates.emplace(name, std::move(t).value());
  }
  std::map<std::string, int> count;
  for (const auto& row : rows) {
    ChatTemplateOptions opts;
    opts.add_generation_prompt = row["add_generation_prompt"].get<bool>();
    opts.tools = row["tools"];
    opts.extra = row["extra"];
    const std::string tname = row["template"].get<std::string>();
    auto out = templates.at(tname).Render(row["messages"], opts);
    ASSERT_TRUE(out.ok()) << row["name"] << ": " << out.status().ToString();
    EXPECT_EQ(*out, row["rendered"].get<std::string>()) << tname << " / " << row["name"];
    ++count[tname];
  }
  EXPECT_GE(count["qwen3"], 20);
  EXPECT_GE(count["qwen2.5"], 20);
}

TEST(ChatTemplateTest, LoadedFromTokenizerConfig) {
  auto tok = testing::JsonTokenizer();
  ASSERT_TRUE(tok);
  EXPECT_FALSE(tok->chat_template().is_builtin_chatml());
  nlohmann::ordered_json msgs = {{{"role", "user"}, {"content", "Hi"}}};
  ChatTemplateOptions opts;
  opts.extra = {{"enable_thinking", false}};
  EXPECT_EQ(tok->chat_template().Render(msgs, opts).value(),
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n");
}

TEST(ChatTemplateTest, BuiltinChatML) {
  ChatTemplate t = ChatTemplate::ChatML();
  nlohmann::ordered_json msgs = {{{"role", "user"}, {"content", "你好"}}};
  EXPECT_EQ(t.Render(msgs).value(),
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n你好"
            "<|im_end|>\n<|im_start|>assistant\n");
  nlohmann::ordered_json with_sys = {{{"role", "system"}, {"content", "S"}},
                                     {{"role", "user"}, {"content", "U"}}};
  ChatTemplateOptions no_prompt;
  no_prompt.add_generation_prompt = false;
  EXPECT_EQ(t.Render(with_sys, no_prompt).value(),
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n");
  EXPECT_FALSE(t.Render(nlohmann::ordered_json::object()).ok());
  EXPECT_FALSE(t.Render(nlohmann::ordered_json::array({{{"content", "no role"}}})).ok());
}

std::string Render(const std::string& src,
                   nlohmann::ordered_json ctx = nlohmann::ordered_json::object()) {
  auto t = jinja::Template::Parse(src);
  if (!t.ok()) return "PARSE ERROR: " + t.status().message();
  auto r = (*t)->Render(ctx);
  if (!r.ok()) return "ERROR: " + r.status().message();
  return *r;
}

// Expected values are what Python's Jinja2 (transformers' renderer) prints.
TEST(JinjaTest, PythonSemantics) {
  EXPECT_EQ(Render("{{ 7 // 2 }} {{ -7 // 2 }} {{ -7 % 3 }} {{ 7 / 2 }} {{ 4 / 2 }} {{ 2 ** 10 }}"),
            "3 -4 2 3.5 2.0 1024");
  EXPECT_EQ(Render("{{ [1, 2, 3][::-1] }} {{ 'abcdef'[1:4] }} {{ 'héllo'[1] }} {{ [1,2,3][-1] }}"),
            "[3, 2, 1] bcd é 3");
  EXPECT_EQ(Render("{{ 'xxaxx'.strip('x') }}|{{ '  a b  '.split() }}|{{ 'a,b,,c'.split(',') }}"),
            "a|['a', 'b']|['a', 'b', '', 'c']");
  EXPECT_EQ(Render("{{ true }} {{ none }} {{ 1.0 }} {{ x }}|"), "True None 1.0 |");
  EXPECT_EQ(Render("{{ 'a' ~ 1 ~ none }}"), "a1None");
  EXPECT_EQ(Render("{{ 'ab' in 'cabd' }} {{ 3 not in [1, 2] }} {{ 'k' in {'k': 1} }}"),
            "True True True");
  EXPECT_EQ(Render("{{ {'b': 1, 'a': [1, 'x', none, true]} | tojson }}"),
            "{\"b\": 1, \"a\": [1, \"x\", null, true]}");
  EXPECT_EQ(Render("{{ {'a': [1]} | tojson(indent=2) }}"), "{\n  \"a\": [\n    1\n  ]\n}");
  EXPECT_EQ(Render("{{ 'é\n\"' | tojson }}"), "\"é\\n\\\"\"");
  EXPECT_NE(Render("{{ 'a' + 1 }}").find("ERROR"), std::string::npos);
}

TEST(JinjaTest, ControlFlowAndScoping) {
  EXPECT_EQ(
      Render("{% for x in [1,2,3] %}{{ loop.index }}{{ loop.first }}{{ loop.last }};{% endfor %}"),
      "1TrueFalse;2FalseFalse;3FalseTrue;");
  EXPECT_EQ(Render("{% set x = 1 %}{% for i in [1] %}{% set x = 2 %}{% endfor %}{{ x }}"), "1");
  EXPECT_EQ(Render("{% set ns = namespace(x=1) %}{% for i in [1] %}{% set ns.x = 2 %}{% endfor "
                   "%}{{ ns.x }}"),
            "2");
  EXPECT_EQ(Render("{% for x in [] %}a{% else %}empty{% endfor %}"), "empty");
  EXPECT_EQ(Render("{% for x in [1,2,3,4] %}{% if x == 2 %}{% continue %}{% endif %}{% if x == 4 "
                   "%}{% break %}{% endif %}{{ x }}{% endfor %}"),
            "13");
  EXPECT_EQ(Render("{% for k, v in d.items() %}{{ k }}={{ v }},{% endfor %}",
                   {{"d", {{"z", 1}, {"a", 2}}}}),
            "z=1,a=2,");
  EXPECT_EQ(Render("{% if a %}A{% elif b %}B{% else %}C{% endif %}", {{"a", false}, {"b", 1}}),
            "B");
  EXPECT_EQ(Render("{{ x is defined }} {{ y is none }} {{ 3 is odd }} {{ y is not none }}",
                   {{"y", nullptr}}),
            "False True True False");
  EXPECT_EQ(Render("{% set s %}in{{ 1 }}{% endset %}[{{ s }}]"), "[in1]");
  EXPECT_EQ(Render("{{ [3,1,2] | sort | join(',') }} {{ ['a','b'] | length }} {{ 'ab' | upper }}"),
            "1,2,3 2 AB");
  EXPECT_EQ(
      Render(
          "{{ xs | selectattr('r', 'equalto', 'u') | map(attribute='c') | join }}",
          {{"xs", {{{"r", "u"}, {"c", "1"}}, {{"r", "a"}, {"c", "2"}}, {{"r", "u"}, {"c", "3"}}}}}),
      "13");
  EXPECT_EQ(Render("{{ 'yes' if 1 > 2 else 'no' }}"), "no");
}

TEST(JinjaTest, WhitespaceControl) {
  // trim_blocks + lstrip_blocks as transformers sets them.
  EXPECT_EQ(Render("  {% if true %}\n  a\n  {% endif %}\nb"), "  a\nb");
  EXPECT_EQ(Render("x  {%- if true -%}  y  {%- endif -%}  z"), "xyz");
  EXPECT_EQ(Render("{# comment #}\na {{- ' b ' -}} c"), "a b c");
  EXPECT_EQ(Render("  {%+ if true %}k{% endif %}"), "  k");
  EXPECT_EQ(Render("{% raw %}{{ not evaluated }}{% endraw %}"), "{{ not evaluated }}");
}

TEST(JinjaTest, ErrorsNameTheProblem) {
  EXPECT_NE(Render("{% if x %}never closed").find("endif"), std::string::npos);
  EXPECT_NE(Render("{{ 1 + }}").find("line 1"), std::string::npos);
  EXPECT_NE(Render("\n{% macro m() %}{% endmacro %}").find("line 2"), std::string::npos);
  EXPECT_NE(Render("{{ raise_exception('bad role') }}").find("bad role"), std::string::npos);
  EXPECT_NE(Render("{{ x | nosuchfilter }}").find("nosuchfilter"), std::string::npos);
  EXPECT_NE(Render("{% for i in range(100000000) %}{% endfor %}").find("ERROR"), std::string::npos);
  EXPECT_NE(Render("{{ 'a' * 100000000000 }}").find("ERROR"), std::string::npos);
  EXPECT_NE(Render("{{ 1 // 0 }}").find("division by zero"), std::string::npos);
  EXPECT_NE(
      Render("{{ " + std::string(500, '(') + "1" + std::string(500, ')') + " }}").find("deeply"),
      std::string::npos);
}

}  // namespace
}  // namespace qilin::tokenizer
