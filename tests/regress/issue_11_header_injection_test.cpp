// Issue 11: bunny pasted relay-supplied job ids into the local service's
// request unchecked; an id with CR LF in it ended bunny's request early and
// smuggled a second one (`DELETE /admin/everything`) to the service. The
// HTTP client is the last place that can stop it whatever its caller
// forgot: request() refuses a method that is not a token, a target with a
// byte outside visible ASCII and a header line that is not `Name: value`
// CRLF -- with kind `refused`, from the loop (never inside request()), and
// without one byte reaching the server.
#include <doctest/doctest.h>
#include <uv.h>

#include <chrono>
#include <iterator>
#include <string>
#include <thread>
#include <vector>

#include "../support/raw_http_server.h"
#include "relay/http_client.h"

namespace {

using relay::http::client_conn;
using relay::http::client_error;
using relay::http::client_response;
using test::raw_http_server;

raw_http_server::answer ok(const std::string&) {
  return {{"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"}, 0, false};
}

struct attempt {
  std::string method = "POST";
  std::string target = "/run";
  std::string headers;
};

}  // namespace

TEST_CASE("a request that would split on the wire is refused and nothing is sent") {
  const std::string smuggle = "0000000000000001\r\nContent-Length: 0\r\n\r\nDELETE /admin/everything HTTP/1.1\r\nX: y";
  const attempt bad[] = {
      {"POST", "/v1/jobs/" + smuggle + "/complete", ""},        // CR LF in the target
      {"POST", "/run", "X-Job-Id: " + smuggle + "\r\n"},          // CR LF in a header value
      {"POST", "/run", "X-Job-Id: 1\nX-Other: 2\r\n"},          // a bare LF
      {"POST", "/run", std::string("X-Job-Id: a\0b\r\n", 15)},  // NUL in a value
      {"POST", "/run", "X-Job-Id: 1"},                          // no CRLF at the end
      {"POST", "/run", "X Job: 1\r\n"},                         // the name is not a token
      {"POST", "/run", ": 1\r\n"},                              // no name
      {"POST", "/run", " folded: 1\r\n"},                       // obsolete line folding
      {"POST", "/run", "Content-Length: 0\r\n"},                // a second framing header
      {"POST", "/run", "Transfer-Encoding: chunked\r\n"},
      {"POST", "/a b", ""},                                     // a space in the target
      {"POST", std::string("/a\0b", 4), ""},                    // NUL in the target
      {"POST", "/caf\xc3\xa9", ""},                             // bytes above 0x7E
      {"POST", "", ""},                                         // no target
      {"GET /x HTTP/1.1\r\nX:", "/", ""},                       // the method is not a token
      {"", "/", ""},
  };
  raw_http_server server(ok);
  uv_loop_t loop;
  uv_loop_init(&loop);
  client_conn::options o;
  o.host = "127.0.0.1";
  o.port = server.port();
  client_conn* c = client_conn::create(&loop, o);
  std::vector<int> calls(std::size(bad), 0);
  for (size_t i = 0; i < std::size(bad); ++i) {
    const attempt& a = bad[i];
    c->request(a.method, a.target, "{}", [&calls, i](const client_error& e, client_response& r) {
      CAPTURE(i);
      CHECK_EQ(e.what, client_error::kind::refused);
      CHECK_EQ(r.status, 0);
      ++calls[i];
    }, 5000, a.headers);
    // "Nothing answers on someone else's stack."
    CHECK_EQ(calls[i], 0);
  }
  REQUIRE(test::run_until(&loop, [&] {
    for (int n : calls)
      if (n == 0) return false;
    return true;
  }));
  CHECK_EQ(calls, std::vector<int>(std::size(bad), 1));
  // Give anything that was sent all the time it needs to arrive.
  test::run_until(&loop, [] { return false; }, 300);
  CHECK_EQ(server.connections(), 0u);
  CHECK_EQ(server.bytes_received(), 0u);

  // The connection is still usable, and well-formed headers go through as given.
  bool done = false;
  client_error error;
  c->request("POST", "/v1/jobs/0000000000000001/complete?x=%0D%0A", "{}",
             [&](const client_error& e, client_response& r) {
               error = e;
               CHECK_EQ(r.status, 200);
               done = true;
             },
             5000, "X-Job-Id: 0000000000000001\r\nX-Note: tab\tand obs-text \xe9 are fine\r\n");
  REQUIRE(test::run_until(&loop, [&] { return done; }));
  CHECK_MESSAGE(!error, error.message);
  CHECK_EQ(server.requests(), 1u);
  auto seen = server.seen();
  REQUIRE_EQ(seen.size(), 1u);
  CHECK(seen[0].rfind("POST /v1/jobs/0000000000000001/complete?x=%0D%0A HTTP/1.1\r\n", 0) == 0);
  CHECK(seen[0].find("\r\nX-Job-Id: 0000000000000001\r\n") != std::string::npos);
  c->close();
  uv_run(&loop, UV_RUN_DEFAULT);
  CHECK_EQ(uv_loop_close(&loop), 0);
}

TEST_CASE("a refused request still pending when the owner closes is answered, once") {
  raw_http_server server(ok);
  uv_loop_t loop;
  uv_loop_init(&loop);
  client_conn::options o;
  o.host = "127.0.0.1";
  o.port = server.port();
  client_conn* c = client_conn::create(&loop, o);
  int calls = 0;
  client_error error;
  c->request("POST", "/run\r\n", "{}", [&](const client_error& e, client_response&) {
    error = e;
    ++calls;
  });
  c->close();
  uv_run(&loop, UV_RUN_DEFAULT);
  CHECK_EQ(calls, 1);
  CHECK_EQ(error.what, client_error::kind::refused);
  CHECK_EQ(server.connections(), 0u);
  CHECK_EQ(uv_loop_close(&loop), 0);
}
