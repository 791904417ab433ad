// Tools for tests that attack the real relay binary the way a hostile or
// broken peer would (tests/integration/hostile_test.cpp and the issue 9
// regression tests): relay's memory from /proc, raw TCP sockets bound to a
// chosen loopback source address (so that per-address limits can be
// exercised from 127.0.0.2, 127.0.0.3, ...), a raw TLS client over a
// non-blocking socket built on the project's own tls::session, a parser
// that splits the bytes relay sent into responses, and a well-behaved
// client that runs in its own thread and records its latencies.
//
// Nothing here uses doctest assertions from a background thread: threads
// record what happened and the test checks it afterwards.
#pragma once

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <fstream>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "relay/tls.h"

namespace test::hostile {

using clock = std::chrono::steady_clock;

inline int ms_left(clock::time_point until) {
  auto left = std::chrono::duration_cast<std::chrono::milliseconds>(until - clock::now()).count();
  return left <= 0 ? 0 : static_cast<int>(left);
}

inline double ms_since(clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(clock::now() - t0).count();
}

// Raw sockets a test holds open, closed when it ends.
struct sockets {
  std::vector<int> v;
  sockets() = default;
  sockets(const sockets&) = delete;
  sockets& operator=(const sockets&) = delete;
  ~sockets() {
    for (int fd : v) ::close(fd);
  }
};

// ---- relay's memory, from /proc ----

// Whether relay's RSS means anything here. Under AddressSanitizer freed
// memory sits in a quarantine (256 MiB by default) and the allocator keeps
// what it has; under ThreadSanitizer shadow memory follows every byte
// touched. The sanitizer builds check memory safety under the same attacks;
// the RSS bounds are asserted by the other builds. (The tests are built
// with the same sanitizer as the relay they start.)
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
inline constexpr bool rss_bounds_apply = false;
#else
inline constexpr bool rss_bounds_apply = true;
#endif

// meson runs tests with MALLOC_PERTURB_ set, and glibc then writes over
// every block it allocates or frees: memory on the allocator's free lists
// becomes resident and RSS measures the free lists, not what relay holds.
// Tests that bound relay's RSS start it without (call before starting it).
inline void unperturbed_allocator() { ::unsetenv("MALLOC_PERTURB_"); }

// A "VmRSS:"-style line of /proc/<pid>/status in KiB; -1 if absent.
inline long proc_status_kib(pid_t pid, const char* key) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  const size_t klen = std::strlen(key);
  while (std::getline(in, line))
    if (line.compare(0, klen, key) == 0) return std::atol(line.c_str() + klen);
  return -1;
}
inline long rss_kib(pid_t pid) { return proc_status_kib(pid, "VmRSS:"); }
inline long hwm_kib(pid_t pid) { return proc_status_kib(pid, "VmHWM:"); }

// Resets the process's peak RSS (VmHWM) to its current RSS; see proc(5),
// /proc/pid/clear_refs, value 5. False where the kernel does not allow it.
inline bool reset_hwm(pid_t pid) {
  std::ofstream out("/proc/" + std::to_string(pid) + "/clear_refs");
  out << "5";
  out.flush();
  return static_cast<bool>(out);
}

// Watches one process's RSS from a thread, every few milliseconds, and the
// kernel's own peak (VmHWM, reset at start) where available: the peak is
// the larger of the two, so a spike between two samples is not missed.
class rss_watch {
 public:
  explicit rss_watch(pid_t pid) : _pid(pid) {
    _hwm_ok = reset_hwm(pid);
    _before = rss_kib(pid);
    _peak = _before;
    _thread = std::thread([this] {
      while (!_stop.load()) {
        long r = rss_kib(_pid);
        if (r > _peak.load()) _peak.store(r);
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
      }
    });
  }
  rss_watch(const rss_watch&) = delete;
  rss_watch& operator=(const rss_watch&) = delete;
  ~rss_watch() { stop(); }

