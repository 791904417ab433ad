// The client side of relay's HTTP stack, used by bunny, relayctl, the bench
// harness and the tests: one keep-alive HTTP/1.1 connection over TLS (the
// same tls::session as the server) or plain TCP, parsed with llhttp.
//
// Requests are pipelined and answered in FIFO order. A transport, TLS or
// protocol error, or a request timing out, fails every outstanding request
// with the same error and closes the connection; whether to reconnect is the
// owner's decision. An answer with Connection: close, or one whose body ends
// with the stream (HTTP/1.0 services), is not a failure: the server
// processed nothing after it, so requests pipelined behind it are sent again
// on a new connection. Over TLS such a body counts only if the server ended
// the stream with close_notify; a bare FIN or reset may be a truncation by
// anyone on the path, so the request fails with kind `lost`. Interim 1xx
// answers (100 Continue, 102, 103 Early Hints) are skipped and the request
// waits for its final answer; a 101 is a protocol error, since the client
// never asks to upgrade. The host name is resolved again on every connect.
//
// Callbacks: each request's callback runs exactly once. It runs from a
// libuv callback of this connection (a read, its timer, a stream end), or
// from inside close() (with kind `closed`) -- never from inside request().
//
// The process must ignore SIGPIPE (relay, bunny, relayctl and the tests do):
// libuv writes to sockets with write(2), which raises it when the peer has
// gone.
#pragma once

#include <llhttp.h>
#include <uv.h>

#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include "relay/http.h"
#include "relay/stream.h"
#include "relay/tls.h"

namespace relay::http {

using client_response = response;

// Why a request got no response. A value, not a string to compare: callers
// decide on `what` (retry, reconnect, give up) and log `message`.
struct client_error {
  enum class kind : uint8_t {
    none,
    connect,    // resolve or TCP connect failed
    tls,        // handshake failed or the server's certificate was refused
    lost,       // the connection broke (reset, EOF, write failure) before the answer was complete
    timeout,    // connect_timeout_ms or the request's timeout_ms passed
    protocol,   // the server's bytes are not a valid HTTP/1.1 answer (or an unasked one)
    too_large,  // the answer exceeds max_response_bytes
    refused,    // the request itself is malformed (see request()); nothing was sent
    closed,     // close() was called by the owner
  };
  kind what = kind::none;
  std::string message;
  explicit operator bool() const { return what != kind::none; }
};
// "timeout", "closed", ...: for logs and metric labels.
std::string_view to_string(client_error::kind k);

class client_conn final : private net::stream_handler {
 public:
  struct options {
    std::string host;  // name or IP address
    uint16_t port = 0;
    std::string server_name;                  // TLS name to verify; empty: host
    std::shared_ptr<const tls::context> tls;  // null: plain HTTP
    uint32_t connect_timeout_ms = 10000;      // resolve + connect + handshake
    size_t max_response_bytes = 64 << 20;
    // Bytes of room (spaces) each response body starts with, not counted
    // in max_response_bytes: where bunny's http handler has the envelope of
    // the complete request written, so the service's answer becomes that
    // request's body without a copy (v1::complete_room).
    size_t response_body_room = 0;
  };
  // `error` is false (kind none) on success; otherwise it says what failed,
  // and `response` is empty.
  using callback = std::function<void(const client_error& error, client_response& response)>;

  // The connection frees itself after close(); do not delete it.
  static client_conn* create(uv_loop_t* loop, options o);
  client_conn(const client_conn&) = delete;
  client_conn& operator=(const client_conn&) = delete;

