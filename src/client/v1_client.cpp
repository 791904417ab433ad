// The typed v1 client: builds each request from validated arguments, sends
// it over one http::client_conn, and turns the answer into a typed value or
// an error. See relay/v1_client.h for the contract.
#include "relay/v1_client.h"

#include <simdjson.h>

#include <cstring>
#include <fstream>
#include <sstream>

#include "relay/api_keys.h"
#include "relay/auth.h"
#include "relay/json.h"
#include "relay/json_read.h"

namespace relay::v1 {
namespace {

error transport_error(const http::client_error& e) {
  error out;
  out.what = error::kind::transport;
  out.transport = e.what;
  out.message = e.message;
  return out;
}

error refused(http::client_response& r) {
  error out;
  out.what = error::kind::refused;
  out.status = r.status;
  out.retry_after = r.retry_after;
  parse_error_body(r.body, out.code, out.message);
  if (out.message.empty()) out.message = "relay answered " + std::to_string(r.status);
  return out;
}

error bad_answer(std::string_view what, const std::string& why) {
  error out;
  out.what = error::kind::bad_answer;
  out.message = std::string(what) + ": " + why;
  return out;
}

error bad_call(std::string why) {
  error out;
  out.what = error::kind::bad_call;
  out.message = std::move(why);
  return out;
}

// A one-shot timer that runs `fn` from the loop: how an answer that is known
// at once (a bad argument) still arrives on a later callback.
void defer(uv_loop_t* loop, std::function<void()> fn) {
  struct deferred {
    uv_timer_t timer;
    std::function<void()> fn;
  };
  auto* d = new deferred{{}, std::move(fn)};
  uv_timer_init(loop, &d->timer);
  d->timer.data = d;
  uv_timer_start(
      &d->timer,
      [](uv_timer_t* t) {
        auto* dd = static_cast<deferred*>(t->data);
        auto run = std::move(dd->fn);
        uv_close(reinterpret_cast<uv_handle_t*>(t), [](uv_handle_t* h) { delete static_cast<deferred*>(h->data); });
        run();
      },
      0, 0);
}

std::string job_path(std::string_view id, std::string_view action = {}) {
  std::string p = "/v1/jobs/";
  p += id;
  if (!action.empty()) {
    p += '/';
    p += action;
  }
  return p;
}

std::string lease_body(std::string_view lease) {
  std::string b = "{\"lease\":\"";
  b += lease;
  b += '"';
  return b;
}

// The elements of a JSON array, as the exact bytes written.
bool split_json_array(std::string_view text, std::vector<std::string>& out, std::string& why) {
  simdjson::padded_string padded(text);
  simdjson::dom::parser dom;
  simdjson::dom::element root;
  if (auto err = dom.parse(padded).get(root)) {
    why = std::string("the batch is not valid JSON: ") + simdjson::error_message(err);
    return false;
  }
  simdjson::ondemand::parser parser;
  simdjson::ondemand::document doc;
  simdjson::ondemand::array a;
  if (parser.iterate(padded).get(doc) || doc.get_array().get(a)) {
    why = "a batch is a JSON array of payloads";
    return false;
  }
  for (auto el : a) {
    simdjson::ondemand::value v;
    std::string_view raw;
    if (el.get(v) || !json::raw_value(v, raw)) {
      why = "an element of the batch is not a JSON value";
      return false;
    }
    out.emplace_back(raw);
  }
  if (out.empty()) {
    why = "the batch is empty";
    return false;
  }
  return true;
}

// Whether simdjson may read `s` in place (client_conn reserves the
// padding behind each body it receives).
bool has_padding(const std::string& s) { return s.capacity() >= s.size() + simdjson::SIMDJSON_PADDING; }

bool visible_ascii(std::string_view s) {
  for (unsigned char c : s)
    if (c < 0x21 || c > 0x7e) return false;
  return true;
}

}  // namespace

std::string_view error::kind_name() const {
  switch (what) {
    case kind::none: return "none";
    case kind::transport: return "transport";
    case kind::refused: return "refused";
    case kind::bad_answer: return "bad_answer";
    case kind::bad_call: return "bad_call";
  }
  return "unknown";
}

client::client(uv_loop_t* loop, options o) : _loop(loop), _o(std::move(o)), _alive(std::make_shared<bool>(true)) {}

client::~client() {
  // Callbacks of requests still out check _alive and never run: the owner is
  // going away with this client.
  *_alive = false;
  if (_conn) _conn->close();
}

http::client_conn* client::connection() {
  if (_conn && _replace && _conn->outstanding() == 0) {
    _conn->close();
    _conn = nullptr;
  }
  if (!_conn) {
    _conn = http::client_conn::create(_loop, _o.connection);
    _replace = false;
  }
  return _conn;
}

void client::set_connection(const http::client_conn::options& o) {
  _o.connection = o;
  _replace = _conn != nullptr;
}

void client::reset() {
  if (!_conn) return;
  http::client_conn* c = _conn;
  _conn = nullptr;
  c->close();
}

void client::later(std::function<void()> fn) { defer(_loop, std::move(fn)); }

void client::send(std::string_view method, std::string target, std::string body, uint32_t timeout_ms, raw_callback cb,
                  std::shared_ptr<const std::string> shared_body) {
  std::weak_ptr<bool> alive = _alive;
  // client_conn may fail requests inside close() (our reset() or the
  // destructor); the answer then goes through the loop like any other.
  auto deliver = [this, alive, cb = std::move(cb)](const http::client_error& e, http::client_response& r) mutable {
    auto a = alive.lock();
    if (!a || !*a) return;
    error err;
    if (e) err = transport_error(e);
    else if (r.status < 200 || r.status > 299) err = refused(r);
    if (e && e.what == http::client_error::kind::closed) {
      later([alive, cb = std::move(cb), err]() mutable {
        auto a2 = alive.lock();
        if (!a2 || !*a2) return;
        http::client_response none;
        cb(err, none);
      });
      return;
    }
    cb(err, r);
  };
  uint32_t timeout = timeout_ms ? timeout_ms : _o.request_timeout_ms;
  if (shared_body) {
    std::string_view view = *shared_body;
    connection()->request(method, target, view, std::move(shared_body), std::move(deliver), timeout, _o.extra_headers);
  }
  else connection()->request(method, target, body, std::move(deliver), timeout, _o.extra_headers);
}

void client::lease(const lease_request& r, callback<lease_answer> cb) {
  if (!auth::valid_queue_name(r.queue) || r.max == 0) {
    later([cb = std::move(cb)] {
      lease_answer none;
      cb(bad_call("lease: the queue name or max is not valid"), none);
    });
    return;
  }
  std::string body = "{\"max\":" + std::to_string(r.max) + ",\"wait_ms\":" + std::to_string(r.wait_ms) +
                     ",\"lease_ms\":" + std::to_string(r.lease_ms);
  if (r.max_bytes) body += ",\"max_bytes\":" + std::to_string(r.max_bytes);
  body += '}';
  send("POST", "/v1/queues/" + r.queue + "/lease", std::move(body), r.wait_ms + _o.request_timeout_ms,
       [cb = std::move(cb)](const error& e, http::client_response& resp) {
         lease_answer a;
         if (e) return cb(e, a);
         std::string why;
         // The jobs view the answer's bytes, which move here rather than
         // being copied per payload.
         bool padded = has_padding(resp.body);
         auto bytes = std::make_shared<const std::string>(std::move(resp.body));
         if (!parse_lease_answer(*bytes, a, why, padded)) return cb(bad_answer("lease answer", why), a);
         a.body = std::move(bytes);
         cb(e, a);
       });
}

void client::heartbeat(std::string_view id, std::string_view lease, uint32_t extend_ms, callback<int64_t> cb) {
  if (!valid_job_id(id) || !valid_lease_token(lease)) {
    later([cb = std::move(cb)] {
      int64_t none = 0;
      cb(bad_call("heartbeat: the id or lease is not valid"), none);
    });
    return;
  }
  std::string body = lease_body(lease) + ",\"extend_ms\":" + std::to_string(extend_ms) + "}";
  send("POST", job_path(id, "heartbeat"), std::move(body), 0, [cb = std::move(cb)](const error& e, http::client_response& resp) {
    int64_t expires = 0;
    if (e) return cb(e, expires);
    std::string why;
    if (!parse_heartbeat_answer(resp.body, expires, why)) return cb(bad_answer("heartbeat answer", why), expires);
    cb(e, expires);
  });
}

void client::complete(std::string_view id, std::string_view lease, std::string_view result_json, done cb) {
  if (!valid_job_id(id) || !valid_lease_token(lease) || result_json.empty()) {
    later([cb = std::move(cb)] { cb(bad_call("complete: the id, lease or result is not valid")); });
    return;
  }
  std::string body = lease_body(lease) + ",\"result\":";
  body += result_json;
  body += '}';
  send("POST", job_path(id, "complete"), std::move(body), 0,
       [cb = std::move(cb)](const error& e, http::client_response&) { cb(e); });
}

bool fill_complete_body(std::string& body, std::string_view lease) {
  if (!valid_lease_token(lease) || body.size() <= complete_room) return false;
  char* at = body.data();
  std::memcpy(at, complete_head_open.data(), complete_head_open.size());
  at += complete_head_open.size();
  std::memcpy(at, lease.data(), lease.size());
  at += lease.size();
  std::memcpy(at, complete_head_close.data(), complete_head_close.size());
  body += '}';
  return true;
}

void client::complete_body(std::string_view id, std::shared_ptr<const std::string> body, done cb) {
  // Only a body fill_complete_body() made: it starts with the envelope.
  if (!valid_job_id(id) || !body || body->size() <= complete_room + 1 || !body->starts_with(complete_head_open) ||
      body->back() != '}') {
    later([cb = std::move(cb)] { cb(bad_call("complete: the id or the result body is not valid")); });
    return;
  }
  send("POST", job_path(id, "complete"), {}, 0, [cb = std::move(cb)](const error& e, http::client_response&) { cb(e); },
       std::move(body));
}

void client::fail(std::string_view id, std::string_view lease, std::string_view message,
                  std::optional<uint32_t> retry_delay_ms, done cb) {
  if (!valid_job_id(id) || !valid_lease_token(lease)) {
    later([cb = std::move(cb)] { cb(bad_call("fail: the id or lease is not valid")); });
    return;
  }
  std::string body = lease_body(lease) + ",\"error\":";
  json::append_string(body, message);
  if (retry_delay_ms) body += ",\"retry_delay_ms\":" + std::to_string(*retry_delay_ms);
  body += '}';
  send("POST", job_path(id, "fail"), std::move(body), 0,
       [cb = std::move(cb)](const error& e, http::client_response&) { cb(e); });
}

void client::submit(const submit_request& r, callback<submitted> cb) {
  if (!auth::valid_queue_name(r.queue) || r.payload.empty()) {
    later([cb = std::move(cb)] {
      submitted none;
      cb(bad_call("submit: the queue name or payload is not valid"), none);
    });
    return;
  }
  std::string opts;
  if (r.priority) opts += ",\"priority\":" + std::to_string(*r.priority);
  if (r.delay_ms) opts += ",\"delay_ms\":" + std::to_string(*r.delay_ms);
  if (r.max_attempts) opts += ",\"max_attempts\":" + std::to_string(*r.max_attempts);
  if (r.lease_ms) opts += ",\"lease_ms\":" + std::to_string(*r.lease_ms);
  std::string body;
  if (r.batch) {
    std::vector<std::string> payloads;
    std::string why;
    if (r.idempotency_key || !split_json_array(r.payload, payloads, why)) {
      later([cb = std::move(cb), why = r.idempotency_key ? "an idempotency key applies to one job" : why] {
        submitted none;
        cb(bad_call("submit: " + why), none);
      });
      return;
    }
    // Built once, at its final size: no temporaries per element.
    body.reserve(r.payload.size() + payloads.size() * (16 + opts.size()));
    body = "[";
    for (size_t i = 0; i < payloads.size(); ++i) {
      body += i ? ",{\"payload\":" : "{\"payload\":";
      body += payloads[i];
      body += opts;
      body += '}';
    }
    body += ']';
  } else {
    // One copy of the payload, into the body at its final size; the body is
    // then handed to the connection without another (a payload may be
    // 256 MiB).
    body.reserve(r.payload.size() + opts.size() + 64 + (r.idempotency_key ? r.idempotency_key->size() * 6 : 0));
    body = "{\"payload\":";
    body += r.payload;
    body += opts;
    if (r.idempotency_key) {
      body += ",\"idempotency_key\":";
      json::append_string(body, *r.idempotency_key);
    }
    body += '}';
  }
  auto shared = std::make_shared<const std::string>(std::move(body));
  send("POST", "/v1/queues/" + r.queue + "/jobs", {}, 0,
       [cb = std::move(cb)](const error& e, http::client_response& resp) {
         submitted s;
         if (e) return cb(e, s);
         std::string why;
         if (!parse_submitted(resp.body, s, why)) return cb(bad_answer("submit answer", why), s);
         s.created = resp.status == 201;
         cb(e, s);
       },
       std::move(shared));
}

void client::get_job(std::string_view id, uint32_t wait_ms, callback<job_view> cb) {
  if (!valid_job_id(id)) {
    later([cb = std::move(cb)] {
      job_view none;
      cb(bad_call("get: a job id is 16 lowercase hex digits"), none);
    });
    return;
  }
  std::string path = job_path(id);
  if (wait_ms) path += "?wait_ms=" + std::to_string(wait_ms);
  send("GET", std::move(path), {}, wait_ms ? wait_ms + _o.request_timeout_ms : 0,
       [cb = std::move(cb)](const error& e, http::client_response& resp) {
         job_view j;
         if (e) return cb(e, j);
         std::string why;
         bool padded = has_padding(resp.body);
         auto bytes = std::make_shared<const std::string>(std::move(resp.body));
         if (!parse_job_view(*bytes, j, why, padded)) return cb(bad_answer("job", why), j);
         j.body = std::move(bytes);
         cb(e, j);
       });
}

void client::cancel(std::string_view id, done cb) {
  if (!valid_job_id(id)) {
    later([cb = std::move(cb)] { cb(bad_call("cancel: a job id is 16 lowercase hex digits")); });
    return;
  }
  send("DELETE", job_path(id), {}, 0, [cb = std::move(cb)](const error& e, http::client_response&) { cb(e); });
}

void client::call(std::string_view method, std::string_view target, std::string_view body, callback<std::string> cb,
                  uint32_t timeout_ms) {
  if (!target.starts_with("/v1/") || !visible_ascii(target)) {
    later([cb = std::move(cb)] {
      std::string none;
      cb(bad_call("a request target must start with /v1/ and be visible ASCII"), none);
    });
    return;
  }
  send(method, std::string(target), std::string(body), timeout_ms,
       [cb = std::move(cb)](const error& e, http::client_response& resp) { cb(e, resp.body); });
}

bool read_api_key_file(const std::string& path, std::string& header_line, std::string& error) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    error = path + ": cannot open the API key file";
    return false;
  }
  std::ostringstream ss;
  ss << in.rdbuf();
  std::string key = ss.str();
  while (!key.empty() && (key.back() == '\n' || key.back() == '\r' || key.back() == ' ' || key.back() == '\t'))
    key.pop_back();
  size_t start = key.find_first_not_of(" \t");
  key.erase(0, start == std::string::npos ? key.size() : start);
  // Checked as relay will check it, so a bad file is reported here, by
  // name, rather than as 401s.
  std::string_view token;
  if (key.empty() || !auth::bearer_token("Bearer " + key, token)) {
    error = path + ": the API key file must hold one key on one line (RFC 6750 token characters)";
    return false;
  }
  header_line = "Authorization: Bearer " + key + "\r\n";
  return true;
}

