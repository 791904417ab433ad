// Issue 11: the real bunny against a relay that misbehaves (tests/support/
// hostile_relay.h), and against the real relay across a link that is cut
// for longer than a lease (tests/support/wan_proxy.cpp).
//
// Every case asserts what bunny must do whatever relay sends: stay up (and
// never trip AddressSanitizer or UBSan), exit 0 soon after SIGTERM, never
// run two attempts of one job at once (tests/support/handlers/record.sh
// writes when each attempt starts and ends), never put bytes relay sent it
// into a header, a path or the environment unless they are a valid id or
// lease (the job is not run, and nothing derived from it is sent
// anywhere), keep its memory bounded, and serve again once relay behaves.
//
// These tests assert the behaviour of the issue 11 fixes to bunny: lease
// answers validated field by field (a bad one is logged as
// bad_lease_answer, counted in bunny_lease_answers_rejected_total, and its
// job left to expire), running jobs keyed by (id, lease) with a repeated id
// stopping the older attempt, and "max_bytes" in lease requests.
#include <doctest/doctest.h>
#include <signal.h>

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include "../support/bunny_fixture.h"
#include "../support/hostile_relay.h"

namespace {

using test::action;
using test::fake_job;
using test::hostile_relay;
using test::request_kind;
using test::sanitizer_report;
using test::quick_bunny_args;

// ---- What the handler recorded ----

struct handler_run {
  std::string id;
  std::string attempt;
  long pid = 0;
  int64_t start_ns = 0;
  int64_t end_ns = -1;  // -1: no end recorded (still running, or killed hard)
  std::string how;      // ok, fail, term
};

inline int64_t now_ns() {
  timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

// The runs record.sh wrote to `file`, in start order. Lines it cannot read
// (an id with a line break in it...) are kept as a run with id "?", so that
// a run of such a job is never missed.
std::vector<handler_run> read_runs(const std::string& file) {
  std::vector<handler_run> runs;
  std::map<long, size_t> by_pid;
  std::istringstream in(test::read_file(file));
  for (std::string line; std::getline(in, line);) {
    std::istringstream f(line);
    std::string what, id, attempt, how;
    long pid = 0;
    int64_t ns = 0;
    if (!(f >> what >> id >> attempt >> pid >> ns) || (what != "start" && what != "end")) {
      runs.push_back({"?", "?", 0, 0, 0, "unreadable: " + line});
      continue;
    }
    if (what == "start") {
      by_pid[pid] = runs.size();
      runs.push_back({id, attempt, pid, ns, -1, {}});
    } else if (auto it = by_pid.find(pid); it != by_pid.end()) {
      f >> how;
      runs[it->second].end_ns = ns;
      runs[it->second].how = how;
    }
  }
  return runs;
}

// Bytes relay sent, fit for a failure message: control bytes escaped, cut
// to `n` characters.
std::string printable(std::string_view s, size_t n = 120) {
  std::string out;
  for (unsigned char c : s.substr(0, n)) {
    if (c >= 0x20 && c < 0x7f) {
      out += static_cast<char>(c);
    } else {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
    }
  }
  return s.size() > n ? out + "...(" + std::to_string(s.size()) + " bytes)" : out;
}

std::string describe(const std::vector<handler_run>& runs) {
  std::ostringstream out;
  for (size_t i = 0; i < runs.size(); ++i) {
    if (i == 30) {
      out << "\n  ... " << runs.size() - i << " more";
      break;
    }
    const auto& r = runs[i];
    out << "\n  job " << printable(r.id, 40) << " attempt " << printable(r.attempt, 20) << " pid " << r.pid << " ran "
        << (r.end_ns < 0 ? std::string("(no end)")
                         : std::to_string((r.end_ns - r.start_ns) / 1000000) + " ms " + printable(r.how, 60));
  }
  return out.str();
}

// Two runs of one job id overlapping by more than `tolerance_ms`. The
// tolerance covers bunny starting the new attempt while the older one's
// SIGTERM is being delivered; an attempt left running takes seconds.
void check_no_overlap(const std::vector<handler_run>& runs, int tolerance_ms = 300) {
  int64_t now = now_ns();
  for (size_t i = 0; i < runs.size(); ++i)
    for (size_t j = i + 1; j < runs.size(); ++j) {
      const auto& a = runs[i];
      const auto& b = runs[j];
      if (a.id != b.id || a.id == "?") continue;
      int64_t a_end = a.end_ns < 0 ? now : a.end_ns;
      int64_t b_end = b.end_ns < 0 ? now : b.end_ns;
      int64_t overlap_ms = (std::min(a_end, b_end) - std::max(a.start_ns, b.start_ns)) / 1000000;
      CHECK_MESSAGE(overlap_ms <= tolerance_ms, "two attempts of job " << a.id << " ran at once for " << overlap_ms
                                                                         << " ms:" << describe(runs));
    }
}

// ---- bunny ----


// Running, not exited (a zombie counts as exited).
bool alive(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  for (std::string line; std::getline(in, line);)
    if (line.rfind("State:", 0) == 0) return line.find('Z') == std::string::npos && line.find('X') == std::string::npos;
  return false;
}

long rss_kib(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  for (std::string line; std::getline(in, line);)
    if (line.rfind("VmRSS:", 0) == 0) return std::atol(line.c_str() + 6);
  return -1;
}

long metric(const std::string& text, const std::string& name) {
  long total = 0;
  for (const auto& line : test::lines(text))
    if (line.rfind(name, 0) == 0 && (line[name.size()] == '{' || line[name.size()] == ' '))
      total += std::atol(line.c_str() + line.rfind(' ') + 1);
  return total;
}


// The end every case shares: bunny is still up, has reported nothing to
// the sanitizers, and exits 0 within `bound_ms` of SIGTERM (nothing it
// still runs may keep it from leaving).
void expect_alive_then_clean_exit(test::bunny_process& b, int bound_ms = 6000) {
  CHECK_MESSAGE(alive(b.proc->pid()), "bunny is gone: " << test::log_tail(b.proc->log()));
  b.proc->signal(SIGTERM);
  int rc = b.proc->wait(bound_ms);
  CHECK_MESSAGE(rc == 0, "bunny after SIGTERM: " << (rc == -1 ? std::string("still running after ") + std::to_string(bound_ms) + " ms"
                                                                : "exit status " + std::to_string(rc))
                                                 << "\n" << test::log_tail(b.proc->log()));
  CHECK_MESSAGE(!sanitizer_report(b.proc->log()), test::log_tail(b.proc->log(), 12000));
}

// Whether bunny logged that an attempt of `job` was stopped: superseded by a
// new lease of the same job, or its lease found lost.
bool logged_attempt_stopped(const std::string& log, const std::string& job) {
  for (const auto& line : test::lines(log)) {
    if (line.find("\"job\":\"" + job + "\"") == std::string::npos) continue;
    if (line.find("\"event\":\"job_superseded\"") != std::string::npos ||
        line.find("\"event\":\"lease_lost\"") != std::string::npos)
      return true;
  }
  return false;
}


std::string record_handler(const std::string& runs_file) {
  return R"({"exec": [")" + test::handler_path("record.sh") + R"(", ")" + runs_file + R"("], "timeout_ms": 30000})";
}

// A hostile relay and a bunny leasing from it with record.sh as handler.
// The hostile rig with record.sh as handler, and what it recorded.
struct rig : test::hostile_rig {
  explicit rig(std::vector<std::string> more_args = {}, int concurrency = 2, std::string handler = {})
      : test::hostile_rig(
            [&handler](const std::string& runs) { return handler.empty() ? record_handler(runs) : handler; },
            std::move(more_args), concurrency) {}
  std::vector<handler_run> runs() const { return read_runs(runs_file); }
  bool ran(const std::string& id) const {
    for (const auto& r : runs())
      if (r.id == id) return true;
    return false;
  }
  // Waits for a /complete of `job` under `lease`; the request, if one came.
  std::optional<test::recorded_request> wait_complete(const fake_job& job, int timeout_ms = 8000) const {
    std::optional<test::recorded_request> found;
    hostile_relay::wait_until(
        [&] {
          for (const auto& r : relay.requests(request_kind::complete))
            if (r.job_id() == job.id && r.lease() == job.lease) found = r;
          return found.has_value();
        },
        timeout_ms);
    return found;
  }
  // A well-behaved relay again: a proper job runs and its /complete comes
  // with its own lease.
  void expect_recovery() {
    fake_job good;
    good.payload = "[0]";
    relay.push_lease({good});
    auto done = wait_complete(good);
    CHECK_MESSAGE(done.has_value(), "no /complete for a proper job after the relay behaved again: "
                                        << test::log_tail(bunny->proc->log()) << describe(runs()));
    if (done) CHECK(done->body.find("\"attempt\":1") != std::string::npos);
  }
  // No heartbeat, complete or fail was sent at all (only bad jobs were
  // handed out).
  void expect_no_job_requests() const {
    std::string sent;
    size_t n = 0;
    for (const auto& r : relay.requests())
      if (r.kind != request_kind::lease && ++n <= 10)
        sent += "\n  " + std::string(test::to_string(r.kind)) + " " + printable(r.target) + " " + printable(r.body);
    CHECK_MESSAGE(n == 0, "bunny sent " << n << " requests about jobs it should not have run:" << sent);
  }

};

// bunny_lease_answers_rejected_total counts the lease answers (or jobs in
// them) bunny refuses; the log names the field, never the payload.
void expect_rejections_counted(const rig& r, long at_least) {
  long n = metric(r.bunny->metrics(), "bunny_lease_answers_rejected_total");
  CHECK_MESSAGE(n >= at_least, "bunny_lease_answers_rejected_total = " << n << ", expected at least " << at_least);
}

}  // namespace

// ---------------------------------------------------------------------------
// Repeated ids.

TEST_CASE("hostile relay: one answer naming the same job id twice never runs two attempts at once") {
  rig r;
  fake_job first, second;
  second.id = first.id;
  first.payload = second.payload = "[2]";
  r.relay.push_lease({first, second});
  REQUIRE(r.wait_answers_taken());
  // Whatever bunny makes of it, nothing of this job runs once 3 s are over.
  hostile_relay::wait_until([&] {
    auto runs = r.runs();
    return !runs.empty() && std::all_of(runs.begin(), runs.end(), [](const handler_run& h) { return h.end_ns >= 0; });
  }, 4000);
  check_no_overlap(r.runs());
  // Every request about the job carries one of the two leases relay gave.
  for (const auto& q : r.relay.requests())
    if (q.kind != request_kind::lease) {
      CHECK_EQ(q.job_id(), first.id);
      CHECK_MESSAGE((q.lease() == first.lease || q.lease() == second.lease), q.body);
    }
  // No heartbeat timer outlives its attempt: once everything has ended and
  // been reported, heartbeats stop (interval lease_ms / 3 = 1 s).
  std::this_thread::sleep_for(std::chrono::milliseconds(1200));
  size_t beats = r.relay.count(request_kind::heartbeat);
  std::this_thread::sleep_for(std::chrono::milliseconds(2500));
  CHECK_MESSAGE(r.relay.count(request_kind::heartbeat) == beats, "heartbeats go on for attempts that ended: " << test::log_tail(r.bunny->proc->log()));
  r.expect_recovery();
  expect_alive_then_clean_exit(*r.bunny);
}

TEST_CASE("hostile relay: the same id leased again under a new lease stops the older attempt") {
  rig r;
  fake_job first;
  first.payload = "[20,1]";  // attempt 1 runs 20 s, attempt 2 one second
  r.relay.push_lease({first});
  REQUIRE_MESSAGE(hostile_relay::wait_until([&] { return r.ran(first.id); }, 8000), test::log_tail(r.bunny->proc->log()));
  fake_job again = first;
  again.lease = test::random_lease();
  again.attempt = "2";
  r.relay.push_lease({again});
  REQUIRE(r.wait_answers_taken());
  auto second_given = std::chrono::steady_clock::now();

  auto done = r.wait_complete(again);
  CHECK_MESSAGE(done.has_value(), "attempt 2 never completed: " << test::log_tail(r.bunny->proc->log()) << describe(r.runs()));
  // The older attempt was stopped, not left running beside the new one.
  bool first_ended = hostile_relay::wait_until([&] {
    for (const auto& h : r.runs())
      if (h.attempt == "1" && h.end_ns >= 0) return true;
    return false;
  }, 3000);
  CHECK_MESSAGE(first_ended, "attempt 1 still runs after attempt 2 arrived:" << describe(r.runs()));
  check_no_overlap(r.runs());
  // The older attempt's lease is dead: no heartbeat carries it once the
  // requests in flight when attempt 2 arrived are answered.
  std::this_thread::sleep_for(std::chrono::milliseconds(2500));
  for (const auto& q : r.relay.requests(request_kind::heartbeat))
    if (q.lease() == first.lease)
      CHECK_MESSAGE(q.at < second_given + std::chrono::milliseconds(1500),
                    "a heartbeat for attempt 1's lease " << std::chrono::duration_cast<std::chrono::milliseconds>(
                                                                 q.at - second_given).count()
                                                         << " ms after attempt 2 was leased");
  // At most one /complete, and it is attempt 2's.
  for (const auto& q : r.relay.requests(request_kind::complete)) CHECK_EQ(q.lease(), again.lease);
  CHECK_MESSAGE(logged_attempt_stopped(r.bunny->proc->log(), first.id), test::log_tail(r.bunny->proc->log()));
  // Nothing is left counted as running (no slot orphaned).
  CHECK_MESSAGE(hostile_relay::wait_until([&] { return metric(r.bunny->metrics(), "bunny_jobs_running") == 0; }, 3000),
                r.bunny->metrics());
  expect_alive_then_clean_exit(*r.bunny);
}

// ---------------------------------------------------------------------------
// Answers that are not a lease answer.

TEST_CASE("hostile relay: malformed lease answers are refused, counted and survived") {
  rig r;
  const std::vector<std::string> bodies = {
      R"({"jobs":[{"id":"PAYLOAD-MARKER)",                          // cut short
      "PAYLOAD-MARKER not json",                                     // not JSON
      R"([{"id":"0000000000000001","payload":"PAYLOAD-MARKER"}])",   // not an object
      R"("PAYLOAD-MARKER")", "42", "null", "",                      // nor these
      R"({"jobs":{"id":"0000000000000001","payload":"PAYLOAD-MARKER"}})",  // jobs not an array
      R"({"jobs":"PAYLOAD-MARKER"})", R"({"jobs":null})", R"({"jobs":7})",
      R"({"jobs":[1,"PAYLOAD-MARKER",null]})",                       // elements not objects
      R"({"jobs":[{"payload":"PAYLOAD-MARKER"}]})",                  // no id, no lease
      R"({"jobs":[]} trailing PAYLOAD-MARKER)",                      // garbage after the document
  };
  for (const auto& b : bodies) r.relay.push_lease(action::answer(200, b));
  // Malformed HTTP around a good-looking body.
  const std::string body = test::lease_answer({fake_job{}});
  r.relay.push_lease(action::raw("HTTP/1.1 200 OK\r\nContent-Length: zz\r\n\r\n" + body));
  r.relay.push_lease(action::raw("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 9\r\n\r\n" + body));
  r.relay.push_lease(action::raw("SPDY/9 200 OK\r\n\r\n" + body));
  r.relay.push_lease(action::raw("HTTP/1.1 200 OK\r\nno colon here\r\nContent-Length: 2\r\n\r\n{}"));
  REQUIRE(r.wait_answers_taken(20000));
  CHECK(r.runs().empty());
  r.expect_no_job_requests();
  CHECK(r.bunny->proc->log().find("\"event\":\"bad_lease_answer\"") != std::string::npos);
  CHECK(r.bunny->proc->log().find("PAYLOAD-MARKER") == std::string::npos);
  // Each 200 answer with a body that is not a lease answer is counted (the
  // last one is allowed to pass as empty).
  expect_rejections_counted(r, static_cast<long>(bodies.size()) - 1);
  r.expect_recovery();
  expect_alive_then_clean_exit(*r.bunny);
}

