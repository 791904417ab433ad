// Issue 11, the second attack review of the fixed bunny: bunny's hard kill
// (timeout, output overflow) SIGKILLed the guard with the group, so what the
// handler had moved into a session of its own outlived the job; a handler
// that killed its guard ran on unwatched; a process chain deeper than the
// guard's 64 rounds survived; relayctl printed relay's strings unescaped;
// a job that met a pooled connection the service had just closed failed.
#include <doctest/doctest.h>
#include <signal.h>

#include <chrono>
#include <cstring>
#include <fstream>
#include <sstream>
#include <thread>

#include "../support/bunny_fixture.h"
#include "../support/hostile_relay.h"

namespace {

using test::action;
using test::fake_job;
using test::hostile_relay;
using test::request_kind;
using namespace std::chrono_literals;


using rig = test::hostile_rig;

pid_t wait_pid(const std::string& file) {
  pid_t p = 0;
  hostile_relay::wait_until([&] { p = static_cast<pid_t>(std::atol(test::read_file(file).c_str())); return p > 0; }, 8000);
  return p;
}

}  // namespace

// FINDING (guard): the timeout's SIGKILL goes to the whole process group,
// the guard included; a SIGKILLed guard never runs kill_descendants(), so a
// descendant in a session of its own outlives the job (and bunny).
TEST_CASE("regress issue 11 (second attack review): a setsid'd descendant survives the timeout's SIGKILL of a handler that ignores SIGTERM") {
  test::tmpdir d;
  std::string pidfile = d / "detached.pid";
  rig r(R"({"exec": [")" + test::handler_path("setsid_stubborn.sh") + R"(", ")" + pidfile +
        R"("], "timeout_ms": 1000})");
  fake_job job;
  r.relay.push_lease({job});
  pid_t child = wait_pid(pidfile);
  REQUIRE(child > 0);
  REQUIRE(hostile_relay::wait_until([&] { return r.relay.count(request_kind::fail) >= 1; }, 10000));
  std::this_thread::sleep_for(500ms);
  bool survived = test::process_running(child);
  CHECK_MESSAGE(!survived, "the handler's setsid'd child " << child << " outlived the timed-out job");
  if (survived) ::kill(child, SIGKILL);
}

TEST_CASE("regress issue 11 (second attack review): a setsid'd descendant survives the output-overflow SIGKILL") {
  test::tmpdir d;
  std::string pidfile = d / "detached.pid";
  rig r(R"({"exec": [")" + test::handler_path("setsid_flood.sh") + R"(", ")" + pidfile +
            R"("], "timeout_ms": 20000, "max_output_bytes": 1000})");
  fake_job job;
  r.relay.push_lease({job});
  pid_t child = wait_pid(pidfile);
  REQUIRE(child > 0);
  REQUIRE(hostile_relay::wait_until([&] { return r.relay.count(request_kind::fail) >= 1; }, 10000));
  std::this_thread::sleep_for(500ms);
  bool survived = test::process_running(child);
  CHECK_MESSAGE(!survived, "the handler's setsid'd child " << child << " outlived the job killed for its output");
  if (survived) ::kill(child, SIGKILL);
}

namespace {

// relayctl against the hostile relay, as `producer`.
test::run_result hostile_relayctl(const hostile_relay& relay, std::vector<std::string> args) {
  const std::string& p = test::pki();
  std::vector<std::string> argv{test::env_or_fail("RELAYCTL_BIN"), "--url", "https://127.0.0.1:" + std::to_string(relay.port),
                                "--server-name", "localhost", "--ca", p + "/ca.crt", "--cert", p + "/producer.crt",
                                "--key", p + "/producer.key"};
  argv.insert(argv.end(), args.begin(), args.end());
  static test::tmpdir scratch;
  return test::run(argv, scratch.path(), 20000);
}

const std::string esc = "\x1b]0;pwned\x07\x1b[2J";

bool has_control(const std::string& s) {
  for (unsigned char c : s)
    if ((c < 0x20 && c != '\n') || c == 0x7f) return true;
  return false;
}

}  // namespace

