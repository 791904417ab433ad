// relay::v1's readers of relay's answers (lease, heartbeat, job, submit,
// error bodies): what bunny and relayctl believe of a relay that may be
// broken or hostile.
//
// Invariants: nothing crashes or leaks; every job a lease answer yields has
// an id of 16 and a lease of 32 lowercase hex digits, an attempt in
// 1..max_attempt, an expiry in 1..2^53 and a payload that is one valid JSON
// value; ids are unique within an answer; a rejected entry's id, when kept,
// is a valid id, and its reason never carries the entry's bytes; an error
// body's code is snake_case and its message printable ASCII of at most 300
// bytes.
#include <simdjson.h>

#include <set>
#include <string>

#include "fuzz_input.h"
#include "relay/v1_client.h"

using namespace relay;

namespace {

bool one_json_value(std::string_view s) {
  simdjson::padded_string p(s);
  simdjson::dom::parser parser;
  simdjson::dom::element e;
  return !parser.parse(p).get(e);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view body(reinterpret_cast<const char*>(data), size);
  std::string why;

  v1::lease_answer a;
  if (v1::parse_lease_answer(body, a, why)) {
    std::set<std::string> ids;
    for (const auto& j : a.jobs) {
      FUZZ_CHECK(v1::valid_job_id(j.id));
      FUZZ_CHECK(v1::valid_lease_token(j.lease));
      FUZZ_CHECK(j.attempt >= 1 && j.attempt <= v1::max_attempt);
      FUZZ_CHECK(j.lease_expires_ms >= 1 && j.lease_expires_ms <= v1::max_expiry_ms);
      FUZZ_CHECK(one_json_value(j.payload));
      FUZZ_CHECK(ids.insert(j.id).second);
    }
    for (const auto& r : a.rejected) {
      FUZZ_CHECK(r.id.empty() || v1::valid_job_id(r.id));
      FUZZ_CHECK(!r.reason.empty() && r.reason.size() < 200);
    }
  } else {
    FUZZ_CHECK(!why.empty());
  }

  int64_t expires = 0;
  if (v1::parse_heartbeat_answer(body, expires, why)) FUZZ_CHECK(expires >= 1 && expires <= v1::max_expiry_ms);

  v1::job_view j;
  if (v1::parse_job_view(body, j, why)) FUZZ_CHECK(v1::valid_job_id(j.id) && !j.state.empty());

  v1::submitted s;
  if (v1::parse_submitted(body, s, why)) {
    FUZZ_CHECK(!s.ids.empty());
    for (const auto& id : s.ids) FUZZ_CHECK(v1::valid_job_id(id));
  }

  std::string code, message;
  v1::parse_error_body(body, code, message);
  for (char c : code) FUZZ_CHECK((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_');
  FUZZ_CHECK(message.size() <= 300);
  for (char c : message) FUZZ_CHECK(c >= 0x20 && c < 0x7f);
  return 0;
}
