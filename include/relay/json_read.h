// Reading JSON with simdjson's on-demand API while keeping values as the
// exact bytes that were sent (relay never re-serialises payloads/results).
#pragma once

#include <simdjson.h>

#include <string>
#include <string_view>

namespace relay::json {

// The bytes of `v` as they appear in the input, without trailing whitespace.
bool raw_value(simdjson::ondemand::value v, std::string_view& out);

// Ensures `s` has the padding simdjson reads past the end of its input.
inline void pad(std::string& s) { s.reserve(s.size() + simdjson::SIMDJSON_PADDING); }

}  // namespace relay::json
