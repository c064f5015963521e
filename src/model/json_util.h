// Parsing JSON from files a user hands us (config.json, safetensors headers, index files) and
// reading typed fields from it, with errors that name the file, the key and what was expected.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "common/status.h"

namespace qilin {

// Parses `text`; `source` names the file in errors. Invalid JSON is InvalidArgument naming the
// byte position; nesting deeper than `max_depth` is rejected (hostile input cannot exhaust the
// stack or memory through nesting).
Result<nlohmann::json> ParseJsonText(std::string_view text, const std::string& source,
                                     int max_depth = 64);

// "string", "integer", "number", "boolean", "object", "array", "null".
const char* JsonTypeName(const nlohmann::json& j);

// Typed reads of one JSON object's fields. Absent keys and JSON null are "missing": the *Or
// variants return the default, the others fail naming the key. `prefix` qualifies nested keys
// in messages ("rope_scaling." -> "rope_scaling.factor").
class JsonFields {
 public:
  JsonFields(const nlohmann::json& obj, std::string source, std::string prefix = "")
      : obj_(obj), source_(std::move(source)), prefix_(std::move(prefix)) {}

  // nullptr when absent or null.
  const nlohmann::json* Find(const std::string& key) const;
  bool Has(const std::string& key) const { return Find(key) != nullptr; }

  Result<int64_t> Int(const std::string& key) const;
  Result<int64_t> IntOr(const std::string& key, int64_t def) const;
  Result<double> Double(const std::string& key) const;  // integers accepted
  Result<double> DoubleOr(const std::string& key, double def) const;
  Result<bool> BoolOr(const std::string& key, bool def) const;
  Result<std::string> String(const std::string& key) const;
  Result<std::string> StringOr(const std::string& key, const std::string& def) const;

  // "<source>: key 'rope_scaling.factor'": the start of every message about `key`.
  std::string Where(const std::string& key) const;
  Status Missing(const std::string& key) const;
  Status WrongType(const std::string& key, const char* expected, const nlohmann::json& got) const;

 private:
  const nlohmann::json& obj_;
  std::string source_;
  std::string prefix_;
};

}  // namespace qilin
