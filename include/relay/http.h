// HTTP/1.1 message handling on top of llhttp: a request parser with hard
// limits (so nothing a client sends makes relay allocate without bound) and
// response serialisation. Connections live in relay/server_conn.h and
// relay/http_client.h; this header has no I/O.
#pragma once

#include <llhttp.h>
#include <uv.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "relay/api_error.h"

namespace relay::http {

enum class method : uint8_t { get, post, del, put, head, other };

struct limits {
  size_t max_uri_bytes = 8192;
  size_t max_header_bytes = 16384;  // sum of all header names and values
  size_t max_headers = 64;
  size_t max_body_bytes = 1 << 20;
};

// Bytes of slack kept after a body so that simdjson may read past its end.
inline constexpr size_t body_padding = 64;

// A large value cut out of a spooled body (see body_spool).
struct spooled_value {
  uint32_t item = 0;     // index in the body's top-level array; 0 for a single object
  std::string_view key;  // "payload" or "result" (static storage)
  uint64_t offset = 0;   // where its bytes start in the spool file
  uint64_t length = 0;   // the value's raw JSON bytes, exactly as received
  uint32_t crc32c = 0;   // relay::journal::crc32c() of those bytes
};

// A body too large to hold: its large values went to a file as they arrived
// (limits.spill_threshold_bytes). Whoever stores a reference to the file
// sets `keep`; otherwise the destructor unlinks the file, asynchronously (on
// libuv's threadpool when `loop` is set), so it never blocks the loop.
struct body_spool {
  body_spool() = default;
  body_spool(const body_spool&) = delete;
  body_spool& operator=(const body_spool&) = delete;
  ~body_spool();

  uint64_t file = 0;   // the file is <dir>/<file as %016x>
  std::string dir;     // the blobs directory
  uint64_t bytes = 0;  // bytes in the file: every value back to back
  std::vector<spooled_value> values;  // in body order
  bool keep = false;
  uv_loop_t* loop = nullptr;

  std::string path() const { return path_of(dir, file); }
  static std::string path_of(const std::string& dir, uint64_t file);
};

struct request {
  method verb = method::other;
  std::string target;  // as sent: path and query
  std::string body;    // capacity >= size + body_padding
  std::string authorization;
  bool has_authorization = false;  // the header was sent (perhaps empty)
  bool keep_alive = true;
  bool expect_continue = false;
  bool chunked = false;         // the body is chunked (its length is unknown up front)
  uint64_t content_length = 0;  // as announced; 0 when none or chunked
  // Set when the body was spooled: `body` then holds its skeleton, each cut
  // value replaced by `null`. Null for every body held whole, so a client
  // cannot forge a spooled value.
  std::shared_ptr<body_spool> spool;

  std::string_view path() const;
  std::string_view query() const;
  // The raw (undecoded) value of a query parameter.
  std::optional<std::string_view> query_param(std::string_view name) const;
  void clear();
};

// Where the bytes of a body go instead of request::body once the
// connection decides to spool it (see body_spool). Called from inside
// request_parser::execute().
class body_sink {
 public:
  virtual ~body_sink() = default;
  virtual bool feed(const char* data, size_t len) = 0;
};

// Incremental request parser. Feed bytes with execute(); it stops after each
// complete request (so that pipelined requests are answered one at a time and
// in order) and after the headers of a request that has a body (so that the
// request can be authorised, and its body budgeted, before one body byte is
// held; and so that "100 Continue" can be sent when the client waits for it).
// Requests that ask to switch protocols (Upgrade, CONNECT) are errors: relay
// speaks HTTP/1.1 only, and an upgrade would stop the parser mid-stream.
class request_parser {
 public:
  explicit request_parser(const limits& l);
  request_parser(const request_parser&) = delete;
  request_parser& operator=(const request_parser&) = delete;

  enum class event : uint8_t {
    need_more,         // all input consumed, request not complete
    headers_complete,  // headers done and a body follows (current().expect_continue:
                       // the client waits for "100 Continue" before sending it)
    request_complete,  // current() holds a whole request
    error,             // error() says which; the stream cannot be trusted
  };
  struct result {
    size_t consumed;
    event what;
  };
  result execute(const char* data, size_t len);

  request& current() { return _req; }
  // Call after handling a complete request, before parsing the next.
  void next();
  // From now until the request ends, body bytes go to `sink` (null: to
  // request::body, the default for every request).
  void set_body_sink(body_sink* sink) { _sink = sink; }
  // Body bytes of the current request received so far (wherever they went).
  uint64_t body_received() const { return _body_received; }

  bool started() const { return _started; }  // bytes of a request seen
  bool headers_complete() const { return _headers_done; }
  bool request_done() const { return _complete; }
  api_error error() const { return _error; }
  const std::string& error_detail() const { return _error_detail; }

