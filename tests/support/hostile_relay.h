// A relay of the tests' own, for driving the real bunny against a relay
// that misbehaves: it speaks mTLS on loopback (the project's tls::session
// over blocking sockets, as the canned relay of issue 10's test did),
// records every request it is sent (method, target, headers, body), and
// answers each according to a script the test sets per kind of request
// (lease, heartbeat, complete, fail): a proper answer, raw bytes, a stall,
// a reset in the middle of the answer, a close, an answer to a request
// never sent, a 1xx first, an oversize body.
//
// One thread accepts; each connection gets a thread of its own, so a stall
// on bunny's long-poll connection never holds up its heartbeats and results
// on the other. Everything stops (and every thread is joined) when the
// object goes; no thread outlives it.
//
// Without TLS (`hostile_relay::plain`) the same object is a local HTTP
// service that records what bunny's http handler sends it.
#pragma once

#include <doctest/doctest.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <atomic>
#include <cctype>
#include <cerrno>
#include <cstdio>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <list>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "relay/tls.h"
#include "bunny_fixture.h"
#include "relay_fixture.h"
#include "tmpdir.h"

namespace test {

enum class request_kind { lease, heartbeat, complete, fail, other };

inline const char* to_string(request_kind k) {
  switch (k) {
    case request_kind::lease: return "lease";
    case request_kind::heartbeat: return "heartbeat";
    case request_kind::complete: return "complete";
    case request_kind::fail: return "fail";
    case request_kind::other: return "other";
  }
  return "?";
}

inline int64_t wall_now_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// One request as the relay read it.
struct recorded_request {
  request_kind kind = request_kind::other;
  std::string method, target;
  std::string headers;  // the raw header block, lines ending in CRLF
  std::string body;
  int connection = 0;   // which accepted connection (1, 2, ...)
  std::chrono::steady_clock::time_point at;

  // The {id} of /v1/jobs/{id}/..., or empty.
  std::string job_id() const {
    const std::string prefix = "/v1/jobs/";
    if (target.rfind(prefix, 0) != 0) return {};
    auto end = target.find('/', prefix.size());
    return target.substr(prefix.size(), end == std::string::npos ? std::string::npos : end - prefix.size());
  }
  // The "lease" of a heartbeat, complete or fail body, or empty.
  std::string lease() const { return field(body, "lease"); }
};

// What to do with one request.
struct action {
  enum class what {
    answer,         // send `bytes` (after `delay_ms`)
    stall_forever,  // read on, never answer (until the peer or the relay goes)
    reset,          // send the first `reset_after` bytes of `bytes`, then RST
    close,          // close the connection without answering
    oversize,       // a 200 whose body is `oversize_bytes` long, streamed
  };
  what kind = what::answer;
  std::string bytes;  // the whole answer, as sent
  int delay_ms = 0;
  size_t reset_after = 0;
  size_t oversize_bytes = 0;
  bool chunked = false;

  // A complete HTTP/1.1 answer.
  static action answer(int status, const std::string& body, const std::string& extra_headers = {}) {
    return raw(response(status, body, extra_headers));
  }
  // Exactly these bytes (malformed HTTP, several answers...).
  static action raw(std::string bytes) {
    action a;
    a.bytes = std::move(bytes);
    return a;
  }
  // `then`, after `ms` with the connection open and silent.
  static action stall(int ms, action then) {
    then.delay_ms = ms;
    return then;
  }
  static action stall_forever() {
    action a;
    a.kind = what::stall_forever;
    return a;
  }
  // The first `after` bytes of `a`'s answer, then a TCP reset.
  static action reset_mid(action a, size_t after) {
    a.kind = what::reset;
    a.reset_after = after;
    return a;
  }
  static action close_now() {
    action a;
    a.kind = what::close;
    return a;
  }
  // `a`, followed at once by `unasked`: an answer to a request never sent.
  static action twice(action a, const action& unasked) {
    a.bytes += unasked.bytes;
    return a;
  }
  // An interim 1xx answer, then `a`.
  static action informational_first(action a, const std::string& interim = "HTTP/1.1 100 Continue\r\n\r\n") {
    a.bytes = interim + a.bytes;
    return a;
  }
  // A 200 lease answer of `n` bytes (a syntactically fine start, then one
  // long payload string), streamed until sent or the peer gives up.
  // `chunked`: no Content-Length, so the size shows only as it arrives.
  static action oversize(size_t n, bool chunked = false) {
    action a;
    a.kind = what::oversize;
    a.oversize_bytes = n;
    a.chunked = chunked;
    return a;
  }

