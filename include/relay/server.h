// The server side of relay's network stack: a listener accepts TCP
// connections; each becomes a server_conn that runs TLS (when configured),
// parses HTTP/1.1 requests with hard limits and timeouts, and hands complete
// requests, one at a time and in order, to a request_handler.
//
// Ownership: a listener owns its connections; each connection owns a
// net::stream (relay/stream.h) and is freed from the stream's on_closed(),
// never while any call on it is on the stack.
//
// Bounds (what a peer can make relay hold): per connection, pipelined input
// (max_pending_input), unsent output (max_pending_output, checked before
// each pipelined request is taken) and one body (http.max_body_bytes); per
// listener, connections (max_connections, max_connections_per_ip) and the
// bytes of all partly received bodies (max_pending_body_bytes).
#pragma once

#include <uv.h>

#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "relay/http.h"
#include "relay/metrics.h"
#include "relay/stream.h"
#include "relay/tls.h"

namespace relay::http {
class spool_upload;
}

namespace relay::net {

class listener;
class server_conn;

// What the connection layer asks of the application (the API service, the
// ops endpoints). Every callback runs from the loop, on the connection's own
// stack (a read, a timer, a resumed pipeline), never inside another
// connection's call.
class request_handler {
 public:
  virtual ~request_handler() = default;
  // The connection is ready for requests: the TLS handshake verified the
  // peer (or the listener is plaintext). Resolve the peer's identity here,
  // once, rather than on every request.
  virtual void on_connected(server_conn& conn) { (void)conn; }
  // The headers of a request are complete and its body is not read yet.
  // Method, path and the peer decide whether it may go on: return true to
  // read the body, or answer now (conn.respond...) and return false — the
  // body is then never read and the connection closes after the answer.
  virtual bool on_headers(server_conn& conn, http::request& req) {
    (void)conn, (void)req;
    return true;
  }
  // A complete request. The handler calls conn.respond() exactly once, now
  // or later; one that answers later sets an abandon hook first.
  virtual void on_request(server_conn& conn, http::request& req) = 0;
  // The connection answered a request it could not parse (for metrics).
  virtual void on_rejected(server_conn& conn, api_error e) { (void)conn, (void)e; }
};

struct conn_options {
  http::limits http;
  uint32_t handshake_timeout_ms = 3000;  // accept to TLS handshake done
  uint32_t header_timeout_ms = 10000;    // first byte of a request to end of its headers
  uint32_t idle_timeout_ms = 120000;     // between requests
  uint64_t min_body_rate = 1024;         // bytes/s a body must keep up after header_timeout_ms (0: off)
  size_t max_pending_input = 64 * 1024;      // pipelined bytes held while a request is handled
  // Unsent answer bytes (plaintext queued, TLS output, bytes in flight) past
  // which the connection stops taking pipelined requests. A connection holds
  // at most this plus one answer.
  size_t max_pending_output = 1024 * 1024;
  linger_options linger;  // the close after a final answer
  // A connection older than this (from accept) is retired between
  // requests: the next answer carries Connection: close, or an idle one is
  // closed (close_notify, FIN). An answer in progress -- a parked long poll
  // included -- is never cut. 0: no limit. With TLS, a connection is also
  // retired so once its peer certificate's notAfter has passed.
  uint64_t max_age_ms = 0;
  // Spooling (issue 13): a body longer than this (by Content-Length, or a
  // chunked one once it passes it) is validated as it arrives and its
  // payload/result values of at least this many bytes are written to a
  // file in spool_dir; the request then carries a body_spool and its
  // skeleton. 0 or no spool_dir: every body is held in RAM.
  uint64_t spill_threshold = 0;
  std::string spool_dir;
};

class server_conn final : private stream_handler {
 public:
  server_conn(const server_conn&) = delete;
  server_conn& operator=(const server_conn&) = delete;

  // Milliseconds until the connection is retired (its certificate's
  // notAfter, limits.max_connection_age_ms), at least 1; 0: never. A long
  // poll waits no longer than this, so that an expired certificate is not
  // handed a job by a request parked before it expired.
  uint64_t ms_until_retired() const;
  // Answers the current request. Ignored unless a request is being handled.
  // Safe from anywhere on the loop thread: called from outside this
  // connection's own request callback, the rest (sending, taking the next
  // pipelined request) happens from the loop, never on the caller's stack.
  void respond(int status, std::string_view body, std::string_view extra_headers = {},
               std::string_view content_type = "application/json");
  // The same, taking the body over: a large one is then encrypted a chunk
  // at a time as the socket drains (net::stream::write_owned).
  // `keep` (may be null) is released once the body is wholly encrypted or
  // the connection ends (see stream::write_owned).
  void respond_owned(int status, std::string&& body, std::string_view extra_headers = {},
                     std::string_view content_type = "application/json", std::shared_ptr<void> keep = {});
  void respond_error(api_error e, std::string_view detail = {});