  // Stops sampling; after() is the RSS now.
  void stop() {
    if (_thread.joinable()) {
      _stop.store(true);
      _thread.join();
      _after = rss_kib(_pid);
      if (_after > _peak.load()) _peak.store(_after);
      if (_hwm_ok) {
        long h = hwm_kib(_pid);
        if (h > _peak.load()) _peak.store(h);
      }
    }
  }
  long before() const { return _before; }
  long peak() const { return _peak.load(); }  // valid after stop(); a running maximum before
  long after() const { return _after; }
  long growth() const { return peak() - _before; }  // of the peak over the start

 private:
  pid_t _pid;
  bool _hwm_ok = false;
  long _before = 0;
  long _after = 0;
  std::atomic<long> _peak{0};
  std::atomic<bool> _stop{false};
  std::thread _thread;
};

// Raises this process's open-file limit to the hard limit (children such
// as relay inherit it); returns the soft limit now in force.
inline rlim_t raise_nofile() {
  rlimit rl{};
  getrlimit(RLIMIT_NOFILE, &rl);
  if (rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
    getrlimit(RLIMIT_NOFILE, &rl);
  }
  return rl.rlim_cur;
}

// ---- raw TCP ----

// "127.0.0.<n>": loopback source addresses, all routed to lo on Linux.
inline std::string loopback(int n) { return "127.0.0." + std::to_string(n); }

// Opens a TCP connection to 127.0.0.1:port from `source` (any loopback
// address; empty: the kernel's choice). Non-blocking connects return at
// once (the connection completes in the background); blocking ones wait.
// rcvbuf > 0 caps the socket's receive buffer (set before connecting, so
// the window is small from the start): on loopback the kernel otherwise
// lets a reader that never reads absorb tens of MiB of relay's output in
// socket buffers, which hides what relay itself holds.
// Returns the socket, or -1 with errno set.
inline int tcp_connect(uint16_t port, const std::string& source = {}, bool nonblocking = false, int rcvbuf = 0) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | (nonblocking ? SOCK_NONBLOCK : 0), 0);
  if (fd < 0) return -1;
  if (rcvbuf > 0) setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
  if (!source.empty()) {
    sockaddr_in src{};
    src.sin_family = AF_INET;
    inet_pton(AF_INET, source.c_str(), &src.sin_addr);
    if (::bind(fd, reinterpret_cast<sockaddr*>(&src), sizeof src) != 0) {
      int e = errno;
      ::close(fd);
      errno = e;
      return -1;
    }
  }
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  int rc = ::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a);
  if (rc != 0 && !(nonblocking && errno == EINPROGRESS)) {
    int e = errno;
    ::close(fd);
    errno = e;
    return -1;
  }
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  return fd;
}

// Closes with a reset (SO_LINGER 0) rather than a FIN.
inline void close_with_reset(int fd) {
  linger l{1, 0};
  setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof l);
  ::close(fd);
}

// Whether the peer closed `fd` (EOF or reset) within timeout_ms. Input is
// read and discarded meanwhile.
inline bool wait_peer_closed(int fd, int timeout_ms) {
  auto until = clock::now() + std::chrono::milliseconds(timeout_ms);
  for (;;) {
    pollfd p{fd, POLLIN, 0};
    int r = ::poll(&p, 1, ms_left(until));
    if (r <= 0) return false;
    char buf[4096];
    ssize_t n = ::recv(fd, buf, sizeof buf, MSG_DONTWAIT);
    if (n == 0) return true;
    if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) return true;
  }
}

// Whether the peer has closed `fd` already (no waiting).
inline bool peer_closed_now(int fd) { return wait_peer_closed(fd, 0); }

// Sends all of `data` on a blocking or non-blocking socket, waiting at
// most timeout_ms; returns the bytes sent (less on timeout or error).
inline size_t send_all(int fd, std::string_view data, int timeout_ms) {
  auto until = clock::now() + std::chrono::milliseconds(timeout_ms);
  size_t off = 0;
  while (off < data.size()) {
    ssize_t n = ::send(fd, data.data() + off, data.size() - off, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n > 0) {
      off += static_cast<size_t>(n);
      continue;
    }
    if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) break;
    pollfd p{fd, POLLOUT, 0};
    if (::poll(&p, 1, ms_left(until)) <= 0) break;
  }
  return off;
}

