#include <doctest/doctest.h>

#include <string>
#include <vector>

#include "relay/http.h"

using namespace relay::http;
using event = response_parser::event;

namespace {

// Feeds `in` in pieces of `step` bytes (0: all at once) and collects every
// complete response; stops at the first error.
struct collected {
  std::vector<response> responses;
  std::vector<bool> keep_alive;
  bool failed = false;
};

collected feed(response_parser& p, const std::string& in, size_t step = 0) {
  collected c;
  size_t off = 0;
  while (off < in.size() && !c.failed) {
    size_t n = step ? std::min(step, in.size() - off) : in.size() - off;
    size_t used = 0;
    while (used < n) {
      auto r = p.execute(in.data() + off + used, n - used);
      REQUIRE_LE(r.consumed, n - used);
      used += r.consumed;
      if (r.what == event::need_more) break;
      if (r.what == event::error) {
        c.failed = true;
        break;
      }
      c.responses.push_back(std::move(p.current()));
      c.keep_alive.push_back(p.keep_alive());
      p.next();
    }
    off += n;
  }
  return c;
}

}  // namespace

TEST_CASE("pipelined responses come out one at a time, in order, whatever the read sizes") {
  std::string in =
      "HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: 16\r\n\r\n{\"ids\":[\"0001\"]}"
      "HTTP/1.1 429 Too Many Requests\r\nRetry-After: 3\r\nContent-Length: 2\r\n\r\n{}"
      "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
  for (size_t step : {size_t{0}, size_t{1}, size_t{7}}) {
    CAPTURE(step);
    response_parser p(1024);
    collected c = feed(p, in, step);
    CHECK_FALSE(c.failed);
    REQUIRE_EQ(c.responses.size(), 3u);
    CHECK_EQ(c.responses[0].status, 201);
    CHECK_EQ(c.responses[0].body, "{\"ids\":[\"0001\"]}");
    CHECK_EQ(c.responses[0].retry_after, "");
    CHECK_EQ(c.responses[1].status, 429);
    CHECK_EQ(c.responses[1].retry_after, "3");
    CHECK_EQ(c.responses[1].body, "{}");
    CHECK_EQ(c.responses[2].status, 200);
    CHECK_EQ(c.responses[2].body, "abcde");
    CHECK_EQ(c.keep_alive, std::vector<bool>{true, true, true});
  }
}

TEST_CASE("interim 1xx responses are skipped and the final response is the one returned") {
  response_parser p(1024);
  std::string in =
      "HTTP/1.1 100 Continue\r\n\r\n"
      "HTTP/1.1 103 Early Hints\r\nRetry-After: 9\r\nLink: </x>\r\n\r\n"
      "HTTP/1.1 413 Content Too Large\r\nContent-Length: 5\r\nConnection: close\r\n\r\nlarge";
  collected c = feed(p, in);
  CHECK_FALSE(c.failed);
  REQUIRE_EQ(c.responses.size(), 1u);
  CHECK_EQ(c.responses[0].status, 413);
  CHECK_EQ(c.responses[0].body, "large");
  CHECK_EQ(c.responses[0].retry_after, "");  // the 103's header does not carry over
  CHECK_FALSE(c.keep_alive[0]);
}

TEST_CASE("an interim response alone is not a response") {
  response_parser p(1024);
  collected c = feed(p, "HTTP/1.1 100 Continue\r\n\r\n");
  CHECK_FALSE(c.failed);
  CHECK(c.responses.empty());
  CHECK_FALSE(p.started());
}

TEST_CASE("102 Processing and a 1xx with a body-less Content-Length are interim too, in any read sizes") {
  std::string in =
      "HTTP/1.1 102 Processing\r\n\r\n"
      "HTTP/1.1 100 Continue\r\nContent-Length: 0\r\n\r\n"
      "HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
      "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"
      "HTTP/1.1 100 Continue\r\n\r\n"
      "HTTP/1.1 202 Accepted\r\nContent-Length: 1\r\n\r\n1";
  for (size_t step : {size_t{0}, size_t{1}, size_t{5}}) {
    CAPTURE(step);
    response_parser p(1024);
    collected c = feed(p, in, step);
    CHECK_FALSE(c.failed);
    REQUIRE_EQ(c.responses.size(), 2u);
    CHECK_EQ(c.responses[0].status, 200);
    CHECK_EQ(c.responses[0].body, "{}");
    CHECK_EQ(c.responses[1].status, 202);
    CHECK_EQ(c.responses[1].body, "1");
  }
}