  // Runs if the connection closes while the current request is unanswered
  // (a parked long poll whose client went away). After it runs, respond()
  // must not be called for that request. It runs as soon as the close is
  // known -- from a libuv callback (EOF, reset, a timer, an eviction) or
  // from close() -- and never from inside respond().
  void set_abandon_hook(std::function<void()> hook) { _abandon = std::move(hook); }

  bool is_tls() const { return _stream->is_tls(); }
  const tls::identity& peer() const { return _stream->peer(); }
  const std::string& remote_address() const { return _stream->remote_address(); }
  uint64_t id() const { return _id; }

  // Set by the handler: the interned principal name the current request
  // acts as (what its leases are bound to). The API service sets it in
  // on_connected() from the certificate, or, with API keys, per request
  // from the request's key.
  const std::string* principal = nullptr;

  // Closes now: an unanswered request is abandoned (its hook runs before
  // this returns), unsent bytes are dropped.
  void close();

 private:
  friend class listener;
  // The connection's whole life, in protocol order.
  enum class state : uint8_t {
    handshake,           // TCP accepted, TLS handshake running
    idle,                // between requests
    reading_headers,     // a request's first bytes seen, headers not complete
    reading_body,        // headers accepted, body arriving
    spooling,            // a spooled body is whole; its last writes are going to disk
    handling,            // a complete request is with the handler
    closing_after_write, // a final answer is being written; then lingering close
    closed,
  };

  server_conn(listener& owner, uint64_t id, stream* s);
  ~server_conn() override = default;

  // stream_handler, in the order the protocol runs.
  void on_secure(stream& s) override;
  void on_input(stream& s) override;
  void on_drained(stream& s) override;
  void on_timeout(stream& s) override;
  void on_end(stream& s, stream_end why, std::string_view detail) override;
  void on_closed(stream& s) override;

  void connected();
  void process();
  void resume();  // from the listener's resume list
  void finish_response(bool close_after);
  // respond()/respond_owned(): `owned` (may be null) holds `body`.
  void answer(int status, std::string_view body, std::string* owned, std::string_view extra_headers,
              std::string_view content_type, std::shared_ptr<void> keep = {});
  void reject(api_error e, std::string_view detail);
  void end_with_final_answer();
  void begin_drain();
  void update_reading();
  bool output_full() const;
  void release_body_budget();
  bool reserve_body_budget(size_t bytes);
  // The reservation becomes exactly `bytes` (a spooled body's RAM goes
  // down as well as up); false if growing it would pass the budget.
  bool set_body_budget(size_t bytes);
  // Spooled bodies.
  void start_upload();
  void on_upload_event();
  void refuse_upload();
  void deliver_spooled();
  void drop_upload();
  // Retirement (conn_options::max_age_ms, the certificate's notAfter).
  bool retire_due() const;
  void count_retired();
  uint32_t idle_timer_ms() const;
  // Closed from here on: out of the listener's counts, and the abandon
  // hook run.
  void mark_closed();

  listener& _owner;
  uint64_t _id;
  stream* _stream;
  http::request_parser _parser;
  size_t _in_offset = 0;       // parsed bytes at the front of the stream's input
  state _state = state::handshake;
  bool _in_process = false;    // inside process(): answers continue the loop there
  bool _scheduled = false;     // on the listener's resume list
  bool _draining = false;
  uint64_t _body_started = 0;  // uv_now() when the body phase began
  uint64_t _body_last_progress = 0;
  size_t _body_seen = 0;       // body bytes received so far
  size_t _body_reserved = 0;   // bytes of the listener's body budget this request holds
  http::spool_upload* _upload = nullptr;  // the body being spooled; it frees itself (abandon, hand_over)
  std::function<void()> _abandon;
  std::string _ip;             // the per-address count this connection holds (empty: none)
  // The generation of the TLS context the peer was last verified against
  // (tls::context::generation); 0 for plaintext.
  uint64_t _tls_generation = 0;
  uint64_t _retire_at = 0;     // uv_now() ms past which it is retired (0: never)
  bool _retire_for_expiry = false;  // _retire_at is the certificate's notAfter
  server_conn* _prev = nullptr;  // listener's list of open connections
  server_conn* _next = nullptr;
  // Listener's list of evictable connections, the first to go when it is
  // full: every connection that relay owes no answer, i.e. that waits on
  // its peer (handshake, between requests, a request or body still
  // arriving, output the peer does not read, lingering after a final
  // answer). Ordered by when each was last served, oldest first, so that
  // sockets that never get a request through go before clients that do.
  server_conn* _evictable_prev = nullptr;
  server_conn* _evictable_next = nullptr;
  bool _evictable = false;
};

// The key a connection counts under for max_connections_per_ip: an IPv4
// address as it is, an IPv6 address by its /64 ("2001:db8:1:2::/64"; a
// host or a subscriber is given a whole /64, so one count per address
// would not bound it), an IPv4-mapped IPv6 address as its IPv4 address.
// Anything else (not an address) is returned unchanged.
std::string source_key(std::string_view ip);

struct listener_options {
  std::string name;     // "api" or "ops": in logs and metric labels
  std::string address;  // "IP:port" or "[IPv6]:port"; port 0 picks one
  // Where new connections get their TLS context (read at each accept, so a
  // reload takes effect for new connections only). Empty: plaintext.
  std::function<std::shared_ptr<const tls::context>()> tls;
  conn_options conn;
  // When full, the evictable connection served longest ago (one relay owes
  // no answer: see server_conn) is closed to admit a new one; only when
  // every connection has a request in hand is a new one refused.
  size_t max_connections = 10000;
  // Per source (IPv4 address or IPv6 /64); beyond it a new connection is
  // refused, unless the listener is also full and the connection that
  // makes room is of the same source.
  size_t max_connections_per_ip = 256;
  // Bytes all of this listener's connections may hold in partly received
  // request bodies, counted as they arrive (not as announced); a body that
  // would pass it is refused with 503.
  size_t max_pending_body_bytes = 256u << 20;
};

class listener {
 public:
  listener(uv_loop_t* loop, listener_options o, request_handler& handler, ops::registry& metrics);
  listener(const listener&) = delete;
  listener& operator=(const listener&) = delete;
  // The loop must have run the close callbacks (see close()) before this.
  ~listener();

