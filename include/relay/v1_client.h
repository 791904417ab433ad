// relay's v1 API as typed calls: one client for bunny, relayctl, the bench
// harness and the tests. Requests are built here and answers are parsed and
// validated here, so no caller writes or reads the API's JSON by hand and no
// byte relay sends reaches a header, a path, an environment variable or a
// log without passing these checks. Relay is not trusted: a compromised or
// broken relay (or the path to it) can send anything, and every answer that
// does not keep the contract of DESIGN.md is a `bad_answer`.
//
// The asynchronous `client` runs on the caller's libuv loop over one
// keep-alive connection (http::client_conn) and reconnects on demand. Every
// callback runs later, from the loop: never inside the call that made the
// request. `blocking_client` wraps it on a private loop for relayctl and the
// tests.
#pragma once

#include <uv.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "relay/http_client.h"
#include "relay/tls.h"

namespace relay::v1 {

// Why a call did not succeed.
struct error {
  enum class kind : uint8_t {
    none,
    transport,   // no answer: see `transport` (connect, tls, lost, timeout, ...)
    refused,     // relay answered with a non-2xx status: see `status`, `code`
    bad_answer,  // relay answered 2xx with something the contract does not allow
    bad_call,    // the caller's arguments are not valid (an id that is not 16 hex digits)
  };
  kind what = kind::none;
  http::client_error::kind transport = http::client_error::kind::none;
  int status = 0;        // when refused
  std::string code;      // relay's error code ("lease_lost", "not_found"), when refused
  std::string message;   // for people and logs; never carries payload or result bytes
  std::string retry_after;  // relay's Retry-After, when refused with 429/503
  explicit operator bool() const { return what != kind::none; }
  // "transport", "refused", ...: for logs and metric labels.
  std::string_view kind_name() const;
};

// ---- What relay's answers hold, validated ----

// Ids are 16 lowercase hex digits, lease tokens 32 (DESIGN.md).
bool valid_job_id(std::string_view s);
bool valid_lease_token(std::string_view s);

// Bounds on what a lease answer may say; beyond them the job is rejected.
inline constexpr uint32_t max_attempt = 1000;          // relay's max_attempts ceiling
inline constexpr int64_t max_expiry_ms = int64_t{1} << 53;

struct leased_job {
  std::string id;       // valid_job_id
  std::string lease;    // valid_lease_token
  uint32_t attempt = 0; // 1 ..= max_attempt
  int64_t lease_expires_ms = 0;  // relay's wall clock, 1 ..= max_expiry_ms
  // One complete, valid JSON value (exact bytes): a view into the answer,
  // not a copy, since a payload may be hundreds of MiB. It lives as long as
  // the answer's bytes (lease_answer::body, or the caller's buffer for the
  // string_view parse).
  std::string_view payload;
};

// A job entry of a lease answer that was refused, and why. `id` is set only
// when the entry's id itself was valid (so the refusal can be logged by id);
// nothing else of the entry is kept.
struct rejected_job {
  size_t index = 0;
  std::string id;
  std::string reason;
};

struct lease_answer {
  std::vector<leased_job> jobs;
  std::vector<rejected_job> rejected;
  size_t bytes = 0;  // the answer's size, for logs
  // The answer as received, which the jobs' payloads view. Shared so that
  // each job can keep its payload alive after the rest is dropped; set by
  // client::lease (null after the string_view parse: the caller owns it).
  std::shared_ptr<const std::string> body;
};

// Parses a 200 answer to POST /v1/queues/{q}/lease. Returns false (with
// `why`) when the answer as a whole is not `{"jobs":[...]}` with valid JSON
// throughout; otherwise each entry is either a job (all fields present,
// valid, no key repeated) or a rejected_job. An id that appears twice in one
// answer is kept the first time and rejected after. Pure: the fuzzer's
// entry point too.
//
// Cost: the answer is validated once (simdjson's DOM parser: every
// string's UTF-8 and escapes, every number, the structure, depth up to
// 1024 inside a payload), in place when `body` has SIMDJSON_PADDING
// readable bytes past its end (`padded`), else from one padded copy. The
// payloads' exact bytes are then found by a plain scan of the validated
// text; nothing is copied.
bool parse_lease_answer(std::string_view body, lease_answer& out, std::string& why, bool padded = false);

// The answer to a heartbeat: the lease's new expiry.
bool parse_heartbeat_answer(std::string_view body, int64_t& expires_ms, std::string& why);

// One job, as GET /v1/jobs/{id} shows it. The raw JSON fields are views
// into the answer (a result may be hundreds of MiB): valid while `body`
// (set by client::get_job) or the caller's buffer lives.
struct job_view {
  std::string id;
  std::string queue;
  std::string state;  // queued, delayed, leased, succeeded, failed, dead, cancelled
  uint32_t attempts = 0;
  std::string_view payload;  // raw JSON
  std::string_view result;   // raw JSON; "null" when none
  std::string_view error;    // raw JSON; "null" when none
  int64_t created_ms = 0;
  int64_t updated_ms = 0;
  std::string_view raw;      // the whole answer, exactly as sent
  std::shared_ptr<const std::string> body;
  bool terminal() const { return state == "succeeded" || state == "dead" || state == "cancelled"; }
};
bool parse_job_view(std::string_view body, job_view& out, std::string& why, bool padded = false);

// The answer to a submit: one id, or a batch's ids.
struct submitted {
  std::vector<std::string> ids;
  bool created = true;  // false: an idempotency key matched an earlier job (200)
  std::string raw;
};
bool parse_submitted(std::string_view body, submitted& out, std::string& why);

// Relay's error body {"error":{"code","message"}}, as far as it can be read;
// the code is kept only if it is snake_case, the message only printable
// ASCII and at most 300 bytes.
void parse_error_body(std::string_view body, std::string& code, std::string& message);

// ---- Requests ----

// The "Authorization: Bearer <key>\r\n" line for the key in `path` (one key
// on one line, surrounding whitespace dropped). The key never appears in
// `error`.
bool read_api_key_file(const std::string& path, std::string& header_line, std::string& error);

// A job's result laid out as the body of its complete request, so that a
// large result reaches the wire without being copied: the producer of the
// result (bunny's handler) reserves `complete_room` bytes at the front of
// its buffer and reads the result JSON in behind them; fill_complete_body
// then writes {"lease":"<token>","result": into the room and appends the
// closing brace. Whitespace between the room and the JSON is allowed (JSON
// allows it there, and relay keeps only the value's own bytes).
inline constexpr std::string_view complete_head_open = "{\"lease\":\"";
inline constexpr std::string_view complete_head_close = "\",\"result\":";
inline constexpr size_t complete_room = complete_head_open.size() + 32 + complete_head_close.size();
// False (nothing changed) when the lease is not a lease token or `body` is
// not longer than the room.
bool fill_complete_body(std::string& body, std::string_view lease);

struct lease_request {
  std::string queue;
  uint32_t max = 1;
  uint32_t wait_ms = 0;
  uint32_t lease_ms = 30000;
  // The most answer bytes the caller will take: relay adds jobs while the
  // answer stays within it (always at least one). 0: not sent.
  uint64_t max_bytes = 0;
};

// One job, or with `batch` one job per element of `payload` (a JSON array
// of payloads), all with the same options.
struct submit_request {
  std::string queue;
  std::string payload;  // raw JSON
  bool batch = false;
  std::optional<uint32_t> priority, delay_ms, max_attempts, lease_ms;
  std::optional<std::string> idempotency_key;
};

class client {
 public:
  struct options {
    http::client_conn::options connection;
    // Whole header lines ending in CRLF sent with every request (the
    // Authorization header); never logged.
    std::string extra_headers;
    uint32_t request_timeout_ms = 30000;
  };

