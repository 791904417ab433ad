#include <arpa/inet.h>

#include <cassert>

#include "relay/http_client.h"
#include "relay/server.h"

namespace relay::http {
namespace {

struct write_req {
  uv_write_t req;
  std::string data;
};

}  // namespace

// Lifetime: the object is freed from its timer's close callback. A connect
// or getaddrinfo request still pending then is detached first (data = null),
// because libuv may run its callback after the timer's close callback.

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
  _plain.clear();
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
  c->_tcp = new uv_tcp_t;
  uv_tcp_init(c->_loop, c->_tcp);
  c->_tcp->data = c;
  c->_connect = new uv_connect_t;
  c->_connect->data = c;
  int rc = uv_tcp_connect(c->_connect, c->_tcp, res->ai_addr, on_connect);
  uv_freeaddrinfo(res);
  if (rc != 0) {
    delete c->_connect;
    c->_connect = nullptr;
    c->drop("connect to " + c->_options.host + ":" + std::to_string(c->_options.port) + ": " + uv_strerror(rc));
    return;
  }
  c->_state = state::connecting;
}

void client_conn::on_connect(uv_connect_t* req, int status) {
  auto* c = static_cast<client_conn*>(req->data);
  delete req;
  if (!c) return;  // the handle was closed under this request
  c->_connect = nullptr;
  if (status < 0) {
    c->drop("connect to " + c->_options.host + ":" + std::to_string(c->_options.port) + ": " + uv_strerror(status));
    return;
  }
  c->connected_tcp();
}

void client_conn::connected_tcp() {
  uv_tcp_nodelay(_tcp, 1);
  uv_tcp_keepalive(_tcp, 1, 60);
  uv_read_start(reinterpret_cast<uv_stream_t*>(_tcp), on_alloc, on_read);
  if (!_options.tls) {
    ready();
    return;
  }
  _state = state::handshaking;
  _tls = std::make_unique<tls::session>(_options.tls, _options.server_name);
  if (_tls->start() == tls::session::status::error) {
    std::string why = "TLS with " + _options.host + ": " + _tls->error();
    drop(why);
    return;
  }
  std::string out;
  _tls->take_output(out);
  write_out(out);
}

void client_conn::ready() {
  _state = state::ready;
  _connect_deadline = 0;
  if (_tls) _server = _tls->peer_identity();
  send_pending();
  arm_timer();
}

void client_conn::send_pending() {
  std::string batch;
  for (auto& p : _queue) {
    if (p.sent) continue;
    p.sent = true;
    batch += p.bytes;
    p.bytes.clear();
    p.bytes.shrink_to_fit();
  }
  if (batch.empty()) return;
  if (_tls) {
    if (_tls->write(batch) == tls::session::status::error) {
      std::string why = "TLS write: " + _tls->error();
      drop(why);
      return;
    }
    std::string out;
    _tls->take_output(out);
    write_out(out);
  } else {
    write_out(batch);
  }
}

void client_conn::write_out(std::string& bytes) {
  if (bytes.empty() || !_tcp) return;
  auto* w = new write_req;
  w->req.data = this;
  w->data = std::move(bytes);
  uv_buf_t b = uv_buf_init(w->data.data(), static_cast<unsigned>(w->data.size()));
  int rc = uv_write(&w->req, reinterpret_cast<uv_stream_t*>(_tcp), &b, 1, on_write_done);
  if (rc != 0) {
    delete w;
    drop(std::string("write: ") + uv_strerror(rc));
  }
}

void client_conn::on_write_done(uv_write_t* req, int status) {
  auto* w = reinterpret_cast<write_req*>(req);
  delete w;
  // Errors also surface as a failed read, which fails the requests; a
  // cancelled write belongs to a transport already reset.
  (void)status;
}

void client_conn::on_alloc(uv_handle_t* h, size_t, uv_buf_t* buf) {
  auto* c = static_cast<client_conn*>(h->data);
  buf->base = c->_read_buffer;
  buf->len = sizeof c->_read_buffer;
}

void client_conn::on_read(uv_stream_t* s, ssize_t nread, const uv_buf_t* buf) {
  auto* c = static_cast<client_conn*>(s->data);
  if (nread == 0 || c->_tcp != reinterpret_cast<uv_tcp_t*>(s)) return;
  if (nread < 0) {
    std::string why = c->_state == state::handshaking
                          ? "TLS with " + c->_options.host + ": connection closed during the handshake"
                          : std::string("connection to ") + c->_options.host + " lost: " + uv_strerror(static_cast<int>(nread));
    if (nread == UV_EOF && c->_state == state::ready) c->peer_closed(why);
    else c->drop(why);
    return;
  }
  c->received(buf->base, static_cast<size_t>(nread));
}

void client_conn::received(const char* data, size_t len) {
  if (!_tls) {
    parse(data, len);
    return;
  }
  _tls->feed(data, len);
  tls::session::status st = _tls->read(_plain);
  std::string out;
  _tls->take_output(out);
  write_out(out);
  if (st == tls::session::status::error) {
    std::string why = "TLS with " + _options.host + ": " + _tls->error();
    drop(why);
    return;
  }
  if (_state == state::handshaking && _tls->handshake_complete()) ready();
  if (!_plain.empty()) {
    std::string plain;
    plain.swap(_plain);
    parse(plain.data(), plain.size());
  }
  if (st == tls::session::status::closed && _tcp) {
    peer_closed("server closed the TLS session");
  }
}

void client_conn::parse(const char* data, size_t len) {
  size_t off = 0;
  while (off < len && _tcp && !_closing) {
    response_parser::result r = _parser.execute(data + off, len - off);
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
    fail_all("server closed the connection");
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
  if (_tcp) {
    uv_read_stop(reinterpret_cast<uv_stream_t*>(_tcp));
    uv_close(reinterpret_cast<uv_handle_t*>(_tcp), on_tcp_closed);
    _tcp = nullptr;
  }
  if (_connect) {
    _connect->data = nullptr;  // its callback only frees it
    _connect = nullptr;
  }
  if (_resolve) {
    _resolve->data = nullptr;
    uv_cancel(reinterpret_cast<uv_req_t*>(_resolve));
    _resolve = nullptr;
  }
  _tls.reset();
  _server = {};
  _plain.clear();
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
  if (_tls && _state == state::ready) {
    _tls->shutdown();
    std::string bytes;
    _tls->take_output(bytes);
    write_out(bytes);
  }
  drop("closed");
  _closing = true;
  uv_timer_stop(&_timer);
  uv_close(reinterpret_cast<uv_handle_t*>(&_timer), on_timer_closed);
}

void client_conn::on_tcp_closed(uv_handle_t* h) { delete reinterpret_cast<uv_tcp_t*>(h); }

void client_conn::on_timer_closed(uv_handle_t* h) { delete static_cast<client_conn*>(h->data); }

}  // namespace relay::http