  // Binds and listens; logs {"event":"listening",...}. On failure returns
  // false with `error` naming the address.
  bool start(std::string& error);
  // The bound address with its real port, e.g. "127.0.0.1:43123".
  const std::string& address() const { return _bound; }

  // Stops accepting. Idle connections close now; busy ones close after
  // answering their current request.
  void drain();
  // The TLS material was reloaded (listener_options::tls now returns a new
  // context): verifies again the peer certificates of every connection that
  // was verified against an older context, against the current one (its CA
  // bundle and CRL, the handshake's flags, the current time), and closes
  // each that no longer verifies at once -- an unanswered request is
  // abandoned (its hook runs), nothing more is sent. Each such close is
  // counted (relay_connections_revoked_total) and audited
  // (connection_revoked). The work runs from the loop, a bounded batch per
  // iteration, never from this call; a call during a sweep starts it over
  // against the newer context. A handshake that completes after a reload on
  // an older context is checked when it completes. No-op without TLS.
  void recheck_peers();
  // Closes the listening socket and every connection.
  void close();
  size_t open_connections() const { return _open; }
  size_t pending_body_bytes() const { return _body_bytes; }

 private:
  friend class server_conn;
  static void on_connection(uv_stream_t* server, int status);
  static void on_resume(uv_idle_t* h);
  static void on_recheck(uv_idle_t* h);
  // Verifies `c`'s peer against `ctx` if it was verified against an older
  // context (a secure connection: from the sweep, or as its handshake
  // completes); closes it if it fails. False if it was closed.
  bool recheck(server_conn& c, const tls::context& ctx);
  void remove(server_conn* c);
  void schedule(server_conn* c);
  void unschedule(server_conn* c);
  void evictable_insert(server_conn* c);
  void evictable_remove(server_conn* c);

  uv_loop_t* _loop;
  listener_options _options;
  request_handler& _handler;
  uv_tcp_t _tcp{};
  uv_idle_t _resume{};
  bool _listening = false;
  bool _closed = false;
  std::string _bound;
  uint64_t _next_id = 1;
  size_t _open = 0;
  size_t _body_bytes = 0;
  server_conn* _head = nullptr;
  server_conn* _evictable_head = nullptr;  // served longest ago
  server_conn* _evictable_tail = nullptr;
  // Open connections per source: an IPv4 address, or an IPv6 /64 (what one
  // host or subscriber is usually given).
  std::unordered_map<std::string, size_t> _per_ip;
  // Connections whose pipeline continues from the loop (an answer given
  // from outside their own request callback).
  std::vector<server_conn*> _to_resume;
  std::vector<server_conn*>* _resuming = nullptr;  // the batch on_resume() is running
  // The peer re-verification sweep after a reload: the next connection to
  // look at (remove() moves it on when that one goes), and this sweep's
  // figures for its closing log line.
  uv_idle_t _recheck{};
  server_conn* _recheck_next = nullptr;
  bool _rechecking = false;
  size_t _recheck_verified = 0;
  size_t _recheck_revoked = 0;

  ops::counter& _accepted;
  ops::counter& _refused;
  ops::counter& _refused_per_ip;
  ops::counter& _evicted;
  ops::counter& _handshake_failures;
  ops::counter& _timeouts;
  ops::counter& _body_refused;
  ops::counter& _revoked;
  ops::counter& _retired_age;
  ops::counter& _retired_expiry;
  ops::gauge& _open_gauge;
};

// Parses "IP:port" / "[IPv6]:port" into a socket address.
bool parse_address(std::string_view text, sockaddr_storage& out, std::string& error);
std::string format_address(const sockaddr* sa);

}  // namespace relay::net