  static std::string response(int status, const std::string& body, const std::string& extra_headers = {}) {
    return "HTTP/1.1 " + std::to_string(status) + " X\r\nContent-Type: application/json\r\nContent-Length: " +
           std::to_string(body.size()) + "\r\n" + extra_headers + "\r\n" + body;
  }
};

// ---- Lease answers ----

// A JSON string literal for any bytes: control bytes (CR, LF, NUL...) as
// \u escapes, so that the answer is valid JSON and bunny's parser hands the
// raw bytes on.
inline std::string json_quote(std::string_view s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", c);
      out += buf;
    } else {
      out += static_cast<char>(c);
    }
  }
  return out + "\"";
}

inline std::string random_hex(size_t digits) {
  std::string out;
  while (out.size() < digits) {
    uint8_t b[16];
    relay::tls::random_bytes(b, sizeof b);
    out += relay::tls::to_hex(b, sizeof b);
  }
  out.resize(digits);
  return out;
}
inline std::string random_job_id() { return random_hex(16); }
inline std::string random_lease() { return random_hex(32); }

// One element of a lease answer's "jobs". Every field is JSON text, so a
// test can put anything there (a number where a string belongs...); a
// field set to std::nullopt is left out.
struct fake_job {
  std::string id = random_job_id();
  std::string lease = random_lease();
  std::optional<std::string> id_json, lease_json;  // override the quoted id / lease
  std::optional<std::string> attempt = "1";
  std::optional<std::string> expires_ms = std::to_string(wall_now_ms() + 30000);
  std::optional<std::string> payload = "0";

  std::string json() const {
    std::string out = "{";
    auto add = [&out](const char* key, const std::optional<std::string>& v) {
      if (!v) return;
      if (out.size() > 1) out += ',';
      out += '"';
      out += key;
      out += "\":" + *v;
    };
    add("id", id_json ? id_json : std::optional<std::string>(json_quote(id)));
    add("attempt", attempt);
    add("lease", lease_json ? lease_json : std::optional<std::string>(json_quote(lease)));
    add("lease_expires_ms", expires_ms);
    add("payload", payload);
    return out + "}";
  }
};

inline std::string lease_answer(const std::vector<fake_job>& jobs) {
  std::string out = "{\"jobs\":[";
  for (size_t i = 0; i < jobs.size(); ++i) out += (i ? "," : "") + jobs[i].json();
  return out + "]}";
}
inline action lease_action(const std::vector<fake_job>& jobs) { return action::answer(200, lease_answer(jobs)); }

// ---- The relay ----

class hostile_relay {
 public:
  using script = std::function<action(const recorded_request&, size_t nth)>;
  struct plain_tag {};
  static constexpr plain_tag plain{};

  // mTLS with the PKI's server certificate, verifying clients against its CA.
  hostile_relay() : _ctx(server_tls()) { listen_and_serve(); }
  // Plain HTTP: a local service for the http handler. Answers every request
  // 200 {"ok":true} unless scripted (request_kind::other).
  explicit hostile_relay(plain_tag) {
    _scripts[static_cast<size_t>(request_kind::other)] = [](const recorded_request&, size_t) {
      return action::answer(200, R"({"ok":true})");
    };
    listen_and_serve();
  }
  hostile_relay(const hostile_relay&) = delete;
  hostile_relay& operator=(const hostile_relay&) = delete;
  ~hostile_relay() {
    _stop = true;
    _cv.notify_all();
    ::shutdown(_fd, SHUT_RDWR);
    _acceptor.join();
    {
      std::lock_guard<std::mutex> g(_mu);
      for (int fd : _conn_fds) ::shutdown(fd, SHUT_RDWR);
    }
    for (auto& t : _conn_threads) t.join();
    ::close(_fd);
  }

  uint16_t port = 0;

  // How requests of `k` are answered from now on (null: the default).
  // Called on connection threads: captures must be safe to share.
  void set_script(request_kind k, script s) {
    std::lock_guard<std::mutex> g(_mu);
    _scripts[static_cast<size_t>(k)] = std::move(s);
  }
  // With no lease script, lease requests take these answers in order; when
  // there is none, a lease request waits up to idle_lease_ms for one, then
  // is answered {"jobs":[]} (a long poll that ran out).
  void push_lease(action a) {
    {
      std::lock_guard<std::mutex> g(_mu);
      _lease_queue.push_back(std::move(a));
    }
    _cv.notify_all();
  }
  void push_lease(const std::vector<fake_job>& jobs) { push_lease(lease_action(jobs)); }
  size_t leases_queued() const {
    std::lock_guard<std::mutex> g(_mu);
    return _lease_queue.size();
  }
  int idle_lease_ms = 200;

