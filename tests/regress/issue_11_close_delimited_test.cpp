// Issue 11: an answer with neither Content-Length nor chunked encoding ends
// where the connection does (RFC 9112, 6.3) -- what HTTP/1.0 services such
// as Python's http.server send. The client must complete it at EOF rather
// than fail it, must not reuse the connection after it (requests behind it
// go again on a new one), and must still fail an answer that EOF cuts short
// inside a Content-Length or chunked body (kind lost). Over TLS such a body
// ends only with the server's close_notify: a bare FIN may be a truncation
// by anyone on the path (RFC 8446, 6.1). End to end: bunny's http handler
// against such a service.
#include <doctest/doctest.h>
#include <uv.h>

#include <atomic>
#include <chrono>
#include <string>
#include <thread>

#include "../support/bunny_fixture.h"
#include "../support/raw_http_server.h"
#include "relay/http_client.h"

namespace {

using relay::http::client_conn;
using relay::http::client_error;
using relay::http::client_response;
using test::raw_http_server;

using outcome = test::client_outcome;
using test::record;

std::string body_of(const std::string& request) { return request.substr(request.find("\r\n\r\n") + 4); }

// What http.server's BaseHTTPRequestHandler sends by default: HTTP/1.0, no
// Content-Length, then it closes.
raw_http_server::answer http10_echo(const std::string& request) {
  return {{"HTTP/1.0 200 OK\r\nServer: SimpleHTTP/0.6 Python/3.11\r\nContent-Type: application/json\r\n\r\n",
           "{\"echo\":" + body_of(request) + "}"},
          20, true};
}

struct client {
  explicit client(const raw_http_server& server) {
    uv_loop_init(&loop);
    client_conn::options o;
    o.host = "127.0.0.1";
    o.port = server.port();
    conn = client_conn::create(&loop, o);
  }
  ~client() {
    conn->close();
    uv_run(&loop, UV_RUN_DEFAULT);
    CHECK_EQ(uv_loop_close(&loop), 0);
  }
  uv_loop_t loop;
  client_conn* conn;
};

// Serves one TLS connection on a thread with relay's own TLS session:
// reads one request, answers `answer`, then ends the stream with or without
// close_notify (always with a FIN).
class tls_once_server {
 public:
  tls_once_server(std::string answer, bool close_notify) : _ctx(test::server_tls()) {
    _listen = test::loopback_listener(1, port);
    _thread = std::thread([this, answer = std::move(answer), close_notify] { serve(answer, close_notify); });
  }
  ~tls_once_server() {
    _thread.join();
    ::close(_listen);
  }
  uint16_t port = 0;
  std::atomic<bool> answered{false};

 private:
  void serve(const std::string& answer, bool close_notify) {
    pollfd lp{_listen, POLLIN, 0};
    if (poll(&lp, 1, 5000) <= 0) return;
    int fd = accept4(_listen, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) return;
    relay::tls::session s(_ctx);
    auto flush = [&] {
      std::string out;
      s.take_output(out);
      for (size_t off = 0; off < out.size();) {
        ssize_t n = ::send(fd, out.data() + off, out.size() - off, MSG_NOSIGNAL);
        if (n <= 0) return;
        off += static_cast<size_t>(n);
      }
    };
    std::string plain;
    auto until = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    // The client sends one request with Content-Length: 1.
    while (std::chrono::steady_clock::now() < until) {
      size_t head = plain.find("\r\n\r\n");
      if (head != std::string::npos && plain.size() >= head + 5) break;
      pollfd p{fd, POLLIN, 0};
      if (poll(&p, 1, 50) <= 0) continue;
      char buf[16384];
      ssize_t n = ::recv(fd, buf, sizeof buf, 0);
      if (n <= 0) break;
      s.feed(buf, static_cast<size_t>(n));
      if (s.read(plain) == relay::tls::session::status::error) break;
      flush();
    }
    s.write(answer);
    if (close_notify) s.shutdown();
    flush();
    answered = true;
    ::shutdown(fd, SHUT_WR);
    // Wait for the client to close too, so that our close sends no reset
    // that could overtake what we sent.
    for (int i = 0; i < 100; ++i) {
      pollfd p{fd, POLLIN, 0};
      if (poll(&p, 1, 50) <= 0) continue;
      char buf[4096];
      if (::recv(fd, buf, sizeof buf, 0) <= 0) break;
    }
    ::close(fd);
  }

  std::shared_ptr<const relay::tls::context> _ctx;
  int _listen = -1;
  std::thread _thread;
};

}  // namespace