  // Queues a request; connects first if needed. `extra_headers` are whole
  // lines, each `Name: value` ending in CRLF. timeout_ms (0: none) counts
  // from when the request is queued until its response is complete.
  //
  // The request is refused (kind `refused`, from the loop, nothing sent and
  // no connection opened for it) when `method` is not an HTTP token, when
  // `target` holds a byte outside visible ASCII (0x21-0x7E; so no space,
  // CR, LF or NUL), or when `extra_headers` holds a line that is not a
  // token name, a colon and a value of visible characters, spaces, tabs and
  // bytes >= 0x80 (so no CR, LF, NUL or other control byte), ended by CRLF,
  // or a line that sets Host, Content-Length or Transfer-Encoding (the
  // connection writes those itself; a second copy would make the framing
  // ambiguous).
  // Callers pass job ids and the like into these: the check stops a value
  // that slipped past their own validation from ending the request early
  // and smuggling a second one.
  void request(std::string_view method, std::string_view target, std::string_view body, callback cb,
               uint32_t timeout_ms = 0, std::string_view extra_headers = {});
  // The same with a body that is not copied: a large body (a job's payload
  // or result) is written to the stream from the caller's buffer, which
  // `keep` keeps alive until the answer (the request may be sent again).
  void request(std::string_view method, std::string_view target, std::string_view body,
               std::shared_ptr<const void> keep, callback cb, uint32_t timeout_ms = 0,
               std::string_view extra_headers = {});
  // Fails outstanding requests with kind `closed` (from inside this call),
  // then closes; the object is freed once libuv has closed its handles, so
  // nothing may be called on it afterwards.
  void close();

  bool connected() const { return _state == state::ready; }
  size_t outstanding() const { return _queue.size(); }
  // The verified server certificate's identity, once connected.
  const tls::identity& server_identity() const { return _server; }
  // Whether the TLS session was resumed rather than fully negotiated.
  bool resumed() const { return _stream && _stream->tls() && _stream->tls()->resumed(); }
  // The TLS context this connection was opened with (null: plain HTTP).
  const std::shared_ptr<const tls::context>& tls_context() const { return _options.tls; }

 private:
  enum class state : uint8_t { idle, resolving, connecting, handshaking, ready, closed };
  struct pending {
    std::string bytes;               // the head, and the body unless kept by the caller
    std::string_view body;           // a body not copied, sent after `bytes`...
    std::shared_ptr<const void> keep;  // ...and what keeps it alive
    callback cb;
    uint64_t deadline = 0;  // uv_now() ms; 0: none
    bool sent = false;
  };
  struct deferred_answer {
    callback cb;
    client_error error;
  };

  client_conn(uv_loop_t* loop, options o);
  ~client_conn() override;

  // net::stream_handler, in protocol order.
  void on_secure(net::stream& s) override;
  void on_input(net::stream& s) override;
  void on_end(net::stream& s, net::stream_end why, std::string_view detail) override;
  void on_closed(net::stream& s) override;

  void enqueue(std::string_view method, std::string_view target, std::string_view body,
               std::shared_ptr<const void> keep, callback cb, uint32_t timeout_ms, std::string_view extra_headers);
  void start_connect();
  void send_pending();
  void parse(const std::string& data);
  // Hands the complete response to the oldest request; false when the
  // connection closed or failed on the way (stop parsing).
  bool deliver();
  // The server ended the stream: completes a close-delimited response, then
  // fails what is left with `error`.
  void peer_closed(client_error error);
  void fail_all(const client_error& error);
  // Closes the transport and fails every outstanding request with `error`.
  void drop(const client_error& error);
  // Answers the requests that failed before a connection was tried
  // (refused, or the resolver would not start).
  void answer_deferred();
  void arm_timer();
  void reset_transport();

  std::string where() const { return _options.host + ":" + std::to_string(_options.port); }

  static void on_resolved(uv_getaddrinfo_t* req, int status, addrinfo* res);
  static void on_timer(uv_timer_t* t);
  static void on_timer_closed(uv_handle_t* h);

  uv_loop_t* _loop;
  options _options;
  state _state = state::idle;
  // The transport of the current connection attempt. A reset detaches it
  // and lets it close on its own, so a reconnect never waits for it.
  net::stream* _stream = nullptr;
  uv_timer_t _timer{};
  uv_getaddrinfo_t* _resolve = nullptr;
  uint64_t _connect_deadline = 0;
  tls::identity _server;
  response_parser _parser;
  std::deque<pending> _queue;
  size_t _answerable = 0;  // requests the bytes being parsed may answer
  // Failed inside request(), answered from the timer so that no callback
  // runs on the caller's stack.
  std::deque<deferred_answer> _deferred;
  bool _closing = false;
};

}  // namespace relay::http
