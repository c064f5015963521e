#!/usr/bin/env node
// Reference renderings of Qwen's chat templates by @huggingface/jinja (the JS port of
// transformers' apply_chat_template), written to tests/fixtures/tokenizer/chat_template_renderings.json.
//   cd tools/tokenizer && npm install && node render_templates.mjs
// Conversations avoid the few spots where @huggingface/jinja and Python Jinja2 differ (printing
// booleans/None, str.strip with non-whitespace chars, str + None).
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { Template } from "@huggingface/jinja";

const here = path.dirname(fileURLToPath(import.meta.url));
const fixtures = path.join(here, "../../tests/fixtures/tokenizer");
const templates = {
  "qwen3": fs.readFileSync(path.join(fixtures, "qwen3-chat_template.jinja"), "utf8"),
  "qwen2.5": fs.readFileSync(path.join(fixtures, "qwen2.5-chat_template.jinja"), "utf8"),
};

const weather = {
  type: "function",
  function: {
    name: "get_weather",
    description: "Get the current weather in a city, in \"celsius\" or fahrenheit.",
    parameters: {
      type: "object",
      properties: {
        city: { type: "string", description: "城市 name, e.g. 北京" },
        unit: { type: "string", enum: ["celsius", "fahrenheit"] },
      },
      required: ["city"],
    },
  },
};
const search = {
  type: "function",
  function: {
    name: "search",
    description: "Search the web.\nReturns the top results.",
    parameters: { type: "object", properties: { query: { type: "string" }, k: { type: "integer", minimum: 1, maximum: 10 } }, required: ["query"] },
  },
};
const sys = { role: "system", content: "You are a careful assistant. 请用中文回答。" };
const u = (c) => ({ role: "user", content: c });
const a = (c, extra = {}) => ({ role: "assistant", content: c, ...extra });
const tool = (c) => ({ role: "tool", content: c });
const call = (name, args) => ({ type: "function", function: { name, arguments: args } });

// [name, messages, options]
const common = [
  ["single user", [u("Hello!")], {}],
  ["system + user", [sys, u("What is 2+2?")], {}],
  ["no generation prompt", [sys, u("Hi"), a("Hello! How can I help?")], { add_generation_prompt: false }],
  ["multi turn", [sys, u("Name a color."), a("Blue."), u("Another one?")], {}],
  ["unicode and emoji", [u("你好，世界 🌏! Ünïcödé — «quotes» \"double\" 'single'\ttab")], {}],
  ["newlines in content", [u("\n\nline one\nline two\n\n"), a("\nanswer\n"), u("ok\n")], {}],
  ["empty contents", [u(""), a(""), u("")], {}],
  ["system not first", [u("first"), { role: "system", content: "late system" }, u("second")], {}],
  ["tools no system", [u("Weather in Paris?")], { tools: [weather] }],
  ["tools with system", [sys, u("Weather in Paris?")], { tools: [weather, search] }],
  ["tool call object args", [u("Weather in Paris?"), a("", { tool_calls: [call("get_weather", { city: "Paris", unit: "celsius" })] }), tool("{\"temp\": 21}")], { tools: [weather] }],
  ["tool call with content", [u("Weather?"), a("Let me check.", { tool_calls: [call("get_weather", { city: "東京" })] }), tool("晴れ, 25°C")], { tools: [weather] }],
  ["two tool calls two results", [sys, u("Paris and Rome?"), a("", { tool_calls: [call("get_weather", { city: "Paris" }), call("get_weather", { city: "Rome", unit: "fahrenheit" })] }), tool("18C"), tool("75F"), a("Paris 18C, Rome 75F.")], { tools: [weather] }],
  ["tool call nested args", [u("search"), a("", { tool_calls: [call("search", { query: "a \"quoted\" \\ back\nslash", k: 3, opts: { deep: [1, 2, { x: null, y: true, z: 1.5 }] } })] }), tool("[]")], { tools: [search] }],
  ["tool call then user", [u("q1"), a("", { tool_calls: [call("search", { query: "x" })] }), tool("r1"), a("done"), u("thanks")], { tools: [search] }],
  ["tool message first", [tool("orphan result"), u("hm")], {}],
  ["long conversation", [sys, u("a"), a("b"), u("c"), a("d"), u("e"), a("f"), u("g")], {}],
  ["control characters", [u("bell\u0007 nul\u0000 esc\u001b[0m del\u007f")], {}],
  ["tools empty list", [u("hi")], { tools: [] }],
  ["assistant last no prompt", [u("hi"), a("partial answ")], { add_generation_prompt: false }],
];

const qwen3Only = [
  ["reasoning_content last turn", [u("Why is the sky blue?"), a("Rayleigh scattering.", { reasoning_content: "\nThink about scattering.\n" })], { add_generation_prompt: false }],
  ["inline think last turn", [u("2+2?"), a("<think>\nadd them\n</think>\n\n4")], { add_generation_prompt: false }],
  ["inline think earlier turn", [u("2+2?"), a("<think>\nadd\n</think>\n\n4"), u("3+3?")], {}],
  ["think after tool response", [u("weather?"), a("<think>\nneed tool\n</think>\n\n", { tool_calls: [call("get_weather", { city: "Oslo" })] }), tool("-3C"), a("<think>\nit is cold\n</think>\n\nIt is -3C in Oslo.")], { tools: [weather], add_generation_prompt: false }],
  ["user tool_response text", [u("q"), a("x"), u("<tool_response>\nresult\n</tool_response>")], {}],
  ["enable_thinking false", [u("Hi")], { extra: { enable_thinking: false } }],
  ["enable_thinking true", [u("Hi")], { extra: { enable_thinking: true } }],
  ["enable_thinking false multi", [sys, u("Hi"), a("Hello"), u("Bye")], { extra: { enable_thinking: false } }],
  ["reasoning_content null", [u("a"), a("b", { reasoning_content: null })], { add_generation_prompt: false }],
  ["string arguments", [u("a"), a("", { tool_calls: [{ type: "function", function: { name: "search", arguments: "{\"query\": \"raw string\"}" } }] }), tool("ok")], { tools: [search] }],
  ["tool_call without function wrapper", [u("a"), a("", { tool_calls: [{ name: "search", arguments: { query: "flat" } }] }), tool("ok")], { tools: [search] }],
];
const qwen25Only = [
  ["qwen2.5 tool call no content", [u("a"), a(null, { tool_calls: [call("search", { query: "q" })] }), tool("ok")], { tools: [search] }],
  ["qwen2.5 default system with tools", [u("Weather in Paris?"), a("", { tool_calls: [call("get_weather", { city: "Paris" })] })], { tools: [weather], add_generation_prompt: false }],
];

const rows = [];
for (const [tname, src] of Object.entries(templates)) {
  const t = new Template(src);
  const list = common.concat(tname === "qwen3" ? qwen3Only : qwen25Only);
  for (const [name, messages, opt] of list) {
    const ctx = {
      messages,
      tools: opt.tools ?? null,
      add_generation_prompt: opt.add_generation_prompt ?? true,
      bos_token: "",
      eos_token: "<|im_end|>",
      ...(opt.extra || {}),
    };
    rows.push({
      template: tname,
      name,
      messages,
      tools: opt.tools ?? null,
      add_generation_prompt: ctx.add_generation_prompt,
      extra: opt.extra || {},
      rendered: t.render(ctx),
    });
  }
}
const out = path.join(fixtures, "chat_template_renderings.json");
fs.writeFileSync(out, JSON.stringify(rows, null, 1) + "\n");
console.log(`wrote ${rows.length} renderings to ${out}`);
