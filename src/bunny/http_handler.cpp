// The http handler: POSTs the payload to a local service (plain HTTP on
// loopback or a pod-local sidecar); a 2xx JSON body is the result.
#include <simdjson.h>

#include <algorithm>
#include <memory>
#include <vector>

#include "bunny/handler.h"
#include "relay/http_client.h"
#include "relay/v1_client.h"

namespace relay::bunny {
namespace {

// Idle keep-alive connections to the local service. A connection is in the
// pool only between runs: a run takes one (or a new one) for its single
// request and gives it back only when that request was answered in full on
// a connection still open. So a connection never carries two requests at
// once (no pipelining: a handler that answers out of order or dies mid-way
// harms only its own run), the pool never holds more connections than the
// most runs ever under way at once, and a connection whose request failed,
// timed out or was cancelled -- whose state is unknown -- is never reused.
//
// The pool is shared by the handler and its runs, because a run cancelled
// by bunny's stop reports (and gives its connection back) after the handler
// has been told to shut down.
class pool {
 public:
  pool(uv_loop_t* loop, const http_options& o)
      : _loop(loop),
        // 30 s keeps a connection across the gaps of a steady job stream; a
        // service that closes idle connections sooner (uvicorn 5 s, gunicorn
        // 2 s) is fine too, since the connection reads while it waits here
        // and one the service closed is dropped, not reused. Never longer
        // than the handler's timeout, which is how long bunny waits on the
        // service anyway.
        _idle_ms(std::min<uint64_t>(30000, o.timeout_ms ? o.timeout_ms : 30000)),
        _timer(new uv_timer_t) {
    _conn_options.host = o.host;
    _conn_options.port = o.port;
    _conn_options.max_response_bytes = o.max_output_bytes;
    // The service's answer lands behind room for the complete request's
    // envelope: a 2xx body is sent on to relay from where it was read.
    _conn_options.response_body_room = v1::complete_room;
    uv_timer_init(loop, _timer);
    _timer->data = this;
    // The sweep alone keeps no loop alive; shutdown() closes the
    // connections that would.
    uv_unref(reinterpret_cast<uv_handle_t*>(_timer));
  }
  pool(const pool&) = delete;
  pool& operator=(const pool&) = delete;
  ~pool() { shutdown(); }

  // The most recently returned open connection, else a new one; `reused`
  // says which. Most recent first, so that when fewer runs go on at once
  // the connections no longer needed are the ones that age out.
  http::client_conn* take(bool& reused, bool fresh = false) {
    while (!fresh && !_idle.empty()) {
      http::client_conn* c = _idle.back().conn;
      _idle.pop_back();
      if (c->connected() && c->outstanding() == 0) {
        reused = true;
        return c;
      }
      c->close();  // the service closed it while it waited
    }
    reused = false;
    return http::client_conn::create(_loop, _conn_options);
  }

  // `c` answered its request in full; keep it if it can carry another.
  void give_back(http::client_conn* c) {
    // Not connected: the answer said Connection: close, or was delimited
    // by the end of the stream, or the service has closed since.
    if (_shut || !c->connected() || c->outstanding() != 0) {
      c->close();
      return;
    }
    _idle.push_back({c, uv_now(_loop)});
    if (!uv_is_active(reinterpret_cast<uv_handle_t*>(_timer))) uv_timer_start(_timer, on_sweep, _idle_ms, 0);
  }

  void shutdown() {
    if (_shut) return;
    _shut = true;
    for (auto& i : _idle) i.conn->close();
    _idle.clear();
    uv_timer_stop(_timer);
    uv_close(reinterpret_cast<uv_handle_t*>(_timer), [](uv_handle_t* h) { delete reinterpret_cast<uv_timer_t*>(h); });
    _timer = nullptr;
  }

 private:
  struct idle_conn {
    http::client_conn* conn;
    uint64_t since;  // uv_now() when given back
  };

  static void on_sweep(uv_timer_t* t) {
    auto* p = static_cast<pool*>(t->data);
    uint64_t now = uv_now(p->_loop);
    // Oldest first: they were given back in order.
    size_t expired = 0;
    while (expired < p->_idle.size() && now - p->_idle[expired].since >= p->_idle_ms) ++expired;
    for (size_t i = 0; i < expired; ++i) p->_idle[i].conn->close();
    p->_idle.erase(p->_idle.begin(), p->_idle.begin() + static_cast<std::ptrdiff_t>(expired));
    if (!p->_idle.empty()) {
      uint64_t due = p->_idle.front().since + p->_idle_ms;
      uv_timer_start(t, on_sweep, due > now ? due - now : 0, 0);
    }
  }