 private:
  static int on_message_begin(llhttp_t* p);
  static int on_url(llhttp_t* p, const char* at, size_t len);
  static int on_header_field(llhttp_t* p, const char* at, size_t len);
  static int on_header_value(llhttp_t* p, const char* at, size_t len);
  static int on_header_value_complete(llhttp_t* p);
  static int on_headers_complete(llhttp_t* p);
  static int on_body(llhttp_t* p, const char* at, size_t len);
  static int on_message_complete(llhttp_t* p);
  int reject(api_error e, std::string detail);
  bool count_header_bytes(size_t len);

  limits _limits;
  llhttp_settings_t _settings;
  llhttp_t _parser;
  request _req;
  std::string _field;
  std::string _value;
  size_t _header_bytes = 0;
  size_t _header_count = 0;
  body_sink* _sink = nullptr;
  uint64_t _body_received = 0;
  bool _started = false;
  bool _headers_done = false;
  bool _complete = false;
  bool _failed = false;
  api_error _error = api_error::bad_request;
  std::string _error_detail;
};

// A response as the client side receives it.
struct response {
  int status = 0;
  std::string body;
  std::string retry_after;  // the Retry-After header, if sent
  std::string www_authenticate;  // the WWW-Authenticate header (a 401's challenge), if sent
};

// Incremental parser of the responses a client receives, with no I/O (the
// client connection and the fuzzer feed it). execute() stops after each
// final response; interim 1xx responses (100 Continue, 103 Early Hints) are
// skipped, never taken for the answer; 101 Switching Protocols is an error
// because the client never asks to upgrade. A body delimited by the end of
// the stream (no Content-Length, not chunked) completes when finish() is
// called at EOF. Bodies beyond max_body_bytes and header lines beyond 8 KiB
// are errors, so a server cannot make the client allocate without bound.
class response_parser {
 public:
  // `body_room`: each body starts with that many spaces, not counted in
  // max_body_bytes (see client_conn::options::response_body_room).
  explicit response_parser(size_t max_body_bytes, size_t body_room = 0);
  response_parser(const response_parser&) = delete;
  response_parser& operator=(const response_parser&) = delete;

  enum class event : uint8_t {
    need_more,          // all input consumed, response not complete
    response_complete,  // current() holds a final response
    error,              // error() says why; the stream cannot be trusted
  };
  struct result {
    size_t consumed;
    event what;
  };
  result execute(const char* data, size_t len);
  // The peer ended the stream. response_complete when that ended a
  // close-delimited body; need_more when no response was under way; error
  // when one was cut short. Nothing may be fed afterwards.
  event finish();

  response& current() { return _resp; }
  // Whether the connection may carry another response after current().
  bool keep_alive() const { return _keep_alive; }
  // Call after taking a complete response, before parsing the next.
  void next();
  // Forget everything, for a new connection.
  void reset();

  bool started() const { return _started; }  // bytes of a response seen
  const std::string& error() const { return _error; }
  // What kind of error error() describes, so that the connection can tell a
  // server that breaks the protocol from one that sends too much or stops
  // half way.
  enum class failure : uint8_t {
    none,
    malformed,  // not a valid HTTP/1.1 answer (or an unasked-for 101)
    too_large,  // a body over max_body_bytes or a header line over 8 KiB
    cut_short,  // the stream ended inside a response (finish())
  };
  failure error_kind() const { return _failure; }

 private:
  static int on_message_begin(llhttp_t* p);
  static int on_header_field(llhttp_t* p, const char* at, size_t len);
  static int on_header_value(llhttp_t* p, const char* at, size_t len);
  static int on_header_value_complete(llhttp_t* p);
  static int on_headers_complete(llhttp_t* p);
  static int on_body(llhttp_t* p, const char* at, size_t len);
  static int on_message_complete(llhttp_t* p);
  int fail(std::string why, failure f = failure::malformed);

  size_t _max_body_bytes;
  size_t _body_room;
  llhttp_settings_t _settings;
  llhttp_t _parser;
  response _resp;
  std::string _field;
  std::string _value;
  bool _started = false;
  bool _complete = false;
  bool _keep_alive = true;
  bool _failed = false;
  bool _finished = false;
  failure _failure = failure::none;
  std::string _error;
};

std::string_view reason_phrase(int status);

// Appends a complete response. `extra_headers` are whole header lines, each
// ending in CRLF. Every response carries Cache-Control: no-store because
// bodies may hold job data.
void write_response(std::string& out, int status, std::string_view content_type,
                    std::string_view body, std::string_view extra_headers, bool close);
// The same response without its body (`body_size` bytes the caller sends
// right after it): a large body goes to the transport as it is
// (net::stream::write encrypts it in place) instead of being copied first.
void write_response_head(std::string& out, int status, std::string_view content_type, size_t body_size,
                         std::string_view extra_headers, bool close);

}  // namespace relay::http
