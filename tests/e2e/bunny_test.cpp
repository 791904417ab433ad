// relay + bunny + relayctl as real processes on loopback.
#include <doctest/doctest.h>

#include <chrono>
#include <csignal>
#include <cstdlib>
#include <set>
#include <sstream>
#include <thread>

#include "../support/bunny_fixture.h"
#include "../support/notify_socket.h"

using test::bunny_options;
using test::bunny_process;
using test::field;
using test::lines;
using test::relay_process;

namespace {

std::string submit(const relay_process& relay, const std::string& queue, const std::string& payload,
                   const std::string& extra = {}) {
  auto r = relay.curl("producer", "POST", "/v1/queues/" + queue + "/jobs", R"({"payload":)" + payload + extra + "}");
  REQUIRE_MESSAGE(r.status == 201, r.body);
  return field(r.body, "id");
}

size_t count_lines(const std::string& log, const std::string& needle) {
  return test::tls_pipe::count(log, needle);
}

}  // namespace

TEST_CASE("many jobs through two bunnies: every result is correct, both do work") {
  relay_process relay;
  bunny_process a(relay, {}, "a");
  bunny_process b(relay, {}, "b");
  const int n = 200;
  std::string batch = "[";
  for (int i = 0; i < n; ++i) batch += (i ? "," : "") + std::to_string(i);
  batch += "]";
  test::write_file(relay.dir / "batch.json", batch);
  auto sub = test::relayctl(relay, "producer", {"submit", "render", "--batch", "--file", relay.dir / "batch.json"});
  REQUIRE_MESSAGE(sub.exit_code == 0, sub.err);
  auto ids = lines(sub.out);
  REQUIRE_EQ(ids.size(), static_cast<size_t>(n));

  std::vector<std::string> args{"wait", "--json", "--timeout", "60000"};
  args.insert(args.end(), ids.begin(), ids.end());
  auto w = test::relayctl(relay, "producer", args, 90000);
  REQUIRE_MESSAGE(w.exit_code == 0, w.err);
  auto results = lines(w.out);
  REQUIRE_EQ(results.size(), static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) {
    const std::string& job = results[static_cast<size_t>(i)];
    CHECK_EQ(field(job, "state"), "succeeded");
    CHECK_EQ(field(job, "payload"), std::to_string(i));
    CHECK_MESSAGE(job.find("\"square\":" + std::to_string(i * i) + ",") != std::string::npos, job);
    CHECK_MESSAGE(job.find("\"job\":\"" + ids[static_cast<size_t>(i)] + "\"") != std::string::npos, job);
  }
  size_t by_a = count_lines(a.proc->log(), "\"event\":\"result_delivered\"");
  size_t by_b = count_lines(b.proc->log(), "\"event\":\"result_delivered\"");
  CHECK_EQ(by_a + by_b, static_cast<size_t>(n));
  CHECK_GT(by_a, 0u);
  CHECK_GT(by_b, 0u);
  MESSAGE("bunny a delivered " << by_a << ", bunny b " << by_b);
  CHECK(a.metrics().find("bunny_jobs_succeeded_total " + std::to_string(by_a)) != std::string::npos);
}

TEST_CASE("a bunny killed in the middle of a job: another finishes it after the lease runs out") {
  relay_process relay;
  std::string id = submit(relay, "render", "[7, 2]");
  {
    bunny_process doomed(relay, {.concurrency = 1, .lease_ms = 1500}, "doomed");
    REQUIRE(doomed.proc->wait_for_line("\"event\":\"job_started\"").has_value());
    doomed.proc->signal(SIGKILL);
    CHECK_EQ(doomed.proc->wait(5000), 128 + SIGKILL);
  }
  bunny_process rescuer(relay, {.concurrency = 1}, "rescuer");
  std::string job = test::wait_job(relay, id);
  CHECK_EQ(field(job, "state"), "succeeded");
  CHECK_EQ(field(job, "attempts"), "2");
  CHECK_MESSAGE(job.find("\"square\":49,\"attempt\":2") != std::string::npos, job);
}

