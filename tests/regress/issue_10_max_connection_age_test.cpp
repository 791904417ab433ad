// Issue 10, "Revocation and expiry reach live connections": a connection
// lived as long as its client kept using it (a long-polling worker: for
// ever), so nothing made a live peer verify again. limits.max_connection_age_ms
// retires a connection older than that between requests: the next answer
// carries Connection: close, an idle one is closed, and a parked long poll
// still gets its answer first.
#include <doctest/doctest.h>

#include <chrono>
#include <thread>

#include "../support/hostile.h"
#include "../support/relay_fixture.h"

namespace h = test::hostile;
using test::relay_process;

TEST_CASE("limits.max_connection_age_ms retires connections between requests, never mid-answer, and ends long polls at the age") {
  const int age_ms = 1500;
  relay_process relay({"--set", "limits.max_connection_age_ms=" + std::to_string(age_ms)});
  auto worker = test::client_tls("worker");
  const std::string no_wait = h::post_request("/v1/queues/work/lease", R"({"max":1,"wait_ms":0})");
  auto started = std::chrono::steady_clock::now();

  h::tls_client busy(worker, relay.api_port);    // a request under way when the age passes
  h::tls_client idle(worker, relay.api_port);    // asks once, then waits
  h::tls_client parked(worker, relay.api_port);  // a long poll that outlives the age
  for (auto* c : {&busy, &idle, &parked}) REQUIRE(c->handshake());
  for (auto* c : {&busy, &idle}) {
    c->queue(no_wait);
    auto r = c->read_responses(1, 5000);
    REQUIRE_EQ(r.size(), 1u);
    CHECK_EQ(r[0].status, 200);
    CHECK_FALSE(r[0].close);
  }
  parked.queue(h::post_request("/v1/queues/work/lease", R"({"max":1,"wait_ms":3000})"));
  REQUIRE(parked.flush(2000));
  // Half a request before the age, the rest after it.
  const size_t half = no_wait.size() / 2;
  busy.queue(no_wait.substr(0, half));
  REQUIRE(busy.flush(2000));

  std::this_thread::sleep_until(started + std::chrono::milliseconds(age_ms + 500));
  // Served, and told that this is the last answer.
  busy.queue(no_wait.substr(half));
  auto last = busy.read_responses(1, 5000);
  REQUIRE_EQ(last.size(), 1u);
  CHECK_EQ(last[0].status, 200);
  CHECK(last[0].close);
  CHECK(busy.read_until_closed(5000));
  // The idle one was closed cleanly, with no answer it did not ask for.
  CHECK(idle.read_until_closed(5000));
  CHECK(idle.responses().empty());
  // The long poll waits no longer than its connection may live (a poll
  // parked on a certificate about to expire must not be handed a job after
  // notAfter): answered with no jobs, as the connection's last answer.
  auto answered = parked.read_responses(1, 5000);
  REQUIRE_EQ(answered.size(), 1u);
  CHECK_EQ(answered[0].status, 200);
  CHECK_EQ(answered[0].body, R"({"jobs":[]})");
  CHECK(answered[0].close);

  // A new connection is served as usual.
  h::tls_client fresh(worker, relay.api_port);
  REQUIRE(fresh.handshake());
  fresh.queue(no_wait);
  auto r = fresh.read_responses(1, 5000);
  REQUIRE_EQ(r.size(), 1u);
  CHECK_FALSE(r[0].close);
  CHECK_EQ(h::metric(relay.ops_get("/metrics").body,
                     "relay_connections_retired_total{listener=\"api\",reason=\"max_age\"}"),
           3);
}

// The project's client (bunny, relayctl) pipelines: a request sent behind
// the answer that retires a connection was never processed (relay discards
// it), and used to fail with "server closed the connection".
// http::client_conn itself is under test (its re-send of pipelined
// requests), so this test drives it directly, not through relay::v1.
TEST_CASE("the project's client sends again what it pipelined behind an answer that retires the connection") {
  relay_process relay({"--set", "limits.max_connection_age_ms=1000"});
  uv_loop_t loop;
  uv_loop_init(&loop);
  relay::http::client_conn::options o;
  o.host = "127.0.0.1";
  o.port = relay.api_port;
  o.server_name = "localhost";
  o.tls = test::client_tls("worker");
  auto* conn = relay::http::client_conn::create(&loop, o);
  struct outcome {
    bool done = false;
    relay::http::client_error error;
    int status = 0;
  } parked, behind;
  auto record = [](outcome& out) {
    return [&out](const relay::http::client_error& e, relay::http::client_response& r) {
      out.done = true;
      out.error = e;
      out.status = r.status;
    };
  };
  // A long poll that outlives the age, and a request pipelined behind it.
  conn->request("POST", "/v1/queues/work/lease", R"({"max":1,"wait_ms":2000})", record(parked), 10000);
  conn->request("POST", "/v1/queues/work/lease", R"({"max":1,"wait_ms":0})", record(behind), 10000);
  auto until = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (!(parked.done && behind.done) && std::chrono::steady_clock::now() < until) uv_run(&loop, UV_RUN_ONCE);
  CHECK_EQ(parked.status, 200);
  CHECK_MESSAGE(!behind.error, behind.error.message);
  CHECK_EQ(behind.status, 200);
  conn->close();
  uv_run(&loop, UV_RUN_DEFAULT);
  CHECK_EQ(uv_loop_close(&loop), 0);
  CHECK_GE(h::metric(relay.ops_get("/metrics").body,
                     "relay_connections_retired_total{listener=\"api\",reason=\"max_age\"}"),
           1);
}

TEST_CASE("limits.max_connection_age_ms is validated and shown by --check-config") {
  relay_process relay;
  const std::string bin = test::env_or_fail("RELAY_BIN");
  auto shown = test::run({bin, "--config", relay.dir / "relay.json", "--check-config"}, relay.dir.path());
  REQUIRE_MESSAGE(shown.exit_code == 0, shown.err);
  CHECK(shown.out.find("\"max_connection_age_ms\": 3600000") != std::string::npos);
  CHECK(shown.out.find("\"session_lifetime_ms\": 300000") != std::string::npos);
  auto bad = test::run({bin, "--config", relay.dir / "relay.json", "--set", "limits.max_connection_age_ms=-1",
                        "--check-config"},
                       relay.dir.path());
  CHECK_NE(bad.exit_code, 0);
  CHECK(bad.err.find("limits.max_connection_age_ms") != std::string::npos);
}