  client(uv_loop_t* loop, options o);
  client(const client&) = delete;
  client& operator=(const client&) = delete;
  // Closes the connection. Callbacks of requests still outstanding never
  // run: their owner is going away with the client.
  ~client();

  template <class T>
  using callback = std::function<void(const error&, T&)>;
  using done = std::function<void(const error&)>;

  // A long poll's timeout is its wait plus request_timeout_ms.
  void lease(const lease_request& r, callback<lease_answer> cb);
  void heartbeat(std::string_view id, std::string_view lease, uint32_t extend_ms, callback<int64_t> cb);
  void complete(std::string_view id, std::string_view lease, std::string_view result_json, done cb);
  // With a body fill_complete_body() made: sent from `body` itself, which
  // the caller may keep to send again (a retry) without copying.
  void complete_body(std::string_view id, std::shared_ptr<const std::string> body, done cb);
  void fail(std::string_view id, std::string_view lease, std::string_view message,
            std::optional<uint32_t> retry_delay_ms, done cb);
  void submit(const submit_request& r, callback<submitted> cb);
  // wait_ms > 0: long-polls until the job is terminal or the wait ends.
  void get_job(std::string_view id, uint32_t wait_ms, callback<job_view> cb);
  void cancel(std::string_view id, done cb);
  // Anything else (queue statistics, dead jobs, requeue): the 2xx answer's
  // body as sent; non-2xx is a `refused` error. `target` must start with
  // "/v1/" and be visible ASCII.
  void call(std::string_view method, std::string_view target, std::string_view body, callback<std::string> cb,
            uint32_t timeout_ms = 0);

