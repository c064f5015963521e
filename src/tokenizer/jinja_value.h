// Internal to the Jinja subset: runtime values with Python semantics (lists and dicts are
// shared references, dicts keep insertion order).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
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
  int depth = 0;  // nesting of lists/dicts (bounded: deep values would overflow the stack)

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
    int d = 0;
    for (const auto& v : items) d = v.depth > d ? v.depth : d;
    x.depth = d + 1;
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

// ---- helpers shared by the evaluator (jinja_value.cc): Python semantics ----
constexpr int kMaxValueDepth = 256;  // nesting of lists/dicts (bounds recursion)
[[noreturn]] void Fail(int line, const std::string& msg);
const char* TypeName(const Value& v);
Value& Nest(Value& v, int line);
Value FromJson(const nlohmann::ordered_json& j, int depth = 0);
nlohmann::ordered_json ToJsonValue(const Value& v, int line, int depth = 0);
void DumpJson(const nlohmann::ordered_json& j, int indent, int depth, std::string* out);
std::string Str(const Value& v);     // str(v) as Jinja2 prints it
std::string PyRepr(const Value& v);  // repr(v)
bool Truthy(const Value& v);
double AsDouble(const Value& v);
int64_t AsInt(const Value& v);
bool Equal(const Value& a, const Value& b);
int Compare(const Value& a, const Value& b, int line, const std::string& op);
std::vector<std::string_view> Chars(const std::string& s);  // code points of UTF-8 text
int64_t CharCount(const std::string& s);
std::string Strip(const std::string& s, const Value* chars, bool left, bool right);
Value Split(const std::string& s, const Value* sep, int64_t maxsplit, int line);
std::string Replace(const std::string& s, const std::string& from, const std::string& to,
                    int64_t count);
std::string Capitalize(const std::string& s);
std::string Title(const std::string& s);
std::string Upper(std::string s);
std::string Lower(std::string s);
void SliceIndices(int64_t len, const Value* start, const Value* stop, const Value* step,
                  int64_t* out_start, int64_t* out_stop, int64_t* out_step, int line);

}  // namespace qilin::tokenizer::jinja