// FINDING (relayctl): relay-controlled strings reach the terminal raw.
TEST_CASE("regress issue 11 (second attack review): relayctl get prints a job's queue, state and max_attempts from relay unescaped") {
  hostile_relay relay;
  std::string id = test::random_job_id();
  std::string body = R"({"id":")" + id + R"(","queue":)" + test::json_quote("q" + esc) + R"(,"state":)" +
                     test::json_quote("succeeded" + esc) + R"(,"attempts":1,"max_attempts":)" + test::json_quote(esc) +
                     R"(,"result":1})";
  relay.set_script(request_kind::other, [body](const test::recorded_request&, size_t) { return action::answer(200, body); });
  auto r = hostile_relayctl(relay, {"get", id});
  INFO("stdout: " << r.out << " stderr: " << r.err);
  CHECK_FALSE_MESSAGE(has_control(r.out), "relayctl get printed relay's control bytes to the terminal");
}

TEST_CASE("regress issue 11 (second attack review): relayctl dead and queues print relay's strings unescaped") {
  hostile_relay relay;
  relay.set_script(request_kind::other, [](const test::recorded_request& q, size_t) {
    if (q.target.find("/dead") != std::string::npos)
      return action::answer(200, R"({"jobs":[{"id":"0123456789abcdef","attempts":)" + test::json_quote(esc) +
                                     R"(,"error":)" + test::json_quote(esc) + "}]}");
    return action::answer(200, R"({"name":"render","counts":{"queued":)" + test::json_quote(esc) +
                                   R"(},"waiting_workers":)" + test::json_quote(esc) + "}");
  });
  auto d = hostile_relayctl(relay, {"dead", "render"});
  CHECK_FALSE_MESSAGE(has_control(d.out), "relayctl dead printed relay's control bytes: " << d.out);
  auto q = hostile_relayctl(relay, {"queues", "render"});
  CHECK_FALSE_MESSAGE(has_control(q.out), "relayctl queues printed relay's control bytes: " << q.out);
}

TEST_CASE("regress issue 11 (second attack review): relayctl requeue prints relay's answer body raw (not even JSON-checked)") {
  hostile_relay relay;
  relay.set_script(request_kind::other, [](const test::recorded_request&, size_t) {
    return action::answer(200, "not json " + esc);
  });
  auto r = hostile_relayctl(relay, {"requeue", "render"});
  CHECK_FALSE_MESSAGE(has_control(r.out), "relayctl requeue printed relay's raw bytes: " << r.out);
}

// FINDING (guard): kill_descendants() stops after 64 rounds, one level of
// descent per round; a chain of processes deeper than that outlives the
// job (and, not being in the way of any group kill any more, bunny too).
TEST_CASE("regress issue 11 (second attack review): a process chain deeper than kill_descendants' 64 rounds outlives the job") {
  test::tmpdir d;
  std::string pidfile = d / "chain.pids";
  rig r(R"({"exec": [")" + test::handler_path("deep.sh") + R"(", ")" + pidfile + R"(", "80"], "timeout_ms": 20000})");
  fake_job job;
  r.relay.push_lease({job});
  REQUIRE(hostile_relay::wait_until([&] { return r.relay.count(request_kind::complete) + r.relay.count(request_kind::fail) >= 1; }, 20000));
  std::this_thread::sleep_for(500ms);
  std::istringstream in(test::read_file(pidfile));
  std::vector<pid_t> pids;
  for (long p; in >> p;) pids.push_back(static_cast<pid_t>(p));
  REQUIRE(pids.size() == 80);
  size_t survivors = 0;
  for (pid_t p : pids) survivors += test::process_running(p) ? 1 : 0;
  CHECK_MESSAGE(survivors == 0, survivors << " of the 80 processes the handler left behind outlived its job");
  for (pid_t p : pids)
    if (test::process_running(p)) ::kill(p, SIGKILL);  // this test's own processes
}

