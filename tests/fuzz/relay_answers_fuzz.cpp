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
//
// And the exact bytes: every payload a lease answer yields, and a job
// view's payload, result and error, are the bytes simdjson's on-demand
// parser finds for that field (the oracle for the scan that finds them
// without a second parse), whether the answer was parsed in place or
// copied.
#include <simdjson.h>

#include <set>
#include <string>

#include "fuzz_input.h"
#include "relay/json_read.h"
#include "relay/v1_client.h"

using namespace relay;

namespace {

bool one_json_value(std::string_view s) {
  simdjson::padded_string p(s);
  simdjson::dom::parser parser;
  simdjson::dom::element e;
  return !parser.parse(p).get(e);
}

// The raw bytes of field `key` of the `index`th entry of the top-level
// "jobs" array (or of the top-level object when index < 0), by on-demand.
bool ondemand_field(const simdjson::padded_string& p, long index, std::string_view key, std::string_view& out) {
  simdjson::ondemand::parser parser;
  simdjson::ondemand::document doc;
  simdjson::ondemand::object top;
  if (parser.allocate(p.size(), simdjson::DEFAULT_MAX_DEPTH + 8) || parser.iterate(p).get(doc) ||
      doc.get_object().get(top))
    return false;
  // The last occurrence: a job view takes the last of a repeated key (a
  // lease entry refuses repeats, so there it is the only one).
  auto find_in = [&](simdjson::ondemand::object o) {
    bool found = false;
    for (auto f : o) {
      simdjson::ondemand::field field;
      std::string_view k;
      if (std::move(f).get(field) || field.unescaped_key().get(k)) return false;
      if (k == key) {
        if (!relay::json::raw_value(field.value(), out)) return false;
        found = true;
      }
    }
    return found;
  };
  if (index < 0) return find_in(top);
  for (auto f : top) {
    simdjson::ondemand::field field;
    std::string_view k;
    if (std::move(f).get(field) || field.unescaped_key().get(k)) return false;
    if (k != "jobs") continue;
    simdjson::ondemand::array a;
    if (field.value().get_array().get(a)) return false;
    long i = 0;
    for (auto el : a) {
      simdjson::ondemand::value v;
      if (el.get(v)) return false;
      if (i++ == index) {
        simdjson::ondemand::object o;
        return !v.get_object().get(o) && find_in(o);
      }
    }
    return false;
  }
  return false;
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
    // Each job's payload is the entry's "payload" as on-demand reads it;
    // jobs come in entry order, skipping the rejected.
    simdjson::padded_string padded(body);
    std::set<size_t> rejected;
    for (const auto& r : a.rejected) rejected.insert(r.index);
    long index = 0;
    for (const auto& j : a.jobs) {
      while (rejected.count(static_cast<size_t>(index))) ++index;
      std::string_view want;
      FUZZ_CHECK(ondemand_field(padded, index, "payload", want));
      FUZZ_CHECK(j.payload == want);
      ++index;
    }
    // The same answer parsed in place (padding behind it) says the same.
    v1::lease_answer b;
    std::string why2;
    FUZZ_CHECK(v1::parse_lease_answer(std::string_view(padded.data(), padded.size()), b, why2, true));
    FUZZ_CHECK(b.jobs.size() == a.jobs.size() && b.rejected.size() == a.rejected.size());
    for (size_t i = 0; i < a.jobs.size(); ++i) FUZZ_CHECK(b.jobs[i].payload == a.jobs[i].payload);
  } else {
    FUZZ_CHECK(!why.empty());
  }

  int64_t expires = 0;
  if (v1::parse_heartbeat_answer(body, expires, why)) FUZZ_CHECK(expires >= 1 && expires <= v1::max_expiry_ms);

  v1::job_view j;
  if (v1::parse_job_view(body, j, why)) {
    FUZZ_CHECK(v1::valid_job_id(j.id) && !j.state.empty());
    simdjson::padded_string padded(body);
    for (auto [key, got] : {std::pair{"payload", j.payload}, {"result", j.result}, {"error", j.error}}) {
      std::string_view want;
      if (!got.empty()) FUZZ_CHECK(ondemand_field(padded, -1, key, want) && got == want);
    }
  }

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
