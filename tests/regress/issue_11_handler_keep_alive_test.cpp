// Issue 11: bunny's http handler opened a new connection to the local
// service for every job. Finished runs now leave their connection open
// (HTTP/1.1 keep-alive) for the next run, one request at a time; an answer
// with Connection: close is never reused, nor is a connection whose request
// failed or timed out.
#include <doctest/doctest.h>

#include <atomic>
#include <csignal>
#include <string>

#include "../support/bunny_fixture.h"
#include "../support/raw_http_server.h"

namespace {

using test::raw_http_server;

std::string body_of(const std::string& request) { return request.substr(request.find("\r\n\r\n") + 4); }

raw_http_server::answer keep_alive_echo(const std::string& request, bool close) {
  std::string body = "{\"echo\":" + body_of(request) + "}";
  return {{"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: " + std::to_string(body.size()) +
           (close ? "\r\nConnection: close" : "") + "\r\n\r\n" + body},
          0, close};
}

// Runs `n` jobs one after another through a bunny whose handler is `service`.
void run_jobs(const test::relay_process& relay, const std::string& address, int n) {
  test::bunny_process bunny(relay, {.queues = R"(["render"])",
                                    .handler = R"({"http": "http://)" + address + R"(/run", "timeout_ms": 10000})"});
  for (int i = 0; i < n; ++i) {
    auto r = relay.curl("producer", "POST", "/v1/queues/render/jobs",
                        R"({"payload":{"n":)" + std::to_string(i) + R"(},"max_attempts":1})");
    REQUIRE_MESSAGE(r.status == 201, r.body);
    std::string job = test::wait_job(relay, test::field(r.body, "id"));
    CHECK_MESSAGE(test::field(job, "state") == "succeeded", job);
    CHECK_MESSAGE(job.find(R"("result":{"echo":{"n":)" + std::to_string(i) + "}}") != std::string::npos, job);
  }
  // Idle connections kept for later jobs must not keep bunny from exiting
  // (its loop ends only when every handle is closed) nor leak.
  bunny.proc->signal(SIGTERM);
  CHECK_EQ(bunny.proc->wait(10000), 0);
}

}  // namespace

TEST_CASE("sequential jobs through the http handler share one keep-alive connection") {
  test::relay_process relay;
  raw_http_server service([](const std::string& r) { return keep_alive_echo(r, false); });
  run_jobs(relay, service.address(), 5);
  CHECK_EQ(service.requests(), 5u);
  CHECK_EQ(service.connections(), 1u);
}

TEST_CASE("an answer with Connection: close is not reused") {
  test::relay_process relay;
  raw_http_server service([](const std::string& r) { return keep_alive_echo(r, true); });
  run_jobs(relay, service.address(), 3);
  CHECK_EQ(service.requests(), 3u);
  CHECK_EQ(service.connections(), 3u);
}

TEST_CASE("a connection whose request failed or timed out is not reused") {
  test::relay_process relay;
  // The first request gets a broken answer, or none before the handler's
  // timeout; the connection it went on must not carry the next job.
  raw_http_server::answer first;
  std::string expect_error;
  SUBCASE("a protocol error") {
    first = {{"HTTP/1.1 2OO OK\r\n\r\n"}, 0, false};
    expect_error = "http handler: malformed response";
  }
  SUBCASE("a timeout") {
    first = {{}, 0, false};
    expect_error = "http handler: timed out";
  }
  std::atomic<int> calls{0};
  raw_http_server service([&](const std::string& r) {
    if (calls++ == 0) return first;
    return keep_alive_echo(r, false);
  });
  test::bunny_process bunny(relay, {.queues = R"(["render"])",
                                    .handler = R"({"http": "http://)" + service.address() + R"(/run", "timeout_ms": 1000})"});
  auto bad = relay.curl("producer", "POST", "/v1/queues/render/jobs", R"({"payload":0,"max_attempts":1})");
  REQUIRE_MESSAGE(bad.status == 201, bad.body);
  std::string failed = test::wait_job(relay, test::field(bad.body, "id"));
  CHECK_MESSAGE(test::field(failed, "state") == "dead", failed);
  CHECK_MESSAGE(test::field(failed, "error").rfind(expect_error, 0) == 0, failed);
  for (int i = 1; i <= 2; ++i) {
    auto r = relay.curl("producer", "POST", "/v1/queues/render/jobs",
                        R"({"payload":)" + std::to_string(i) + R"(,"max_attempts":1})");
    REQUIRE_MESSAGE(r.status == 201, r.body);
    std::string job = test::wait_job(relay, test::field(r.body, "id"));
    CHECK_MESSAGE(test::field(job, "state") == "succeeded", job);
  }
  // One for the failed run, one shared by the two that followed.
  CHECK_EQ(service.requests(), 3u);
  CHECK_EQ(service.connections(), 2u);
}