// ---- HTTP responses ----

struct response {
  int status = 0;
  std::string head;  // status line and headers
  std::string body;
  bool close = false;        // Connection: close
  std::string retry_after;   // Retry-After, if sent
  size_t size = 0;           // bytes on the wire (plaintext)
};

inline std::string lower(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

// The value of header `name` (lower case) in a response head; empty if absent.
inline std::string header(const std::string& head, const std::string& name) {
  std::string h = lower(head);
  std::string pat = "\r\n" + name + ":";
  auto p = h.find(pat);
  if (p == std::string::npos) return {};
  p += pat.size();
  auto e = h.find("\r\n", p);
  std::string v = head.substr(p, e - p);
  while (!v.empty() && v.front() == ' ') v.erase(0, 1);
  while (!v.empty() && v.back() == ' ') v.pop_back();
  return v;
}

// Takes one complete response off the front of `buf` (relay always sends
// Content-Length). Interim 1xx responses are returned like any other.
inline std::optional<response> take_response(std::string& buf) {
  auto end = buf.find("\r\n\r\n");
  if (end == std::string::npos || buf.compare(0, 9, "HTTP/1.1 ") != 0) return std::nullopt;
  response r;
  r.head = buf.substr(0, end);
  r.status = std::atoi(r.head.c_str() + 9);
  size_t len = 0;
  std::string cl = header(r.head, "content-length");
  if (!cl.empty()) len = std::strtoull(cl.c_str(), nullptr, 10);
  if (buf.size() < end + 4 + len) return std::nullopt;
  r.body = buf.substr(end + 4, len);
  r.close = lower(header(r.head, "connection")) == "close";
  r.retry_after = header(r.head, "retry-after");
  r.size = end + 4 + len;
  buf.erase(0, r.size);
  return r;
}

// The receive buffer the tests give a client that does not read.
inline constexpr int small_rcvbuf = 64 * 1024;

// ---- a raw TLS client ----

// One TLS connection over a non-blocking socket, driven by poll(): the
// caller decides exactly what to send and when to read (or not read at
// all). Uses the project's tls::session, as relay's own client does.
class tls_client {
 public:
  // A null `ctx` makes a plaintext HTTP client (for the ops listener).
  // rcvbuf: see tcp_connect().
  tls_client(std::shared_ptr<const relay::tls::context> ctx, uint16_t port, const std::string& source = {},
             int rcvbuf = 0) {
    if (ctx) _session = std::make_unique<relay::tls::session>(std::move(ctx), "localhost");
    _fd = tcp_connect(port, source, true, rcvbuf);
    if (_fd < 0) {
      _error = std::string("connect: ") + std::strerror(errno);
      _closed = true;
    }
  }
  tls_client(const tls_client&) = delete;
  tls_client& operator=(const tls_client&) = delete;
  ~tls_client() {
    if (_fd >= 0) ::close(_fd);
  }

  // Runs the handshake; false (see error()) if it fails or takes longer.
  bool handshake(int timeout_ms = 5000) {
    if (_closed) return false;
    if (!_session) return true;
    if (!_started) start_handshake();
    auto until = clock::now() + std::chrono::milliseconds(timeout_ms);
    while (!_session->handshake_complete()) {
      if (_closed || !pump(ms_left(until))) {
        if (_error.empty()) _error = _closed ? "closed during handshake" : "handshake timed out";
        return false;
      }
    }
    return true;
  }

  // Queues the ClientHello (sent by the next flush() or pump()) without
  // waiting for the server: for tests that drop or stall mid-handshake.
  void start_handshake() {
    _started = true;
    if (_session) _session->start();
    take_output();
  }

  // Encrypts `plain` and queues it; send() or pump() puts it on the wire.
  void queue(std::string_view plain) {
    if (_closed) return;
    if (_session) _session->write(plain);
    else _out.append(plain);
    take_output();
  }
  // Queues bytes exactly as given, bypassing TLS (garbage records).
  void queue_raw(std::string_view bytes) { _out.append(bytes); }
  // Queues `plain` and sends as much as the socket takes within timeout_ms;
  // true when everything queued so far is on the wire.
  bool send(std::string_view plain, int timeout_ms = 5000) {
    queue(plain);
    return flush(timeout_ms);
  }
  // Sends queued ciphertext without reading anything; false if it is not
  // all on the wire within timeout_ms, or a send failed (EPIPE, a reset).
  bool flush(int timeout_ms) {
    auto until = clock::now() + std::chrono::milliseconds(timeout_ms);
    while (!_closed && _out_off < _out.size()) {
      if (!write_some()) break;
      if (_out_off >= _out.size()) break;
      pollfd p{_fd, POLLOUT, 0};
      if (::poll(&p, 1, ms_left(until)) <= 0) break;
    }
    return !_write_failed && _out_off >= _out.size();
  }
  // Why a send failed ("" if none did).
  const std::string& write_error() const { return _write_error; }
  size_t unsent() const { return _out.size() - _out_off; }

  // One round: sends what the socket takes, and reads once if input is
  // ready within timeout_ms. False on timeout (nothing happened).
  bool pump(int timeout_ms) {
    if (_closed) return false;
    write_some();
    pollfd p{_fd, static_cast<short>(POLLIN | (unsent() ? POLLOUT : 0)), 0};
    int r = ::poll(&p, 1, timeout_ms);
    if (r <= 0) return false;
    if (p.revents & POLLOUT) write_some();
    if (p.revents & (POLLIN | POLLHUP | POLLERR)) read_some();
    return true;
  }

  // Reads (and sends what is queued) until `n` responses have arrived, the
  // connection closed, or timeout_ms passed. Returns what arrived.
  std::vector<response> read_responses(size_t n, int timeout_ms) {
    auto until = clock::now() + std::chrono::milliseconds(timeout_ms);
    std::vector<response> out;
    for (;;) {
      while (out.size() < n) {
        auto r = take_response(_plain);
        if (!r) break;
        out.push_back(std::move(*r));
      }
      if (out.size() >= n || _closed) break;
      int left = ms_left(until);
      if (left == 0) break;
      pump(left);
    }
    return out;
  }
  // Reads until the peer closes or timeout_ms passes; true if it closed.
  // Responses that arrived meanwhile are kept in responses().
  bool read_until_closed(int timeout_ms) {
    auto until = clock::now() + std::chrono::milliseconds(timeout_ms);
    while (!_closed) {
      int left = ms_left(until);
      if (left == 0) break;
      pump(left);
    }
    return _closed;
  }
  // Complete responses in what was read so far (taken off the buffer).
  std::vector<response> responses() {
    std::vector<response> out;
    while (auto r = take_response(_plain)) out.push_back(std::move(*r));
    return out;
  }

  // Reads at most `budget` bytes of ciphertext in one go: a slow reader.
  size_t read_at_most(size_t budget) {
    if (_closed) return 0;
    std::string buf(budget, '\0');
    ssize_t n = ::recv(_fd, buf.data(), budget, MSG_DONTWAIT);
    if (n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
      note_close(n);
      return 0;
    }
    if (n < 0) return 0;
    feed(buf.data(), static_cast<size_t>(n));
    return static_cast<size_t>(n);
  }

  void shutdown_write() { ::shutdown(_fd, SHUT_WR); }
  int fd() const { return _fd; }
  bool closed() const { return _closed; }
  bool reset() const { return _reset; }  // closed by ECONNRESET rather than EOF/close_notify
  bool handshake_complete() const { return !_session || _session->handshake_complete(); }
  // The handshake resumed a session (the context offered a cached one).
  bool resumed() const { return _session && _session->resumed(); }
  // Sends close_notify. OpenSSL keeps a client session resumable only if
  // its connection ended with one.
  void close_notify(int timeout_ms = 1000) {
    if (!_session || _closed) return;
    _session->shutdown();
    take_output();
    flush(timeout_ms);
  }
  const std::string& error() const { return _error; }
  std::string& plain() { return _plain; }
  size_t bytes_read() const { return _bytes_read; }

 private:
  void take_output() {
    if (_out_off > 0 && _out_off == _out.size()) {
      _out.clear();
      _out_off = 0;
    }
    if (_session) _session->take_output(_out);
  }
  // False on a socket error.
  bool write_some() {
    while (_out_off < _out.size()) {
      ssize_t n = ::send(_fd, _out.data() + _out_off, _out.size() - _out_off, MSG_NOSIGNAL | MSG_DONTWAIT);
      if (n > 0) {
        _out_off += static_cast<size_t>(n);
        continue;
      }
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) return true;
      // The peer is gone for writing; what it sent may still be readable.
      _write_failed = true;
      if (_write_error.empty()) _write_error = std::strerror(errno);
      _out.clear();
      _out_off = 0;
      return false;
    }
    if (_out_off == _out.size()) {
      _out.clear();
      _out_off = 0;
    }
    return true;
  }
  void read_some() {
    char buf[65536];
    for (int i = 0; i < 16 && !_closed; ++i) {
      ssize_t n = ::recv(_fd, buf, sizeof buf, MSG_DONTWAIT);
      if (n > 0) {
        feed(buf, static_cast<size_t>(n));
        continue;
      }
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) return;
      note_close(n);
    }
  }
  void note_close(ssize_t n) {
    if (n < 0 && errno == ECONNRESET) _reset = true;
    if (_error.empty()) _error = n == 0 ? "EOF" : std::string("recv: ") + std::strerror(errno);
    _closed = true;
  }
  void feed(const char* data, size_t len) {
    _bytes_read += len;
    if (!_session) {
      _plain.append(data, len);
      return;
    }
    _session->feed(data, len);
    auto st = _session->read(_plain);
    take_output();
    write_some();
    if (st == relay::tls::session::status::closed) {
      _closed = true;
      if (_error.empty()) _error = "close_notify";
    } else if (st == relay::tls::session::status::error) {
      _closed = true;
      if (_error.empty()) _error = "tls: " + _session->error();
    }
  }

  int _fd = -1;
  std::unique_ptr<relay::tls::session> _session;  // null: plaintext
  bool _started = false;
  std::string _out;  // ciphertext not yet sent
  size_t _out_off = 0;
  std::string _plain;  // plaintext received, not yet taken
  size_t _bytes_read = 0;
  bool _closed = false;
  bool _reset = false;
  bool _write_failed = false;
  std::string _write_error;
  std::string _error;
};

