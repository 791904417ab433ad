#include <arpa/inet.h>

#include <algorithm>
#include <cassert>
#include <cstring>

#include <openssl/bio.h>

#include "relay/tls.h"
#include "tls/compat.h"

namespace relay::tls {
namespace {

bool is_ip_address(std::string_view name) {
  std::string s(name);
  unsigned char buf[16];
  return inet_pton(AF_INET, s.c_str(), buf) == 1 || inet_pton(AF_INET6, s.c_str(), buf) == 1;
}

}  // namespace

session::session(std::shared_ptr<const context> ctx) : _ctx(std::move(ctx)) {
  assert(_ctx->is_server());
  init(true);
}

session::session(std::shared_ptr<const context> ctx, std::string_view server_name)
    : _ctx(std::move(ctx)) {
  assert(!_ctx->is_server());
  init(false);
  if (!_ssl) return;
  if (SSL_SESSION* cached = _ctx->cached_session()) SSL_set_session(_ssl, cached);
  std::string name(server_name);
  if (is_ip_address(name)) {
    X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(_ssl), name.c_str());
  } else {
    compat::set_server_name(_ssl, name.c_str());
    // Require the name in the server certificate's SAN; no wildcard games
    // beyond the single left-most label.
    SSL_set1_host(_ssl, name.c_str());
    X509_VERIFY_PARAM_set_hostflags(SSL_get0_param(_ssl), X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
  }
}

void session::init(bool server) {
  _ssl = SSL_new(_ctx->native());
  // One method for both directions; the session is the BIO's data.
  static BIO_METHOD* method = [] {
    BIO_METHOD* m = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "relay session");
    if (!m) return m;
    BIO_meth_set_read(m, on_bio_read);
    BIO_meth_set_write(m, on_bio_write);
    BIO_meth_set_ctrl(m, on_bio_ctrl);
    return m;
  }();
  auto new_bio = [this] {
    BIO* b = method ? BIO_new(method) : nullptr;
    if (!b) return b;
    BIO_set_data(b, this);
    BIO_set_init(b, 1);
    return b;
  };
  _in = new_bio();
  _out = new_bio();
  if (!_ssl || !_in || !_out) {
    _error = "cannot allocate TLS session: " + compat::drain_error_queue();
    if (_ssl) SSL_free(_ssl);
    if (_in) BIO_free(_in);
    if (_out) BIO_free(_out);
    _ssl = nullptr;
    _in = _out = nullptr;
    return;
  }
  SSL_set_bio(_ssl, _in, _out);  // _ssl owns both from here on
  if (server) {
    SSL_set_accept_state(_ssl);
    // Ex-data slot 0 is the "app data" slot; nothing else uses it on a session.
    SSL_set_ex_data(_ssl, 0, this);
    SSL_set_verify(_ssl, SSL_get_verify_mode(_ssl), on_verify);
  } else {
    SSL_set_connect_state(_ssl);
  }
}

int session::on_bio_read(BIO* b, char* out, int len) {
  auto* s = static_cast<session*>(BIO_get_data(b));
  BIO_clear_retry_flags(b);
  if (len <= 0) return 0;
  size_t want = static_cast<size_t>(len);
  size_t saved = s->_in_saved.size() - s->_in_saved_off;
  if (saved > 0) {
    size_t n = std::min(want, saved);
    std::memcpy(out, s->_in_saved.data() + s->_in_saved_off, n);
    s->_in_saved_off += n;
    if (s->_in_saved_off == s->_in_saved.size()) {
      s->_in_saved.clear();  // capacity kept for the next partial record
      s->_in_saved_off = 0;
    }
    return static_cast<int>(n);
  }
  if (s->_in_span_len > 0) {
    size_t n = std::min(want, s->_in_span_len);
    std::memcpy(out, s->_in_span, n);
    s->_in_span += n;
    s->_in_span_len -= n;
    return static_cast<int>(n);
  }
  // Nothing buffered means "wait for more", not end of stream: the TCP
  // stream's end is reported by the stream, not through the session.
  BIO_set_retry_read(b);
  return -1;
}

int session::on_bio_write(BIO* b, const char* in, int len) {
  auto* s = static_cast<session*>(BIO_get_data(b));
  BIO_clear_retry_flags(b);
  if (len <= 0) return 0;
  s->_out_buf.append(in, static_cast<size_t>(len));
  return len;
}

