// relay::http::request_parser over a stream of pipelined requests, read in
// pieces the input chooses.
//
// Input: [limits byte] [cut count] [u16 cut]... [stream]. Bit 0 of the limits
// byte picks small limits (so that every limit is reachable in a short
// input) instead of relay's defaults.
//
// Invariants: a call never consumes more than it was given; need_more means
// everything was taken; a complete request respects every limit and its body
// carries the padding simdjson reads into; and the parser's answers do not
// depend on where the stream was cut (the same requests, then failing or
// not alike).
#include <string>
#include <vector>

#include "fuzz_input.h"
#include "relay/http.h"

using namespace relay;
using namespace relay::http;

namespace {

struct outcome {
  std::vector<std::string> requests;  // one digest per complete request
  bool failed = false;
  size_t consumed = 0;
};

// Checks the announced length against the body when the parser records it
// (the fields are newer than the parser's first version).
template <class Request>
void check_length(const Request& r) {
  if constexpr (requires { r.content_length; r.chunked; }) {
    if (!r.chunked && r.content_length != 0) FUZZ_CHECK(r.body.size() == r.content_length);
    if (r.chunked) FUZZ_CHECK(r.content_length == 0);
  }
}

std::string digest(const request& r) {
  std::string d;
  d += std::to_string(static_cast<int>(r.verb));
  d += '|';
  d += r.target;
  d += '|';
  d += r.authorization;
  d += '|';
  d += r.keep_alive ? 'k' : 'c';
  d += r.expect_continue ? 'e' : '-';
  d += '|';
  d += r.body;
  return d;
}

void check_request(const request& r, const limits& l) {
  FUZZ_CHECK(r.body.size() <= l.max_body_bytes);
  FUZZ_CHECK(r.target.size() <= l.max_uri_bytes);
  FUZZ_CHECK(r.body.capacity() >= r.body.size() + body_padding);
  check_length(r);
  std::string_view path = r.path();
  FUZZ_CHECK(path.size() <= r.target.size());
  FUZZ_CHECK(std::string_view(r.target).substr(0, path.size()) == path);
  if (auto v = r.query_param("wait_ms")) FUZZ_CHECK(v->size() <= r.query().size());
}

outcome run(const limits& l, const std::vector<std::string_view>& pieces) {
  request_parser p(l);
  outcome o;
  for (std::string_view piece : pieces) {
    size_t off = 0;
    // Each stop consumes at least the byte that completed something, so a
    // piece yields at most one stop per byte (and a final need_more).
    size_t budget = 2 * piece.size() + 8;
    while (!o.failed) {
      FUZZ_CHECK(budget-- > 0);
      request_parser::result r = p.execute(piece.data() + off, piece.size() - off);
      FUZZ_CHECK(r.consumed <= piece.size() - off);
      off += r.consumed;
      o.consumed += r.consumed;
      if (r.what == request_parser::event::need_more) {
        FUZZ_CHECK(off == piece.size());
        break;
      } else if (r.what == request_parser::event::request_complete) {
        check_request(p.current(), l);
        o.requests.push_back(digest(p.current()));
        p.next();
      } else if (r.what == request_parser::event::error) {
        o.failed = true;
        // An error sticks: nothing after it is parsed.
        request_parser::result again = p.execute("GET / HTTP/1.1\r\n\r\n", 18);
        FUZZ_CHECK(again.what == request_parser::event::error && again.consumed == 0);
      } else {
        // A stop inside a request (headers complete, before the body) or
        // one added later: the connection would decide, then read on.
        FUZZ_CHECK(p.started());
      }
    }
    if (o.failed) break;
  }
  return o;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  fuzz::input in(data, size);
  limits l;
  if (in.byte() & 1) {
    l.max_uri_bytes = 64;
    l.max_header_bytes = 256;
    l.max_headers = 8;
    l.max_body_bytes = 32;
  }
  std::vector<std::string_view> pieces = fuzz::split(in);
  std::string_view stream = in.rest();

  outcome split = run(l, pieces);
  outcome whole = run(l, {stream});
  FUZZ_CHECK(split.requests == whole.requests);
  FUZZ_CHECK(split.failed == whole.failed);
  // Which error is reported may depend on the cuts: llhttp hands over a
  // span (the URI, a header) at the end of each read, so a URI over its
  // limit that also holds an invalid byte is 414 when cut before that byte
  // and 400 when read at once. Both refuse the stream; that is what counts.
  if (!split.failed) FUZZ_CHECK(split.consumed == stream.size() && whole.consumed == stream.size());
  return 0;
}
