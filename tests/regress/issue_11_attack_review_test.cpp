// Issue 11, the attack review of the fixed bunny (a hostile relay and a
// misbehaving local service): a newer attempt that lost its lease while it
// waited was started anyway; what a handler left running behind it outlived
// the job and bunny; one job's stale bytes on a pooled connection
// became the next job's answer; the same lease sent twice restarted the
// running attempt; one deep payload made a whole lease answer unreadable
// and burnt the attempts of the jobs beside it. Plus the drain of a
// superseded attempt, which held up.
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
using test::sanitizer_report;
using namespace std::chrono_literals;




std::string stubborn_handler(const std::string& runs) {
  return R"({"exec": [")" + test::handler_path("stubborn.sh") + R"(", ")" + runs + R"("], "timeout_ms": 60000})";
}

using rig = test::hostile_rig;

}  // namespace

// FINDING: the newer attempt waiting for the older one to end loses its
// lease (heartbeat 409) while it waits; it is started anyway when the older
// one ends: a handler runs a job whose lease relay has taken back.
TEST_CASE("regress issue 11 (attack review): a waiting attempt whose lease is lost while it waits is never started") {
  test::tmpdir d;
  std::string runs = d / "runs.log";
  rig r(stubborn_handler(runs), {"--set", "handler.kill_grace_ms=3000"});
  fake_job first;
  first.payload = "20";
  r.relay.push_lease({first});
  REQUIRE(hostile_relay::wait_until([&] { return test::read_file(runs).find("start " + first.id + " 1") != std::string::npos; }, 8000));
  fake_job again = first;
  again.lease = test::random_lease();
  again.attempt = "2";
  again.payload = "1";
  std::string lost = again.lease;
  r.relay.set_script(request_kind::heartbeat, [lost](const test::recorded_request& q, size_t) {
    if (q.lease() == lost) return action::answer(409, R"({"error":{"code":"lease_lost","message":"gone"}})");
    return action::answer(200, "{\"lease_expires_ms\":" + std::to_string(test::wall_now_ms() + 30000) + "}");
  });
  r.relay.push_lease({again});
  REQUIRE(r.wait_answers_taken());
  // The waiting attempt's heartbeat (every lease_ms/3 = 1 s) gets 409.
  REQUIRE(hostile_relay::wait_until([&] {
    for (auto& q : r.relay.requests(request_kind::heartbeat))
      if (q.lease() == lost) return true;
    return false;
  }, 5000));
  // The older attempt is SIGKILLed at kill_grace (3 s); give it time.
  std::this_thread::sleep_for(5000ms);
  std::string log = test::read_file(runs);
  CHECK_MESSAGE(log.find("start " + first.id + " 2") == std::string::npos,
                "attempt 2 ran although relay had answered 409 lease_lost for its lease:\n" << log << "\n" << test::log_tail(r.bunny->proc->log()));
  r.bunny->proc->signal(SIGTERM);
  CHECK_EQ(r.bunny->proc->wait(15000), 0);
  CHECK(!sanitizer_report(r.bunny->proc->log()));
}

// PROBE: SIGTERM while an attempt is superseded and its successor waits.
// Does bunny exit 0 within its drain bounds, and does it start new work
// after SIGTERM?
TEST_CASE("regress issue 11 (attack review): SIGTERM while a superseded attempt ends and a newer one waits") {
  test::tmpdir d;
  std::string runs = d / "runs.log";
  rig r(stubborn_handler(runs), {"--set", "handler.kill_grace_ms=2000", "--set", "drain_timeout_ms=1000"});
  fake_job first;
  first.payload = "30";
  r.relay.push_lease({first});
  REQUIRE(hostile_relay::wait_until([&] { return test::read_file(runs).find("start " + first.id + " 1") != std::string::npos; }, 8000));
  fake_job again = first;
  again.lease = test::random_lease();
  again.attempt = "2";
  again.payload = "30";
  r.relay.push_lease({again});
  // SIGTERM as soon as the older attempt is being stopped (concurrency 2 is
  // full: bunny does not poll again until the older one has ended).
  REQUIRE(hostile_relay::wait_until([&] { return r.bunny->proc->log().find("job_superseded") != std::string::npos; }, 8000));
  auto t0 = std::chrono::steady_clock::now();
  r.bunny->proc->signal(SIGTERM);
  int rc = r.bunny->proc->wait(30000);
  auto took = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0).count();
  MESSAGE("bunny exited " << rc << " after " << took << " ms");
  std::string log = test::read_file(runs);
  CHECK_EQ(rc, 0);
  CHECK_MESSAGE(log.find("start " + first.id + " 2") == std::string::npos,
                "attempt 2 was started after SIGTERM:\n" << log);
  CHECK(!sanitizer_report(r.bunny->proc->log()));
  MESSAGE(test::log_tail(r.bunny->proc->log(), 3000));
}

