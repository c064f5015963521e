// libFuzzer: parse arbitrary text as a Jinja chat template and render it with a small
// conversation. Checks: no crash, hang or sanitizer report; errors come back as Status.
#include <cstdint>
#include <string>

#include "tokenizer/jinja.h"

using qilin::tokenizer::jinja::Template;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string src(reinterpret_cast<const char*>(data), size);
  auto t = Template::Parse(src);
  if (!t.ok()) return 0;
  static const nlohmann::ordered_json ctx = nlohmann::ordered_json::parse(R"({
    "messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi <b>"},
                 {"role": "assistant", "content": "<think>\nr\n</think>\n\nok",
                  "tool_calls": [{"function": {"name": "f", "arguments": {"a": [1, 2.5, null]}}}]},
                 {"role": "tool", "content": "42"}],
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
    "add_generation_prompt": true, "enable_thinking": false, "bos_token": "", "eos_token": "<|im_end|>"
  })");
  auto out = (*t)->Render(ctx);
  (void)out;
  return 0;
}
