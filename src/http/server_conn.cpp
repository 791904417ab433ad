#include <cassert>

#include "relay/log.h"
#include "relay/server.h"

namespace relay::net {
namespace {

constexpr size_t read_buffer_size = 64 * 1024;
constexpr uint32_t linger_ms = 2000;             // how long to wait for the client's EOF
constexpr size_t linger_max_bytes = 256 * 1024;  // how much of its input to discard meanwhile

struct write_req {
  uv_write_t req;
  std::string data;
};

}  // namespace

server_conn::server_conn(listener& owner, uint64_t id)
    : _owner(owner), _id(id), _parser(owner._options.conn.http) {}

server_conn::~server_conn() = default;

bool server_conn::start(uv_stream_t* server) {
  uv_loop_t* loop = server->loop;
  uv_tcp_init(loop, &_tcp);
  _tcp.data = this;
  ++_open_handles;
  uv_timer_init(loop, &_timer);
  _timer.data = this;
  ++_open_handles;
  if (uv_accept(server, reinterpret_cast<uv_stream_t*>(&_tcp)) != 0) return false;
  uv_tcp_nodelay(&_tcp, 1);
  // Long polls sit idle for up to a minute behind VPNs and load balancers;
  // keepalive probes find peers that vanished without a FIN.
  uv_tcp_keepalive(&_tcp, 1, 60);
  sockaddr_storage peer{};
  int len = sizeof peer;
  if (uv_tcp_getpeername(&_tcp, reinterpret_cast<sockaddr*>(&peer), &len) == 0)
    _remote = format_address(reinterpret_cast<sockaddr*>(&peer));

  if (_owner._options.tls) {
    auto ctx = _owner._options.tls();
    if (!ctx) return false;
    _tls = std::make_unique<tls::session>(std::move(ctx));
    _phase = phase::handshake;
    arm_timer(_owner._options.conn.header_timeout_ms);
  } else {
    handshake_done();
  }
  update_reading();
  return true;
}

void server_conn::handshake_done() {
  if (_tls) _peer = _tls->peer_identity();
  _phase = phase::idle;
  arm_timer(_owner._options.conn.idle_timeout_ms);
  _owner._handler.on_connected(*this);
}

void server_conn::arm_timer(uint32_t ms) {
  if (ms == 0) {
    uv_timer_stop(&_timer);
    return;
  }
  uv_timer_start(&_timer, on_timeout, ms, 0);
}

void server_conn::update_reading() {
  if (_closing || _lingering) return;
  // Keep reading while a request is handled, so that a client who hangs up
  // on a parked long poll is noticed at once; stop only when too much input
  // or output is waiting.
  bool want = (_in.size() - _in_offset) < _owner._options.conn.max_pending_input &&
              _in_flight < _owner._options.conn.max_pending_output && !_close_after_write;
  if (want && !_reading) {
    uv_read_start(reinterpret_cast<uv_stream_t*>(&_tcp), on_alloc, on_read);
    _reading = true;
  } else if (!want && _reading) {
    uv_read_stop(reinterpret_cast<uv_stream_t*>(&_tcp));
    _reading = false;
  }
}

void server_conn::on_alloc(uv_handle_t* h, size_t, uv_buf_t* buf) {
  auto* c = static_cast<server_conn*>(h->data);
  buf->base = c->_owner._read_buffer.get();
  buf->len = read_buffer_size;
}

void server_conn::on_read(uv_stream_t* s, ssize_t nread, const uv_buf_t* buf) {
  auto* c = static_cast<server_conn*>(s->data);
  if (nread == 0) return;
  if (c->_lingering && nread > 0) {
    c->_lingered += static_cast<size_t>(nread);
    if (c->_lingered > linger_max_bytes) c->close();
    return;
  }
  if (nread < 0) {
    // EOF or a reset. A half-closed client cannot read our answer either
    // (HTTP/1.1 clients do not half-close), so close.
    if (c->_phase == phase::handshake && nread != UV_EOF) c->_owner._handshake_failures.inc();
    c->close();
    return;
  }
  c->received(buf->base, static_cast<size_t>(nread));
}

void server_conn::received(const char* data, size_t len) {
  if (_closing) return;
  if (!_tls) {
    _in.append(data, len);
  } else {
    _tls->feed(data, len);
    tls::session::status st = _tls->read(_in);
    if (_phase == phase::handshake && _tls->handshake_complete()) handshake_done();
    if (st == tls::session::status::error) {
      if (_phase == phase::handshake) {
        _owner._handshake_failures.inc();
        log::warn("tls_handshake_failed")
            .str("listener", _owner._options.name)
            .str("remote", _remote)
            .str("reason", _tls->error());
      } else {
        log::info("tls_error").str("listener", _owner._options.name).str("remote", _remote).str("reason", _tls->error());
      }
      // Send the alert the library produced, then close.
      _close_after_write = true;
      flush();
      return;
    }
    if (st == tls::session::status::closed) {
      close();
      return;
    }
  }
  process();
  flush();
}

void server_conn::process() {
  if (_in_process) return;
  _in_process = true;
  while (!_closing && !_close_after_write && _phase != phase::handshake && _phase != phase::handling &&
         _in_offset < _in.size() && _in_flight < _owner._options.conn.max_pending_output) {
    if (_phase == phase::idle) {
      _phase = phase::reading;
      _body_timer = false;
      arm_timer(_owner._options.conn.header_timeout_ms);
    }
    auto r = _parser.execute(_in.data() + _in_offset, _in.size() - _in_offset);
    _in_offset += r.consumed;
    if (_parser.headers_complete() && !_body_timer && _phase == phase::reading) {
      _body_timer = true;
      arm_timer(_owner._options.conn.idle_timeout_ms);
    }
    if (r.what == http::request_parser::event::need_more) break;
    if (r.what == http::request_parser::event::expects_continue) {
      _pending += "HTTP/1.1 100 Continue\r\n\r\n";
      continue;
    }
    if (r.what == http::request_parser::event::error) {
      _owner._handler.on_rejected(*this, _parser.error());
      reject(_parser.error(), _parser.error_detail());
      break;
    }
    _phase = phase::handling;
    uv_timer_stop(&_timer);
    _owner._handler.on_request(*this, _parser.current());  // may respond now
  }
  // Drop consumed input; keep any partial next request. An empty buffer is
  // released: SSL_read grows it in 16 KiB steps, and an idle connection
  // should cost little.
  if (_in_offset == _in.size()) {
    std::string().swap(_in);
    _in_offset = 0;
  } else if (_in_offset > 0 && _in_offset >= _in.size() / 2) {
    _in.erase(0, _in_offset);
    _in_offset = 0;
  }
  _in_process = false;
  update_reading();
}

void server_conn::respond(int status, std::string_view body, std::string_view extra_headers,
                          std::string_view content_type) {
  if (_closing || _phase != phase::handling) return;
  _abandon = nullptr;
  bool close_after = !_parser.current().keep_alive || _draining;
  http::write_response(_pending, status, content_type, body, extra_headers, close_after);
  finish_response(close_after);
}

void server_conn::respond_error(api_error e, std::string_view detail) {
  const auto& info = describe(e);
  respond(info.status, api_error_body(e, detail), api_error_headers(e));
}

void server_conn::finish_response(bool close_after) {
  _parser.next();
  _phase = phase::idle;
  if (close_after) {
    _close_after_write = true;
  } else {
    arm_timer(_owner._options.conn.idle_timeout_ms);
  }
  if (!_in_process) {
    // Answered later (a long poll): carry on with pipelined requests.
    process();
    flush();
  }
}

void server_conn::reject(api_error e, std::string_view detail) {
  // The stream can no longer be trusted: answer, then close.
  const auto& info = describe(e);
  http::write_response(_pending, info.status, "application/json", api_error_body(e, detail),
                       api_error_headers(e), true);
  _parser.next();
  _phase = phase::idle;
  _close_after_write = true;
  uv_timer_stop(&_timer);
}

void server_conn::flush() {
  if (_closing) return;
  if (_tls) {
    if (!_pending.empty()) {
      if (_tls->write(_pending) == tls::session::status::error) {
        _pending.clear();
        close();
        return;
      }
      _pending.clear();
    }
    // close_notify goes after the last response, never before it.
    if (_close_after_write && !_notify_sent && _tls->handshake_complete()) {
      _tls->shutdown();
      _notify_sent = true;
    }
    _tls->take_output(_out);
  } else if (!_pending.empty()) {
    if (_out.empty()) _out.swap(_pending);
    else _out += _pending;
    _pending.clear();
  }
  if (!_out.empty()) {
    // Most responses fit the socket buffer: try to send without a request
    // allocation, and queue only what is left.
    int n = UV_EAGAIN;
    if (_in_flight == 0) {
      uv_buf_t b = uv_buf_init(_out.data(), static_cast<unsigned>(_out.size()));
      n = uv_try_write(reinterpret_cast<uv_stream_t*>(&_tcp), &b, 1);
    }
    if (n < 0 && n != UV_EAGAIN) {
      close();
      return;
    }
    size_t sent = n > 0 ? static_cast<size_t>(n) : 0;
    if (sent < _out.size()) {
      auto* w = new write_req;
      w->req.data = this;
      w->data.assign(_out, sent, std::string::npos);
      uv_buf_t b = uv_buf_init(w->data.data(), static_cast<unsigned>(w->data.size()));
      int rc = uv_write(&w->req, reinterpret_cast<uv_stream_t*>(&_tcp), &b, 1, on_write_done);
      if (rc != 0) {  // the callback will not run
        delete w;
        _out.clear();
        close();
        return;
      }
      _in_flight += w->data.size();
    }
    std::string().swap(_out);
  }
  if (_pending.capacity() > 16 * 1024) std::string().swap(_pending);
  if (_close_after_write && _in_flight == 0) linger();
  else update_reading();
}

void server_conn::linger() {
  if (_lingering || _closing) return;
  // Closing a socket with unread input makes the kernel send a reset, which
  // can destroy the answer (a 413, a 408) before the client reads it. Send
  // FIN instead, discard what the client still sends, and close on its EOF
  // or after a short grace period.
  _lingering = true;
  _shutdown.data = this;
  if (uv_shutdown(&_shutdown, reinterpret_cast<uv_stream_t*>(&_tcp), on_shutdown) != 0) {
    close();
    return;
  }
  ++_pending_reqs;
  arm_timer(linger_ms);
  if (!_reading) {
    uv_read_start(reinterpret_cast<uv_stream_t*>(&_tcp), on_alloc, on_read);
    _reading = true;
  }
}

void server_conn::on_shutdown(uv_shutdown_t* req, int status) {
  auto* c = static_cast<server_conn*>(req->data);
  --c->_pending_reqs;
  if (status < 0 && !c->_closing) c->close();
  else if (c->_closing && c->_pending_reqs == 0 && c->_open_handles == 0) delete c;
}

void server_conn::on_write_done(uv_write_t* req, int status) {
  auto* w = reinterpret_cast<write_req*>(req);
  auto* c = static_cast<server_conn*>(req->data);
  c->_in_flight -= w->data.size();
  delete w;
  if (c->_closing) return;
  if (status < 0) {
    c->close();
    return;
  }
  if (c->_close_after_write && c->_in_flight == 0) {
    c->linger();
    return;
  }
  // Output drained: requests held back by the output limit may proceed.
  c->process();
  c->flush();
}

void server_conn::on_timeout(uv_timer_t* t) {
  auto* c = static_cast<server_conn*>(t->data);
  if (c->_lingering) {
    c->close();
    return;
  }
  c->_owner._timeouts.inc();
  switch (c->_phase) {
    case phase::handshake:
      c->_owner._handshake_failures.inc();
      log::info("tls_handshake_timeout").str("listener", c->_owner._options.name).str("remote", c->_remote);
      c->close();
      break;
    case phase::reading:
      log::info("request_timeout").str("listener", c->_owner._options.name).str("remote", c->_remote);
      c->_owner._handler.on_rejected(*c, api_error::request_timeout);
      c->reject(api_error::request_timeout, {});
      c->flush();
      break;
    case phase::idle:
      c->close();
      break;
    case phase::handling:
      break;  // the handler owns the timing of its answer
  }
}

void server_conn::begin_drain() {
  _draining = true;
  if (_phase == phase::idle || _phase == phase::handshake) {
    _close_after_write = true;
    flush();
  }
}

void server_conn::close() {
  if (_closing) return;
  _closing = true;
  if (_abandon) {
    auto hook = std::move(_abandon);
    _abandon = nullptr;
    hook();
  }
  _owner.remove(this);
  uv_timer_stop(&_timer);
  uv_close(reinterpret_cast<uv_handle_t*>(&_timer), on_handle_closed);
  uv_close(reinterpret_cast<uv_handle_t*>(&_tcp), on_handle_closed);
}

void server_conn::on_handle_closed(uv_handle_t* h) {
  auto* c = static_cast<server_conn*>(h->data);
  if (--c->_open_handles == 0 && c->_pending_reqs == 0) delete c;
}

}  // namespace relay::net
