// Reading relay's answers. Relay is not trusted here: every answer is first
// validated whole as JSON (simdjson's DOM parser checks every string's UTF-8,
// every number and the structure), then read field by field with the
// on-demand parser, which keeps payloads as the exact bytes sent. Nothing
// from an answer is used unless it has the shape DESIGN.md gives it.
#include <simdjson.h>

#include <cstring>
#include <unordered_set>

#include "relay/json_read.h"
#include "relay/v1_client.h"

namespace relay::v1 {
namespace {

constexpr size_t answer_max_depth = simdjson::DEFAULT_MAX_DEPTH + 8;

bool lower_hex(std::string_view s, size_t n) {
  if (s.size() != n) return false;
  for (char c : s)
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  return true;
}

// The whole answer is valid JSON; the padded copy is what the on-demand
// parser then reads.
bool valid_json(std::string_view body, simdjson::padded_string& padded, std::string& why) {
  padded = simdjson::padded_string(body);
  simdjson::dom::parser dom;
  simdjson::dom::element root;
  // relay accepts payloads nested as deep as simdjson's default (1024); in
  // an answer they sit a few levels deeper, and one deep payload must not
  // make the whole answer (other producers' jobs) unreadable.
  if (auto err = dom.allocate(body.size(), answer_max_depth)) {
    why = std::string("cannot read the answer: ") + simdjson::error_message(err);
    return false;
  }
  if (auto err = dom.parse(padded).get(root)) {
    why = std::string("not valid JSON: ") + simdjson::error_message(err);
    return false;
  }
  return true;
}

// An integer field within [lo, hi].
bool read_int(simdjson::ondemand::value v, int64_t lo, int64_t hi, int64_t& out) {
  int64_t n = 0;
  if (v.get_int64().get(n) || n < lo || n > hi) return false;
  out = n;
  return true;
}

bool read_string(simdjson::ondemand::value v, std::string& out) {
  std::string_view s;
  if (v.get_string().get(s)) return false;
  out.assign(s);
  return true;
}

// One entry of a lease answer's "jobs". On failure `why` names the field,
// never its value (which may be anything, payload bytes included).
bool read_leased_job(simdjson::ondemand::value el, leased_job& job, std::string& why) {
  simdjson::ondemand::object o;
  if (el.get_object().get(o)) {
    why = "the entry is not an object";
    return false;
  }
  bool has_id = false, has_lease = false, has_attempt = false, has_expiry = false, has_payload = false;
  for (auto f : o) {
    simdjson::ondemand::field field;
    std::string_view key;
    if (std::move(f).get(field) || field.unescaped_key().get(key)) {
      why = "an unreadable key";
      return false;
    }
    auto once = [&](bool& seen) {
      if (seen) why = "\"" + std::string(key) + "\" appears twice";
      return !std::exchange(seen, true);
    };
    if (key == "id") {
      if (!once(has_id)) return false;
      if (!read_string(field.value(), job.id) || !valid_job_id(job.id)) {
        job.id.clear();
        why = "\"id\" is not 16 lowercase hex digits";
        return false;
      }
    } else if (key == "lease") {
      if (!once(has_lease)) return false;
      if (!read_string(field.value(), job.lease) || !valid_lease_token(job.lease)) {
        job.lease.clear();
        why = "\"lease\" is not 32 lowercase hex digits";
        return false;
      }
    } else if (key == "attempt") {
      if (!once(has_attempt)) return false;
      int64_t n = 0;
      if (!read_int(field.value(), 1, max_attempt, n)) {
        why = "\"attempt\" is not an integer from 1 to " + std::to_string(max_attempt);
        return false;
      }
      job.attempt = static_cast<uint32_t>(n);
    } else if (key == "lease_expires_ms") {
      if (!once(has_expiry)) return false;
      if (!read_int(field.value(), 1, max_expiry_ms, job.lease_expires_ms)) {
        why = "\"lease_expires_ms\" is not a positive integer below 2^53";
        return false;
      }
    } else if (key == "payload") {
      if (!once(has_payload)) return false;
      std::string_view raw;
      if (!json::raw_value(field.value(), raw) || raw.empty()) {
        why = "\"payload\" is not a JSON value";
        return false;
      }
      job.payload.assign(raw);
    }
    // Other keys: later versions of relay may add fields; they are ignored.
  }
  for (auto [seen, name] : {std::pair{has_id, "id"}, {has_lease, "lease"}, {has_attempt, "attempt"},
                            {has_expiry, "lease_expires_ms"}, {has_payload, "payload"}}) {
    if (!seen) {
      why = std::string("\"") + name + "\" is missing";
      return false;
    }
  }
  return true;
}

bool snake_case(std::string_view s) {
  if (s.empty() || s.size() > 64) return false;
  for (char c : s)
    if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_')) return false;
  return true;
}

}  // namespace

bool valid_job_id(std::string_view s) { return lower_hex(s, 16); }
bool valid_lease_token(std::string_view s) { return lower_hex(s, 32); }

bool parse_lease_answer(std::string_view body, lease_answer& out, std::string& why) {
  out = {};
  out.bytes = body.size();
  simdjson::padded_string padded;
  if (!valid_json(body, padded, why)) return false;
  simdjson::ondemand::parser parser;
  simdjson::ondemand::document doc;
  simdjson::ondemand::object top;
  if (parser.allocate(padded.size(), answer_max_depth) || parser.iterate(padded).get(doc) || doc.get_object().get(top)) {
    why = "not a JSON object";
    return false;
  }
  bool seen_jobs = false;
  std::unordered_set<std::string> ids;
  for (auto f : top) {
    simdjson::ondemand::field field;
    std::string_view key;
    if (std::move(f).get(field) || field.unescaped_key().get(key)) {
      why = "an unreadable key";
      return false;
    }
    if (key != "jobs") continue;
    if (seen_jobs) {
      why = "\"jobs\" appears twice";
      return false;
    }
    seen_jobs = true;
    simdjson::ondemand::array jobs;
    if (field.value().get_array().get(jobs)) {
      why = "\"jobs\" is not an array";
      return false;
    }
    size_t index = 0;
    for (auto el : jobs) {
      simdjson::ondemand::value v;
      leased_job job;
      std::string reason;
      if (el.get(v)) {
        why = "an unreadable entry in \"jobs\"";
        return false;
      }
      if (!read_leased_job(v, job, reason)) {
        out.rejected.push_back({index, std::move(job.id), std::move(reason)});
      } else if (!ids.insert(job.id).second) {
        out.rejected.push_back({index, std::move(job.id), "the id appears twice in one answer"});
      } else {
        out.jobs.push_back(std::move(job));
      }
      ++index;
    }
  }
  if (!seen_jobs) {
    why = "no \"jobs\" array";
    return false;
  }
  return true;
}

bool parse_heartbeat_answer(std::string_view body, int64_t& expires_ms, std::string& why) {
  simdjson::padded_string padded;
  if (!valid_json(body, padded, why)) return false;
  simdjson::ondemand::parser parser;
  simdjson::ondemand::document doc;
  simdjson::ondemand::object top;
  simdjson::ondemand::value v;
  if (parser.allocate(padded.size(), answer_max_depth) || parser.iterate(padded).get(doc) || doc.get_object().get(top) ||
      top.find_field_unordered("lease_expires_ms").get(v) || !read_int(v, 1, max_expiry_ms, expires_ms)) {
    why = "no \"lease_expires_ms\" that is a positive integer below 2^53";
    return false;
  }
  return true;
}

namespace {

// A job's state is one of relay's seven (DESIGN.md); anything else -- the
// empty string among them -- is not a job view.
bool known_state(std::string_view s) {
  for (std::string_view k : {"queued", "delayed", "leased", "succeeded", "failed", "dead", "cancelled"})
    if (s == k) return true;
  return false;
}

}  // namespace

bool parse_job_view(std::string_view body, job_view& out, std::string& why) {
  out = {};
  simdjson::padded_string padded;
  if (!valid_json(body, padded, why)) return false;
  simdjson::ondemand::parser parser;
  simdjson::ondemand::document doc;
  simdjson::ondemand::object top;
  if (parser.allocate(padded.size(), answer_max_depth) || parser.iterate(padded).get(doc) || doc.get_object().get(top)) {
    why = "not a JSON object";
    return false;
  }
  bool has_id = false, has_state = false;
  for (auto f : top) {
    simdjson::ondemand::field field;
    std::string_view key, raw;
    if (std::move(f).get(field) || field.unescaped_key().get(key)) {
      why = "an unreadable key";
      return false;
    }
    int64_t n = 0;
    bool ok = true;
    if (key == "id") ok = has_id = read_string(field.value(), out.id) && valid_job_id(out.id);
    else if (key == "queue") ok = read_string(field.value(), out.queue);
    else if (key == "state") ok = has_state = read_string(field.value(), out.state) && known_state(out.state);
    else if (key == "attempts") ok = read_int(field.value(), 0, max_attempt, n);
    else if (key == "created_ms") ok = read_int(field.value(), 0, max_expiry_ms, out.created_ms);
    else if (key == "updated_ms") ok = read_int(field.value(), 0, max_expiry_ms, out.updated_ms);
    else if (key == "payload" || key == "result" || key == "error") ok = json::raw_value(field.value(), raw);
    if (ok && key == "attempts") out.attempts = static_cast<uint32_t>(n);
    if (ok && key == "payload") out.payload.assign(raw);
    if (ok && key == "result") out.result.assign(raw);
    if (ok && key == "error") out.error.assign(raw);
    if (!ok) {
      why = "\"" + std::string(key) + "\" is not what a job's " + std::string(key) + " must be";
      return false;
    }
  }
  if (!has_id || !has_state) {
    why = "no \"id\" or \"state\"";
    return false;
  }
  out.raw.assign(body);
  return true;
}

bool parse_submitted(std::string_view body, submitted& out, std::string& why) {
  out.ids.clear();
  simdjson::padded_string padded;
  if (!valid_json(body, padded, why)) return false;
  simdjson::ondemand::parser parser;
  simdjson::ondemand::document doc;
  simdjson::ondemand::object top;
  if (parser.allocate(padded.size(), answer_max_depth) || parser.iterate(padded).get(doc) || doc.get_object().get(top)) {
    why = "not a JSON object";
    return false;
  }
  for (auto f : top) {
    simdjson::ondemand::field field;
    std::string_view key;
    if (std::move(f).get(field) || field.unescaped_key().get(key)) {
      why = "an unreadable key";
      return false;
    }
    if (key == "id") {
      std::string id;
      if (!read_string(field.value(), id) || !valid_job_id(id)) {
        why = "\"id\" is not 16 lowercase hex digits";
        return false;
      }
      out.ids.push_back(std::move(id));
    } else if (key == "ids") {
      simdjson::ondemand::array a;
      if (field.value().get_array().get(a)) {
        why = "\"ids\" is not an array";
        return false;
      }
      for (auto el : a) {
        std::string id;
        simdjson::ondemand::value v;
        if (el.get(v) || !read_string(v, id) || !valid_job_id(id)) {
          why = "an entry of \"ids\" is not 16 lowercase hex digits";
          return false;
        }
        out.ids.push_back(std::move(id));
      }
    }
  }
  if (out.ids.empty()) {
    why = "no \"id\" or \"ids\"";
    return false;
  }
  out.raw.assign(body);
  return true;
}

void parse_error_body(std::string_view body, std::string& code, std::string& message) {
  code.clear();
  message.clear();
  simdjson::padded_string padded(body);
  simdjson::dom::parser dom;
  simdjson::dom::element root;
  std::string_view c, m;
  if (dom.parse(padded).get(root)) return;
  if (!root["error"]["code"].get_string().get(c) && snake_case(c)) code.assign(c);
  if (!root["error"]["message"].get_string().get(m)) {
    for (char ch : m.substr(0, 300)) message += (ch >= 0x20 && ch < 0x7f) ? ch : '?';
  }
}

}  // namespace relay::v1
