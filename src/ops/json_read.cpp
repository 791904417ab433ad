#include "relay/json_read.h"

namespace relay::json {

bool raw_value(simdjson::ondemand::value v, std::string_view& out) {
  using namespace simdjson;
  // simdjson's raw views run up to the next structural character, so the
  // whitespace after a value is dropped here.
  ondemand::json_type t;
  if (v.type().get(t)) return false;
  if (t == ondemand::json_type::object) {
    ondemand::object o;
    if (v.get_object().get(o) || o.raw_json().get(out)) return false;
  } else if (t == ondemand::json_type::array) {
    ondemand::array a;
    if (v.get_array().get(a) || a.raw_json().get(out)) return false;
  } else {
    out = v.raw_json_token();
  }
  while (!out.empty() && (out.back() == ' ' || out.back() == '\t' || out.back() == '\n' || out.back() == '\r'))
    out.remove_suffix(1);
  return true;
}

}  // namespace relay::json
