// Issue 9, found by the http_response fuzzer: a response completed by the
// end of the stream (llhttp_finish) could be reported keep-alive -- a 204
// with an unknown Transfer-Encoding is delimited by the close in llhttp,
// yet llhttp_should_keep_alive() says yes -- so a client would hand the next
// request to a connection that no longer exists. A response ended by EOF
// is never keep-alive.
#include <doctest/doctest.h>

#include <string>

#include "relay/http.h"

using relay::http::response_parser;

TEST_CASE("a response that the end of the stream completes is not keep-alive") {
  const std::string stream = "HTTP/1.1 204 No Content\r\nTransfer-Encoding: core\r\n\r\n";
  response_parser p(1024);
  auto r = p.execute(stream.data(), stream.size());
  REQUIRE_EQ(r.consumed, stream.size());
  REQUIRE(r.what == response_parser::event::need_more);  // llhttp waits for the close
  REQUIRE(p.finish() == response_parser::event::response_complete);
  CHECK_EQ(p.current().status, 204);
  CHECK_FALSE(p.keep_alive());
}

TEST_CASE("a close-delimited 200 is not keep-alive either") {
  const std::string stream = "HTTP/1.1 200 OK\r\n\r\nhello";
  response_parser p(1024);
  auto r = p.execute(stream.data(), stream.size());
  REQUIRE_EQ(r.consumed, stream.size());
  REQUIRE(p.finish() == response_parser::event::response_complete);
  CHECK_EQ(p.current().body, "hello");
  CHECK_FALSE(p.keep_alive());
}
