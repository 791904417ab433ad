// Reading relay's answers. Relay is not trusted here: every answer is
// validated whole, once, by simdjson's DOM parser (every string's UTF-8 and
// escapes, every number, the structure), and fields are read from that
// parse. Payloads and results are kept as the exact bytes sent: their spans
// are found by a plain scan of the already-validated text (raw_cursor),
// walked in step with the DOM, so no second JSON pass and no copy. Nothing
// from an answer is used unless it has the shape DESIGN.md gives it.
#include <simdjson.h>

#include <cstring>
#include <unordered_set>

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

// One answer, validated whole. In place when the caller's buffer has
// simdjson's padding past its end (client_conn reserves it for bodies), so
// a 256 MiB answer is not copied just to be read.
struct validated {
  simdjson::dom::parser dom;
  simdjson::padded_string copy;
  simdjson::dom::element root;
};

bool valid_json(std::string_view body, bool padded, validated& v, std::string& why) {
  // relay accepts payloads nested as deep as simdjson's default (1024); in
  // an answer they sit a few levels deeper, and one deep payload must not
  // make the whole answer (other producers' jobs) unreadable.
  if (auto err = v.dom.allocate(body.size(), answer_max_depth)) {
    why = std::string("cannot read the answer: ") + simdjson::error_message(err);
    return false;
  }
  simdjson::error_code err;
  if (padded) {
    err = v.dom.parse(body.data(), body.size(), false).get(v.root);
  } else {
    v.copy = simdjson::padded_string(body);
    err = v.dom.parse(v.copy).get(v.root);
  }
  if (err) {
    why = std::string("not valid JSON: ") + simdjson::error_message(err);
    return false;
  }
  return true;
}

// Where the values of a document are in its text. Only ever run over bytes
// simdjson has just accepted, so it checks nothing: it skips whitespace,
// strings (a quote ends one unless an odd run of backslashes precedes it)
// and brackets. Walked in step with the DOM's members, which come in text
// order, it gives each value's exact bytes without a second parse.
class raw_cursor {
 public:
  explicit raw_cursor(std::string_view text) : _p(text.data()), _end(text.data() + text.size()) {}

  // Past the opening bracket of the object or array the cursor is on.
  void enter() {
    ws();
    ++_p;
  }
  // The next element of an array: its bytes, consumed.
  std::string_view element() {
    separator();
    return value();
  }
  // The next member of an object: its value's bytes, key consumed too.
  std::string_view member() {
    separator();
    skip_string();
    ws();
    ++_p;  // ':'
    return value();
  }

 private:
  void ws() {
    while (_p < _end && (*_p == ' ' || *_p == '\n' || *_p == '\r' || *_p == '\t')) ++_p;
  }
  void separator() {
    ws();
    if (_p < _end && *_p == ',') ++_p;
    ws();
  }
  void skip_string() {
    ++_p;  // the opening quote
    for (;;) {
      auto* q = static_cast<const char*>(std::memchr(_p, '"', static_cast<size_t>(_end - _p)));
      if (!q) {  // cannot happen on validated text; stay in bounds regardless
        _p = _end;
        return;
      }
      const char* b = q;
      while (b > _p && b[-1] == '\\') --b;
      _p = q + 1;
      if (((q - b) & 1) == 0) return;
    }
  }
  std::string_view value() {
    ws();
    const char* start = _p;
    if (_p >= _end) return {};
    if (*_p == '"') {
      skip_string();
    } else if (*_p == '{' || *_p == '[') {
      size_t depth = 0;
      while (_p < _end) {
        char c = *_p;
        if (c == '"') {
          skip_string();
          continue;
        }
        ++_p;
        if (c == '{' || c == '[') ++depth;
        else if ((c == '}' || c == ']') && --depth == 0) break;
      }
    } else {
      while (_p < _end && *_p != ',' && *_p != '}' && *_p != ']' && *_p != ' ' && *_p != '\n' && *_p != '\r' &&
             *_p != '\t')
        ++_p;
    }
    return {start, static_cast<size_t>(_p - start)};
  }

  const char* _p;
  const char* _end;
};

// An integer field within [lo, hi].
bool read_int(simdjson::dom::element v, int64_t lo, int64_t hi, int64_t& out) {
  int64_t n = 0;
  if (v.get_int64().get(n) || n < lo || n > hi) return false;
  out = n;
  return true;
}

bool read_string(simdjson::dom::element v, std::string& out) {
  std::string_view s;
  if (v.get_string().get(s)) return false;
  out.assign(s);
  return true;
}

