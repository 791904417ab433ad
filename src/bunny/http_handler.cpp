// The http handler: POSTs the payload to a local service (plain HTTP on
// loopback or a pod-local sidecar); a 2xx JSON body is the result.
#include <simdjson.h>

#include "bunny/handler.h"
#include "relay/http_client.h"

namespace relay::bunny {
namespace {

struct http_handler final : handler {
  http_handler(uv_loop_t* l, http_options o) : loop(l), options(std::move(o)) {}
  handler_run* start(const job_input& job, done_fn done) override;
  uv_loop_t* loop;
  http_options options;
};

class http_run final : public handler_run {
 public:
  http_run(http_handler& h, const job_input& job, done_fn done) : _done(std::move(done)) {
    // The outcome is handed over from a timer callback so that it never
    // arrives inside start() or cancel().
    uv_timer_init(h.loop, &_defer);
    _defer.data = this;
    http::client_conn::options o;
    o.host = h.options.host;
    o.port = h.options.port;
    o.max_response_bytes = h.options.max_output_bytes;
    _conn = http::client_conn::create(h.loop, o);
    std::string headers = "X-Job-Id: " + job.id + "\r\nX-Job-Queue: " + job.queue +
                          "\r\nX-Job-Attempt: " + std::to_string(job.attempt) + "\r\n";
    _conn->request("POST", h.options.path, job.payload,
                   [this](const http::client_error& error, http::client_response& r) { answered(error, r); },
                   static_cast<uint32_t>(h.options.timeout_ms), headers);
  }

  void cancel(std::string_view why) override {
    if (_answered) return;
    _outcome.cancelled = true;
    _outcome.error = why;
    _conn->close();  // answers the request with kind closed
  }

 private:
  void answered(const http::client_error& error, http::client_response& r) {
    if (_answered) return;
    _answered = true;
    if (_outcome.cancelled) {
      // keep the cancellation reason
    } else if (error) {
      _outcome.timed_out = error.what == http::client_error::kind::timeout;
      _outcome.error = "http handler: " + error.message;
    } else if (r.status < 200 || r.status > 299) {
      _outcome.error = "http handler answered " + std::to_string(r.status);
      _outcome.error_own_bytes = _outcome.error.size();
      _outcome.error += ": " + r.body.substr(0, 1024);
    } else {
      std::string why;
      if (as_json_result(r.body, _outcome.result, why)) _outcome.ok = true;
      else _outcome.error = "http handler's answer is not a JSON result (" + why + ")";
    }
    uv_timer_start(&_defer, on_defer, 0, 0);
  }

  static void on_defer(uv_timer_t* t) {
    auto* r = static_cast<http_run*>(t->data);
    r->_conn->close();
    uv_close(reinterpret_cast<uv_handle_t*>(&r->_defer), [](uv_handle_t* h) { delete static_cast<http_run*>(h->data); });
    done_fn done = std::move(r->_done);
    done(std::move(r->_outcome));
  }

  done_fn _done;
  http::client_conn* _conn;
  uv_timer_t _defer{};
  bool _answered = false;
  outcome _outcome;
};

handler_run* http_handler::start(const job_input& job, done_fn done) { return new http_run(*this, job, std::move(done)); }

}  // namespace

std::unique_ptr<handler> make_http_handler(uv_loop_t* loop, http_options o) {
  return std::make_unique<http_handler>(loop, std::move(o));
}

bool as_json_result(std::string_view text, std::string& json, std::string& why) {
  size_t b = 0, e = text.size();
  auto space = [](char c) { return c == ' ' || c == '\n' || c == '\r' || c == '\t'; };
  while (b < e && space(text[b])) ++b;
  while (e > b && space(text[e - 1])) --e;
  if (b == e) {
    why = "empty";
    return false;
  }
  simdjson::padded_string padded(text.substr(b, e - b));
  simdjson::dom::parser parser;
  simdjson::dom::element root;
  if (auto err = parser.parse(padded).get(root)) {
    why = simdjson::error_message(err);
    return false;
  }
  json.assign(text.substr(b, e - b));
  return true;
}

}  // namespace relay::bunny
