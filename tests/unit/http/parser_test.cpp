#include <doctest/doctest.h>

#include <string>

#include "relay/http.h"

using namespace relay;
using namespace relay::http;
using event = request_parser::event;

namespace {

limits small_limits() {
  limits l;
  l.max_uri_bytes = 64;
  l.max_header_bytes = 256;
  l.max_headers = 8;
  l.max_body_bytes = 32;
  return l;
}

// Runs the parser past the stop after the headers of a request with a body
// (where a connection authorises it), as a connection does.
request_parser::result execute_whole(request_parser& p, const char* data, size_t len) {
  auto r = p.execute(data, len);
  if (r.what != event::headers_complete) return r;
  auto rest = p.execute(data + r.consumed, len - r.consumed);
  return {r.consumed + rest.consumed, rest.what};
}

}  // namespace

TEST_CASE("pipelined requests are returned one at a time, in order") {
  limits l;
  request_parser p(l);
  std::string in =
      "POST /v1/queues/a/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 13\r\n\r\n{\"payload\":1}"
      "GET /v1/jobs/00000000000000a1?wait_ms=5&x=1 HTTP/1.1\r\nHost: x\r\n\r\n";
  auto r1 = execute_whole(p, in.data(), in.size());
  REQUIRE(r1.what == event::request_complete);
  CHECK_EQ(p.current().verb, method::post);
  CHECK_EQ(p.current().path(), "/v1/queues/a/jobs");
  CHECK_EQ(p.current().body, "{\"payload\":1}");
  CHECK_GE(p.current().body.capacity(), p.current().body.size() + body_padding);
  p.next();
  auto r2 = p.execute(in.data() + r1.consumed, in.size() - r1.consumed);
  REQUIRE(r2.what == event::request_complete);
  CHECK_EQ(r1.consumed + r2.consumed, in.size());
  CHECK_EQ(p.current().verb, method::get);
  CHECK_EQ(p.current().path(), "/v1/jobs/00000000000000a1");
  CHECK_EQ(p.current().query_param("wait_ms").value(), "5");
  CHECK_EQ(p.current().query_param("x").value(), "1");
  CHECK_FALSE(p.current().query_param("nope").has_value());
  CHECK(p.current().keep_alive);
}

TEST_CASE("a request split across reads is reassembled") {
  limits l;
  request_parser p(l);
  std::string in = "POST /x HTTP/1.1\r\nContent-Length: 5\r\nAuthorization: Bearer k\r\n\r\nhello";
  size_t headers_end = in.find("\r\n\r\n") + 4;
  for (size_t i = 0; i + 1 < in.size(); ++i) {
    auto r = p.execute(in.data() + i, 1);
    // The parser stops once after the headers: a body follows.
    REQUIRE(r.what == (i + 1 == headers_end ? event::headers_complete : event::need_more));
    REQUIRE_EQ(r.consumed, 1u);
  }
  auto r = p.execute(in.data() + in.size() - 1, 1);
  REQUIRE(r.what == event::request_complete);
  CHECK_EQ(p.current().body, "hello");
  CHECK_EQ(p.current().authorization, "Bearer k");
}

TEST_CASE("chunked bodies are decoded and bounded") {
  request_parser p(small_limits());
  std::string ok = "POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
  auto r = execute_whole(p, ok.data(), ok.size());
  REQUIRE(r.what == event::request_complete);
  CHECK_EQ(p.current().body, "abcde");

  request_parser q(small_limits());
  std::string big = "POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n21\r\n" + std::string(33, 'a') + "\r\n0\r\n\r\n";
  CHECK(execute_whole(q, big.data(), big.size()).what == event::error);
  CHECK_EQ(q.error(), api_error::payload_too_large);
}

TEST_CASE("requests that switch protocols are refused at their headers") {
  for (std::string in : {std::string("GET /x HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"),
                         std::string("GET /x HTTP/1.1\r\nUpgrade: h2c\r\n\r\n"),
                         std::string("CONNECT relay:443 HTTP/1.1\r\nHost: relay:443\r\n\r\n")}) {
    request_parser p(small_limits());
    CHECK(p.execute(in.data(), in.size()).what == event::error);
    CHECK_EQ(p.error(), api_error::bad_request);
    CHECK(p.error_detail().find("Upgrade") != std::string::npos);
  }
}

TEST_CASE("the body buffer is not reserved before the body is accepted") {
  limits l;
  request_parser p(l);
  std::string in = "POST /x HTTP/1.1\r\nContent-Length: 1000000\r\n\r\n";
  auto r = p.execute(in.data(), in.size());
  REQUIRE(r.what == event::headers_complete);
  CHECK_EQ(p.current().content_length, 1000000u);
  CHECK_LT(p.current().body.capacity(), 1000u);
}

