#include <arpa/inet.h>

#include <cassert>

#include "relay/http_client.h"
#include "relay/server.h"

namespace relay::http {
// Lifetime: the object is freed from its timer's close callback. Its stream
// and a getaddrinfo request still pending then are detached first, because
// libuv may run their callbacks after the timer's close callback.

client_conn* client_conn::create(uv_loop_t* loop, options o) { return new client_conn(loop, std::move(o)); }

client_conn::client_conn(uv_loop_t* loop, options o)
    : _loop(loop), _options(std::move(o)), _parser(_options.max_response_bytes) {
  if (_options.server_name.empty()) _options.server_name = _options.host;
  uv_timer_init(loop, &_timer);
  _timer.data = this;
}

client_conn::~client_conn() = default;

void client_conn::request(std::string_view method, std::string_view target, std::string_view body, callback cb,
                          uint32_t timeout_ms, std::string_view extra_headers) {
  if (_closing) {
    client_response none;
    cb("closed", none);
    return;
  }
  pending p;
  p.bytes.reserve(128 + target.size() + body.size());
  p.bytes.append(method);
  p.bytes += ' ';
  p.bytes.append(target);
  p.bytes += " HTTP/1.1\r\nHost: ";
  p.bytes += _options.server_name;
  p.bytes += "\r\nContent-Type: application/json\r\nContent-Length: ";
  p.bytes += std::to_string(body.size());
  p.bytes += "\r\n";
  p.bytes.append(extra_headers);
  p.bytes += "\r\n";
  p.bytes.append(body);
  p.cb = std::move(cb);
  if (timeout_ms) p.deadline = uv_now(_loop) + timeout_ms;
  _queue.push_back(std::move(p));
  if (_state == state::idle) start_connect();
  else if (_state == state::ready) send_pending();
  arm_timer();
}

void client_conn::start_connect() {
  _connect_deadline = uv_now(_loop) + _options.connect_timeout_ms;
  _state = state::resolving;
  _parser.reset();
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  _resolve = new uv_getaddrinfo_t;
  _resolve->data = this;
  std::string port = std::to_string(_options.port);
  int rc = uv_getaddrinfo(_loop, _resolve, on_resolved, _options.host.c_str(), port.c_str(), &hints);
  if (rc != 0) {
    delete _resolve;
    _resolve = nullptr;
    _state = state::idle;
    fail_all("resolve " + _options.host + ": " + uv_strerror(rc));
  }
}

void client_conn::on_resolved(uv_getaddrinfo_t* req, int status, addrinfo* res) {
  auto* c = static_cast<client_conn*>(req->data);
  delete req;
  if (!c) {  // abandoned: timed out or closed
    if (res) uv_freeaddrinfo(res);
    return;
  }
  c->_resolve = nullptr;
  if (status < 0 || !res) {
    c->_state = state::idle;
    c->fail_all("resolve " + c->_options.host + ": " + uv_strerror(status));
    return;
  }
  std::string error;
  c->_stream = net::stream::connect(c->_loop, res->ai_addr, *c, c->_options.tls, c->_options.server_name, error);
  uv_freeaddrinfo(res);
  if (!c->_stream) {
    c->drop("connect to " + c->where() + ": " + error);
    return;
  }
  c->_state = c->_options.tls ? state::handshaking : state::connecting;
}

void client_conn::on_secure(net::stream& s) {
  _state = state::ready;
  _connect_deadline = 0;
  _server = s.peer();
  send_pending();
  arm_timer();
}

void client_conn::send_pending() {
  if (!_stream || _state != state::ready) return;
  bool any = false;
  for (auto& p : _queue) {
    if (p.sent) continue;
    p.sent = true;
    // The bytes stay until the answer: a request pipelined behind an answer
    // that closes the connection is sent again (see deliver()).
    _stream->write(p.bytes);
    any = true;
  }
  if (any) _stream->flush();
}

void client_conn::on_input(net::stream& s) {
  // Taken out of the stream first: a callback may reset the connection.
  std::string data;
  data.swap(s.input());
  parse(data);
}

void client_conn::on_end(net::stream&, net::stream_end why, std::string_view detail) {
  std::string d(detail);
  switch (why) {
    case net::stream_end::connect_failed:
      drop("connect to " + where() + ": " + d);
      return;
    case net::stream_end::tls_error:
      drop("TLS with " + _options.host + ": " + d);
      return;
    case net::stream_end::eof:
      if (_state == state::ready) peer_closed("server closed the connection (" + d + ")");
      else drop("TLS with " + _options.host + ": connection closed during the handshake");
      return;
    case net::stream_end::reset:
      drop("connection to " + _options.host + " lost: " + d);
      return;
  }
}

void client_conn::on_closed(net::stream& s) {
  // Only a stream that closed itself (a failed write) gets here: a reset
  // detaches the stream before closing it.
  if (&s != _stream) return;
  _stream = nullptr;
  drop("connection to " + _options.host + " lost: the write failed");
}

void client_conn::parse(const std::string& data) {
  size_t off = 0;
  while (off < data.size() && _stream && !_closing) {
    response_parser::result r = _parser.execute(data.data() + off, data.size() - off);
    off += r.consumed;
    if (r.what == response_parser::event::need_more) return;
    if (r.what != response_parser::event::response_complete) {
      drop(_parser.error());
      return;
    }
    if (!deliver()) return;
  }
}

bool client_conn::deliver() {
  // One response is complete: hand it to the oldest request.
  if (_queue.empty() || !_queue.front().sent) {
    drop("protocol error: a response arrived that no request asked for");
    return false;
  }
  pending p = std::move(_queue.front());
  _queue.pop_front();
  client_response r = std::move(_parser.current());
  bool close_now = !_parser.keep_alive();
  _parser.next();
  if (close_now) reset_transport();
  p.cb({}, r);  // may queue requests or close this connection
  if (close_now) {
    // A server that answers with Connection: close processes nothing sent
    // after that request (RFC 9112, 9.6) -- relay retires old connections
    // so -- so what was pipelined behind it goes again, in order, on a new
    // connection rather than failing.
    if (_closing) return false;
    for (auto& q : _queue) q.sent = false;
    if (!_queue.empty() && _state == state::idle) start_connect();
    arm_timer();
    return false;
  }
  arm_timer();
  return true;
}

void client_conn::peer_closed(const std::string& error) {
  response_parser::event e = _parser.finish();
  if (e == response_parser::event::response_complete && !deliver()) return;
  drop(error);
}

void client_conn::drop(const std::string& error) {
  reset_transport();
  fail_all(error);
}

void client_conn::fail_all(const std::string& error) {
  std::deque<pending> failed;
  failed.swap(_queue);
  for (auto& p : failed) {
    client_response none;
    p.cb(error, none);
  }
  if (!_closing) arm_timer();
}

void client_conn::reset_transport() {
  if (_stream) {
    _stream->detach();
    _stream->close();
    _stream = nullptr;
  }
  if (_resolve) {
    _resolve->data = nullptr;
    uv_cancel(reinterpret_cast<uv_req_t*>(_resolve));
    _resolve = nullptr;
  }
  _server = {};
  _state = state::idle;
  _connect_deadline = 0;
}

void client_conn::arm_timer() {
  if (_closing) return;
  uint64_t due = _connect_deadline;
  for (const auto& p : _queue)
    if (p.deadline && (!due || p.deadline < due)) due = p.deadline;
  if (!due) {
    uv_timer_stop(&_timer);
    return;
  }
  uint64_t now = uv_now(_loop);
  uv_timer_start(&_timer, on_timer, due > now ? due - now : 0, 0);
}

void client_conn::on_timer(uv_timer_t* t) {
  auto* c = static_cast<client_conn*>(t->data);
  uint64_t now = uv_now(c->_loop);
  if (c->_connect_deadline && now >= c->_connect_deadline) {
    std::string why = "connect to " + c->_options.host + ":" + std::to_string(c->_options.port) + ": timed out";
    c->drop(why);
    return;
  }
  for (const auto& p : c->_queue) {
    if (p.deadline && now >= p.deadline) {
      c->drop("timed out waiting for the response");
      return;
    }
  }
  c->arm_timer();
}

void client_conn::close() {
  if (_closing) return;
  // End the TLS stream with close_notify. Besides being polite, it keeps the
  // session resumable: OpenSSL marks a session whose connection was dropped
  // without one as not resumable.
  if (_stream && _state == state::ready) {
    _stream->detach();
    _stream->finish(net::linger_options{0, 0});
    _stream = nullptr;
  }
  drop("closed");
  _closing = true;
  uv_timer_stop(&_timer);
  uv_close(reinterpret_cast<uv_handle_t*>(&_timer), on_timer_closed);
}

void client_conn::on_timer_closed(uv_handle_t* h) { delete static_cast<client_conn*>(h->data); }

}  // namespace relay::http
