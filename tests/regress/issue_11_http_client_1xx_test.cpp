// Issue 11: the HTTP client must skip interim 1xx answers (100 Continue,
// 102 Processing, 103 Early Hints) and hand its request the final answer
// that follows; taking an interim answer for the final one would give the
// caller an empty 100 and then misread the real answer as the next
// request's (or as unasked). A 101 the client never asked for is a
// protocol error, not an answer.
#include <doctest/doctest.h>
#include <uv.h>

#include <string>

#include "relay/http_client.h"
#include "../support/raw_http_server.h"

namespace {

using relay::http::client_conn;
using relay::http::client_error;
using relay::http::client_response;
using test::raw_http_server;

using outcome = test::client_outcome;
using test::record;

client_conn* connect_to(uv_loop_t* loop, const raw_http_server& server) {
  client_conn::options o;
  o.host = "127.0.0.1";
  o.port = server.port();
  return client_conn::create(loop, o);
}

}  // namespace

TEST_CASE("interim 1xx answers are skipped and the final answer is delivered") {
  raw_http_server server([](const std::string& request) {
    std::string body = request.find("/second") != std::string::npos ? R"({"n":2})" : R"({"n":1})";
    return raw_http_server::answer{{"HTTP/1.1 100 Continue\r\n\r\n", "HTTP/1.1 102 Processing\r\n\r\n",
                                    "HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n",
                                    "HTTP/1.1 200 OK\r\nContent-Length: " + std::to_string(body.size()) + "\r\n\r\n" + body},
                                   20, false};
  });
  uv_loop_t loop;
  uv_loop_init(&loop);
  client_conn* c = connect_to(&loop, server);
  outcome first, second;
  c->request("POST", "/first", R"({"x":1})", record(first), 5000);
  REQUIRE(test::run_until(&loop, [&] { return first.done; }));
  CHECK_MESSAGE(!first.error, first.error.message);
  CHECK_EQ(first.response.status, 200);
  CHECK_EQ(first.response.body, R"({"n":1})");
  // The same connection stays in step: the next request gets its own answer.
  c->request("POST", "/second", "{}", record(second), 5000);
  REQUIRE(test::run_until(&loop, [&] { return second.done; }));
  CHECK_MESSAGE(!second.error, second.error.message);
  CHECK_EQ(second.response.status, 200);
  CHECK_EQ(second.response.body, R"({"n":2})");
  CHECK_EQ(server.connections(), 1u);
  c->close();
  uv_run(&loop, UV_RUN_DEFAULT);
  CHECK_EQ(uv_loop_close(&loop), 0);
}

TEST_CASE("interim answers in the same read as the final one are skipped too") {
  raw_http_server server([](const std::string&) {
    return raw_http_server::answer{
        {"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
         "HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\n{}"},
        0, false};
  });
  uv_loop_t loop;
  uv_loop_init(&loop);
  client_conn* c = connect_to(&loop, server);
  outcome o;
  c->request("POST", "/", "{}", record(o), 5000);
  REQUIRE(test::run_until(&loop, [&] { return o.done; }));
  CHECK_MESSAGE(!o.error, o.error.message);
  CHECK_EQ(o.response.status, 201);
  CHECK_EQ(o.response.body, "{}");
  c->close();
  uv_run(&loop, UV_RUN_DEFAULT);
  CHECK_EQ(uv_loop_close(&loop), 0);
}

TEST_CASE("a 101 to a request that did not ask to upgrade is a protocol error") {
  raw_http_server server([](const std::string&) {
    return raw_http_server::answer{{"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n"}, 0,
                                   false};
  });
  uv_loop_t loop;
  uv_loop_init(&loop);
  client_conn* c = connect_to(&loop, server);
  outcome o;
  c->request("GET", "/", {}, record(o), 5000);
  REQUIRE(test::run_until(&loop, [&] { return o.done; }));
  CHECK_EQ(o.error.what, client_error::kind::protocol);
  CHECK_EQ(o.response.status, 0);
  c->close();
  uv_run(&loop, UV_RUN_DEFAULT);
  CHECK_EQ(uv_loop_close(&loop), 0);
}
