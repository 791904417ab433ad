// Small helpers for writing JSON by hand. Job payloads and results are never
// re-serialised (they are copied byte for byte), so all relay needs is string
// escaping and a few appenders for its own envelopes.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace relay::json {

// Appends `s` as a quoted JSON string. Control characters are escaped;
// invalid UTF-8 is replaced by U+FFFD so that the output is always valid
// JSON even when a message quotes untrusted bytes.
void append_string(std::string& out, std::string_view s);

inline void append_uint(std::string& out, uint64_t v) { out += std::to_string(v); }
inline void append_int(std::string& out, int64_t v) { out += std::to_string(v); }

// `"key":` with the key escaped.
inline void append_key(std::string& out, std::string_view key) {
  append_string(out, key);
  out += ':';
}

}  // namespace relay::json