TEST_CASE("failing handlers: non-zero exit, non-JSON output and timeouts go dead after max attempts") {
  relay_process relay;
  bunny_process failing(relay, {.queues = R"(["render"])",
                                .handler = R"({"exec": [")" + test::handler_path("fail.sh") + R"("]})"},
                        "failing");
  bunny_process nonjson(relay, {.queues = R"(["encode-x"])",
                                .handler = R"({"exec": [")" + test::handler_path("nonjson.sh") + R"("]})"},
                        "nonjson");
  bunny_process sleepy(relay, {.queues = R"(["work"])",
                               .handler = R"({"exec": [")" + test::handler_path("sleepy.sh") +
                                          R"("], "timeout_ms": 300, "kill_grace_ms": 200})"},
                       "sleepy");
  std::string a = submit(relay, "render", "1", R"(,"max_attempts":2)");
  std::string b = submit(relay, "encode-x", "2", R"(,"max_attempts":2)");
  std::string c = submit(relay, "work", "3", R"(,"max_attempts":2)");

  std::string ja = test::wait_job(relay, a), jb = test::wait_job(relay, b), jc = test::wait_job(relay, c);
  CHECK_EQ(field(ja, "state"), "dead");
  CHECK_EQ(field(ja, "attempts"), "2");
  CHECK_EQ(field(ja, "error"), "handler exited with status 3: cannot render: texture missing");
  CHECK_EQ(field(jb, "state"), "dead");
  CHECK_MESSAGE(field(jb, "error").find("handler stdout is not a JSON result") == 0, jb);
  CHECK_EQ(field(jc, "state"), "dead");
  CHECK_MESSAGE(field(jc, "error").find("handler timed out after 300 ms") == 0, jc);
  // Two attempts, with the default 1 s backoff between them.
  auto job_started = count_lines(failing.proc->log(), "\"event\":\"job_started\"");
  CHECK_EQ(job_started, 2u);
  CHECK(sleepy.metrics().find("bunny_jobs_timed_out_total 2") != std::string::npos);
  auto dead = relay.curl("admin", "GET", "/v1/queues/render/dead");
  CHECK(dead.body.find(a) != std::string::npos);
}

// Handlers run under a guard process (issue 11); what bunny reports about
// them must be what it reported when it started them itself.
TEST_CASE("a handler that cannot start is named; one killed by a signal is reported as killed by it") {
  relay_process relay;
  bunny_process missing(relay, {.queues = R"(["render"])", .handler = R"({"exec": ["/nonexistent/render-job", "--fast"]})"},
                        "missing");
  bunny_process killed(relay, {.queues = R"(["work"])", .handler = R"({"exec": ["/bin/sh", "-c", "kill -9 $$"]})"},
                       "killed");
  std::string a = submit(relay, "render", "1", R"(,"max_attempts":1)");
  std::string b = submit(relay, "work", "2", R"(,"max_attempts":1)");
  std::string ja = test::wait_job(relay, a), jb = test::wait_job(relay, b);
  CHECK_EQ(field(ja, "state"), "dead");
  CHECK_EQ(field(ja, "error"), "cannot start handler /nonexistent/render-job: no such file or directory");
  CHECK_EQ(field(jb, "state"), "dead");
  CHECK_EQ(field(jb, "error"), "handler killed by signal 9");
}

TEST_CASE("the handler has stdin, stdout and stderr, and no other descriptor of bunny's or its guard's") {
  relay_process relay;
  bunny_process b(relay, {.handler = R"({"exec": [")" + test::handler_path("fds.sh") + R"("]})"});
  std::string id = submit(relay, "render", "0");
  std::string job = test::wait_job(relay, id);
  CHECK_EQ(field(job, "state"), "succeeded");
  CHECK_EQ(field(job, "result"), "0 1 2 3 ");  // 3: the directory ls reads
}

TEST_CASE("the handler's environment holds the job and nothing of bunny's") {
  relay_process relay;
  setenv("BUNNY_TEST_SECRET", "do-not-leak", 1);
  bunny_process b(relay, {.handler = R"({"exec": [")" + test::handler_path("env.sh") + R"("]})"});
  unsetenv("BUNNY_TEST_SECRET");
  std::string id = submit(relay, "render", "0");
  std::string job = test::wait_job(relay, id);
  CHECK_EQ(field(job, "state"), "succeeded");
  for (const char* name : {"\"JOB_ID\"", "\"JOB_QUEUE\"", "\"JOB_ATTEMPT\"", "\"PATH\""})
    CHECK_MESSAGE(job.find(name) != std::string::npos, job);
  CHECK_MESSAGE(job.find("BUNNY_TEST_SECRET") == std::string::npos, job);
  CHECK_MESSAGE(job.find("HOME") == std::string::npos, job);
}