  // Where requests go from now on (a failover to another relay address, a
  // reloaded certificate, a rotated API key): the open connection is
  // replaced once nothing is in flight on it.
  void set_connection(const http::client_conn::options& o);
  void set_extra_headers(std::string lines) { _o.extra_headers = std::move(lines); }
  // Drops the connection now (after a transport error, to reconnect);
  // outstanding requests fail with a `closed` transport error, from the
  // loop, after reset() has returned.
  void reset();
  size_t outstanding() const { return _conn ? _conn->outstanding() : 0; }

 private:
  using raw_callback = std::function<void(const error&, http::client_response&)>;
  void send(std::string_view method, std::string target, std::string body, uint32_t timeout_ms, raw_callback cb,
            std::shared_ptr<const std::string> shared_body = nullptr);
  http::client_conn* connection();
  void later(std::function<void()> fn);

  uv_loop_t* _loop;
  options _o;
  http::client_conn* _conn = nullptr;
  bool _replace = false;  // set_connection() asked for a new connection
  std::shared_ptr<bool> _alive;
};

// The same calls, synchronous, on a private loop: for relayctl and tests.
class blocking_client {
 public:
  explicit blocking_client(client::options o);
  blocking_client(const blocking_client&) = delete;
  blocking_client& operator=(const blocking_client&) = delete;
  ~blocking_client();

  template <class T>
  struct answer {
    error err;
    T value{};
  };
  answer<lease_answer> lease(const lease_request& r);
  answer<int64_t> heartbeat(std::string_view id, std::string_view lease, uint32_t extend_ms);
  error complete(std::string_view id, std::string_view lease, std::string_view result_json);
  error fail(std::string_view id, std::string_view lease, std::string_view message,
             std::optional<uint32_t> retry_delay_ms = {});
  answer<submitted> submit(const submit_request& r);
  answer<job_view> get_job(std::string_view id, uint32_t wait_ms = 0);
  error cancel(std::string_view id);
  answer<std::string> call(std::string_view method, std::string_view target, std::string_view body = {},
                           uint32_t timeout_ms = 0);

 private:
  template <class T, class Start>
  answer<T> run(Start start);

  uv_loop_t _loop{};
  std::unique_ptr<client> _client;
};

}  // namespace relay::v1