long session::on_bio_ctrl(BIO* b, int cmd, long, void*) {
  auto* s = static_cast<session*>(BIO_get_data(b));
  switch (cmd) {
    case BIO_CTRL_PENDING:
      // Only the input side is ever asked; the output side is never behind.
      return b == s->_in ? static_cast<long>(s->input_pending()) : 0;
    case BIO_CTRL_WPENDING:
      return 0;
    case BIO_CTRL_FLUSH:
      return 1;  // ciphertext is handed out by take_output()
    default:
      return 0;  // anything else (EOF queries, kTLS, datagram controls): unsupported
  }
}

int session::on_verify(int ok, X509_STORE_CTX* store) {
  if (ok) return ok;
  auto* ssl = static_cast<SSL*>(X509_STORE_CTX_get_ex_data(store, SSL_get_ex_data_X509_STORE_CTX_idx()));
  auto* self = ssl ? static_cast<session*>(SSL_get_ex_data(ssl, 0)) : nullptr;
  if (self && self->_refused_certificate.empty())
    self->_refused_certificate = summarize_certificate(X509_STORE_CTX_get0_cert(store));
  return ok;
}

session::~session() {
  if (_ssl) SSL_free(_ssl);
}

session::status session::fail(int ret) {
  int err = SSL_get_error(_ssl, ret);
  switch (err) {
    case SSL_ERROR_WANT_READ:
      // The input BIO is empty: nothing is lost, more ciphertext is needed.
      return status::ok;
    case SSL_ERROR_WANT_WRITE:
      // The output BIO grows without bound, so writes never block.
      return status::ok;
    case SSL_ERROR_ZERO_RETURN:
      // The peer sent close_notify: a clean end of the TLS stream.
      return status::closed;
    case SSL_ERROR_SYSCALL: {
      // With memory BIOs there is no syscall; this is an unexpected EOF or
      // an error that left the queue empty.
      std::string q = compat::drain_error_queue();
      _error = q.empty() ? "unexpected end of TLS stream" : q;
      return status::error;
    }
    case SSL_ERROR_SSL:
    default: {
      // Protocol or verification failure. Name the certificate problem when
      // there is one: "certificate has expired" says more than the alert.
      _error = compat::drain_error_queue();
      // INVALID_CALL: no certificate was verified at all (none was sent).
      long verify = SSL_get_verify_result(_ssl);
      if (verify != X509_V_OK && verify != X509_V_ERR_INVALID_CALL) {
        if (!_error.empty()) _error += "; ";
        _error += "certificate verify: ";
        _error += X509_verify_cert_error_string(verify);
      }
      if (_error.empty()) _error = "TLS error " + std::to_string(err);
      return status::error;
    }
  }
}

session::status session::start() {
  if (!_ssl) return status::error;
  int ret = SSL_do_handshake(_ssl);
  if (ret == 1) return status::ok;
  return fail(ret);
}

void session::feed(const char* data, size_t len) {
  if (!_ssl || len == 0) return;
  if (_in_saved_off > 0 && _in_saved_off >= _in_saved.size() / 2) {
    _in_saved.erase(0, _in_saved_off);
    _in_saved_off = 0;
  }
  _in_saved.append(data, len);
}

session::status session::receive(const char* data, size_t len, std::string& out) {
  if (!_ssl) return status::error;
  if (_in_saved_off < _in_saved.size()) {
    // Behind a partial record: it goes first, so this joins it.
    feed(data, len);
    return read(out);
  }
  // At most `len` bytes of plaintext: room for them now, so that appending
  // a burst does not grow `out` several times.
  out.reserve(out.size() + len);
  _in_span = data;
  _in_span_len = len;
  status st = read(out);
  // Whatever the library did not take (a partial record it did not ask for
  // yet, or bytes after an error or close_notify) outlives the caller's
  // buffer only as a copy.
  if (_in_span_len > 0) _in_saved.append(_in_span, _in_span_len);
  _in_span = nullptr;
  _in_span_len = 0;
  return st;
}

