// ChatTemplate: built-in ChatML or a Jinja chat template from tokenizer_config.json.
#include "tokenizer/jinja.h"
#include "tokenizer/tokenizer.h"

namespace qilin::tokenizer {

ChatTemplate ChatTemplate::ChatML() { return ChatTemplate(); }

Result<ChatTemplate> ChatTemplate::FromJinja(std::string_view source, std::string bos_token,
                                             std::string eos_token) {
  QILIN_ASSIGN_OR_RETURN(std::shared_ptr<const jinja::Template> t, jinja::Template::Parse(source));
  ChatTemplate out;
  out.tmpl_ = std::move(t);
  out.bos_token_ = std::move(bos_token);
  out.eos_token_ = std::move(eos_token);
  return out;
}

Result<std::string> ChatTemplate::Render(const nlohmann::ordered_json& messages,
                                         const ChatTemplateOptions& options) const {
  if (!messages.is_array()) {
    return InvalidArgument("messages must be a JSON array, got {}", messages.type_name());
  }
  for (size_t i = 0; i < messages.size(); ++i) {
    const auto& m = messages[i];
    if (!m.is_object()) return InvalidArgument("messages[{}] is not an object", i);
    if (!m.contains("role") || !m["role"].is_string()) {
      return InvalidArgument("messages[{}] has no string \"role\"", i);
    }
  }
  if (!options.tools.is_null() && !options.tools.is_array()) {
    return InvalidArgument("tools must be an array, got {}", options.tools.type_name());
  }
  if (!options.extra.is_null() && !options.extra.is_object()) {
    return InvalidArgument("chat template variables must be an object, got {}",
                           options.extra.type_name());
  }
  if (!tmpl_) {
    // Built-in ChatML, as Qwen-7B-Chat's make_context builds its prompt.
    std::string out;
    size_t start = 0;
    if (messages.empty() || messages[0]["role"] != "system") {
      out += "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n";
    }
    for (size_t i = start; i < messages.size(); ++i) {
      const auto& m = messages[i];
      std::string content;
      if (m.contains("content") && m["content"].is_string()) {
        content = m["content"].get<std::string>();
      } else if (m.contains("content") && !m["content"].is_null()) {
        return InvalidArgument("messages[{}].content must be a string for ChatML", i);
      }
      out += "<|im_start|>" + m["role"].get<std::string>() + "\n" + content + "<|im_end|>\n";
    }
    if (options.add_generation_prompt) out += "<|im_start|>assistant\n";
    return out;
  }
  nlohmann::ordered_json ctx = nlohmann::ordered_json::object();
  ctx["messages"] = messages;
  ctx["tools"] = options.tools;
  ctx["add_generation_prompt"] = options.add_generation_prompt;
  ctx["bos_token"] = bos_token_;
  ctx["eos_token"] = eos_token_;
  if (options.extra.is_object()) {
    for (const auto& [k, v] : options.extra.items()) ctx[k] = v;
  }
  return tmpl_->Render(ctx);
}

}  // namespace qilin::tokenizer