// One entry of a lease answer's "jobs"; `text` is its bytes. On failure
// `why` names the field, never its value (which may be anything, payload
// bytes included).
bool read_leased_job(simdjson::dom::element el, std::string_view text, leased_job& job, std::string& why) {
  simdjson::dom::object o;
  if (el.get_object().get(o)) {
    why = "the entry is not an object";
    return false;
  }
  raw_cursor raw(text);
  raw.enter();
  bool has_id = false, has_lease = false, has_attempt = false, has_expiry = false, has_payload = false;
  for (simdjson::dom::key_value_pair member : o) {
    // Named, not a structured binding: clang 14 cannot capture those (once).
    std::string_view key = member.key;
    simdjson::dom::element value = member.value;
    std::string_view bytes = raw.member();
    auto once = [&](bool& seen) {
      if (seen) why = "\"" + std::string(key) + "\" appears twice";
      return !std::exchange(seen, true);
    };
    if (key == "id") {
      if (!once(has_id)) return false;
      if (!read_string(value, job.id) || !valid_job_id(job.id)) {
        job.id.clear();
        why = "\"id\" is not 16 lowercase hex digits";
        return false;
      }
    } else if (key == "lease") {
      if (!once(has_lease)) return false;
      if (!read_string(value, job.lease) || !valid_lease_token(job.lease)) {
        job.lease.clear();
        why = "\"lease\" is not 32 lowercase hex digits";
        return false;
      }
    } else if (key == "attempt") {
      if (!once(has_attempt)) return false;
      int64_t n = 0;
      if (!read_int(value, 1, max_attempt, n)) {
        why = "\"attempt\" is not an integer from 1 to " + std::to_string(max_attempt);
        return false;
      }
      job.attempt = static_cast<uint32_t>(n);
    } else if (key == "lease_expires_ms") {
      if (!once(has_expiry)) return false;
      if (!read_int(value, 1, max_expiry_ms, job.lease_expires_ms)) {
        why = "\"lease_expires_ms\" is not a positive integer below 2^53";
        return false;
      }
    } else if (key == "payload") {
      if (!once(has_payload)) return false;
      if (bytes.empty()) {
        why = "\"payload\" is not a JSON value";
        return false;
      }
      job.payload = bytes;
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

bool parse_lease_answer(std::string_view body, lease_answer& out, std::string& why, bool padded) {
  out = {};
  out.bytes = body.size();
  validated v;
  if (!valid_json(body, padded, v, why)) return false;
  simdjson::dom::object top;
  if (v.root.get_object().get(top)) {
    why = "not a JSON object";
    return false;
  }
  raw_cursor raw(body);
  raw.enter();
  bool seen_jobs = false;
  std::unordered_set<std::string> ids;
  for (auto [key, value] : top) {
    std::string_view bytes = raw.member();
    if (key != "jobs") continue;
    if (seen_jobs) {
      why = "\"jobs\" appears twice";
      return false;
    }
    seen_jobs = true;
    simdjson::dom::array jobs;
    if (value.get_array().get(jobs)) {
      why = "\"jobs\" is not an array";
      return false;
    }
    raw_cursor entries(bytes);
    entries.enter();
    size_t index = 0;
    for (simdjson::dom::element el : jobs) {
      std::string_view entry = entries.element();
      leased_job job;
      std::string reason;
      if (!read_leased_job(el, entry, job, reason)) {
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
  validated v;
  if (!valid_json(body, false, v, why)) return false;
  simdjson::dom::object top;
  simdjson::dom::element e;
  if (v.root.get_object().get(top) || top["lease_expires_ms"].get(e) || !read_int(e, 1, max_expiry_ms, expires_ms)) {
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

bool parse_job_view(std::string_view body, job_view& out, std::string& why, bool padded) {
  out = {};
  validated v;
  if (!valid_json(body, padded, v, why)) return false;
  simdjson::dom::object top;
  if (v.root.get_object().get(top)) {
    why = "not a JSON object";
    return false;
  }
  raw_cursor raw(body);
  raw.enter();
  bool has_id = false, has_state = false;
  for (auto [key, value] : top) {
    std::string_view bytes = raw.member();
    int64_t n = 0;
    bool ok = true;
    if (key == "id") ok = has_id = read_string(value, out.id) && valid_job_id(out.id);
    else if (key == "queue") ok = read_string(value, out.queue);
    else if (key == "state") ok = has_state = read_string(value, out.state) && known_state(out.state);
    else if (key == "attempts") ok = read_int(value, 0, max_attempt, n);
    else if (key == "created_ms") ok = read_int(value, 0, max_expiry_ms, out.created_ms);
    else if (key == "updated_ms") ok = read_int(value, 0, max_expiry_ms, out.updated_ms);
    else if (key == "payload" || key == "result" || key == "error") ok = !bytes.empty();
    if (ok && key == "attempts") out.attempts = static_cast<uint32_t>(n);
    if (ok && key == "payload") out.payload = bytes;
    if (ok && key == "result") out.result = bytes;
    if (ok && key == "error") out.error = bytes;
    if (!ok) {
      why = "\"" + std::string(key) + "\" is not what a job's " + std::string(key) + " must be";
      return false;
    }
  }
  if (!has_id || !has_state) {
    why = "no \"id\" or \"state\"";
    return false;
  }
  out.raw = body;
  return true;
}

bool parse_submitted(std::string_view body, submitted& out, std::string& why) {
  out.ids.clear();
  validated v;
  if (!valid_json(body, false, v, why)) return false;
  simdjson::dom::object top;
  if (v.root.get_object().get(top)) {
    why = "not a JSON object";
    return false;
  }
  for (auto [key, value] : top) {
    if (key == "id") {
      std::string id;
      if (!read_string(value, id) || !valid_job_id(id)) {
        why = "\"id\" is not 16 lowercase hex digits";
        return false;
      }
      out.ids.push_back(std::move(id));
    } else if (key == "ids") {
      simdjson::dom::array a;
      if (value.get_array().get(a)) {
        why = "\"ids\" is not an array";
        return false;
      }
      for (simdjson::dom::element el : a) {
        std::string id;
        if (!read_string(el, id) || !valid_job_id(id)) {
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