// "GET <target> HTTP/1.1" with a Host header.
inline std::string get_request(const std::string& target) {
  return "GET " + target + " HTTP/1.1\r\nHost: localhost\r\n\r\n";
}
inline std::string post_request(const std::string& target, const std::string& body,
                                const std::string& extra_headers = {}) {
  return "POST " + target + " HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: " +
         std::to_string(body.size()) + "\r\n" + extra_headers + "\r\n" + body;
}

// The value of one series (name with its labels, as printed) in a
// Prometheus text page; -1 if absent.
inline double metric(const std::string& page, const std::string& series) {
  std::string pat = "\n" + series + " ";
  auto p = page.find(pat);
  if (p == std::string::npos) return -1;
  return std::strtod(page.c_str() + p + pat.size(), nullptr);
}

// Pumps every client in `clients` (reading what arrives, sending what is
// queued) until done() is true or timeout_ms passes; returns done().
template <class Clients, class Done>
bool pump_all(Clients& clients, int timeout_ms, Done done) {
  auto until = clock::now() + std::chrono::milliseconds(timeout_ms);
  while (!done()) {
    std::vector<pollfd> fds;
    for (auto& c : clients)
      if (!c->closed()) fds.push_back({c->fd(), static_cast<short>(POLLIN | (c->unsent() ? POLLOUT : 0)), 0});
    int left = ms_left(until);
    if (fds.empty() || left == 0) break;
    if (::poll(fds.data(), fds.size(), std::min(left, 50)) < 0) break;
    for (auto& c : clients)
      if (!c->closed()) c->pump(0);
  }
  return done();
}