// FINDING (http handler): a pooled keep-alive connection that the local
// service closes just as bunny reuses it (the service's idle timeout racing
// the next job) fails that job with "server closed the connection", though
// nothing of it was answered and a new connection would have served it.
// http_run computes `reused` and never uses it.
TEST_CASE("regress issue 11 (second attack review): a job that meets a reused connection the service has just closed fails instead of going again") {
  hostile_relay service(hostile_relay::plain);
  service.set_script(request_kind::other, [](const test::recorded_request&, size_t nth) {
    // The second request on the first connection is the one the service's
    // idle timeout cut off: closed unanswered, as the race looks on the wire.
    if (nth == 1) return action::close_now();
    return action::answer(200, R"({"ok":true})");
  });
  rig r(R"({"http": "http://127.0.0.1:)" + std::to_string(service.port) + R"(/run", "timeout_ms": 5000})");
  fake_job first, second;
  r.relay.push_lease({first});
  REQUIRE(hostile_relay::wait_until([&] { return r.relay.count(request_kind::complete) >= 1; }, 8000));
  r.relay.push_lease({second});
  REQUIRE(hostile_relay::wait_until(
      [&] { return r.relay.count(request_kind::complete) + r.relay.count(request_kind::fail) >= 2; }, 8000));
  for (auto& q : r.relay.requests(request_kind::fail)) MESSAGE("fail: " << q.body);
  CHECK_MESSAGE(r.relay.count(request_kind::fail) == 0, "the second job failed on a stale pooled connection");
  MESSAGE("service connections: " << service.connections());
}

// FINDING (guard/exec handler): a handler that SIGKILLs its guard (its
// parent, or its own group with kill -9 0) goes on running unwatched: bunny
// sees the guard end, reports the attempt failed and never signals the
// group again; relay runs the job again beside it, and it outlives bunny.
TEST_CASE("regress issue 11 (second attack review): a handler that kills its guard keeps running after its attempt is reported failed") {
  test::tmpdir d;
  std::string pidfile = d / "handler.pids";
  rig r(R"({"exec": [")" + test::handler_path("kill_guard.sh") + R"(", ")" + pidfile + R"("], "timeout_ms": 60000})");
  fake_job job;
  r.relay.push_lease({job});
  REQUIRE(hostile_relay::wait_until([&] { return r.relay.count(request_kind::fail) >= 1; }, 10000));
  MESSAGE("fail: " << r.relay.requests(request_kind::fail).front().body);
  // relay gives the job out again, as it does after a failure
  fake_job again = job;
  again.lease = test::random_lease();
  again.attempt = "2";
  r.relay.push_lease({again});
  REQUIRE(hostile_relay::wait_until([&] { return r.relay.count(request_kind::fail) >= 2; }, 10000));
  std::this_thread::sleep_for(300ms);
  std::istringstream in(test::read_file(pidfile));
  std::vector<pid_t> pids;
  for (long p; in >> p;) pids.push_back(static_cast<pid_t>(p));
  size_t running = 0;
  for (pid_t p : pids) running += test::process_running(p) ? 1 : 0;
  CHECK_MESSAGE(running == 0, running << " attempts of job " << job.id << " still run after bunny reported them failed");
  r.bunny->proc->signal(SIGKILL);
  r.bunny->proc->wait(5000);
  std::this_thread::sleep_for(500ms);
  size_t after = 0;
  for (pid_t p : pids) after += test::process_running(p) ? 1 : 0;
  CHECK_MESSAGE(after == 0, after << " handlers outlived bunny's SIGKILL");
  for (pid_t p : pids) {  // this test's own processes, and their sleep
    pid_t g = ::getpgid(p);
    if (test::process_running(p) && g > 1 && g != ::getpgid(0)) ::kill(-g, SIGKILL);
    if (test::process_running(p)) ::kill(p, SIGKILL);
  }
}
