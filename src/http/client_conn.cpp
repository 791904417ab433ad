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
    : _loop(loop), _options(std::move(o)), _parser(_options.max_response_bytes, _options.response_body_room) {
  if (_options.server_name.empty()) _options.server_name = _options.host;
  uv_timer_init(loop, &_timer);
  _timer.data = this;
}

client_conn::~client_conn() = default;

std::string_view to_string(client_error::kind k) {
  switch (k) {
    case client_error::kind::none: return "none";
    case client_error::kind::connect: return "connect";
    case client_error::kind::tls: return "tls";
    case client_error::kind::lost: return "lost";
    case client_error::kind::timeout: return "timeout";
    case client_error::kind::protocol: return "protocol";
    case client_error::kind::too_large: return "too_large";
    case client_error::kind::refused: return "refused";
    case client_error::kind::closed: return "closed";
  }
  return "unknown";
}

namespace {

using kind = client_error::kind;

// RFC 9110, 5.6.2: tchar.
bool is_tchar(unsigned char c) {
  if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9')) return true;
  switch (c) {
    case '!': case '#': case '$': case '%': case '&': case '\'': case '*': case '+':
    case '-': case '.': case '^': case '_': case '`': case '|': case '~':
      return true;
    default:
      return false;
  }
}

bool is_token(std::string_view s) {
  if (s.empty()) return false;
  for (unsigned char c : s)
    if (!is_tchar(c)) return false;
  return true;
}

bool iequals(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    auto lower = [](unsigned char c) { return c >= 'A' && c <= 'Z' ? static_cast<unsigned char>(c + 32) : c; };
    if (lower(static_cast<unsigned char>(a[i])) != lower(static_cast<unsigned char>(b[i]))) return false;
  }
  return true;
}

// Why the request may not go on the wire; empty when it may. The bytes come
// from callers that paste job ids, queue names and keys into targets and
// headers: one CR LF in any of them would end the request early and let the
// rest be read as a second, smuggled request.
std::string check_request(std::string_view method, std::string_view target, std::string_view headers) {
  if (!is_token(method)) return "the method is not an HTTP token";
  if (target.empty()) return "the target is empty";
  for (unsigned char c : target)
    if (c < 0x21 || c > 0x7e) return "the target holds a byte outside visible ASCII";
  while (!headers.empty()) {
    size_t eol = headers.find("\r\n");
    if (eol == std::string_view::npos) return "an extra header line does not end in CRLF";
    std::string_view line = headers.substr(0, eol);
    headers.remove_prefix(eol + 2);
    size_t colon = line.find(':');
    if (colon == std::string_view::npos || !is_token(line.substr(0, colon)))
      return "an extra header line is not a token name followed by a colon";
    std::string_view name = line.substr(0, colon);
    // The connection writes these itself; a second copy would make the
    // framing ambiguous between us and the server.
    if (iequals(name, "content-length") || iequals(name, "transfer-encoding") || iequals(name, "host"))
      return "an extra header line sets " + std::string(name) + ", which the connection writes itself";
    // RFC 9110, 5.5: field values are visible characters, obs-text, SP and
    // HTAB; CR, LF and NUL are named because they are the dangerous ones.
    for (unsigned char c : line.substr(colon + 1))
      if ((c < 0x20 && c != '\t') || c == 0x7f) return "an extra header value holds CR, LF, NUL or another control byte";
  }
  return {};
}

}  // namespace

void client_conn::request(std::string_view method, std::string_view target, std::string_view body, callback cb,
                          uint32_t timeout_ms, std::string_view extra_headers) {
  enqueue(method, target, body, nullptr, std::move(cb), timeout_ms, extra_headers);
}

void client_conn::request(std::string_view method, std::string_view target, std::string_view body,
                          std::shared_ptr<const void> keep, callback cb, uint32_t timeout_ms,
                          std::string_view extra_headers) {
  enqueue(method, target, body, std::move(keep), std::move(cb), timeout_ms, extra_headers);
}

