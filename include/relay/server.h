// The server side of relay's network stack: a listener accepts TCP
// connections; each becomes a server_conn that runs TLS (when configured),
// parses HTTP/1.1 requests with hard limits and timeouts, and hands complete
// requests, one at a time and in order, to a request_handler.
//
// Ownership: a listener owns its connections. A connection is freed only from
// its libuv close callbacks, never while any call on it is on the stack.
#pragma once

#include <uv.h>

#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include "relay/http.h"
#include "relay/metrics.h"
#include "relay/tls.h"

namespace relay::net {

class listener;
class server_conn;

class request_handler {
 public:
  virtual ~request_handler() = default;
  // The connection is ready for requests: the TLS handshake verified the
  // peer (or the listener is plaintext). Resolve the peer's identity here,
  // once, rather than on every request.
  virtual void on_connected(server_conn& conn) { (void)conn; }
  // A complete request. The handler calls conn.respond() exactly once, now
  // or later; one that answers later sets an abandon hook first.
  virtual void on_request(server_conn& conn, http::request& req) = 0;
  // The connection answered a request it could not parse (for metrics).
  virtual void on_rejected(server_conn& conn, api_error e) { (void)conn, (void)e; }
};

struct conn_options {
  http::limits http;
  uint32_t header_timeout_ms = 10000;  // handshake, and first byte to end of headers
  uint32_t idle_timeout_ms = 120000;   // between requests, and body progress
  size_t max_pending_input = 64 * 1024;     // pipelined bytes held while a request is handled
  size_t max_pending_output = 1024 * 1024;  // unsent response bytes before reading pauses
};

class server_conn {
 public:
  server_conn(const server_conn&) = delete;
  server_conn& operator=(const server_conn&) = delete;

  // Answers the current request. Ignored if the connection is closing.
  void respond(int status, std::string_view body, std::string_view extra_headers = {},
               std::string_view content_type = "application/json");
  void respond_error(api_error e, std::string_view detail = {});

  // Runs if the connection closes while the current request is unanswered
  // (a parked long poll whose client went away). After it runs, respond()
  // must not be called for that request.
  void set_abandon_hook(std::function<void()> hook) { _abandon = std::move(hook); }

  bool is_tls() const { return _tls != nullptr; }
  const tls::identity& peer() const { return _peer; }
  const std::string& remote_address() const { return _remote; }
  uint64_t id() const { return _id; }

  // Set by the handler in on_connected(); an interned principal name.
  const std::string* principal = nullptr;

  // Closes now: unanswered requests are abandoned, unsent bytes dropped.
  void close();

 private:
  friend class listener;
  enum class phase : uint8_t { handshake, idle, reading, handling };

  server_conn(listener& owner, uint64_t id);
  ~server_conn();
  bool start(uv_stream_t* server);
  void begin_drain();

  static void on_alloc(uv_handle_t* h, size_t suggested, uv_buf_t* buf);
  static void on_read(uv_stream_t* s, ssize_t nread, const uv_buf_t* buf);
  static void on_timeout(uv_timer_t* t);
  static void on_write_done(uv_write_t* req, int status);
  static void on_handle_closed(uv_handle_t* h);
  static void on_shutdown(uv_shutdown_t* req, int status);

  void received(const char* data, size_t len);
  void handshake_done();
  void process();
  void finish_response(bool close);
  void reject(api_error e, std::string_view detail);
  void flush();
  void linger();
  void arm_timer(uint32_t ms);
  void update_reading();

  listener& _owner;
  uint64_t _id;
  uv_tcp_t _tcp{};
  uv_timer_t _timer{};
  uv_shutdown_t _shutdown{};
  int _open_handles = 0;
  int _pending_reqs = 0;  // the shutdown request also pins the object
  std::unique_ptr<tls::session> _tls;
  http::request_parser _parser;
  std::string _in;        // plaintext received and not yet parsed
  size_t _in_offset = 0;
  std::string _pending;   // plaintext responses not yet encrypted/sent
  std::string _out;       // bytes for the socket
  size_t _in_flight = 0;  // bytes handed to uv_write and not yet done
  phase _phase = phase::handshake;
  bool _body_timer = false;
  bool _reading = false;
  bool _in_process = false;
  bool _close_after_write = false;
  bool _notify_sent = false;
  bool _lingering = false;
  size_t _lingered = 0;
  bool _draining = false;
  bool _closing = false;
  std::function<void()> _abandon;
  tls::identity _peer;
  std::string _remote;
  server_conn* _prev = nullptr;  // listener's list of open connections
  server_conn* _next = nullptr;
};

struct listener_options {
  std::string name;     // "api" or "ops": in logs and metric labels
  std::string address;  // "IP:port" or "[IPv6]:port"; port 0 picks one
  // Where new connections get their TLS context (read at each accept, so a
  // reload takes effect for new connections only). Empty: plaintext.
  std::function<std::shared_ptr<const tls::context>()> tls;
  conn_options conn;
  size_t max_connections = 10000;
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
  // Closes the listening socket and every connection.
  void close();
  size_t open_connections() const { return _open; }

 private:
  friend class server_conn;
  static void on_connection(uv_stream_t* server, int status);
  void remove(server_conn* c);

  uv_loop_t* _loop;
  listener_options _options;
  request_handler& _handler;
  uv_tcp_t _tcp{};
  bool _listening = false;
  bool _closed = false;
  std::string _bound;
  uint64_t _next_id = 1;
  size_t _open = 0;
  server_conn* _head = nullptr;
  // One receive buffer per listener: libuv calls alloc and read back to back
  // on the one loop thread, so connections can share it.
  std::unique_ptr<char[]> _read_buffer;

  ops::counter& _accepted;
  ops::counter& _refused;
  ops::counter& _handshake_failures;
  ops::counter& _timeouts;
  ops::gauge& _open_gauge;
};

// Parses "IP:port" / "[IPv6]:port" into a socket address.
bool parse_address(std::string_view text, sockaddr_storage& out, std::string& error);
std::string format_address(const sockaddr* sa);

}  // namespace relay::net