TEST_CASE("the http handler posts the payload to a local service") {
  relay_process relay;
  test::tmpdir dir;
  test::child echo({test::env_or_fail("ECHO_SERVICE_BIN")}, dir / "echo.log");
  auto line = echo.wait_for_line("\"listener\":\"echo\"");
  REQUIRE(line.has_value());
  std::string addr = test::json_field(*line, "addr");
  bunny_process ok(relay, {.queues = R"(["render"])", .handler = R"({"http": "http://)" + addr + R"(/run"})"}, "ok");
  bunny_process broken(relay, {.queues = R"(["work"])", .handler = R"({"http": "http://)" + addr + R"(/fail"})"}, "broken");
  bunny_process garbage(relay, {.queues = R"(["encode-x"])", .handler = R"({"http": "http://)" + addr + R"(/garbage"})"},
                        "garbage");
  std::string a = submit(relay, "render", R"({"frame":12,"name":"Zoë"})");
  std::string b = submit(relay, "work", "1", R"(,"max_attempts":1)");
  std::string c = submit(relay, "encode-x", "1", R"(,"max_attempts":1)");
  std::string ja = test::wait_job(relay, a);
  CHECK_EQ(field(ja, "state"), "succeeded");
  CHECK_MESSAGE(ja.find(R"("result":{"echo":{"frame":12,"name":"Zoë"}})") != std::string::npos, ja);
  std::string jb = test::wait_job(relay, b);
  CHECK_EQ(field(jb, "state"), "dead");
  CHECK_MESSAGE(field(jb, "error").find("http handler answered 500") == 0, jb);
  std::string jc = test::wait_job(relay, c);
  CHECK_EQ(field(jc, "state"), "dead");
  CHECK_MESSAGE(field(jc, "error").find("not a JSON result") != std::string::npos, jc);
  echo.signal(SIGTERM);
  CHECK_EQ(echo.wait(5000), 0);
}

TEST_CASE("relay restarts while bunnies run: they reconnect and take new work") {
  uint16_t port = test::free_port();
  std::vector<std::string> listen{"--listen", "127.0.0.1:" + std::to_string(port)};
  auto first = std::make_unique<relay_process>(listen);
  bunny_process b(port, {});
  std::string before = submit(*first, "render", "2");
  CHECK_EQ(field(test::wait_job(*first, before), "state"), "succeeded");
  first->proc->signal(SIGTERM);
  CHECK_EQ(first->proc->wait(15000), 0);
  first.reset();
  REQUIRE(b.proc->wait_for_line("\"event\":\"relay_unreachable\"", 10000).has_value());

  relay_process second(listen);
  std::string after = submit(second, "render", "9");
  std::string job = test::wait_job(second, after);
  CHECK_EQ(field(job, "state"), "succeeded");
  CHECK(job.find("\"square\":81") != std::string::npos);
  std::string m = b.metrics();
  CHECK_MESSAGE(m.find("bunny_reconnects_total 0") == std::string::npos, m);
  CHECK(m.find("bunny_relay_connected 1") != std::string::npos);
}

TEST_CASE("SIGTERM on a busy bunny: the running job's result is delivered before it exits") {
  relay_process relay;
  std::string id = submit(relay, "render", "[5, 1]");
  bunny_process b(relay, {.concurrency = 1});
  REQUIRE(b.proc->wait_for_line("\"event\":\"job_started\"").has_value());
  b.proc->signal(SIGTERM);
  CHECK_EQ(b.proc->wait(20000), 0);
  std::string log = b.proc->log();
  auto draining = log.find("\"event\":\"draining\""), delivered = log.find("\"event\":\"result_delivered\"");
  REQUIRE(draining != std::string::npos);
  REQUIRE(delivered != std::string::npos);
  CHECK(draining < delivered);
  std::string job = relay.curl("producer", "GET", "/v1/jobs/" + id).body;
  CHECK_EQ(field(job, "state"), "succeeded");
  CHECK(job.find("\"square\":25") != std::string::npos);
}

TEST_CASE("a job still running when the drain grace runs out is failed so it runs elsewhere at once") {
  relay_process relay;
  std::string id = submit(relay, "render", "1");
  bunny_process slow(relay, {.concurrency = 1,
                             .handler = R"({"exec": [")" + test::handler_path("sleepy.sh") + R"("], "kill_grace_ms": 200})",
                             .extra_args = {"--set", "drain_timeout_ms=300"}},
                     "slow");
  REQUIRE(slow.proc->wait_for_line("\"event\":\"job_started\"").has_value());
  slow.proc->signal(SIGTERM);
  CHECK_EQ(slow.proc->wait(20000), 0);
  std::string job = relay.curl("producer", "GET", "/v1/jobs/" + id).body;
  CHECK_EQ(field(job, "error"), "bunny shut down before the job finished");
  bunny_process rescuer(relay, {}, "rescuer");
  std::string done = test::wait_job(relay, id);
  CHECK_EQ(field(done, "state"), "succeeded");
  CHECK_EQ(field(done, "attempts"), "2");
}

TEST_CASE("bunny refuses a relay whose certificate has the wrong name, and says why") {
  const std::string& p = test::pki();
  relay_process relay({"--set", "tls.cert=" + p + "/wrongname.crt", "--set", "tls.key=" + p + "/wrongname.key"});
  bunny_process b(relay, {});
  auto line = b.proc->wait_for_line("\"event\":\"relay_unreachable\"");
  REQUIRE(line.has_value());
  bool named = line->find("ostname mismatch") != std::string::npos;
  CHECK_MESSAGE(named, *line);
  auto ready = test::run({"curl", "-sS", "http://" + b.ops + "/readyz"}, b.dir.path());
  CHECK(ready.out.find("not_ready") != std::string::npos);
}

TEST_CASE("relay sees bunny's certificate identity as the principal") {
  relay_process relay;
  bunny_process b(relay, {.queues = R"(["billing"])"});
  auto denied = relay.proc->wait_for_line("\"event\":\"authz_denied\"");
  REQUIRE(denied.has_value());
  CHECK(denied->find("\"principal\":\"spiffe://test/ns/jobs/sa/bunny\"") != std::string::npos);
  CHECK(denied->find("\"queue\":\"billing\"") != std::string::npos);
  CHECK(b.proc->wait_for_line("\"event\":\"lease_refused\"").has_value());
}

TEST_CASE("bunny reloads its certificate when the files change, without dropping jobs") {
  // Only worker2's identity may consume "only2".
  std::string policy = test::policy_with_grant(R"({"principal": "bunny2", "allow": ["consume"], "queues": ["only2"]})");
  relay_process relay({}, policy);
  bunny_process b(relay, {.who = "worker", .queues = R"(["only2"])"});
  REQUIRE(b.proc->wait_for_line("\"event\":\"lease_refused\"").has_value());
  std::string id = submit(relay, "only2", "4");
  // Rotate: write the key first, then the certificate, as a rotation would.
  const std::string& p = test::pki();
  test::write_file(b.dir / "tls.key", test::read_file(p + "/worker2.key"));
  test::write_file(b.dir / "tls.crt", test::read_file(p + "/worker2.crt"));
  REQUIRE(b.proc->wait_for_line("\"event\":\"tls_reloaded\"", 10000).has_value());
  std::string job = test::wait_job(relay, id);
  CHECK_EQ(field(job, "state"), "succeeded");
  CHECK(job.find("\"square\":16") != std::string::npos);
}

TEST_CASE("bunny tells systemd (Type=notify) it runs, even before relay answers, and when it drains") {
  relay_process relay;  // before the socket exists: its READY=1 is not bunny's
  test::notify_socket manager;
  REQUIRE(manager.ok());
  bunny_process b(relay, {});
  auto ready = manager.next();
  REQUIRE(ready.has_value());
  CHECK_EQ(*ready, "READY=1\nSTATUS=running");
  b.proc->signal(SIGTERM);
  auto stopping = manager.next();
  REQUIRE(stopping.has_value());
  CHECK_EQ(*stopping, "STOPPING=1\nSTATUS=draining");
  CHECK_EQ(b.proc->wait(20000), 0);
}

TEST_CASE("relayctl: exit codes scripts can trust") {
  relay_process relay;
  auto bad_url = test::relayctl(relay, "producer", {"--url", "https://127.0.0.1:1", "queues"});
  CHECK_EQ(bad_url.exit_code, 3);
  auto usage = test::relayctl(relay, "producer", {"frobnicate"});
  CHECK_EQ(usage.exit_code, 2);
  auto denied = test::relayctl(relay, "worker", {"submit", "render", "1"});
  CHECK_EQ(denied.exit_code, 1);
  CHECK(denied.err.find("relay answered 403") != std::string::npos);
  auto not_json = test::relayctl(relay, "producer", {"submit", "render", "{oops"});
  CHECK_EQ(not_json.exit_code, 1);
  CHECK(not_json.err.find("400") != std::string::npos);

  auto id = test::relayctl(relay, "producer", {"submit", "render", R"({"x":1})", "--max-attempts", "1"});
  REQUIRE_EQ(id.exit_code, 0);
  std::string job = lines(id.out).at(0);
  auto timeout = test::relayctl(relay, "producer", {"wait", job, "--timeout", "300"});
  CHECK_EQ(timeout.exit_code, 5);
  auto cancel = test::relayctl(relay, "producer", {"cancel", job});
  CHECK_EQ(cancel.exit_code, 0);
  CHECK_EQ(cancel.out, job + " cancelled\n");
  auto waited = test::relayctl(relay, "producer", {"wait", job});
  CHECK_EQ(waited.exit_code, 4);

  test::write_file(relay.dir / "payload.json", R"({"from":"stdin"})");
  auto from_stdin = test::relayctl(relay, "producer", {"submit", "render", "-", "--json"}, 30000, relay.dir / "payload.json");
  CHECK_EQ(from_stdin.exit_code, 0);
  CHECK_EQ(field(from_stdin.out, "state"), "queued");
  auto stats = test::relayctl(relay, "admin", {"queues"});
  CHECK_EQ(stats.exit_code, 0);
  CHECK(stats.out.find("render") != std::string::npos);
}

TEST_CASE("a heartbeat answered 'no such lease' stops the handler and drops the job") {
  // A relay restarted without its journal has forgotten the lease: the next
  // heartbeat is refused and bunny stops work nobody will accept.
  uint16_t port = test::free_port();
  std::vector<std::string> listen{"--listen", "127.0.0.1:" + std::to_string(port)};
  auto first = std::make_unique<relay_process>(listen);
  submit(*first, "render", "1");
  bunny_process b(port, {.concurrency = 1, .lease_ms = 1200,
                         .handler = R"({"exec": [")" + test::handler_path("sleepy.sh") + R"("], "kill_grace_ms": 200})"});
  REQUIRE(b.proc->wait_for_line("\"event\":\"job_started\"").has_value());
  first.reset();  // SIGKILL
  relay_process second(listen);
  auto lost = b.proc->wait_for_line("\"event\":\"lease_lost\"", 15000);
  REQUIRE(lost.has_value());
  auto finished = b.proc->wait_for_line("\"event\":\"job_finished\"", 15000);
  REQUIRE(finished.has_value());
  CHECK(finished->find("\"error\":\"lease lost\"") != std::string::npos);
  CHECK(b.metrics().find("bunny_jobs_lease_lost_total 1") != std::string::npos);
  // The slot is free again: the next job is taken.
  std::string id = submit(second, "render", "3");
  CHECK(b.proc->wait_for_line("\"job\":\"" + id + "\",\"queue\":\"render\",\"attempt\":1", 15000).has_value());
  CHECK_EQ(field(second.curl("producer", "GET", "/v1/jobs/" + id).body, "state"), "leased");
}

TEST_CASE("a result relay cannot take is retried, then abandoned once its lease has certainly expired") {
  uint16_t port = test::free_port();
  std::vector<std::string> listen{"--listen", "127.0.0.1:" + std::to_string(port)};
  auto relay = std::make_unique<relay_process>(listen);
  submit(*relay, "render", "[6, 1]");
  bunny_process b(port, {.concurrency = 1, .lease_ms = 1500});
  REQUIRE(b.proc->wait_for_line("\"event\":\"job_started\"").has_value());
  relay.reset();  // relay is gone while the job runs; nothing answers
  auto abandoned = b.proc->wait_for_line("\"event\":\"result_abandoned\"", 20000);
  REQUIRE(abandoned.has_value());
  std::string log = b.proc->log();
  CHECK(log.find("\"event\":\"relay_unreachable\"") != std::string::npos);
  CHECK(log.find("\"event\":\"result_delivered\"") == std::string::npos);
  CHECK(b.metrics().find("bunny_results_abandoned_total 1") != std::string::npos);
  // bunny is still there, waiting for relay to come back.
  CHECK_EQ(b.proc->wait(0), -1);
}

TEST_CASE("relayctl lists and requeues dead jobs") {
  relay_process relay;
  std::string id = submit(relay, "render", "1", R"(,"max_attempts":1)");
  auto l = relay.curl("worker", "POST", "/v1/queues/render/lease", "{}");
  relay.curl("worker", "POST", "/v1/jobs/" + id + "/fail", R"({"lease":")" + field(l.body, "lease") + R"(","error":"bad input"})");
  auto dead = test::relayctl(relay, "admin", {"dead", "render"});
  CHECK_EQ(dead.exit_code, 0);
  CHECK_EQ(dead.out, id + "  attempts=1  error=bad input\n");
  auto requeue = test::relayctl(relay, "admin", {"requeue", "render", id});
  CHECK_EQ(requeue.exit_code, 0);
  CHECK(requeue.out.find(id) != std::string::npos);
  CHECK_EQ(field(relay.curl("producer", "GET", "/v1/jobs/" + id).body, "state"), "queued");
  auto denied = test::relayctl(relay, "producer", {"requeue", "render"});
  CHECK_EQ(denied.exit_code, 1);
}