session::status session::read(std::string& out) {
  if (!_ssl) return status::error;
  if (!_resumption_checked && _ctx->is_server()) {
    // Finish the handshake on its own first, so that a resumed session is
    // judged before one byte of the peer's plaintext is taken.
    if (!SSL_is_init_finished(_ssl)) {
      int ret = SSL_do_handshake(_ssl);
      if (ret != 1) return fail(ret);
    }
    _resumption_checked = true;
    // A resumed handshake verifies no certificate: the ticket vouches for a
    // verification done when it was issued. The certificate may have
    // expired or been revoked since, so verify it again, now.
    if (SSL_session_reused(_ssl)) {
      std::string why = _ctx->verify_peer(peer_certificates());
      if (!why.empty()) {
        _error = "resumed session refused: " + why;
        return status::error;
      }
    }
  }
  // Into a stack buffer, then append what arrived: growing `out` first would
  // zero-fill 16 KiB per call (callgrind showed half of relay's instructions
  // in that memset).
  char buf[16384];
  for (;;) {
    int n = SSL_read(_ssl, buf, static_cast<int>(sizeof buf));
    if (n > 0) {
      out.append(buf, static_cast<size_t>(n));
      continue;
    }
    return fail(n);
  }
}

session::status session::write(std::string_view plain) {
  if (!_ssl) return status::error;
  if (plain.empty()) return status::ok;
  // SSL_MODE_ENABLE_PARTIAL_WRITE is off and the output BIO never fills, so
  // one call writes everything or fails. Room for all of it first: one
  // append per record into a buffer that does not move.
  constexpr size_t record = 16384, record_overhead = 64;  // header, type, tag (1.3); nonce (1.2)
  _out_buf.reserve(_out_buf.size() + plain.size() + (plain.size() / record + 1) * record_overhead);
  int n = SSL_write(_ssl, plain.data(), static_cast<int>(plain.size()));
  if (n > 0) return status::ok;
  return fail(n);
}

void session::shutdown() {
  if (_ssl && SSL_is_init_finished(_ssl)) {
    SSL_shutdown(_ssl);
    compat::drain_error_queue();
  }
}

void session::release_input_buffer() {
  if (!_ssl || input_pending() > 0) return;
  // A partial record's worth is kept (it is reused); a burst's is not.
  constexpr size_t small_input_buffer = 16 * 1024 + 512;
  if (_in_saved.capacity() > small_input_buffer) std::string().swap(_in_saved);
  _in_saved_off = 0;
}

peer_chain session::peer_certificates() const {
  peer_chain c;
  if (!_ssl) return c;
  c._leaf = compat::peer_certificate(_ssl);
  // Without the leaf on the server side in both libraries; the stack is the
  // session's, so the certificates are taken by reference into our own.
  if (STACK_OF(X509)* rest = SSL_get_peer_cert_chain(_ssl)) c._rest = X509_chain_up_ref(rest);
  return c;
}

peer_chain::peer_chain(peer_chain&& o) noexcept : _leaf(o._leaf), _rest(o._rest) {
  o._leaf = nullptr;
  o._rest = nullptr;
}

peer_chain& peer_chain::operator=(peer_chain&& o) noexcept {
  if (this != &o) {
    reset();
    _leaf = o._leaf;
    _rest = o._rest;
    o._leaf = nullptr;
    o._rest = nullptr;
  }
  return *this;
}

peer_chain::~peer_chain() { reset(); }

void peer_chain::reset() {
  if (_leaf) X509_free(_leaf);
  if (_rest) sk_X509_pop_free(_rest, X509_free);
  _leaf = nullptr;
  _rest = nullptr;
}

std::optional<int64_t> peer_chain::ms_until_expiry() const {
  if (!_leaf) return std::nullopt;
  int days = 0, seconds = 0;
  // From null: now.
  if (ASN1_TIME_diff(&days, &seconds, nullptr, X509_get0_notAfter(_leaf)) != 1) {
    compat::drain_error_queue();
    return std::nullopt;
  }
  return (static_cast<int64_t>(days) * 86400 + seconds) * 1000;
}

bool session::has_output() const { return !_out_buf.empty(); }

void session::take_output(std::string& out) {
  if (_out_buf.empty()) return;
  if (out.empty()) {
    out.swap(_out_buf);
    _out_buf.clear();  // the capacity `out` had: may be none
    return;
  }
  out.append(_out_buf);
  _out_buf.clear();
  // A large answer's ciphertext is not kept by an idle connection.
  if (_out_buf.capacity() > 64 * 1024) std::string().swap(_out_buf);
}

bool session::handshake_complete() const { return _ssl && SSL_is_init_finished(_ssl); }
bool session::resumed() const { return _ssl && SSL_session_reused(_ssl); }

}  // namespace relay::tls