  std::vector<recorded_request> requests() const {
    std::lock_guard<std::mutex> g(_mu);
    return _requests;
  }
  std::vector<recorded_request> requests(request_kind k) const {
    std::vector<recorded_request> out;
    for (auto& r : requests())
      if (r.kind == k) out.push_back(r);
    return out;
  }
  size_t count(request_kind k) const { return requests(k).size(); }
  size_t connections() const { return static_cast<size_t>(_accepted.load()); }
  // Every byte of plaintext received, on every connection.
  std::string received() const {
    std::lock_guard<std::mutex> g(_mu);
    return _received;
  }

  // Polls `done` every 10 ms until it holds or timeout_ms passes.
  template <class Pred>
  static bool wait_until(Pred done, int timeout_ms) {
    auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
    while (!done()) {
      if (std::chrono::steady_clock::now() >= until) return false;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return true;
  }
  // Waits until `n` requests of kind `k` have arrived in all.
  bool wait_for(request_kind k, size_t n, int timeout_ms) const {
    return wait_until([&] { return count(k) >= n; }, timeout_ms);
  }

 private:
  void listen_and_serve() {
    _fd = loopback_listener(16, port);
    _acceptor = std::thread([this] { accept_loop(); });
  }

  void accept_loop() {
    while (!_stop) {
      pollfd p{_fd, POLLIN, 0};
      if (poll(&p, 1, 50) <= 0) continue;
      int c = accept(_fd, nullptr, nullptr);
      if (c < 0) continue;
      // Sends never block for long: a peer that stops reading (or a relay
      // that is going away) is noticed within a second.
      timeval tv{1, 0};
      setsockopt(c, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
      int ordinal = ++_accepted;
      std::lock_guard<std::mutex> g(_mu);
      _conn_fds.push_back(c);
      _conn_threads.emplace_back([this, c, ordinal] { serve(c, ordinal); });
    }
  }

  // One connection: TLS (or not), requests parsed as they complete, each
  // answered per its script before the next is read.
  struct conn {
    int fd;
    std::unique_ptr<relay::tls::session> tls;
    std::string plain;  // received, not yet parsed
    bool closed = false;
  };

  void serve(int fd, int ordinal) {
    conn c{fd, _ctx ? std::make_unique<relay::tls::session>(_ctx) : nullptr, {}, false};
    while (!_stop && !c.closed) {
      if (!pump(c, 50)) continue;
      while (!c.closed) {
        auto req = take_request(c.plain);
        if (!req) break;
        req->connection = ordinal;
        req->at = std::chrono::steady_clock::now();
        size_t nth = 0;
        script s;
        {
          std::lock_guard<std::mutex> g(_mu);
          for (auto& r : _requests)
            if (r.kind == req->kind) ++nth;
          _requests.push_back(*req);
          s = _scripts[static_cast<size_t>(req->kind)];
        }
        action a = s ? s(*req, nth) : default_action(*req);
        perform(c, a);
      }
    }
    // Out of the list before the number can be reused by another accept.
    std::lock_guard<std::mutex> g(_mu);
    std::erase(_conn_fds, fd);
    ::close(fd);
  }

  // One read (up to timeout_ms); false when nothing arrived. Plaintext goes
  // to c.plain and to the record of everything received.
  bool pump(conn& c, int timeout_ms) {
    pollfd p{c.fd, POLLIN, 0};
    if (poll(&p, 1, timeout_ms) <= 0) return false;
    char buf[65536];
    ssize_t n = ::recv(c.fd, buf, sizeof buf, 0);
    if (n <= 0) {
      c.closed = true;
      return false;
    }
    std::string got;
    if (c.tls) {
      c.tls->feed(buf, static_cast<size_t>(n));
      if (c.tls->read(got) != relay::tls::session::status::ok) c.closed = true;
      flush(c);
    } else {
      got.assign(buf, static_cast<size_t>(n));
    }
    c.plain += got;
    std::lock_guard<std::mutex> g(_mu);
    _received += got;
    return true;
  }

  // Sends what the TLS session has for the peer (or nothing for plain).
  bool flush(conn& c) {
    if (!c.tls) return true;
    std::string out;
    c.tls->take_output(out);
    return send_all(c, out);
  }
  bool send_all(conn& c, std::string_view bytes) {
    size_t off = 0;
    while (off < bytes.size()) {
      ssize_t n = ::send(c.fd, bytes.data() + off, bytes.size() - off, MSG_NOSIGNAL);
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) && !_stop) continue;
      if (n <= 0) {
        c.closed = true;
        return false;
      }
      off += static_cast<size_t>(n);
    }
    return true;
  }
  bool send_plain(conn& c, std::string_view bytes) {
    if (!c.tls) return send_all(c, bytes);
    c.tls->write(bytes);
    return flush(c);
  }