TEST_CASE("hostile relay: a lease answer over bunny's cap drops the connection, not bunny") {
  rig r;
  size_t connections = r.relay.connections();
  // One announced by its Content-Length, one that shows its size only as
  // its chunks arrive.
  r.relay.push_lease(action::oversize((64u << 20) + 4096));
  r.relay.push_lease(action::oversize((64u << 20) + 4096, true));
  REQUIRE(r.wait_answers_taken(60000));
  CHECK_GE(r.relay.connections(), connections + 2);  // it gave up on those connections
  CHECK(r.runs().empty());
  // Lease requests say how many bytes of answer bunny takes.
  auto leases = r.relay.requests(request_kind::lease);
  REQUIRE_FALSE(leases.empty());
  CHECK_MESSAGE(leases.back().body.find("\"max_bytes\":") != std::string::npos, leases.back().body);
  r.expect_recovery();
  expect_alive_then_clean_exit(*r.bunny);
}

// ---------------------------------------------------------------------------
// Bad tokens.

namespace {

// One job whose `field` holds `bad` (JSON text), everything else proper.
struct bad_job {
  std::string what;
  fake_job job;
  std::vector<std::string> never_sent;  // byte strings that must reach nobody
};

std::vector<bad_job> bad_jobs() {
  std::vector<bad_job> out;
  auto id = [&](std::string what, std::string value, std::vector<std::string> never = {}) {
    bad_job b{"id " + what, {}, std::move(never)};
    b.job.id_json = test::json_quote(value);
    b.job.id = value;
    out.push_back(std::move(b));
  };
  auto lease = [&](std::string what, std::string value, std::vector<std::string> never = {}) {
    bad_job b{"lease " + what, {}, std::move(never)};
    b.job.lease_json = test::json_quote(value);
    b.job.lease = value;
    out.push_back(std::move(b));
  };
  const std::string hex16 = test::random_hex(16), hex32 = test::random_hex(32);
  id("with CRLF and a smuggled request",
     hex16 + "\r\nContent-Length: 0\r\n\r\nDELETE /smuggled-request HTTP/1.1\r\nX-Smuggled: yes\r\n",
     {"smuggled-request", "X-Smuggled"});
  id("with a space", hex16.substr(0, 8) + " " + hex16.substr(8, 7));
  id("with a slash", hex16.substr(0, 8) + "/" + hex16.substr(8, 7));
  id("climbing with ..", "../../v1/queues/dotdot-climb/jobs", {"dotdot-climb"});
  id("percent-encoded", "%2e%2e%2fpercent0000", {"percent0000"});
  id("with a NUL", hex16.substr(0, 8) + std::string(1, '\0') + hex16.substr(8, 7));
  id("not hex", "zzzzzzzzzzzzzzzz");
  id("upper-case hex", "ABCDEF0123456789");
  id("15 digits", test::random_hex(15));
  id("17 digits", test::random_hex(17));
  id("empty", "");
  id("overlong", test::random_hex(8192));
  {
    bad_job b{"id a number", {}, {}};
    b.job.id_json = "1234567890123456";
    out.push_back(std::move(b));
  }
  lease("with CRLF", hex32 + "\r\nX-Smuggled-Lease: yes", {"X-Smuggled-Lease"});
  lease("with a quote", hex32.substr(0, 16) + "\",\"extend_ms\":999999999,\"x\":\"", {"999999999"});
  lease("with a space", hex32.substr(0, 16) + " " + hex32.substr(16, 15));
  lease("with a NUL", hex32.substr(0, 16) + std::string(1, '\0') + hex32.substr(16, 15));
  lease("not hex", std::string(32, 'g'));
  lease("31 digits", test::random_hex(31));
  lease("33 digits", test::random_hex(33));
  lease("empty", "");
  lease("overlong", test::random_hex(8192));
  {
    bad_job b{"lease an object", {}, {}};
    b.job.lease_json = R"({"nested":"x"})";
    out.push_back(std::move(b));
  }
  for (const char* a : {R"("zz")", R"("1")", "0", "-1", "1.5", "4294967297", "1e3", "null", "true", "[]"}) {
    bad_job b{std::string("attempt ") + a, {}, {}};
    b.job.attempt = a;
    out.push_back(std::move(b));
  }
  {
    bad_job b{"attempt missing", {}, {}};
    b.job.attempt.reset();
    out.push_back(std::move(b));
  }
  for (const char* e : {R"("soon")", "-1", "1.5", "1e300", "99999999999999999999", "null", "{}"}) {
    bad_job b{std::string("lease_expires_ms ") + e, {}, {}};
    b.job.expires_ms = e;
    out.push_back(std::move(b));
  }
  {
    bad_job b{"lease_expires_ms missing", {}, {}};
    b.job.expires_ms.reset();
    out.push_back(std::move(b));
  }
  return out;
}

// Checks after a run of bad jobs: none ran, nothing about them was sent.
void expect_bad_jobs_ignored(const rig& r, const std::vector<bad_job>& bad) {
  CHECK_MESSAGE(r.runs().empty(), "jobs with bad tokens ran:" << describe(r.runs()));
  r.expect_no_job_requests();
  std::string received = r.relay.received();
  for (const auto& b : bad) {
    bool leaked = false;
    for (const auto& s : b.never_sent) leaked = leaked || received.find(s) != std::string::npos;
    // The bad id or lease itself (when that is the bad field).
    if (b.job.id_json && b.job.id.size() >= 4) leaked = leaked || received.find(b.job.id) != std::string::npos;
    if (b.job.lease_json && b.job.lease.size() >= 4) leaked = leaked || received.find(b.job.lease) != std::string::npos;
    CHECK_MESSAGE(!leaked, "relay was sent bytes of the job with a bad " << b.what);
  }
  // Every request is a lease request to the one path bunny is configured for.
  size_t elsewhere = 0;
  for (const auto& q : r.relay.requests()) elsewhere += q.target != "/v1/queues/render/lease";
  CHECK_EQ(elsewhere, 0u);
}

}  // namespace

