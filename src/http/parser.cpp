#include <strings.h>

#include "relay/http.h"

namespace relay::http {
namespace {

request_parser* self(llhttp_t* p) { return static_cast<request_parser*>(p->data); }

bool iequals(std::string_view a, std::string_view b) {
  return a.size() == b.size() && strncasecmp(a.data(), b.data(), a.size()) == 0;
}

method to_method(uint8_t m) {
  switch (m) {
    case HTTP_GET: return method::get;
    case HTTP_POST: return method::post;
    case HTTP_DELETE: return method::del;
    case HTTP_PUT: return method::put;
    case HTTP_HEAD: return method::head;
    default: return method::other;
  }
}

}  // namespace

std::string_view request::path() const {
  std::string_view t = target;
  return t.substr(0, t.find('?'));
}

std::string_view request::query() const {
  std::string_view t = target;
  auto q = t.find('?');
  return q == std::string_view::npos ? std::string_view{} : t.substr(q + 1);
}

std::optional<std::string_view> request::query_param(std::string_view name) const {
  std::string_view q = query();
  while (!q.empty()) {
    auto amp = q.find('&');
    std::string_view pair = q.substr(0, amp);
    auto eq = pair.find('=');
    std::string_view key = pair.substr(0, eq);
    if (key == name) return eq == std::string_view::npos ? std::string_view{} : pair.substr(eq + 1);
    if (amp == std::string_view::npos) break;
    q.remove_prefix(amp + 1);
  }
  return std::nullopt;
}

void request::clear() {
  verb = method::other;
  target.clear();
  body.clear();
  // A connection that once carried a large body must not keep its buffer
  // while it idles (thousands of idle long-polling workers).
  if (body.capacity() > 16 * 1024) std::string().swap(body);
  authorization.clear();
  has_authorization = false;
  keep_alive = true;
  expect_continue = false;
  chunked = false;
  content_length = 0;
  spool.reset();
}

request_parser::request_parser(const limits& l) : _limits(l) {
  llhttp_settings_init(&_settings);
  _settings.on_message_begin = on_message_begin;
  _settings.on_url = on_url;
  _settings.on_header_field = on_header_field;
  _settings.on_header_value = on_header_value;
  _settings.on_header_value_complete = on_header_value_complete;
  _settings.on_headers_complete = on_headers_complete;
  _settings.on_body = on_body;
  _settings.on_message_complete = on_message_complete;
  llhttp_init(&_parser, HTTP_REQUEST, &_settings);
  _parser.data = this;
}

int request_parser::reject(api_error e, std::string detail) {
  _failed = true;
  _error = e;
  _error_detail = std::move(detail);
  return -1;
}

bool request_parser::count_header_bytes(size_t len) {
  _header_bytes += len;
  return _header_bytes <= _limits.max_header_bytes;
}

int request_parser::on_message_begin(llhttp_t* p) {
  auto* s = self(p);
  s->_req.clear();
  s->_started = true;
  s->_headers_done = false;
  s->_complete = false;
  s->_header_bytes = 0;
  s->_header_count = 0;
  s->_sink = nullptr;
  s->_body_received = 0;
  s->_field.clear();
  s->_value.clear();
  return 0;
}

int request_parser::on_url(llhttp_t* p, const char* at, size_t len) {
  auto* s = self(p);
  if (s->_req.target.size() + len > s->_limits.max_uri_bytes)
    return s->reject(api_error::uri_too_long, "the request URI is longer than " +
                                                   std::to_string(s->_limits.max_uri_bytes) + " bytes");
  s->_req.target.append(at, len);
  return 0;
}

int request_parser::on_header_field(llhttp_t* p, const char* at, size_t len) {
  auto* s = self(p);
  if (!s->count_header_bytes(len)) return s->reject(api_error::headers_too_large, {});
  s->_field.append(at, len);
  return 0;
}

int request_parser::on_header_value(llhttp_t* p, const char* at, size_t len) {
  auto* s = self(p);
  if (!s->count_header_bytes(len)) return s->reject(api_error::headers_too_large, {});
  s->_value.append(at, len);
  return 0;
}

int request_parser::on_header_value_complete(llhttp_t* p) {
  auto* s = self(p);
  if (++s->_header_count > s->_limits.max_headers)
    return s->reject(api_error::headers_too_large, "more than " + std::to_string(s->_limits.max_headers) + " headers");
  // Only the headers relay acts on are kept; the rest are counted and dropped.
  if (iequals(s->_field, "authorization")) {
    // Two credentials in one request: which one counts would be a guess.
    // Seen, not non-empty: an empty first header followed by a real one
    // would show a proxy no credential and relay the second.
    if (s->_req.has_authorization) return s->reject(api_error::bad_request, "more than one Authorization header");
    s->_req.has_authorization = true;
    s->_req.authorization = s->_value;
  } else if (iequals(s->_field, "expect")) {
    if (!iequals(s->_value, "100-continue"))
      return s->reject(api_error::bad_request, "unsupported Expect header");
    s->_req.expect_continue = true;
  }
  s->_field.clear();
  s->_value.clear();
  return 0;
}

int request_parser::on_headers_complete(llhttp_t* p) {
  auto* s = self(p);
  s->_headers_done = true;
  s->_req.verb = to_method(p->method);
  // An upgrade would hand the connection to another protocol; llhttp then
  // stops parsing, and pipelined requests behind it would hang.
  if (p->method == HTTP_CONNECT || (p->flags & F_UPGRADE) != 0)
    return s->reject(api_error::bad_request, "relay does not switch protocols (Upgrade or CONNECT)");
  bool has_length = (p->flags & F_CONTENT_LENGTH) != 0;
  bool chunked = (p->flags & F_CHUNKED) != 0;
  if (has_length && p->content_length > s->_limits.max_body_bytes)
    return s->reject(api_error::payload_too_large, "the request body is larger than " +
                                                       std::to_string(s->_limits.max_body_bytes) + " bytes");
  if ((s->_req.verb == method::post || s->_req.verb == method::put) && !has_length && !chunked)
    return s->reject(api_error::length_required, {});
  s->_req.chunked = chunked;
  s->_req.content_length = has_length ? p->content_length : 0;
  // The body's buffer is reserved when its first byte arrives, not here:
  // a request refused at its headers costs no memory.
  // Pause before the body: the connection decides whether to read it.
  if (has_length ? p->content_length > 0 : chunked) return HPE_PAUSED;
  return 0;
}

int request_parser::on_body(llhttp_t* p, const char* at, size_t len) {
  auto* s = self(p);
  // Content-Length was checked up front; this bounds chunked bodies.
  if (s->_body_received + len > s->_limits.max_body_bytes)
    return s->reject(api_error::payload_too_large, "the request body is larger than " +
                                                       std::to_string(s->_limits.max_body_bytes) + " bytes");
  s->_body_received += len;
  if (s->_sink) {
    // A refusal is the sink's to report (the connection asks it after
    // execute()); the rest of the body is still parsed, and ignored.
    s->_sink->feed(at, len);
    return 0;
  }
  if (s->_req.body.empty() && s->_req.content_length > 0)
    s->_req.body.reserve(static_cast<size_t>(s->_req.content_length) + body_padding);
  s->_req.body.append(at, len);
  return 0;
}

int request_parser::on_message_complete(llhttp_t* p) {
  auto* s = self(p);
  s->_complete = true;
  s->_req.keep_alive = llhttp_should_keep_alive(p) != 0;
  if (s->_req.body.capacity() < s->_req.body.size() + body_padding)
    s->_req.body.reserve(s->_req.body.size() + body_padding);
  // Stop after each request so that pipelined requests are answered in order.
  return HPE_PAUSED;
}

request_parser::result request_parser::execute(const char* data, size_t len) {
  if (_failed) return {0, event::error};
  llhttp_errno_t err = llhttp_execute(&_parser, data, len);
  switch (err) {
    case HPE_OK:
      return {len, event::need_more};
    case HPE_PAUSED: {
      size_t consumed = static_cast<size_t>(llhttp_get_error_pos(&_parser) - data);
      llhttp_resume(&_parser);
      if (_complete) return {consumed, event::request_complete};
      return {consumed, event::headers_complete};
    }
    default:
      if (!_failed) {
        _failed = true;
        _error = api_error::bad_request;
        _error_detail = std::string("malformed HTTP request: ") + llhttp_get_error_reason(&_parser);
      }
      return {0, event::error};
  }
}

void request_parser::next() {
  // An answered request's body is not kept while the connection idles
  // (it counted against the body budget only until the answer).
  if (_req.body.capacity() > 16 * 1024) std::string().swap(_req.body);
  _sink = nullptr;
  _started = false;
  _headers_done = false;
  _complete = false;
}

std::string_view reason_phrase(int status) {
  switch (status) {
    case 100: return "Continue";
    case 200: return "OK";
    case 201: return "Created";
    case 204: return "No Content";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 408: return "Request Timeout";
    case 409: return "Conflict";
    case 411: return "Length Required";
    case 413: return "Content Too Large";
    case 414: return "URI Too Long";
    case 429: return "Too Many Requests";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 503: return "Service Unavailable";
    default: return "Unknown";
  }
}

void write_response(std::string& out, int status, std::string_view content_type, std::string_view body,
                    std::string_view extra_headers, bool close) {
  // One allocation for head and body.
  out.reserve(out.size() + body.size() + 160 + content_type.size() + extra_headers.size());
  write_response_head(out, status, content_type, body.size(), extra_headers, close);
  out += body;
}

void write_response_head(std::string& out, int status, std::string_view content_type, size_t body_size,
                         std::string_view extra_headers, bool close) {
  out += "HTTP/1.1 ";
  out += std::to_string(status);
  out += ' ';
  out += reason_phrase(status);
  out += "\r\nContent-Type: ";
  out += content_type;
  out += "\r\nContent-Length: ";
  out += std::to_string(body_size);
  out += "\r\nCache-Control: no-store\r\n";
  out += extra_headers;
  if (close && extra_headers.find("Connection: close") == std::string_view::npos) out += "Connection: close\r\n";
  out += "\r\n";
}

}  // namespace relay::http
