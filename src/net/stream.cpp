#include "relay/stream.h"

#include <algorithm>
#include <cassert>
#include <utility>

#include "relay/server.h"

namespace relay::net {
namespace {

constexpr size_t read_buffer_size = 64 * 1024;
// Below this a copy costs less than a record boundary and a separate
// encryption call; small answers keep one record run per flush.
constexpr size_t encrypt_in_place_bytes = 64 * 1024;
// Ciphertext made ahead of the socket from pieces taken over: enough for
// few wake-ups, small enough to stay in cache and to be reused by malloc
// (a whole 16 MiB answer encrypted at once cost its size in page faults).
constexpr size_t chunk_bytes = 256 * 1024;

// libuv calls alloc and read back to back on the loop thread, so every
// stream of a thread can share one receive buffer.
char* read_buffer() {
  thread_local std::unique_ptr<char[]> buffer(new char[read_buffer_size]);
  return buffer.get();
}

struct write_req {
  uv_write_t req;
  std::string data;  // data[0, offset) was taken by the try-write
  size_t offset = 0;
  size_t size() const { return data.size() - offset; }
};

}  // namespace

stream::stream(uv_loop_t* loop, stream_handler& h) : _handler(&h) {
  // Both handles exist from here on, so that close() is always legal.
  uv_tcp_init(loop, &_tcp);
  _tcp.data = this;
  uv_timer_init(loop, &_timer);
  _timer.data = this;
  _open_handles = 2;
}

stream* stream::accept(uv_stream_t* server, stream_handler& h, std::shared_ptr<const tls::context> tls) {
  auto* s = new stream(server->loop, h);
  if (uv_accept(server, reinterpret_cast<uv_stream_t*>(&s->_tcp)) != 0) {
    s->detach();
    s->close();
    return nullptr;
  }
  uv_tcp_nodelay(&s->_tcp, 1);
  // Long polls sit idle for up to a minute behind VPNs and load balancers;
  // keepalive probes find peers that vanished without a FIN.
  uv_tcp_keepalive(&s->_tcp, 1, 60);
  s->note_remote();
  if (tls) s->_tls = std::make_unique<tls::session>(std::move(tls));
  else s->_secure = true;  // plaintext: nothing to wait for (on_secure is not called)
  s->_is_tls = s->_tls != nullptr;
  s->start_reading();
  return s;
}

stream* stream::connect(uv_loop_t* loop, const sockaddr* addr, stream_handler& h,
                        std::shared_ptr<const tls::context> tls, std::string_view server_name,
                        std::string& error) {
  auto* s = new stream(loop, h);
  if (tls) s->_tls = std::make_unique<tls::session>(std::move(tls), server_name);
  s->_is_tls = s->_tls != nullptr;
  s->_connect.data = s;
  int rc = uv_tcp_connect(&s->_connect, &s->_tcp, addr, on_connect);
  if (rc != 0) {
    error = uv_strerror(rc);
    s->detach();
    s->close();
    return nullptr;
  }
  ++s->_pending_reqs;
  return s;
}

void stream::on_connect(uv_connect_t* req, int status) {
  auto* s = static_cast<stream*>(req->data);
  --s->_pending_reqs;
  if (s->_closing) return;
  if (status < 0) {
    s->end(stream_end::connect_failed, uv_strerror(status));
    return;
  }
  uv_tcp_nodelay(&s->_tcp, 1);
  uv_tcp_keepalive(&s->_tcp, 1, 60);
  s->note_remote();
  s->start_reading();
  if (!s->_tls) {
    s->became_secure();
    return;
  }
  if (s->_tls->start() == tls::session::status::error) {
    s->end(stream_end::tls_error, s->_tls->error());
    return;
  }
  s->_tls->take_output(s->_out);
  s->send_bytes();
}

void stream::note_remote() {
  sockaddr_storage peer{};
  int len = sizeof peer;
  if (uv_tcp_getpeername(&_tcp, reinterpret_cast<sockaddr*>(&peer), &len) == 0)
    _remote = format_address(reinterpret_cast<sockaddr*>(&peer));
}

std::string_view stream::remote_ip() const {
  std::string_view r = _remote;
  if (!r.empty() && r.front() == '[') return r.substr(1, r.find(']') - 1);
  return r.substr(0, r.rfind(':'));
}

void stream::set_reading(bool on) {
  _reading_wanted = on;
  if (_closing) return;
  if (_finishing) return;  // finish() reads (and discards) until the end
  if (on) start_reading();
  else if (_reading) {
    uv_read_stop(reinterpret_cast<uv_stream_t*>(&_tcp));
    _reading = false;
  }
}

void stream::start_reading() {
  if (_reading || _closing) return;
  if (!_reading_wanted && !_finishing) return;
  if (uv_read_start(reinterpret_cast<uv_stream_t*>(&_tcp), on_alloc, on_read) == 0) _reading = true;
}

void stream::on_alloc(uv_handle_t*, size_t, uv_buf_t* buf) {
  buf->base = read_buffer();
  buf->len = read_buffer_size;
}

void stream::on_read(uv_stream_t* h, ssize_t nread, const uv_buf_t* buf) {
  auto* s = static_cast<stream*>(h->data);
  if (nread == 0 || s->_closing) return;
  if (nread < 0) {
    if (s->_finishing) {
      s->close();  // the peer's EOF ends the lingering close
      return;
    }
    s->end(nread == UV_EOF ? stream_end::eof : stream_end::reset, uv_strerror(static_cast<int>(nread)));
    return;
  }
  if (s->_finishing) {
    // Discard: the answer is final. Each read earns the peer another
    // between_ms, never past the total.
    uint64_t now = uv_now(s->loop());
    uint64_t due = std::min(s->_linger_deadline, now + s->_linger.between_ms);
    uv_timer_start(&s->_timer, on_timer, due > now ? due - now : 0, 0);
    return;
  }
  s->received(buf->base, static_cast<size_t>(nread));
}

void stream::received(const char* data, size_t len) {
  if (!_tls) {
    _input.append(data, len);
    if (_handler) _handler->on_input(*this);
    return;
  }
  tls::session::status st = _tls->receive(data, len, _input);
  // Handshake messages, tickets, alerts: whatever the library wants sent.
  _tls->take_output(_out);
  send_bytes();
  if (_closing) return;
  if (st == tls::session::status::error) {
    end(stream_end::tls_error, _tls->error());
    return;
  }
  if (!_secure && _tls->handshake_complete()) {
    became_secure();
    if (_closing || _finishing) return;
  }
  if (!_input.empty() && _handler && _secure) _handler->on_input(*this);
  if (_closing || _finishing) return;
  if (st == tls::session::status::closed) {
    _close_notify = true;
    end(stream_end::eof, "the peer sent close_notify");
  }
}

void stream::became_secure() {
  if (_tls) {
    _peer = _tls->peer_identity();
    // References to objects the session already holds: no copy.
    _peer_chain = _tls->peer_certificates();
  }
  if (!_peer.refused.empty()) {
    // Verified by the CA, but not readable as exactly one principal.
    end(stream_end::tls_error, "peer certificate refused: " + _peer.refused);
    return;
  }
  _secure = true;
  if (_handler) _handler->on_secure(*this);
}

void stream::write(std::string_view plain) {
  if (_closing || _finishing) return;
  if (!_tls || plain.size() < encrypt_in_place_bytes || !_tls->handshake_complete()) {
    _plain_out.append(plain);
    return;
  }
  if (!_pieces.empty()) {
    // Behind pieces not yet encrypted: it waits its turn, as a copy.
    write_owned(std::string(plain));
    return;
  }
  if ((!_plain_out.empty() && _tls->write(_plain_out) == tls::session::status::error) ||
      _tls->write(plain) == tls::session::status::error) {
    _plain_out.clear();
    close();
    return;
  }
  _plain_out.clear();
  _tls->take_output(_out);
}

void stream::write_owned(std::string&& plain, std::shared_ptr<void> keep) {
  if (_closing || _finishing) return;
  if (!_tls || plain.size() < encrypt_in_place_bytes || !_tls->handshake_complete()) {
    write(std::string_view(plain));
    return;
  }
  // What was queued before goes first.
  if (!_plain_out.empty()) {
    _pieces_bytes += _plain_out.size();
    _pieces.push_back(piece{std::exchange(_plain_out, std::string()), 0});
  }
  _pieces_bytes += plain.size();
  _pieces.push_back(piece{std::move(plain), 0, std::move(keep)});
}

void stream::encrypt_pieces() {
  while (!_closing && !_pieces.empty() && _out.size() + _in_flight < chunk_bytes) {
    piece& p = _pieces.front();
    size_t n = std::min(chunk_bytes, p.data.size() - p.offset);
    if (_tls->write(std::string_view(p.data).substr(p.offset, n)) == tls::session::status::error) {
      close();
      return;
    }
    _tls->take_output(_out);
    p.offset += n;
    _pieces_bytes -= n;
    if (p.offset == p.data.size()) _pieces.pop_front();
  }
}

void stream::pump() {
  for (;;) {
    encrypt_pieces();
    send_bytes();
    // Unless the socket took everything at once (then the next chunk, now),
    // the write completion continues.
    if (_closing || _pieces.empty() || _in_flight > 0 || !_out.empty()) return;
  }
}

void stream::flush() {
  if (_closing) return;
  if (!_plain_out.empty() && !_pieces.empty()) {
    // Behind pieces not yet encrypted: it waits its turn.
    _pieces_bytes += _plain_out.size();
    _pieces.push_back(piece{std::exchange(_plain_out, std::string()), 0});
  }
  if (!_plain_out.empty()) {
    if (_tls) {
      if (_tls->write(_plain_out) == tls::session::status::error) {
        _plain_out.clear();
        close();
        return;
      }
      _plain_out.clear();
      _tls->take_output(_out);
    } else if (_out.empty()) {
      _out.swap(_plain_out);
    } else {
      _out += _plain_out;
      _plain_out.clear();
    }
    // A large answer's buffer is not kept by an idle connection.
    if (_plain_out.capacity() > 16 * 1024) std::string().swap(_plain_out);
  }
  pump();
}

void stream::send_bytes() {
  if (_out.empty() || _closing) return;
  // Most answers fit the socket buffer: try without a request allocation,
  // and queue only what is left.
  int n = UV_EAGAIN;
  if (_in_flight == 0) {
    uv_buf_t b = uv_buf_init(_out.data(), static_cast<unsigned>(_out.size()));
    n = uv_try_write(reinterpret_cast<uv_stream_t*>(&_tcp), &b, 1);
  }
  if (n < 0 && n != UV_EAGAIN && n != UV_ENOSYS) {
    _out.clear();
    close();  // the handler hears on_closed(); a reset needs no more words
    return;
  }
  size_t sent = n > 0 ? static_cast<size_t>(n) : 0;
  if (sent < _out.size()) {
    // The buffer itself moves to the request: a large answer's rest is
    // not copied again.
    auto* w = new write_req;
    w->req.data = this;
    w->data.swap(_out);
    w->offset = sent;
    uv_buf_t b = uv_buf_init(w->data.data() + sent, static_cast<unsigned>(w->size()));
    if (uv_write(&w->req, reinterpret_cast<uv_stream_t*>(&_tcp), &b, 1, on_write_done) != 0) {
      delete w;  // the callback will not run
      close();
      return;
    }
    _in_flight += w->size();
  }
  std::string().swap(_out);
  if (_in_flight == 0 && _finishing) maybe_finish_write_side();
}

void stream::on_write_done(uv_write_t* req, int status) {
  auto* w = reinterpret_cast<write_req*>(req);
  auto* s = static_cast<stream*>(req->data);
  s->_in_flight -= w->size();
  delete w;
  if (s->_closing) return;
  if (status < 0) {
    if (s->_finishing) s->close();
    else s->end(stream_end::reset, uv_strerror(status));
    return;
  }
  if (s->_in_flight > 0 || !s->_out.empty()) return;
  if (!s->_pieces.empty()) {
    s->pump();
    if (s->_closing || s->_in_flight > 0 || !s->_out.empty() || !s->_pieces.empty()) return;
  }
  if (s->_finishing) s->maybe_finish_write_side();
  else if (s->_handler) s->_handler->on_drained(*s);
}

void stream::finish(const linger_options& linger) {
  if (_closing || _finishing) return;
  _finishing = true;
  _ended = true;
  _linger = linger;
  // close_notify goes after the last answer, never before it.
  if (_tls && _tls->handshake_complete()) {
    for (const piece& p : _pieces)
      if (_tls->write(std::string_view(p.data).substr(p.offset)) == tls::session::status::error) {
        close();
        return;
      }
    _pieces.clear();
    _pieces_bytes = 0;
    if (!_plain_out.empty() && _tls->write(_plain_out) == tls::session::status::error) {
      close();
      return;
    }
    _plain_out.clear();
    _tls->shutdown();
    _tls->take_output(_out);
  } else if (_tls) {
    _plain_out.clear();
    _tls->take_output(_out);  // an alert, if the handshake failed
  }
  _pieces.clear();  // written above, or never encryptable (no handshake)
  _pieces_bytes = 0;
  // Nothing more is read through TLS or handed to the handler.
  _tls.reset();
  std::string().swap(_input);
  // Keep reading (and discarding) while the answer is written: a client
  // still sending a body it was refused would otherwise block on its write
  // and never read the answer. Time bounds the whole close, not bytes.
  _linger_deadline = uv_now(loop()) + linger.total_ms;
  uv_timer_start(&_timer, on_timer, linger.total_ms, 0);
  start_reading();
  flush();
}

void stream::maybe_finish_write_side() {
  if (_shut || _closing) return;
  if (_linger.total_ms == 0) {
    close();
    return;
  }
  // Closing a socket with unread input makes the kernel send a reset, which
  // can destroy the answer (a 413, a 408) before the client reads it. Send
  // FIN instead and close on the client's EOF or when the linger runs out.
  _shutdown.data = this;
  if (uv_shutdown(&_shutdown, reinterpret_cast<uv_stream_t*>(&_tcp), on_shutdown) != 0) {
    close();
    return;
  }
  ++_pending_reqs;
  _shut = true;
  _lingering = true;
  uint64_t now = uv_now(loop());
  uint64_t due = std::min(_linger_deadline, now + _linger.between_ms);
  uv_timer_start(&_timer, on_timer, due > now ? due - now : 0, 0);
}

void stream::on_shutdown(uv_shutdown_t* req, int status) {
  auto* s = static_cast<stream*>(req->data);
  --s->_pending_reqs;
  if (status < 0 && !s->_closing) s->close();
}

void stream::release_tls_input_buffer() {
  if (_tls) _tls->release_input_buffer();
}

void stream::arm_timer(uint32_t ms) {
  if (_closing || _finishing) return;
  if (ms == 0) uv_timer_stop(&_timer);
  else uv_timer_start(&_timer, on_timer, ms, 0);
}

void stream::on_timer(uv_timer_t* t) {
  auto* s = static_cast<stream*>(t->data);
  if (s->_closing) return;
  if (s->_finishing) {
    s->close();
    return;
  }
  if (s->_handler) s->_handler->on_timeout(*s);
}

void stream::end(stream_end why, std::string_view detail) {
  if (_ended || _closing) return;
  _ended = true;
  if (_handler) _handler->on_end(*this, why, detail);
  if (_closing) return;
  if (why == stream_end::tls_error && !_out.empty()) {
    // Send the alert the library produced, then close (a short linger, so
    // that the peer reads the alert rather than a reset).
    finish(linger_options{2000, 1000});
    return;
  }
  close();
}

void stream::close() {
  if (_closing) return;
  _closing = true;
  _pieces.clear();
  _pieces_bytes = 0;
  _reading = false;
  uv_timer_stop(&_timer);
  uv_close(reinterpret_cast<uv_handle_t*>(&_timer), on_handle_closed);
  uv_close(reinterpret_cast<uv_handle_t*>(&_tcp), on_handle_closed);
}

void stream::on_handle_closed(uv_handle_t* h) {
  auto* s = static_cast<stream*>(h->data);
  if (--s->_open_handles > 0) return;
  // libuv runs cancelled write/connect/shutdown callbacks before the close
  // callback, so nothing refers to the stream after this.
  assert(s->_pending_reqs == 0 && s->_in_flight == 0);
  if (s->_handler) s->_handler->on_closed(*s);
  delete s;
}

}  // namespace relay::net
