// Internal to the Jinja subset: runtime values with Python semantics (lists and dicts are
// shared references, dicts keep insertion order).
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

namespace qilin::tokenizer::jinja {

struct Value;
using List = std::vector<Value>;
struct Dict;
struct Kwargs;
using Func = std::function<Value(std::vector<Value>& args, Kwargs& kwargs)>;

struct Value {
  enum class T { kUndefined, kNone, kBool, kInt, kFloat, kString, kList, kDict, kFunc };
  T t = T::kUndefined;
  bool b = false;
  int64_t i = 0;
  double f = 0;
  std::string s;
  std::shared_ptr<List> list;
  std::shared_ptr<Dict> dict;
  std::shared_ptr<Func> fn;
  bool is_namespace = false;

  static Value None() { return Make(T::kNone); }
  static Value Bool(bool v) {
    Value x = Make(T::kBool);
    x.b = v;
    return x;
  }
  static Value Int(int64_t v) {
    Value x = Make(T::kInt);
    x.i = v;
    return x;
  }
  static Value Float(double v) {
    Value x = Make(T::kFloat);
    x.f = v;
    return x;
  }
  static Value Str(std::string v) {
    Value x = Make(T::kString);
    x.s = std::move(v);
    return x;
  }
  static Value MakeList(List items = {}) {
    Value x = Make(T::kList);
    x.list = std::make_shared<List>(std::move(items));
    return x;
  }
  static Value MakeDict();
  static Value Function(Func f) {
    Value x = Make(T::kFunc);
    x.fn = std::make_shared<Func>(std::move(f));
    return x;
  }
  static Value Make(T t) {
    Value x;
    x.t = t;
    return x;
  }
  bool defined() const { return t != T::kUndefined; }
  bool is_number() const { return t == T::kInt || t == T::kFloat || t == T::kBool; }
};

struct Dict {
  std::vector<std::pair<std::string, Value>> items;
  const Value* Find(const std::string& key) const {
    for (const auto& kv : items) {
      if (kv.first == key) return &kv.second;
    }
    return nullptr;
  }
  void Set(const std::string& key, Value v) {
    for (auto& kv : items) {
      if (kv.first == key) {
        kv.second = std::move(v);
        return;
      }
    }
    items.emplace_back(key, std::move(v));
  }
};

struct Kwargs {
  std::vector<std::pair<std::string, Value>> items;
};

inline Value Value::MakeDict() {
  Value x = Make(T::kDict);
  x.dict = std::make_shared<Dict>();
  return x;
}

}  // namespace qilin::tokenizer::jinja