// ---- latencies ----

struct latency_stats {
  size_t requests = 0;  // answered with the expected status
  size_t errors = 0;    // anything else: timeouts, resets, wrong status, refused connections
  size_t connections = 0;
  double p50_ms = 0, p99_ms = 0, max_ms = 0;
  std::string first_error;
};

inline double percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  size_t i = static_cast<size_t>(p * static_cast<double>(v.size() - 1) + 0.5);
  return v[std::min(i, v.size() - 1)];
}

// A well-behaved client: from its own thread, one mTLS request after
// another (`request`, expecting `expect_status`), a short pause between
// them, and a fresh connection (from 127.0.0.1) every `per_connection`
// requests so that accepting new connections is exercised too. The
// latency of a request on a fresh connection includes connect and
// handshake. A request unanswered after 5 s is an error.
class good_client {
 public:
  good_client(std::shared_ptr<const relay::tls::context> ctx, uint16_t port, std::string request,
              int expect_status = 200, int per_connection = 20, int pause_ms = 10)
      : _ctx(std::move(ctx)),
        _port(port),
        _request(std::move(request)),
        _expect(expect_status),
        _per_connection(per_connection),
        _pause_ms(pause_ms) {
    _thread = std::thread([this] { run(); });
  }
  good_client(const good_client&) = delete;
  good_client& operator=(const good_client&) = delete;
  ~good_client() { stop(); }

