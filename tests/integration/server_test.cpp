// Connection handling, the ops listener, configuration and shutdown.
#include <doctest/doctest.h>

#include <chrono>
#include <csignal>
#include <filesystem>
#include <thread>

#include "../support/notify_socket.h"
#include "../support/relay_fixture.h"

using test::field;
using test::relay_process;

TEST_CASE("a client that never finishes its headers is answered 408 and disconnected") {
  relay_process relay({"--set", "limits.header_timeout_ms=400"});
  test::tls_pipe slow(relay.api_port, "producer");
  auto t0 = std::chrono::steady_clock::now();
  slow.send("POST /v1/queues/render/jobs HTTP/1.1\r\nHost: localhost\r\nContent-Le");
  bool closed = false;
  std::string got = slow.read_until_closed(5000, closed);
  auto ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  CHECK(closed);
  CHECK(got.find("HTTP/1.1 408 ") == 0);
  CHECK(got.find("Connection: close") != std::string::npos);
  CHECK_GE(ms, 350);
  MESSAGE("slow client disconnected after " << ms << " ms (header_timeout_ms=400)");
}

TEST_CASE("a TLS client that never completes the handshake is dropped") {
  relay_process relay({"--set", "limits.header_timeout_ms=300"});
  // Plain TCP, no ClientHello: the handshake deadline closes it.
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(relay.api_port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE_EQ(connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  pollfd p{fd, POLLIN, 0};
  REQUIRE_EQ(poll(&p, 1, 5000), 1);
  char c;
  CHECK_LE(recv(fd, &c, 1, 0), 0);
  close(fd);
  CHECK(relay.proc->wait_for_line("no TLS handshake within limits.handshake_timeout_ms").has_value());
}

TEST_CASE("pipelined requests are answered in order on one connection") {
  relay_process relay;
  test::tls_pipe pipe(relay.api_port, "producer");
  std::string reqs;
  for (int i = 0; i < 5; ++i) {
    std::string body = R"({"payload":)" + std::to_string(i) + "}";
    reqs += "POST /v1/queues/render/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: " + std::to_string(body.size()) +
            "\r\n\r\n" + body;
  }
  reqs += "GET /v1/jobs/0000000000000003 HTTP/1.1\r\nHost: x\r\n\r\n";
  pipe.send(reqs);
  std::string got = pipe.read_responses(6, 5000);
  CHECK_EQ(test::tls_pipe::count(got, "HTTP/1.1 201 "), 5u);
  for (int i = 1; i <= 5; ++i) {
    auto pos = got.find("\"id\":\"000000000000000" + std::to_string(i) + "\"");
    auto next = got.find("\"id\":\"000000000000000" + std::to_string(i + 1) + "\"");
    CHECK(pos != std::string::npos);
    if (i < 5) CHECK(pos < next);
  }
  CHECK(got.find(R"("id":"0000000000000003","queue":"render","state":"queued")") != std::string::npos);
}

TEST_CASE("garbage after a valid request gets 400 and the connection is closed") {
  relay_process relay;
  test::tls_pipe pipe(relay.api_port, "producer");
  pipe.send("GET /v1/jobs/0000000000000001 HTTP/1.1\r\nHost: x\r\n\r\nBLAH\x01\x02 / HTTP/9\r\n\r\n");
  bool closed = false;
  std::string got = pipe.read_until_closed(5000, closed);
  CHECK(closed);
  CHECK(got.find("HTTP/1.1 404 ") == 0);
  CHECK(got.find("HTTP/1.1 400 ") != std::string::npos);
}

TEST_CASE("the ops listener serves health, readiness and metrics, and nothing else") {
  relay_process relay;
  relay.curl("producer", "POST", "/v1/queues/render/jobs", R"({"payload":1})");
  CHECK_EQ(relay.ops_get("/healthz").status, 200);
  auto ready = relay.ops_get("/readyz");
  CHECK_EQ(ready.status, 200);
  CHECK_EQ(field(ready.body, "status"), "ready");
  auto m = relay.ops_get("/metrics");
  CHECK_EQ(m.status, 200);
  for (const char* series : {"relay_queue_jobs{queue=\"render\",state=\"queued\"} 1",
                             "relay_jobs_submitted_total{queue=\"render\"} 1",
                             "relay_jobs_completed_total{queue=\"render\"} 0",
                             "relay_jobs_expired_total{queue=\"render\"} 0",
                             "relay_http_requests_total{route=\"submit\",status=\"201\"} 1",
                             "relay_tls_handshake_failures_total{listener=\"api\"} 0",
                             "# TYPE relay_queue_jobs gauge"}) {
    CHECK_MESSAGE(m.body.find(series) != std::string::npos, series);
  }
  CHECK_EQ(relay.ops_get("/v1/queues").status, 404);
  CHECK_EQ(relay.ops_get("/v1/jobs/0000000000000001").status, 404);
}

TEST_CASE("SIGTERM drains: parked long polls are answered, then relay exits 0") {
  relay_process relay;
  test::test_loop loop;
  relay::v1::client worker(&loop.loop, test::v1_options(relay.api_port, "worker"));
  bool done = false;
  relay::v1::error err;
  relay::v1::lease_answer got;
  relay::v1::lease_request parked;
  parked.queue = "render";
  parked.wait_ms = 30000;
  worker.lease(parked, [&](const relay::v1::error& e, relay::v1::lease_answer& a) { err = e, got = std::move(a), done = true; });
  for (int i = 0; i < 500 && relay.curl("admin", "GET", "/v1/queues/render").status != 200; ++i) {
    uv_run(&loop.loop, UV_RUN_NOWAIT);
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  relay.proc->signal(SIGTERM);
  auto t0 = std::chrono::steady_clock::now();
  while (!done && std::chrono::steady_clock::now() - t0 < std::chrono::seconds(10)) uv_run(&loop.loop, UV_RUN_ONCE);
  REQUIRE(done);
  CHECK_MESSAGE(!err, err.message);  // 200
  // {"jobs":[]}: nothing leased, nothing refused.
  CHECK(got.jobs.empty());
  CHECK(got.rejected.empty());
  CHECK_EQ(got.bytes, std::string_view(R"({"jobs":[]})").size());
  CHECK_EQ(relay.proc->wait(10000), 0);
  CHECK(relay.proc->wait_for_line("\"event\":\"draining\"").has_value());
  CHECK(relay.proc->wait_for_line("\"event\":\"stopped\"").has_value());
}

namespace {
// The default policy plus a grant for the "nogrant" client (CN nobody).
std::string nobody_may_submit() {
  return test::policy_with_grant(R"({"principal": "nobody", "allow": ["submit"], "queues": ["render"]})");
}
}  // namespace

TEST_CASE("relay tells systemd (Type=notify) it is ready once it serves, and when it starts draining") {
  test::notify_socket manager;
  REQUIRE(manager.ok());
  relay_process relay;
  auto ready = manager.next();
  REQUIRE(ready.has_value());
  CHECK_EQ(*ready, "READY=1\nSTATUS=serving");
  relay.proc->signal(SIGTERM);
  auto stopping = manager.next();
  REQUIRE(stopping.has_value());
  CHECK_EQ(*stopping, "STOPPING=1\nSTATUS=draining");
  CHECK_EQ(relay.proc->wait(10000), 0);
}

TEST_CASE("SIGHUP reloads the policy; a broken policy is refused and the old one kept") {
  // Only the signal reloads here, so each log line below answers one signal.
  relay_process relay({"--set", "tls.reload_check_ms=0"});
  CHECK_EQ(relay.curl("nogrant", "POST", "/v1/queues/render/jobs", R"({"payload":1})").status, 403);
  std::string policy = nobody_may_submit();
  test::write_file(relay.dir / "policy.json", policy);
  relay.proc->signal(SIGHUP);
  REQUIRE(relay.proc->wait_for_line("\"event\":\"reloaded\"").has_value());
  CHECK_EQ(relay.curl("nogrant", "POST", "/v1/queues/render/jobs", R"({"payload":1})").status, 201);

  test::write_file(relay.dir / "policy.json", R"({"principals": {}, "grantz": []})");
  relay.proc->signal(SIGHUP);
  auto failed = relay.proc->wait_for_line("\"event\":\"reload_failed\"");
  REQUIRE(failed.has_value());
  CHECK(failed->find("unknown key \\\"grantz\\\"") != std::string::npos);
  CHECK_EQ(relay.curl("nogrant", "POST", "/v1/queues/render/jobs", R"({"payload":1})").status, 201);
}

TEST_CASE("a changed policy file is reloaded without a signal, as a Kubernetes ConfigMap update does") {
  relay_process relay({"--set", "tls.reload_check_ms=100"});
  CHECK_EQ(relay.curl("nogrant", "POST", "/v1/queues/render/jobs", R"({"payload":1})").status, 403);
  std::string policy = nobody_may_submit();
  // Replaced whole, by rename, as the kubelet swaps a mounted volume's files.
  test::write_file(relay.dir / "policy.json.new", policy);
  std::filesystem::rename(relay.dir / "policy.json.new", relay.dir / "policy.json");
  REQUIRE(relay.proc->wait_for_line("\"event\":\"reloaded\"").has_value());
  CHECK_EQ(relay.curl("nogrant", "POST", "/v1/queues/render/jobs", R"({"payload":1})").status, 201);
  CHECK_FALSE(relay.proc->log().find("reload_failed") != std::string::npos);
}

TEST_CASE("configuration errors name the file and the key") {
  test::tmpdir dir;
  const std::string relay_bin = test::env_or_fail("RELAY_BIN");
  const std::string& p = test::pki();
  test::write_file(dir / "policy.json", test::default_policy());
  auto check = [&](const std::string& json, std::vector<std::string> extra = {}) {
    test::write_file(dir / "relay.json", json);
    std::vector<std::string> argv{relay_bin, "--config", dir / "relay.json", "--check-config"};
    argv.insert(argv.end(), extra.begin(), extra.end());
    return test::run(argv, dir.path());
  };
  const std::string good = R"({"tls": {"cert": ")" + p + R"(/server.crt", "key": ")" + p + R"(/server.key",
      "client_ca": ")" + p + R"(/ca.crt"}, "policy": "policy.json"})";

  auto ok = check(good, {"--set", "limits.max_body_bytes=65536", "--listen", "127.0.0.1:9443"});
  CHECK_EQ(ok.exit_code, 0);
  CHECK(ok.out.find("\"max_body_bytes\": 65536") != std::string::npos);
  CHECK(ok.out.find("\"listen\": \"127.0.0.1:9443\"") != std::string::npos);

  auto unknown = check(R"({"limits": {"max_bodybytes": 1}})");
  CHECK_EQ(unknown.exit_code, 2);
  CHECK(unknown.err.find("unknown key \"limits.max_bodybytes\"") != std::string::npos);

  auto wrong_type = check(R"({"limits": {"max_body_bytes": "big"}})");
  CHECK(wrong_type.err.find("\"limits.max_body_bytes\" must be an integer") != std::string::npos);

  auto bad_set = check(good, {"--set", "journal.fsync=sometimes"});
  CHECK(bad_set.err.find("journal.fsync") != std::string::npos);

  auto not_json = check("{\"listen\": ");
  CHECK(not_json.err.find("not valid JSON") != std::string::npos);

  auto missing_cert = check(R"({"tls": {"cert": "/nonexistent.crt"}, "policy": "policy.json"})");
  CHECK_EQ(missing_cert.exit_code, 1);
  CHECK(missing_cert.err.find("/nonexistent.crt") != std::string::npos);

  test::write_file(dir / "policy.json", R"({"principals": {"a": {"cn": "x"}}, "grants": [{"principal": "b", "allow": ["submit"], "queues": ["*"]}]})");
  auto bad_policy = check(good);
  CHECK(bad_policy.err.find("grants[0].principal \"b\" is not defined") != std::string::npos);
}