  // Waits ms (forever if negative) reading on, so that a peer that gives up
  // is seen; false if the connection or the relay went meanwhile.
  bool stall(conn& c, int ms) {
    auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(ms < 0 ? 0 : ms);
    while (!_stop && !c.closed) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(until - std::chrono::steady_clock::now()).count();
      if (ms >= 0 && left <= 0) return true;
      pump(c, ms < 0 ? 50 : static_cast<int>(std::min<int64_t>(left, 50)));
    }
    return false;
  }

  void perform(conn& c, const action& a) {
    if (a.delay_ms > 0 && !stall(c, a.delay_ms)) return;
    switch (a.kind) {
      case action::what::answer:
        send_plain(c, a.bytes);
        return;
      case action::what::stall_forever:
        stall(c, -1);
        c.closed = true;
        return;
      case action::what::reset: {
        send_plain(c, std::string_view(a.bytes).substr(0, a.reset_after));
        linger l{1, 0};
        setsockopt(c.fd, SOL_SOCKET, SO_LINGER, &l, sizeof l);
        c.closed = true;  // serve() closes the socket: with linger 0, an RST
        return;
      }
      case action::what::close:
        c.closed = true;
        return;
      case action::what::oversize: {
        std::string head = "{\"jobs\":[{\"id\":\"" + random_job_id() + "\",\"attempt\":1,\"lease\":\"" +
                           random_lease() + "\",\"lease_expires_ms\":" + std::to_string(wall_now_ms() + 30000) +
                           ",\"payload\":\"";
        const std::string tail = "\"}]}";
        size_t fill = a.oversize_bytes > head.size() + tail.size() ? a.oversize_bytes - head.size() - tail.size() : 0;
        // In chunked framing every piece is a chunk of its own.
        auto piece = [&a](std::string_view p) {
          if (!a.chunked) return std::string(p);
          char size[32];
          std::snprintf(size, sizeof size, "%zx\r\n", p.size());
          return size + std::string(p) + "\r\n";
        };
        std::string framing = a.chunked ? "Transfer-Encoding: chunked\r\n"
                                        : "Content-Length: " + std::to_string(head.size() + fill + tail.size()) + "\r\n";
        if (!send_plain(c, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + framing + "\r\n" + piece(head)))
          return;
        const std::string chunk = piece(std::string(1 << 16, 'x'));
        while (fill > 0 && !_stop && !c.closed) {
          size_t n = std::min<size_t>(fill, 1 << 16);
          if (!send_plain(c, n == (1 << 16) ? chunk : piece(std::string(n, 'x')))) return;
          fill -= n;
        }
        send_plain(c, piece(tail) + (a.chunked ? "0\r\n\r\n" : ""));
        return;
      }
    }
  }

  action default_action(const recorded_request& r) {
    switch (r.kind) {
      case request_kind::lease: {
        std::unique_lock<std::mutex> g(_mu);
        _cv.wait_for(g, std::chrono::milliseconds(idle_lease_ms), [this] { return _stop || !_lease_queue.empty(); });
        if (_lease_queue.empty()) return action::answer(200, R"({"jobs":[]})");
        action a = std::move(_lease_queue.front());
        _lease_queue.pop_front();
        return a;
      }
      case request_kind::heartbeat:
        return action::answer(200, "{\"lease_expires_ms\":" + std::to_string(wall_now_ms() + 30000) + "}");
      case request_kind::complete:
      case request_kind::fail:
        return action::answer(200, "{}");
      case request_kind::other:
        break;
    }
    return action::answer(404, R"({"error":{"code":"not_found","message":"no such route"}})");
  }

  // The first complete request in `buf` (head and Content-Length body),
  // removed from it; nullopt until one is complete.
  static std::optional<recorded_request> take_request(std::string& buf) {
    auto end = buf.find("\r\n\r\n");
    if (end == std::string::npos) return std::nullopt;
    recorded_request r;
    auto line_end = buf.find("\r\n");
    std::string line = buf.substr(0, line_end);
    auto sp1 = line.find(' ');
    auto sp2 = line.rfind(' ');
    r.method = line.substr(0, sp1);
    r.target = sp1 == std::string::npos || sp2 <= sp1 ? std::string() : line.substr(sp1 + 1, sp2 - sp1 - 1);
    r.headers = buf.substr(line_end + 2, end + 2 - (line_end + 2));
    size_t length = 0;
    for (size_t p = 0; p < r.headers.size();) {
      auto e = r.headers.find("\r\n", p);
      std::string h = r.headers.substr(p, e - p);
      p = e + 2;
      std::string lower;
      for (char ch : h) lower += static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
      if (lower.rfind("content-length:", 0) == 0) length = std::strtoul(h.c_str() + 15, nullptr, 10);
    }
    if (buf.size() < end + 4 + length) return std::nullopt;
    r.body = buf.substr(end + 4, length);
    buf.erase(0, end + 4 + length);
    auto ends_with = [&](const std::string& s) {
      return r.target.size() >= s.size() && r.target.compare(r.target.size() - s.size(), s.size(), s) == 0;
    };
    if (r.method == "POST" && r.target.rfind("/v1/queues/", 0) == 0 && ends_with("/lease")) r.kind = request_kind::lease;
    else if (r.method == "POST" && r.target.rfind("/v1/jobs/", 0) == 0 && ends_with("/heartbeat"))
      r.kind = request_kind::heartbeat;
    else if (r.method == "POST" && r.target.rfind("/v1/jobs/", 0) == 0 && ends_with("/complete"))
      r.kind = request_kind::complete;
    else if (r.method == "POST" && r.target.rfind("/v1/jobs/", 0) == 0 && ends_with("/fail")) r.kind = request_kind::fail;
    return r;
  }

  std::shared_ptr<const relay::tls::context> _ctx;  // null: plain HTTP
  int _fd = -1;
  std::atomic<bool> _stop{false};
  std::atomic<int> _accepted{0};
  mutable std::mutex _mu;
  std::condition_variable _cv;
  std::vector<recorded_request> _requests;
  std::string _received;
  script _scripts[5];
  std::deque<action> _lease_queue;
  std::vector<int> _conn_fds;
  std::list<std::thread> _conn_threads;
  std::thread _acceptor;
};