TEST_CASE("limits map to the right errors") {
  SUBCASE("body over the limit by Content-Length, before any body byte") {
    request_parser p(small_limits());
    std::string in = "POST /x HTTP/1.1\r\nContent-Length: 33\r\n\r\n";
    CHECK(p.execute(in.data(), in.size()).what == event::error);
    CHECK_EQ(p.error(), api_error::payload_too_large);
  }
  SUBCASE("URI too long") {
    request_parser p(small_limits());
    std::string in = "GET /" + std::string(80, 'a') + " HTTP/1.1\r\n\r\n";
    CHECK(p.execute(in.data(), in.size()).what == event::error);
    CHECK_EQ(p.error(), api_error::uri_too_long);
  }
  SUBCASE("headers too large") {
    request_parser p(small_limits());
    std::string in = "GET / HTTP/1.1\r\nX-A: " + std::string(300, 'a') + "\r\n\r\n";
    CHECK(p.execute(in.data(), in.size()).what == event::error);
    CHECK_EQ(p.error(), api_error::headers_too_large);
  }
  SUBCASE("too many headers") {
    request_parser p(small_limits());
    std::string in = "GET / HTTP/1.1\r\n";
    for (int i = 0; i < 9; ++i) in += "X: 1\r\n";
    in += "\r\n";
    CHECK(p.execute(in.data(), in.size()).what == event::error);
    CHECK_EQ(p.error(), api_error::headers_too_large);
  }
  SUBCASE("POST without a length") {
    request_parser p(small_limits());
    std::string in = "POST /x HTTP/1.1\r\nHost: a\r\n\r\n";
    CHECK(p.execute(in.data(), in.size()).what == event::error);
    CHECK_EQ(p.error(), api_error::length_required);
  }
  SUBCASE("Content-Length together with chunked is refused (request smuggling)") {
    request_parser p(small_limits());
    std::string in = "POST /x HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
    CHECK(p.execute(in.data(), in.size()).what == event::error);
    CHECK_EQ(p.error(), api_error::bad_request);
  }
  SUBCASE("garbage") {
    request_parser p(small_limits());
    std::string in = "\x16\x03\x01 hello\r\n\r\n";
    CHECK(p.execute(in.data(), in.size()).what == event::error);
    CHECK_EQ(p.error(), api_error::bad_request);
    CHECK(p.error_detail().find("malformed") != std::string::npos);
  }
}

TEST_CASE("Expect: 100-continue pauses after the headers") {
  limits l;
  request_parser p(l);
  std::string in = "POST /x HTTP/1.1\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n";
  auto r = p.execute(in.data(), in.size());
  CHECK(r.what == event::headers_complete);
  CHECK_EQ(r.consumed, in.size());
  std::string body = "{}";
  auto r2 = p.execute(body.data(), body.size());
  REQUIRE(r2.what == event::request_complete);
  CHECK_EQ(p.current().body, "{}");
}

TEST_CASE("Connection: close and HTTP/1.0 end keep-alive") {
  limits l;
  request_parser p(l);
  std::string in = "GET / HTTP/1.1\r\nConnection: close\r\n\r\n";
  REQUIRE(p.execute(in.data(), in.size()).what == event::request_complete);
  CHECK_FALSE(p.current().keep_alive);
  request_parser q(l);
  std::string in10 = "GET / HTTP/1.0\r\n\r\n";
  REQUIRE(q.execute(in10.data(), in10.size()).what == event::request_complete);
  CHECK_FALSE(q.current().keep_alive);
}

TEST_CASE("responses carry length, no-store and close when asked") {
  std::string out;
  write_response(out, 429, "application/json", "{}", "Retry-After: 1\r\n", true);
  CHECK_EQ(out,
           "HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
           "Cache-Control: no-store\r\nRetry-After: 1\r\nConnection: close\r\n\r\n{}");
}

TEST_CASE("error bodies come from the one table") {
  CHECK_EQ(describe(api_error::lease_lost).status, 409);
  CHECK_EQ(api_error_body(api_error::forbidden, "no \"submit\" on q"),
           "{\"error\":{\"code\":\"forbidden\",\"message\":\"no \\\"submit\\\" on q\"}}");
}

TEST_CASE("a body sink takes the body instead of request::body; the size limit still counts every byte") {
  struct collect : body_sink {
    std::string got;
    bool feed(const char* data, size_t len) override {
      got.append(data, len);
      return true;
    }
  } sink;
  limits l = small_limits();
  request_parser p(l);
  std::string head = "POST /v1/queues/a/jobs HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n";
  auto r = p.execute(head.data(), head.size());
  REQUIRE(r.what == event::headers_complete);
  p.set_body_sink(&sink);
  std::string body = "10\r\n{\"payload\":\"abc\"\r\n1\r\n}\r\n0\r\n\r\n";
  auto b = p.execute(body.data(), body.size());
  CHECK(b.what == event::request_complete);
  CHECK_EQ(sink.got, "{\"payload\":\"abc\"}");
  CHECK(p.current().body.empty());
  CHECK_EQ(p.body_received(), 17u);
  p.next();

  // 32 bytes at most, counted whether or not they were held.
  request_parser q(l);
  r = q.execute(head.data(), head.size());
  REQUIRE(r.what == event::headers_complete);
  q.set_body_sink(&sink);
  std::string big = "21\r\n" + std::string(33, 'x') + "\r\n";
  CHECK(q.execute(big.data(), big.size()).what == event::error);
  CHECK(q.error() == api_error::payload_too_large);
}
