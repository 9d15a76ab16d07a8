// A small strict JSON parser (RFC 8259) for safetensors headers, config.json and shard indexes.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace sinkcheck {

class Json {
 public:
  enum class Kind { Null, Bool, Number, String, Array, Object };

  Kind kind = Kind::Null;
  bool boolean = false;
  double number = 0.0;      // every number, as a double
  bool is_integer = false;  // written without fraction or exponent and fits in int64
  int64_t integer = 0;      // valid when is_integer
  std::string string;
  std::vector<Json> items;                            // array elements
  std::vector<std::pair<std::string, Json>> members;  // object members in file order; keys are unique

  bool is_object() const { return kind == Kind::Object; }
  bool is_array() const { return kind == Kind::Array; }
  bool is_string() const { return kind == Kind::String; }
  bool is_number() const { return kind == Kind::Number; }
  bool is_bool() const { return kind == Kind::Bool; }
  bool is_null() const { return kind == Kind::Null; }

  // The member named `key` of an object, or nullptr (also for non-objects).
  const Json* find(std::string_view key) const;
};

// Parses exactly one JSON text: no comments, no trailing commas, no NaN/Infinity, no leading zeros,
// no duplicate object keys, valid UTF-8 and escapes, nesting at most 64 deep, nothing but
// whitespace after the value. Throws CheckError "<what>: <problem> at byte N".
Json parse_json(std::string_view text, std::string_view what);

}  // namespace sinkcheck