// FINDING: a pooled keep-alive connection to the local service holding the
// start of a response nobody asked for is given back and reused: the next
// job's request is answered with it (one job's output becomes another's).
TEST_CASE("regress issue 11 (attack review): stale bytes on a pooled connection never become another job's answer") {
  hostile_relay service(hostile_relay::plain);
  // First request: its answer, then a second answer short of its last byte
  // (a service that writes a response twice, split across segments).
  const std::string stale = "HTTP/1.1 200 OK\r\nContent-Length: 24\r\n\r\n{\"secret_of_job\":\"one\"}";
  service.set_script(request_kind::other, [stale](const test::recorded_request&, size_t nth) {
    if (nth == 0) return action::raw(action::response(200, R"({"job":"one"})") + stale);
    // The rest of the stale answer comes with the next request's own.
    return action::raw("\n" + action::response(200, R"({"job":"two"})"));
  });
  std::string handler = R"({"http": "http://127.0.0.1:)" + std::to_string(service.port) + R"(/run", "timeout_ms": 5000})";
  rig r(handler, {}, 1);
  fake_job one, two;
  r.relay.push_lease({one});
  REQUIRE(hostile_relay::wait_until([&] { return r.relay.count(request_kind::complete) >= 1; }, 8000));
  r.relay.push_lease({two});
  REQUIRE(hostile_relay::wait_until([&] { return r.relay.count(request_kind::complete) + r.relay.count(request_kind::fail) >= 2; }, 8000));
  for (auto& q : r.relay.requests())
    if (q.kind == request_kind::complete || q.kind == request_kind::fail) MESSAGE(q.target << " " << q.body);
  for (auto& q : r.relay.requests(request_kind::complete))
    if (q.job_id() == two.id)
      CHECK_MESSAGE(q.body.find("secret_of_job") == std::string::npos, "job two was completed with bytes the service sent after job one's answer: " << q.body);
  CHECK_EQ(service.connections(), 2u);  // the connection in doubt is not reused
  r.bunny->proc->signal(SIGTERM);
  CHECK_EQ(r.bunny->proc->wait(10000), 0);
  CHECK(!sanitizer_report(r.bunny->proc->log()));
}

// A handler's descendant that outlived the handler (a background process)
// was killed neither when the job ended nor when bunny was SIGKILLed.
TEST_CASE("regress issue 11 (attack review): what a handler leaves behind dies with bunny") {
  test::tmpdir d;
  std::string pidfile = d / "child.pid";
  std::string handler = R"({"exec": [")" + test::handler_path("leaves_child.sh") + R"(", ")" + pidfile + R"("], "timeout_ms": 10000})";
  rig r(handler);
  fake_job job;
  r.relay.push_lease({job});
  REQUIRE(hostile_relay::wait_until([&] { return r.relay.count(request_kind::complete) >= 1; }, 8000));
  pid_t child = static_cast<pid_t>(std::atol(test::read_file(pidfile).c_str()));
  REQUIRE(child > 0);
  CHECK_MESSAGE(!test::process_running(child), "the handler's child " << child << " still runs after its job completed");
  r.bunny->proc->signal(SIGKILL);
  r.bunny->proc->wait(5000);
  std::this_thread::sleep_for(1000ms);
  bool survived = test::process_running(child);
  CHECK_MESSAGE(!survived, "the handler's child " << child << " survived bunny's SIGKILL");
  if (survived) ::kill(child, SIGKILL);  // clean up what this test started
}

TEST_CASE("regress issue 11 (attack review): the same id under the same lease twice") {
  test::tmpdir d;
  std::string runs = d / "runs.log";
  rig r(stubborn_handler(runs), {"--set", "handler.kill_grace_ms=300"});
  fake_job first;
  first.payload = "3";
  r.relay.push_lease({first});
  REQUIRE(hostile_relay::wait_until([&] { return test::read_file(runs).find("start " + first.id) != std::string::npos; }, 8000));
  r.relay.push_lease({first});
  REQUIRE(r.wait_answers_taken());
  std::this_thread::sleep_for(5000ms);
  MESSAGE("runs:\n" << test::read_file(runs));
  size_t completes = 0;
  for (auto& q : r.relay.requests(request_kind::complete)) completes += q.job_id() == first.id;
  MESSAGE("completes: " << completes);
  r.bunny->proc->signal(SIGTERM);
  CHECK_EQ(r.bunny->proc->wait(10000), 0);
  CHECK(!sanitizer_report(r.bunny->proc->log()));
}

TEST_CASE("regress issue 11 (attack review): one producer's deeply nested payload strands the other jobs leased with it") {
  test::relay_process relay;
  std::string deep = std::string(1022, '[') + "1" + std::string(1022, ']');
  std::string id_good, id_deep;
  {
    auto a = relay.curl("producer", "POST", "/v1/queues/render/jobs", "{\"payload\":" + deep + ",\"lease_ms\":2000}");
    REQUIRE_MESSAGE(a.status == 201, a.status << " " << a.body);
    auto b = relay.curl("producer", "POST", "/v1/queues/render/jobs", "{\"payload\":[7],\"lease_ms\":2000}");
    REQUIRE_EQ(b.status, 201);
    id_good = b.body;
  }
  test::bunny_options o;
  o.concurrency = 4;
  o.extra_args = test::quick_bunny_args();
  test::bunny_process bunny(relay, o);
  std::this_thread::sleep_for(6000ms);
  std::string log = bunny.proc->log();
  bool rejected = log.find("bad_lease_answer") != std::string::npos;
  bool good_done = log.find("result_delivered") != std::string::npos;
  MESSAGE("good job (" << id_good << ") delivered: " << good_done << "; answers rejected: " << rejected);
  CHECK_MESSAGE(good_done, "the well-formed job leased beside the deep one never ran:\n" << test::log_tail(log));
  MESSAGE(test::log_tail(log, 6000));
  // The good job must run at its first attempt: none of its attempts may be
  // burnt by being leased beside another producer's payload.
  CHECK_MESSAGE(log.find("\"job\":\"0000000000000002\",\"queue\":\"render\",\"attempt\":1") != std::string::npos,
                "the well-formed job lost attempt 1 to the answer bunny refused for the deep payload");
  bunny.proc->signal(SIGTERM);
  CHECK_EQ(bunny.proc->wait(10000), 0);
}