  uv_loop_t* _loop;
  http::client_conn::options _conn_options;
  uint64_t _idle_ms;
  // Its own allocation: libuv frees it from the close callback, which may
  // run after the pool is gone.
  uv_timer_t* _timer;
  std::vector<idle_conn> _idle;  // oldest first
  bool _shut = false;
};

struct http_handler final : handler {
  http_handler(uv_loop_t* l, http_options o)
      : loop(l), options(std::move(o)), connections(std::make_shared<pool>(l, options)) {}
  ~http_handler() override { connections->shutdown(); }
  handler_run* start(const job_input& job, done_fn done) override;
  void shutdown() override { connections->shutdown(); }
  uv_loop_t* loop;
  http_options options;
  std::shared_ptr<pool> connections;
};

class http_run final : public handler_run {
 public:
  http_run(http_handler& h, const job_input& job, done_fn done)
      : _pool(h.connections),
        _done(std::move(done)),
        _path(h.options.path),
        _payload(job.payload),
        _keep(job.keep),
        _headers("X-Job-Id: " + job.id + "\r\nX-Job-Queue: " + job.queue + "\r\nX-Job-Attempt: " +
                 std::to_string(job.attempt) + "\r\n"),
        _timeout_ms(static_cast<uint32_t>(h.options.timeout_ms)) {
    // The outcome is handed over from a timer callback so that it never
    // arrives inside start() or cancel().
    uv_timer_init(h.loop, &_defer);
    _defer.data = this;
    send(false);
  }

  void cancel(std::string_view why) override {
    if (_answered) return;
    _outcome.cancelled = true;
    _outcome.error = why;
    // This run's own connection, taken out of the pool: no other run has
    // it. Its request is answered with kind closed, and it is not reused.
    _conn->close();
    _conn = nullptr;
  }

 private:
  // A failure (a refused header included) arrives from the loop.
  void send(bool fresh) {
    _conn = _pool->take(_reused, fresh);
    // The payload goes out from relay's answer, not a copy of it.
    _conn->request("POST", _path, _payload, _keep,
                   [this](const http::client_error& error, http::client_response& r) { answered(error, r); },
                   _timeout_ms, _headers);
  }

  void answered(const http::client_error& error, http::client_response& r) {
    if (_answered) return;
    if (error.what == http::client_error::kind::lost && _reused && !_outcome.cancelled) {
      // A kept-alive connection the service closed as this request went
      // out (its idle timeout racing ours) is not the service failing the
      // job: once more, on a new connection. Never twice.
      _conn->close();
      send(true);
      return;
    }
    _answered = true;
    if (_outcome.cancelled) {
      // keep the cancellation reason
    } else if (error) {
      _outcome.timed_out = error.what == http::client_error::kind::timeout;
      _outcome.error = "http handler: " + error.message;
    } else if (r.status < 200 || r.status > 299) {
      _outcome.error = "http handler answered " + std::to_string(r.status);
      _outcome.error_own_bytes = _outcome.error.size();
      _outcome.error += ": " + r.body.substr(v1::complete_room, 1024);
    } else {
      std::string why;
      if (check_json_result(r.body, v1::complete_room, why)) {
        _outcome.ok = true;
        _outcome.result = std::move(r.body);
      } else {
        _outcome.error = "http handler's answer is not a JSON result (" + why + ")";
      }
    }
    // Relay's answer (and the payload in it) is no longer needed here.
    _keep.reset();
    // Any complete answer, 2xx or not, leaves the connection in a known
    // state, and so does a refused request (nothing was sent); any other
    // failure leaves it closed or in doubt.
    _reusable = !error || error.what == http::client_error::kind::refused;
    uv_timer_start(&_defer, on_defer, 0, 0);
  }

  static void on_defer(uv_timer_t* t) {
    auto* r = static_cast<http_run*>(t->data);
    if (r->_conn) {
      if (r->_reusable) r->_pool->give_back(r->_conn);
      else r->_conn->close();
      r->_conn = nullptr;
    }
    uv_close(reinterpret_cast<uv_handle_t*>(&r->_defer), [](uv_handle_t* h) { delete static_cast<http_run*>(h->data); });
    done_fn done = std::move(r->_done);
    done(std::move(r->_outcome));
  }

  std::shared_ptr<pool> _pool;
  done_fn _done;
  const std::string _path;
  const std::string_view _payload;
  std::shared_ptr<const void> _keep;  // holds _payload's bytes until answered
  const std::string _headers;
  const uint32_t _timeout_ms;
  http::client_conn* _conn = nullptr;
  uv_timer_t _defer{};
  bool _reused = false;  // _conn came from the pool (a fresh one is never retried)
  bool _answered = false;
  bool _reusable = false;
  outcome _outcome;
};

handler_run* http_handler::start(const job_input& job, done_fn done) { return new http_run(*this, job, std::move(done)); }

}  // namespace

std::unique_ptr<handler> make_http_handler(uv_loop_t* loop, http_options o) {
  return std::make_unique<http_handler>(loop, std::move(o));
}

bool check_json_result(std::string& out, size_t from, std::string& why) {
  auto space = [](char c) { return c == ' ' || c == '\n' || c == '\r' || c == '\t'; };
  size_t b = from, e = out.size();
  while (b < e && space(out[b])) ++b;
  while (e > b && space(out[e - 1])) --e;
  if (b == e) {
    why = "empty";
    return false;
  }
  // In place: simdjson reads up to SIMDJSON_PADDING bytes past the end,
  // which reserve() provides without moving the bytes when the buffer
  // already has room (the readers leave some).
  out.reserve(out.size() + simdjson::SIMDJSON_PADDING);
  simdjson::dom::parser parser;
  simdjson::dom::element root;
  if (auto err = parser.parse(out.data() + b, e - b, false).get(root)) {
    why = simdjson::error_message(err);
    return false;
  }
  return true;
}

}  // namespace relay::bunny