void client_conn::enqueue(std::string_view method, std::string_view target, std::string_view body,
                          std::shared_ptr<const void> keep, callback cb, uint32_t timeout_ms,
                          std::string_view extra_headers) {
  if (_closing) {
    // Only reachable from a callback that close() is running (the object
    // is gone once close() returns), so this answer is on close()'s stack.
    client_response none;
    cb(client_error{kind::closed, "the connection was closed"}, none);
    return;
  }
  if (std::string why = check_request(method, target, extra_headers); !why.empty()) {
    _deferred.push_back({std::move(cb), client_error{kind::refused, "request refused, nothing sent: " + why}});
    arm_timer();
    return;
  }
  pending p;
  p.bytes.reserve(128 + target.size() + (keep ? 0 : body.size()) + extra_headers.size());
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
  if (keep) {
    p.body = body;
    p.keep = std::move(keep);
  } else {
    p.bytes.append(body);
  }
  p.cb = std::move(cb);
  if (timeout_ms) p.deadline = uv_now(_loop) + timeout_ms;
  _queue.push_back(std::move(p));
  if (_state == state::idle) start_connect();
  else if (_state == state::ready) send_pending();
  arm_timer();
}

void client_conn::answer_deferred() {
  std::deque<deferred_answer> answers;
  answers.swap(_deferred);
  for (auto& r : answers) {
    client_response none;
    r.cb(r.error, none);
  }
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
    _connect_deadline = 0;
    // Called from request() too: the answers go out from the timer.
    client_error error{kind::connect, "resolve " + _options.host + ": " + uv_strerror(rc)};
    for (auto& p : _queue) _deferred.push_back({std::move(p.cb), error});
    _queue.clear();
    arm_timer();
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
    c->fail_all({kind::connect, "resolve " + c->_options.host + ": " + uv_strerror(status)});
    return;
  }
  std::string error;
  c->_stream = net::stream::connect(c->_loop, res->ai_addr, *c, c->_options.tls, c->_options.server_name, error);
  uv_freeaddrinfo(res);
  if (!c->_stream) {
    c->drop({kind::connect, "connect to " + c->where() + ": " + error});
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
    if (!p.body.empty()) _stream->write(p.body);
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
      drop({kind::connect, "connect to " + where() + ": " + d});
      return;
    case net::stream_end::tls_error:
      drop({kind::tls, "TLS with " + _options.host + ": " + d});
      return;
    case net::stream_end::eof:
      if (_state == state::ready) peer_closed({kind::lost, "server closed the connection (" + d + ")"});
      else drop({kind::tls, "TLS with " + _options.host + ": connection closed during the handshake"});
      return;
    case net::stream_end::reset:
      // A server that refuses our certificate may reset rather than send
      // its alert; before the handshake is done that is a TLS failure.
      if (_state == state::handshaking) drop({kind::tls, "TLS with " + _options.host + ": " + d});
      else drop({kind::lost, "connection to " + _options.host + " lost: " + d});
      return;
  }
}

void client_conn::on_closed(net::stream& s) {
  // Only a stream that closed itself (a failed write) gets here: a reset
  // detaches the stream before closing it.
  if (&s != _stream) return;
  _stream = nullptr;
  drop({kind::lost, "connection to " + _options.host + " lost: the write failed"});
}

void client_conn::parse(const std::string& data) {
  // Only requests on the wire before these bytes arrived can be answered by
  // them. A callback below may send a new request at once; an extra answer
  // already in this buffer is then not its answer but one nobody asked for.
  _answerable = 0;
  for (const auto& q : _queue) _answerable += q.sent ? 1 : 0;
  if (_answerable == 0 && !data.empty()) {
    // Bytes on an idle connection: kept, they would become the start of the
    // next request's answer (a pooled connection to a local service gave one
    // job's answer to the next job).
    drop({kind::protocol, "protocol error: bytes arrived that no request asked for"});
    return;
  }
  size_t off = 0;
  while (off < data.size() && _stream && !_closing) {
    response_parser::result r = _parser.execute(data.data() + off, data.size() - off);
    off += r.consumed;
    if (r.what == response_parser::event::need_more) return;
    if (r.what != response_parser::event::response_complete) {
      drop({_parser.error_kind() == response_parser::failure::too_large ? kind::too_large : kind::protocol,
            _parser.error()});
      return;
    }
    if (!deliver()) return;
    if (off < data.size() && _answerable == 0) {
      // More bytes behind the last answer asked for (a local service that
      // wrote extra after its answer): never the next request's answer.
      drop({kind::protocol, "protocol error: bytes arrived that no request asked for"});
      return;
    }
  }
}