TEST_CASE("over TLS, an answer ended by the close counts only when the server sent close_notify") {
  bool close_notify = false;
  SUBCASE("with close_notify: complete") { close_notify = true; }
  SUBCASE("without: perhaps truncated, so lost") { close_notify = false; }
  tls_once_server server("HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{\"whole\":true}", close_notify);
  uv_loop_t loop;
  uv_loop_init(&loop);
  client_conn::options o;
  o.host = "127.0.0.1";
  o.port = server.port;
  o.server_name = "localhost";
  o.tls = test::client_tls("worker");
  client_conn* c = client_conn::create(&loop, o);
  outcome got;
  c->request("POST", "/run", "1", record(got), 10000);
  REQUIRE(test::run_until(&loop, [&] { return got.done; }));
  CHECK(server.answered);
  if (close_notify) {
    CHECK_MESSAGE(!got.error, got.error.message);
    CHECK_EQ(got.response.status, 200);
    CHECK_EQ(got.response.body, R"({"whole":true})");
  } else {
    CHECK_EQ(got.error.what, client_error::kind::lost);
    CHECK_EQ(got.response.status, 0);
  }
  c->close();
  uv_run(&loop, UV_RUN_DEFAULT);
  CHECK_EQ(uv_loop_close(&loop), 0);
}

TEST_CASE("an HTTP/1.0 answer ended by the close is delivered, and the next request gets a new connection") {
  raw_http_server server(http10_echo);
  client c(server);
  outcome first, second;
  c.conn->request("POST", "/run", "1", record(first), 5000);
  REQUIRE(test::run_until(&c.loop, [&] { return first.done; }));
  CHECK_MESSAGE(!first.error, first.error.message);
  CHECK_EQ(first.response.status, 200);
  CHECK_EQ(first.response.body, R"({"echo":1})");
  c.conn->request("POST", "/run", "2", record(second), 5000);
  REQUIRE(test::run_until(&c.loop, [&] { return second.done; }));
  CHECK_MESSAGE(!second.error, second.error.message);
  CHECK_EQ(second.response.body, R"({"echo":2})");
  CHECK_EQ(server.connections(), 2u);
}

TEST_CASE("requests pipelined behind a close-delimited answer are sent again on a new connection") {
  raw_http_server server(http10_echo);
  client c(server);
  outcome a, b, d;
  c.conn->request("POST", "/run", "\"a\"", record(a), 5000);
  c.conn->request("POST", "/run", "\"b\"", record(b), 5000);
  c.conn->request("POST", "/run", "\"d\"", record(d), 5000);
  REQUIRE(test::run_until(&c.loop, [&] { return a.done && b.done && d.done; }));
  for (outcome* o : {&a, &b, &d}) CHECK_MESSAGE(!o->error, o->error.message);
  CHECK_EQ(a.response.body, R"({"echo":"a"})");
  CHECK_EQ(b.response.body, R"({"echo":"b"})");
  CHECK_EQ(d.response.body, R"({"echo":"d"})");
  CHECK_EQ(server.connections(), 3u);
}

TEST_CASE("an answer the close cuts short is lost, not delivered") {
  std::string answer;
  SUBCASE("inside a Content-Length body") { answer = "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{\"a\":"; }
  SUBCASE("inside a chunked body") { answer = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"a\":"; }
  SUBCASE("inside the head") { answer = "HTTP/1.1 200 OK\r\nContent-Le"; }
  raw_http_server server([&](const std::string&) { return raw_http_server::answer{{answer}, 0, true}; });
  client c(server);
  outcome o;
  c.conn->request("POST", "/run", "1", record(o), 5000);
  REQUIRE(test::run_until(&c.loop, [&] { return o.done; }));
  CHECK_EQ(o.error.what, client_error::kind::lost);
  CHECK_EQ(o.response.status, 0);
  CHECK(o.response.body.empty());
}

TEST_CASE("bunny's http handler runs jobs against an HTTP/1.0 service") {
  test::relay_process relay;
  raw_http_server service(http10_echo);
  test::bunny_process bunny(relay, {.queues = R"(["render"])",
                                    .handler = R"({"http": "http://)" + service.address() + R"(/run", "timeout_ms": 10000})"});
  for (int i = 0; i < 3; ++i) {
    auto r = relay.curl("producer", "POST", "/v1/queues/render/jobs",
                        R"({"payload":{"n":)" + std::to_string(i) + R"(},"max_attempts":1})");
    REQUIRE_MESSAGE(r.status == 201, r.body);
    std::string job = test::wait_job(relay, test::field(r.body, "id"));
    CHECK_MESSAGE(test::field(job, "state") == "succeeded", job);
    CHECK_MESSAGE(job.find(R"("result":{"echo":{"n":)" + std::to_string(i) + "}}") != std::string::npos, job);
  }
  // Each answer closed its connection, so none was reused.
  CHECK_EQ(service.connections(), 3u);
}