// ---- bunny against the hostile relay ----

inline std::string log_tail(const std::string& log, size_t n = 4000) {
  return log.size() > n ? log.substr(log.size() - n) : log;
}

inline bool sanitizer_report(const std::string& log) {
  return log.find("AddressSanitizer") != std::string::npos || log.find("LeakSanitizer") != std::string::npos ||
         log.find("runtime error:") != std::string::npos;
}

// Short timeouts so that every case stays well under a few seconds; a
// drain shorter than the fixture's so that a bunny that cannot drain is
// told apart from one that exits.
inline std::vector<std::string> quick_bunny_args(std::vector<std::string> more = {}) {
  std::vector<std::string> args{"--set", "poll.wait_ms=1000",          "--set", "poll.backoff_max_ms=100",
                                "--set", "poll.request_timeout_ms=3000", "--set", "drain_timeout_ms=3000",
                                "--set", "handler.kill_grace_ms=500"};
  args.insert(args.end(), more.begin(), more.end());
  return args;
}

// A hostile relay and the real bunny leasing from it with `handler`.
struct hostile_rig {
  hostile_rig(std::string handler, std::vector<std::string> more_args = {}, int concurrency = 2) {
    start(std::move(handler), std::move(more_args), concurrency);
  }
  // `make_handler` is given runs_file, a scratch file for the handler to
  // write to.
  hostile_rig(const std::function<std::string(const std::string&)>& make_handler, std::vector<std::string> more_args,
              int concurrency) {
    start(make_handler(runs_file), std::move(more_args), concurrency);
  }
  // Waits until every lease answer pushed so far has been taken and bunny
  // has asked again (so it has read them all).
  bool wait_answers_taken(int timeout_ms = 10000) const {
    size_t before = 0;
    bool taken = hostile_relay::wait_until(
        [&] {
          before = relay.count(request_kind::lease);
          return relay.leases_queued() == 0;
        },
        timeout_ms);
    return taken && relay.wait_for(request_kind::lease, before + 1, timeout_ms);
  }

  tmpdir scratch;
  std::string runs_file = scratch / "runs.log";
  hostile_relay relay;
  std::unique_ptr<bunny_process> bunny;

 private:
  void start(std::string handler, std::vector<std::string> more_args, int concurrency) {
    bunny_options o;
    o.concurrency = concurrency;
    o.handler = std::move(handler);
    o.extra_args = quick_bunny_args(std::move(more_args));
    bunny = std::make_unique<bunny_process>(relay.port, o);
    REQUIRE_MESSAGE(relay.wait_for(request_kind::lease, 1, 10000), "bunny never polled: " << bunny->proc->log());
  }
};

}  // namespace test