bool client_conn::deliver() {
  // One response is complete: hand it to the oldest request.
  if (_queue.empty() || !_queue.front().sent || _answerable == 0) {
    drop({kind::protocol, "protocol error: a response arrived that no request asked for"});
    return false;
  }
  --_answerable;
  pending p = std::move(_queue.front());
  _queue.pop_front();
  client_response r = std::move(_parser.current());
  bool close_now = !_parser.keep_alive();
  _parser.next();
  if (close_now) reset_transport();
  p.cb(client_error{}, r);  // may queue requests or close this connection
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

void client_conn::peer_closed(client_error error) {
  response_parser::event e = _parser.finish();
  if (e == response_parser::event::response_complete) {
    // Only a body delimited by the end of the stream completes here. Over
    // TLS a FIN or reset can be forged by anyone on the path, so only the
    // server's close_notify says that the body ended where the bytes did
    // (RFC 8446, 6.1); without it the answer may be truncated.
    if (_stream && _stream->is_tls() && !_stream->peer_sent_close_notify()) {
      drop({kind::lost, "TLS stream from " + _options.host +
                            " ended without close_notify inside an answer delimited by the end of the stream"});
      return;
    }
    // deliver() sees that the connection cannot be reused (the parser says
    // not keep-alive) and sends what is left on a new one.
    _answerable = _queue.empty() || !_queue.front().sent ? 0 : 1;
    deliver();
    return;
  }
  if (e == response_parser::event::error) error.message = _parser.error() + " (" + error.message + ")";
  drop(error);
}

void client_conn::drop(const client_error& error) {
  reset_transport();
  fail_all(error);
}

void client_conn::fail_all(const client_error& error) {
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
  if (!_deferred.empty()) {
    uv_timer_start(&_timer, on_timer, 0, 0);
    return;
  }
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
  if (!c->_deferred.empty()) {
    c->answer_deferred();
    // A callback may have closed the connection.
    if (c->_closing) return;
  }
  uint64_t now = uv_now(c->_loop);
  if (c->_connect_deadline && now >= c->_connect_deadline) {
    c->drop({kind::timeout, "connect to " + c->where() + ": timed out"});
    return;
  }
  for (const auto& p : c->_queue) {
    if (p.deadline && now >= p.deadline) {
      c->drop({kind::timeout, "timed out waiting for the response from " + c->where()});
      return;
    }
  }
  c->arm_timer();
}

void client_conn::close() {
  if (_closing) return;
  // Set first: a callback run from here that queues a request must not
  // start a connection on an object about to be freed.
  _closing = true;
  // End the TLS stream with close_notify. Besides being polite, it keeps the
  // session resumable: OpenSSL marks a session whose connection was dropped
  // without one as not resumable.
  if (_stream && _state == state::ready) {
    _stream->detach();
    _stream->finish(net::linger_options{0, 0});
    _stream = nullptr;
  }
  uv_timer_stop(&_timer);
  uv_close(reinterpret_cast<uv_handle_t*>(&_timer), on_timer_closed);
  reset_transport();
  // The timer that would have answered them is closing: requests refused
  // or failed early get their answer now, like everything else outstanding.
  answer_deferred();
  fail_all({kind::closed, "the connection was closed"});
}

void client_conn::on_timer_closed(uv_handle_t* h) { delete static_cast<client_conn*>(h->data); }

}  // namespace relay::http