  // Stops after the request in progress; the statistics of the whole run.
  latency_stats stop() {
    if (_thread.joinable()) {
      _stop.store(true);
      _thread.join();
    }
    return stats();
  }
  latency_stats stats() const {
    std::lock_guard<std::mutex> g(_mu);
    latency_stats s = _stats;
    s.p50_ms = percentile(_samples, 0.50);
    s.p99_ms = percentile(_samples, 0.99);
    s.max_ms = _samples.empty() ? 0 : *std::max_element(_samples.begin(), _samples.end());
    return s;
  }
  // Requests answered so far.
  size_t answered() const {
    std::lock_guard<std::mutex> g(_mu);
    return _stats.requests;
  }

 private:
  void fail(const std::string& why) {
    std::lock_guard<std::mutex> g(_mu);
    ++_stats.errors;
    if (_stats.first_error.empty()) _stats.first_error = why;
  }
  void run() {
    std::unique_ptr<tls_client> c;
    int on_conn = 0;
    while (!_stop.load()) {
      auto t0 = clock::now();
      if (!c || c->closed() || on_conn >= _per_connection) {
        c = std::make_unique<tls_client>(_ctx, _port);
        on_conn = 0;
        {
          std::lock_guard<std::mutex> g(_mu);
          ++_stats.connections;
        }
        if (!c->handshake(5000)) {
          fail("new connection: " + c->error());
          c.reset();
          std::this_thread::sleep_for(std::chrono::milliseconds(50));
          continue;
        }
      }
      ++on_conn;
      c->queue(_request);
      auto got = c->read_responses(1, 5000);
      double ms = ms_since(t0);
      if (got.empty()) {
        fail(c->closed() ? "connection closed: " + c->error() : "no answer within 5 s");
        c.reset();
      } else if (got[0].status != _expect) {
        fail("status " + std::to_string(got[0].status));
        if (got[0].close) c.reset();
      } else {
        std::lock_guard<std::mutex> g(_mu);
        ++_stats.requests;
        _samples.push_back(ms);
        if (got[0].close) c.reset();
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(_pause_ms));
    }
  }

  std::shared_ptr<const relay::tls::context> _ctx;
  uint16_t _port;
  std::string _request;
  int _expect;
  int _per_connection;
  int _pause_ms;
  std::atomic<bool> _stop{false};
  mutable std::mutex _mu;
  latency_stats _stats;
  std::vector<double> _samples;
  std::thread _thread;
};

}  // namespace test::hostile