// ---- blocking_client ----

blocking_client::blocking_client(client::options o) {
  uv_loop_init(&_loop);
  _client = std::make_unique<client>(&_loop, std::move(o));
}

blocking_client::~blocking_client() {
  _client.reset();
  uv_run(&_loop, UV_RUN_DEFAULT);  // lets the connection close its handles
  uv_loop_close(&_loop);
}

template <class T, class Start>
blocking_client::answer<T> blocking_client::run(Start start) {
  answer<T> out;
  bool finished = false;
  uv_update_time(&_loop);  // the loop sat idle since the last call: deadlines count from now
  start([&](const error& e, T& v) {
    out.err = e;
    out.value = std::move(v);
    finished = true;
  });
  while (!finished) uv_run(&_loop, UV_RUN_ONCE);
  return out;
}

blocking_client::answer<lease_answer> blocking_client::lease(const lease_request& r) {
  return run<lease_answer>([&](auto cb) { _client->lease(r, cb); });
}

blocking_client::answer<int64_t> blocking_client::heartbeat(std::string_view id, std::string_view lease,
                                                            uint32_t extend_ms) {
  return run<int64_t>([&](auto cb) { _client->heartbeat(id, lease, extend_ms, cb); });
}

error blocking_client::complete(std::string_view id, std::string_view lease, std::string_view result_json) {
  bool none = false;
  return run<bool>([&](auto cb) { _client->complete(id, lease, result_json, [cb, &none](const error& e) { cb(e, none); }); }).err;
}

error blocking_client::fail(std::string_view id, std::string_view lease, std::string_view message,
                            std::optional<uint32_t> retry_delay_ms) {
  bool none = false;
  return run<bool>([&](auto cb) {
           _client->fail(id, lease, message, retry_delay_ms, [cb, &none](const error& e) { cb(e, none); });
         }).err;
}

blocking_client::answer<submitted> blocking_client::submit(const submit_request& r) {
  return run<submitted>([&](auto cb) { _client->submit(r, cb); });
}

blocking_client::answer<job_view> blocking_client::get_job(std::string_view id, uint32_t wait_ms) {
  return run<job_view>([&](auto cb) { _client->get_job(id, wait_ms, cb); });
}

error blocking_client::cancel(std::string_view id) {
  bool none = false;
  return run<bool>([&](auto cb) { _client->cancel(id, [cb, &none](const error& e) { cb(e, none); }); }).err;
}

blocking_client::answer<std::string> blocking_client::call(std::string_view method, std::string_view target,
                                                           std::string_view body, uint32_t timeout_ms) {
  return run<std::string>([&](auto cb) { _client->call(method, target, body, cb, timeout_ms); });
}

}  // namespace relay::v1