TEST_CASE("hostile relay: a bad token in any field of a lease answer: the job is not run and its bytes go nowhere") {
  auto bad = bad_jobs();
  SUBCASE("exec handler: nothing reaches the environment") {
    rig r;
    for (const auto& b : bad) r.relay.push_lease({b.job});
    REQUIRE(r.wait_answers_taken(30000));
    expect_bad_jobs_ignored(r, bad);
    expect_rejections_counted(r, static_cast<long>(bad.size()));
    r.expect_recovery();
    expect_alive_then_clean_exit(*r.bunny);
  }
  SUBCASE("http handler: the local service sees no request, smuggled or not") {
    hostile_relay local(hostile_relay::plain);
    rig r({}, 2, R"({"http": "http://127.0.0.1:)" + std::to_string(local.port) + R"(/run", "timeout_ms": 5000})");
    for (const auto& b : bad) r.relay.push_lease({b.job});
    REQUIRE(r.wait_answers_taken(30000));
    std::string seen = local.received();
    CHECK_MESSAGE(seen.empty(), "the local service was sent:\n" << printable(seen, 2000));
    CHECK_EQ(local.connections(), 0u);
    r.expect_no_job_requests();
    std::string received = r.relay.received();
    for (const auto& b : bad)
      for (const auto& s : b.never_sent)
        CHECK_MESSAGE(received.find(s) == std::string::npos, "relay was sent bytes of the job with a bad " << b.what);
    // Recovery through the http handler: one proper request to the service.
    fake_job good;
    r.relay.push_lease({good});
    auto done = r.wait_complete(good);
    CHECK_MESSAGE(done.has_value(), test::log_tail(r.bunny->proc->log()));
    auto calls = local.requests();
    REQUIRE_EQ(calls.size(), 1u);
    CHECK(calls[0].headers.find("X-Job-Id: " + good.id + "\r\n") != std::string::npos);
    expect_alive_then_clean_exit(*r.bunny);
  }
}

TEST_CASE("hostile relay: attempt \"zz\", then SIGTERM: bunny exits 0 at once") {
  rig r;
  fake_job j;
  j.attempt = R"("zz")";
  j.payload = "[30]";
  r.relay.push_lease({j});
  REQUIRE(r.wait_answers_taken());
  CHECK_FALSE(r.ran(j.id));
  // Nothing runs, so nothing to drain: out well within the drain time.
  expect_alive_then_clean_exit(*r.bunny, 2500);
}

// ---------------------------------------------------------------------------
// Slow, broken and surprising transport.

TEST_CASE("hostile relay: a stalled lease answer times out and bunny polls again on a new connection") {
  // Declared before the rig: the relay's threads, which the script runs
  // on, are joined when the rig goes.
  fake_job late;
  std::atomic<int> n{0};
  rig r({"--set", "poll.wait_ms=200", "--set", "poll.request_timeout_ms=1200"});
  r.relay.set_script(request_kind::lease, [&](const test::recorded_request&, size_t) {
    switch (n++) {
      case 0: return action::stall_forever();
      case 1: return action::stall(3000, test::lease_action({late}));  // answered after bunny gave up
      default: return action::stall(100, action::answer(200, R"({"jobs":[]})"));
    }
  });
  size_t conns = r.relay.connections();
  CHECK_MESSAGE(hostile_relay::wait_until([&] { return n.load() >= 3; }, 10000), test::log_tail(r.bunny->proc->log()));
  CHECK_GE(r.relay.connections(), conns + 2);
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  CHECK_FALSE_MESSAGE(r.ran(late.id), "a job from an answer that came after the request timed out ran");
  r.relay.set_script(request_kind::lease, nullptr);
  r.expect_recovery();
  expect_alive_then_clean_exit(*r.bunny);
}

TEST_CASE("hostile relay: a stalled /complete is retried under the same lease") {
  std::atomic<int> n{0};  // before the rig, whose relay threads use it
  rig r({"--set", "poll.wait_ms=200", "--set", "poll.request_timeout_ms=1200"});
  r.relay.set_script(request_kind::complete, [&](const test::recorded_request&, size_t) {
    return n++ == 0 ? action::stall_forever() : action::answer(200, "{}");
  });
  fake_job j;
  r.relay.push_lease({j});
  CHECK(hostile_relay::wait_until([&] { return n.load() >= 2; }, 10000));
  for (const auto& q : r.relay.requests(request_kind::complete)) {
    CHECK_EQ(q.job_id(), j.id);
    CHECK_EQ(q.lease(), j.lease);
  }
  CHECK_EQ(r.runs().size(), 1u);
  expect_alive_then_clean_exit(*r.bunny);
}

TEST_CASE("hostile relay: a reset in the middle of a lease answer") {
  rig r;
  std::vector<fake_job> cut;
  for (size_t after : {size_t(7), size_t(40), size_t(120)}) {  // status line, headers, body
    cut.push_back(fake_job{});
    r.relay.push_lease(action::reset_mid(test::lease_action({cut.back()}), after));
  }
  size_t conns = r.relay.connections();
  REQUIRE(r.wait_answers_taken());
  CHECK_GE(r.relay.connections(), conns + 3);
  for (const auto& j : cut) CHECK_FALSE(r.ran(j.id));
  r.expect_no_job_requests();
  r.expect_recovery();
  expect_alive_then_clean_exit(*r.bunny);
}

TEST_CASE("hostile relay: 409, 403 and 404 to heartbeat, complete and fail") {
  for (int status : {409, 403, 404}) {
    CAPTURE(status);
    rig r({}, 3);
    const std::string refusal = R"({"error":{"code":"lease_lost","message":"refused"}})";
    for (auto k : {request_kind::heartbeat, request_kind::complete, request_kind::fail})
      r.relay.set_script(k, [status, refusal](const test::recorded_request&, size_t) {
        return action::answer(status, refusal);
      });
    fake_job beating, completing, failing;
    beating.payload = "[20]";
    completing.payload = "[0]";
    failing.payload = "[0,0,3]";
    r.relay.push_lease({beating, completing, failing});
    // The heartbeat refused: the attempt is stopped.
    bool stopped = hostile_relay::wait_until([&] {
      for (const auto& h : r.runs())
        if (h.id == beating.id && h.end_ns >= 0) return true;
      return false;
    }, 5000);
    CHECK_MESSAGE(stopped, "a job whose heartbeat was refused " << status << " still runs:" << describe(r.runs()));
    // Refused outcomes are not retried: once each, and heartbeats stop.
    std::this_thread::sleep_for(std::chrono::milliseconds(1500));
    size_t beats = r.relay.count(request_kind::heartbeat);
    std::this_thread::sleep_for(std::chrono::milliseconds(1500));
    CHECK_EQ(r.relay.count(request_kind::heartbeat), beats);
    size_t completes = 0, fails = 0;
    for (const auto& q : r.relay.requests(request_kind::complete)) completes += q.job_id() == completing.id;
    for (const auto& q : r.relay.requests(request_kind::fail)) fails += q.job_id() == failing.id;
    CHECK_EQ(completes, 1u);
    CHECK_EQ(fails, 1u);
    check_no_overlap(r.runs());
    for (auto k : {request_kind::heartbeat, request_kind::complete, request_kind::fail}) r.relay.set_script(k, nullptr);
    r.expect_recovery();
    expect_alive_then_clean_exit(*r.bunny);
  }
}

TEST_CASE("hostile relay: an answer to a request never sent") {
  rig r;
  fake_job asked, unasked;
  r.relay.push_lease(action::twice(test::lease_action({asked}), test::lease_action({unasked})));
  REQUIRE(r.wait_answers_taken());
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  CHECK_FALSE_MESSAGE(r.ran(unasked.id), "bunny ran a job from an answer to a request it never sent");
  // And on the results connection: a /complete answered twice.
  r.relay.set_script(request_kind::complete, [](const test::recorded_request&, size_t) {
    return action::twice(action::answer(200, "{}"), action::answer(200, test::lease_answer({fake_job{}})));
  });
  fake_job j;
  r.relay.push_lease({j});
  CHECK(r.wait_complete(j).has_value());
  r.relay.set_script(request_kind::complete, nullptr);
  r.expect_recovery();
  expect_alive_then_clean_exit(*r.bunny);
}

TEST_CASE("hostile relay: a 1xx before the final answer is skipped, not taken as the answer") {
  rig r;
  fake_job j;
  r.relay.push_lease(action::informational_first(test::lease_action({j})));
  auto done = r.wait_complete(j);
  CHECK_MESSAGE(done.has_value(), "the job behind a 100 Continue never completed: " << test::log_tail(r.bunny->proc->log()));
  // A 1xx before the answer to a /complete: delivered once, not retried.
  r.relay.set_script(request_kind::complete, [](const test::recorded_request&, size_t) {
    return action::informational_first(action::answer(200, "{}"), "HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n");
  });
  fake_job k;
  r.relay.push_lease({k});
  CHECK(r.wait_complete(k).has_value());
  std::this_thread::sleep_for(std::chrono::milliseconds(1000));
  size_t completes = 0;
  for (const auto& q : r.relay.requests(request_kind::complete)) completes += q.job_id() == k.id;
  CHECK_EQ(completes, 1u);
  expect_alive_then_clean_exit(*r.bunny);
}

TEST_CASE("hostile relay: memory stays bounded through many bad answers") {
  // Freed memory sits in AddressSanitizer's quarantine (256 MiB by default)
  // and would read as growth; a small quarantine keeps RSS meaningful.
  std::string saved = std::getenv("ASAN_OPTIONS") ? std::getenv("ASAN_OPTIONS") : "";
  setenv("ASAN_OPTIONS", (saved + (saved.empty() ? "" : ":") + "quarantine_size_mb=4").c_str(), 1);
  rig r({"--set", "poll.backoff_max_ms=10", "--set", "poll.backoff_base_ms=1"});
  if (saved.empty()) unsetenv("ASAN_OPTIONS");
  else setenv("ASAN_OPTIONS", saved.c_str(), 1);

  const std::string filler(16 << 10, 'a');
  auto bad = bad_jobs();
  r.relay.set_script(request_kind::lease, [filler, bad](const test::recorded_request&, size_t nth) {
    if (nth % 3 == 0) return action::answer(200, "{\"jobs\":[{\"payload\":\"" + filler + "\",\"id\":");  // cut short
    // Fresh ids and leases where they are not the bad field, so that this
    // measures memory, not repeated ids (see the cases above for those).
    fake_job j = bad[nth % bad.size()].job;
    if (!j.id_json) j.id = test::random_job_id();
    if (!j.lease_json) j.lease = test::random_lease();
    j.payload = "\"" + filler + "\"";
    return test::lease_action({j});
  });
  REQUIRE_MESSAGE(r.relay.wait_for(request_kind::lease, 100, 30000),
                  r.relay.count(request_kind::lease) << " lease requests; " << test::log_tail(r.bunny->proc->log())
                                                     << describe(r.runs()));
  long before = rss_kib(r.bunny->proc->pid());
  REQUIRE_MESSAGE(r.relay.wait_for(request_kind::lease, 400, 60000), test::log_tail(r.bunny->proc->log()));
  long after = rss_kib(r.bunny->proc->pid());
  CHECK_MESSAGE(after - before < 16 * 1024, "RSS grew from " << before << " KiB to " << after << " KiB over 300 bad answers");
  CHECK(r.runs().empty());
  r.relay.set_script(request_kind::lease, nullptr);
  r.expect_no_job_requests();
  r.expect_recovery();
  expect_alive_then_clean_exit(*r.bunny);
}

// ---------------------------------------------------------------------------
// The real-world path, with the real relay: bunny cut off from relay for
// longer than a lease, and the same job leased again to the same bunny.

namespace {

long relay_metric(const test::relay_process& relay, const std::string& name, const std::string& labels) {
  auto m = relay.ops_get("/metrics");
  for (const auto& line : test::lines(m.body))
    if (line.rfind(name + "{", 0) == 0 && line.find(labels) != std::string::npos)
      return std::atol(line.c_str() + line.rfind(' ') + 1);
  return 0;
}

}  // namespace

TEST_CASE("real relay: a link cut longer than the lease, then the same job leased again to the same bunny") {
  // attempt 1 still running when attempt 2 arrives; or attempt 1 finished
  // during the cut, so its /complete arrives late, after attempt 2 started.
  struct variant {
    const char* what;
    const char* payload;  // [attempt 1 seconds, later attempts seconds]
    bool first_finishes_in_cut;
  };
  for (const variant v : {variant{"attempt 1 still running", "[8,1.5]", false},
                          variant{"attempt 1 finished during the cut", "[1.6,1.5]", true}}) {
    std::string what = v.what;
    CAPTURE(what);
    test::relay_process relay;
    test::tmpdir scratch;
    std::string runs_file = scratch / "runs.log";
    test::child proxy({test::env_or_fail("WAN_PROXY_BIN"), "127.0.0.1:0", "127.0.0.1:" + std::to_string(relay.api_port), "0"},
                      scratch / "proxy.log");
    auto listening = proxy.wait_for_line("\"proxy_listening\"");
    REQUIRE_MESSAGE(listening.has_value(), proxy.log());
    std::string addr = test::json_field(*listening, "addr");
    auto proxy_port = static_cast<uint16_t>(std::stoi(addr.substr(addr.rfind(':') + 1)));

    auto submitted = relay.curl("producer", "POST", "/v1/queues/render/jobs",
                                std::string(R"({"payload":)") + v.payload + R"(,"max_attempts":5})");
    REQUIRE_EQ(submitted.status, 201);
    std::string id = test::field(submitted.body, "id");

    test::bunny_options o;
    o.lease_ms = 1500;
    o.concurrency = 2;
    o.handler = record_handler(runs_file);
    o.extra_args = {"--set", "drain_timeout_ms=3000", "--set", "handler.kill_grace_ms=500"};
    test::bunny_process bunny(proxy_port, o);
    auto attempt_started = [&](const char* attempt) {
      for (const auto& h : read_runs(runs_file))
        if (h.id == id && h.attempt == attempt) return true;
      return false;
    };
    REQUIRE_MESSAGE(hostile_relay::wait_until([&] { return attempt_started("1"); }, 10000), bunny.proc->log());
    // bunny's next long poll is parked on relay: that is where relay will
    // hand attempt 2, and the answer will wait in the cut link.
    REQUIRE(hostile_relay::wait_until([&] {
      return relay.curl("admin", "GET", "/v1/queues/render").body.find("\"waiting_workers\":1") != std::string::npos;
    }, 5000));

    proxy.signal(SIGUSR1);
    REQUIRE(proxy.wait_for_line("\"event\":\"link_cut\"").has_value());
    // The lease runs out (no heartbeat gets through) and relay leases the
    // job again, to the poll bunny parked before the cut.
    bool redelivered = hostile_relay::wait_until([&] {
      return test::field(relay.curl("producer", "GET", "/v1/jobs/" + id).body, "attempts") == "2";
    }, 8000);
    REQUIRE_MESSAGE(redelivered, relay.curl("producer", "GET", "/v1/jobs/" + id).body);
    if (v.first_finishes_in_cut)
      REQUIRE(hostile_relay::wait_until([&] {
        for (const auto& h : read_runs(runs_file))
          if (h.attempt == "1" && h.end_ns >= 0) return true;
        return false;
      }, 5000));
    proxy.signal(SIGUSR2);
    REQUIRE(proxy.wait_for_line("\"event\":\"link_restored\"").has_value());

    auto job = test::wait_job(relay, id, 15);
    CHECK_MESSAGE(test::field(job, "state") == "succeeded", job << "\n" << test::log_tail(bunny.proc->log()) << describe(read_runs(runs_file)));
    // attempt 2's result, from attempt 2's run.
    CHECK_MESSAGE(job.find("\"attempt\":2") != std::string::npos, job);
    auto runs = read_runs(runs_file);
    check_no_overlap(runs);
    bool second_ok = false;
    for (const auto& h : runs) {
      if (h.attempt == "2") second_ok = second_ok || h.how == "ok";
      CHECK_MESSAGE((h.attempt != "2" || h.how != "term"), "attempt 2 was stopped:" << describe(runs));
    }
    CHECK_MESSAGE(second_ok, "attempt 2 did not run to its end:" << describe(runs));
    if (v.first_finishes_in_cut) {
      // attempt 1's outcome never counts: either bunny dropped it when relay
      // leased the job again, or its late /complete was refused (409). Only
      // attempt 2's completion was accepted, and it did not end attempt 2.
      CHECK_EQ(relay_metric(relay, "relay_http_requests_total", "route=\"complete\",status=\"200\""), 1);
    } else {
      // The older attempt was stopped when its lease was found dead, and
      // bunny says so.
      bool first_stopped = false;
      for (const auto& h : runs) first_stopped = first_stopped || (h.attempt == "1" && h.how == "term");
      CHECK_MESSAGE(first_stopped, "attempt 1 was not stopped:" << describe(runs));
      CHECK_MESSAGE(logged_attempt_stopped(bunny.proc->log(), id), test::log_tail(bunny.proc->log()));
    }
    CHECK_EQ(metric(bunny.metrics(), "bunny_jobs_running"), 0);
    expect_alive_then_clean_exit(bunny);
    proxy.signal(SIGTERM);
    proxy.wait(5000);
  }
}