TEST_CASE("the end of the stream right after an interim response completes nothing") {
  response_parser p(1024);
  collected c = feed(p, "HTTP/1.1 100 Continue\r\n\r\n");
  CHECK(c.responses.empty());
  // The final answer never came: for the connection that is "lost", not a
  // response; the parser has nothing under way to complete.
  CHECK(p.finish() == event::need_more);
  CHECK(p.error_kind() == response_parser::failure::none);
}

TEST_CASE("an HTTP/1.0 answer without Content-Length ends with the stream") {
  response_parser p(1024);
  collected c = feed(p, "HTTP/1.0 200 OK\r\nServer: SimpleHTTP/0.6\r\nContent-Type: application/json\r\n\r\n{\"a\":", 3);
  CHECK_FALSE(c.failed);
  CHECK(c.responses.empty());
  feed(p, "1}");
  REQUIRE(p.finish() == event::response_complete);
  CHECK_EQ(p.current().status, 200);
  CHECK_EQ(p.current().body, "{\"a\":1}");
  CHECK_FALSE(p.keep_alive());
}

TEST_CASE("errors say what kind they are") {
  SUBCASE("malformed") {
    response_parser p(1024);
    CHECK(feed(p, "HTTP/1.1 2OO OK\r\n\r\n").failed);
    CHECK(p.error_kind() == response_parser::failure::malformed);
  }
  SUBCASE("101") {
    response_parser p(1024);
    CHECK(feed(p, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n").failed);
    CHECK(p.error_kind() == response_parser::failure::malformed);
  }
  SUBCASE("too large, announced") {
    response_parser p(4);
    CHECK(feed(p, "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n").failed);
    CHECK(p.error_kind() == response_parser::failure::too_large);
  }
  SUBCASE("too large, close-delimited") {
    response_parser p(4);
    CHECK(feed(p, "HTTP/1.0 200 OK\r\n\r\n12345").failed);
    CHECK(p.error_kind() == response_parser::failure::too_large);
  }
  SUBCASE("cut short") {
    response_parser p(1024);
    feed(p, "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc");
    CHECK(p.finish() == event::error);
    CHECK(p.error_kind() == response_parser::failure::cut_short);
  }
  SUBCASE("reset() forgets it") {
    response_parser p(1024);
    CHECK(feed(p, "nonsense\r\n\r\n").failed);
    p.reset();
    CHECK(p.error_kind() == response_parser::failure::none);
  }
}

TEST_CASE("a body without Content-Length ends with the stream and completes on finish") {
  response_parser p(1024);
  collected c = feed(p, "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the", 4);
  CHECK_FALSE(c.failed);
  CHECK(c.responses.empty());
  CHECK(p.started());
  auto r = p.execute(" end", 4);
  CHECK_EQ(r.consumed, 4u);
  CHECK(r.what == event::need_more);
  REQUIRE(p.finish() == event::response_complete);
  CHECK_EQ(p.current().status, 200);
  CHECK_EQ(p.current().body, "until the end");
  CHECK_FALSE(p.keep_alive());
  // Nothing may follow the end of the stream.
  CHECK(p.execute("x", 1).what == event::error);
}

TEST_CASE("the end of the stream after complete responses completes nothing more") {
  response_parser p(1024);
  collected c = feed(p, "HTTP/1.1 204 No Content\r\n\r\n");
  REQUIRE_EQ(c.responses.size(), 1u);
  CHECK_EQ(c.responses[0].status, 204);
  CHECK(p.finish() == event::need_more);
}

TEST_CASE("a response cut short by the end of the stream is an error") {
  SUBCASE("in the body") {
    response_parser p(1024);
    feed(p, "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc");
    CHECK(p.finish() == event::error);
  }
  SUBCASE("in the headers") {
    response_parser p(1024);
    feed(p, "HTTP/1.1 200 OK\r\nContent-Len");
    CHECK(p.finish() == event::error);
    CHECK_FALSE(p.error().empty());
  }
  SUBCASE("in a chunked body") {
    response_parser p(1024);
    feed(p, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab");
    CHECK(p.finish() == event::error);
  }
}

TEST_CASE("keep-alive follows the protocol version and the Connection header") {
  response_parser p(1024);
  collected c = feed(p,
                     "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
                     "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n");
  REQUIRE_EQ(c.responses.size(), 2u);
  CHECK_EQ(c.keep_alive, std::vector<bool>{true, false});

  response_parser p10(1024);
  collected c10 = feed(p10, "HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n");
  REQUIRE_EQ(c10.responses.size(), 1u);
  CHECK_FALSE(c10.keep_alive[0]);

  response_parser p10k(1024);
  collected c10k = feed(p10k, "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n");
  REQUIRE_EQ(c10k.responses.size(), 1u);
  CHECK(c10k.keep_alive[0]);
}

TEST_CASE("a body over the limit is refused, announced or not") {
  SUBCASE("Content-Length over the limit fails before any body byte") {
    response_parser p(8);
    auto r = p.execute("HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", 38);
    CHECK(r.what == event::error);
    CHECK_NE(p.error().find("larger than 8 bytes"), std::string::npos);
  }
  SUBCASE("a chunked body that grows over the limit") {
    response_parser p(8);
    collected c = feed(p, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabcde\r\n5\r\nfghij\r\n0\r\n\r\n");
    CHECK(c.failed);
    CHECK(c.responses.empty());
  }
  SUBCASE("a close-delimited body that grows over the limit") {
    response_parser p(8);
    collected c = feed(p, "HTTP/1.1 200 OK\r\n\r\n0123456789");
    CHECK(c.failed);
    CHECK(p.finish() == event::error);
  }
  SUBCASE("exactly the limit is fine") {
    response_parser p(8);
    collected c = feed(p, "HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\n01234567");
    REQUIRE_EQ(c.responses.size(), 1u);
    CHECK_EQ(c.responses[0].body, "01234567");
  }
}

TEST_CASE("a header line over 8 KiB is refused") {
  response_parser p(1024);
  std::string in = "HTTP/1.1 200 OK\r\nX-Big: " + std::string(9000, 'a') + "\r\nContent-Length: 0\r\n\r\n";
  collected c = feed(p, in, 1000);
  CHECK(c.failed);
  CHECK(c.responses.empty());
}

TEST_CASE("101 Switching Protocols and garbage are errors that stick") {
  SUBCASE("101") {
    response_parser p(1024);
    collected c = feed(p, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n");
    CHECK(c.failed);
    CHECK_NE(p.error().find("101"), std::string::npos);
  }
  SUBCASE("a status code of fewer than three digits (found by the fuzzer)") {
    response_parser p(1024);
    collected c = feed(p, "HTTP/1.1 11 Switching Protocols\r\n\r\nclose-delimited");
    CHECK(c.failed);
    CHECK(p.finish() == event::error);
  }
  SUBCASE("not HTTP") {
    response_parser p(1024);
    collected c = feed(p, "SSH-2.0-OpenSSH_9.2\r\n");
    CHECK(c.failed);
    CHECK(p.execute("HTTP/1.1 200 OK\r\n\r\n", 19).what == event::error);
    CHECK(p.finish() == event::error);
  }
}

TEST_CASE("reset() makes a parser fit for a new connection after an error") {
  response_parser p(1024);
  feed(p, "garbage\r\n");
  REQUIRE_FALSE(p.error().empty());
  p.reset();
  CHECK(p.error().empty());
  collected c = feed(p, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
  REQUIRE_EQ(c.responses.size(), 1u);
  CHECK_EQ(c.responses[0].body, "ok");
}
