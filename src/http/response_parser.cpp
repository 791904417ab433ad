#include <strings.h>

#include "relay/http.h"

namespace relay::http {
namespace {

response_parser* self(llhttp_t* p) { return static_cast<response_parser*>(p->data); }

// One header name or value; only Retry-After and WWW-Authenticate are kept,
// so this bounds what a header can make the parser hold, not the whole head.
constexpr size_t max_header_line_bytes = 8192;

}  // namespace

response_parser::response_parser(size_t max_body_bytes, size_t body_room)
    : _max_body_bytes(max_body_bytes), _body_room(body_room) {
  llhttp_settings_init(&_settings);
  _settings.on_message_begin = on_message_begin;
  _settings.on_header_field = on_header_field;
  _settings.on_header_value = on_header_value;
  _settings.on_header_value_complete = on_header_value_complete;
  _settings.on_headers_complete = on_headers_complete;
  _settings.on_body = on_body;
  _settings.on_message_complete = on_message_complete;
  reset();
}

void response_parser::reset() {
  llhttp_init(&_parser, HTTP_RESPONSE, &_settings);
  _parser.data = this;
  _resp = {};
  _field.clear();
  _value.clear();
  _started = false;
  _complete = false;
  _keep_alive = true;
  _failed = false;
  _failure = failure::none;
  _finished = false;
  _error.clear();
}

int response_parser::fail(std::string why, failure f) {
  _failed = true;
  _failure = f;
  _error = std::move(why);
  return -1;
}

int response_parser::on_message_begin(llhttp_t* p) {
  auto* s = self(p);
  // Also after an interim response: nothing of a 1xx carries over.
  s->_resp = {};
  s->_field.clear();
  s->_value.clear();
  s->_started = true;
  s->_complete = false;
  return 0;
}

int response_parser::on_header_field(llhttp_t* p, const char* at, size_t len) {
  auto* s = self(p);
  if (s->_field.size() + len > max_header_line_bytes)
    return s->fail("response header larger than " + std::to_string(max_header_line_bytes) + " bytes",
                   failure::too_large);
  s->_field.append(at, len);
  return 0;
}

int response_parser::on_header_value(llhttp_t* p, const char* at, size_t len) {
  auto* s = self(p);
  if (s->_value.size() + len > max_header_line_bytes)
    return s->fail("response header larger than " + std::to_string(max_header_line_bytes) + " bytes",
                   failure::too_large);
  s->_value.append(at, len);
  return 0;
}

int response_parser::on_header_value_complete(llhttp_t* p) {
  auto* s = self(p);
  if (s->_field.size() == 11 && strncasecmp(s->_field.data(), "retry-after", 11) == 0) s->_resp.retry_after = s->_value;
  else if (s->_field.size() == 16 && strncasecmp(s->_field.data(), "www-authenticate", 16) == 0)
    s->_resp.www_authenticate = s->_value;
  s->_field.clear();
  s->_value.clear();
  return 0;
}

int response_parser::on_headers_complete(llhttp_t* p) {
  auto* s = self(p);
  // llhttp 8 takes a status of one or two digits ("HTTP/1.1 11 X"); the
  // grammar wants three, and anything below 100 has no meaning.
  if (p->status_code < 100) return s->fail("malformed response: the status code is not three digits");
  // The client never asks to switch protocols; llhttp would stop parsing
  // after a 101 and leave the requests behind it unanswered.
  if (p->status_code == 101) return s->fail("protocol error: 101 Switching Protocols was not asked for");
  if ((p->flags & F_CONTENT_LENGTH) != 0 && p->content_length > s->_max_body_bytes)
    return s->fail("response body larger than " + std::to_string(s->_max_body_bytes) + " bytes", failure::too_large);
  // The whole body at once, plus the padding simdjson reads past the end,
  // so that a large answer neither grows by doubling (copying itself over
  // and over, and peaking at twice its size) nor is copied again to be
  // parsed. Bounded by max_body_bytes, checked above: no more than the
  // body itself could make the client hold.
  if ((p->flags & F_CONTENT_LENGTH) != 0 && p->content_length > 0)
    s->_resp.body.reserve(s->_body_room + static_cast<size_t>(p->content_length) + body_padding);
  s->_resp.body.assign(s->_body_room, ' ');
  return 0;
}

int response_parser::on_body(llhttp_t* p, const char* at, size_t len) {
  auto* s = self(p);
  // Bounds chunked and close-delimited bodies (Content-Length was checked).
  if (s->_resp.body.size() - s->_body_room + len > s->_max_body_bytes)
    return s->fail("response body larger than " + std::to_string(s->_max_body_bytes) + " bytes", failure::too_large);
  s->_resp.body.append(at, len);
  return 0;
}

int response_parser::on_message_complete(llhttp_t* p) {
  auto* s = self(p);
  if (p->status_code >= 100 && p->status_code < 200) {
    // An interim response: the final one follows on the same stream.
    s->_started = false;
    return 0;
  }
  s->_resp.status = p->status_code;
  s->_keep_alive = llhttp_should_keep_alive(p) != 0;
  s->_complete = true;
  // Stop after each response so that each is handed to its request in order.
  return HPE_PAUSED;
}

response_parser::result response_parser::execute(const char* data, size_t len) {
  if (_failed) return {0, event::error};
  if (_finished) {
    fail("protocol error: bytes after the end of the stream");
    return {0, event::error};
  }
  if (_complete) {
    // The previous response was not taken with next(); its connection said
    // it would close, or the caller forgot. Either way nothing more parses.
    if (!_keep_alive) {
      fail("protocol error: a response after one that closes the connection");
      return {0, event::error};
    }
    next();
  }
  llhttp_errno_t err = llhttp_execute(&_parser, data, len);
  if (err == HPE_OK) return {len, event::need_more};
  if (err == HPE_PAUSED && !_failed) {
    size_t consumed = static_cast<size_t>(llhttp_get_error_pos(&_parser) - data);
    llhttp_resume(&_parser);
    return {consumed, event::response_complete};
  }
  if (!_failed) fail(std::string("malformed response: ") + llhttp_get_error_reason(&_parser));
  return {0, event::error};
}

response_parser::event response_parser::finish() {
  if (_failed) return event::error;
  if (_finished) return event::need_more;
  _finished = true;
  // Between responses the stream may end. (llhttp itself would call that an
  // unsafe EOF while it is paused after a response.)
  if (_complete || !_started) return event::need_more;
  llhttp_errno_t err = llhttp_finish(&_parser);
  if (err == HPE_PAUSED && _complete) {
    // Ended by the end of the stream: whatever its headers said (llhttp
    // can call a 204 with an unknown Transfer-Encoding keep-alive), there
    // is no connection left to keep.
    _keep_alive = false;
    return event::response_complete;
  }
  if (!_failed) fail("response cut short by the end of the stream", failure::cut_short);
  return event::error;
}

void response_parser::next() {
  _started = false;
  _complete = false;
}

}  // namespace relay::http
