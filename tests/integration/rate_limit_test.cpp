// Rate limits and queue depth caps (issue 10, part 7) against the real relay:
// 429 with Retry-After, the refusals in /metrics, refusal before a body is
// read, fairness between principals, queue_full, and buckets that survive a
// policy reload.
//
// Rates are set so low (one token per 1000 s) that no token can be earned
// while a test runs: what passes is exactly the burst, whatever the speed of
// the machine. Nothing here measures time.
#include <doctest/doctest.h>

#include <chrono>
#include <csignal>
#include <string>
#include <thread>

#include "../support/relay_fixture.h"

using test::field;
using test::relay_process;

namespace {

// The default principals, producer2 (a second producer with a certificate of
// its own), and `extra` top-level keys ("limits", "queue_limits").
std::string policy(const std::string& extra) {
  return R"({
  "principals": {
    "bunny": {"uri_san": "spiffe://test/ns/jobs/sa/bunny"},
    "producer": {"dns_san": "producer.test"},
    "producer2": {"dns_san": "producer2.test"},
    "ops": {"cn": "ops-admin"}
  },
  "grants": [
    {"principal": "bunny", "allow": ["consume"], "queues": ["*"]},
    {"principal": "producer", "allow": ["submit", "read"], "queues": ["*"]},
    {"principal": "producer2", "allow": ["submit", "read"], "queues": ["*"]},
    {"principal": "ops", "allow": ["admin", "read"], "queues": ["*"]}
  ])" + (extra.empty() ? std::string() : ",\n  " + extra) +
         "\n}";
}

struct answer {
  int status = 0;
  std::string body;
  std::string retry_after;  // empty when the header was not sent
};

// curl, keeping the Retry-After header of the answer.
answer call(const relay_process& relay, const std::string& who, const std::string& method, const std::string& path,
            const std::string& body = {}) {
  const std::string headers = relay.dir / "answer.headers";
  auto r = relay.curl(who, method, path, body, {"-D", headers});
  REQUIRE_MESSAGE(r.curl_exit == 0, r.err);
  answer a{r.status, r.body, {}};
  std::string h = test::read_file(headers);
  std::remove(headers.c_str());
  auto at = h.find("Retry-After: ");
  if (at != std::string::npos) {
    at += 13;
    a.retry_after = h.substr(at, h.find('\r', at) - at);
  }
  return a;
}

std::string error_code(const std::string& body) {
  auto at = body.find("\"code\":\"");
  if (at == std::string::npos) return {};
  at += 8;
  return body.substr(at, body.find('"', at) - at);
}

// The value of one series in /metrics, or -1 when it is not there.
long metric(const relay_process& relay, const std::string& series) {
  auto m = relay.ops_get("/metrics");
  REQUIRE_EQ(m.status, 200);
  auto at = m.body.find("\n" + series + " ");
  if (at == std::string::npos) return -1;
  return std::stol(m.body.substr(at + series.size() + 2));
}

std::string rate_limited(const std::string& principal, const std::string& kind) {
  return "relay_rate_limited_total{principal=\"" + principal + "\",kind=\"" + kind + "\"}";
}

// Waits until relay has logged `n` successful reloads.
void wait_reloads(const relay_process& relay, size_t n) {
  auto until = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (test::tls_pipe::count(relay.proc->log(), "\"event\":\"reloaded\"") < n) {
    REQUIRE_MESSAGE(std::chrono::steady_clock::now() < until, "no reload: " << relay.proc->log());
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

void reload(const relay_process& relay, const std::string& text, size_t nth) {
  test::write_file(relay.dir / "policy.json", text);
  relay.proc->signal(SIGHUP);
  wait_reloads(relay, nth);
}

const std::string missing_job = "/v1/jobs/00000000000000ff";

// `n` pipelined GETs of a job that does not exist: each answer is 404, or
// 429 once the principal's request bucket is empty.
std::string get_request() { return "GET " + missing_job + " HTTP/1.1\r\nHost: localhost\r\n\r\n"; }

}  // namespace

TEST_CASE("rate limits: beyond its burst a principal gets 429 rate_limited with Retry-After, counted") {
  relay_process relay({}, policy(R"("limits": [{"principal": "producer", "requests_per_s": 0.001, "burst": 3}])"));
  for (int i = 0; i < 2; ++i) CHECK_EQ(call(relay, "producer", "GET", missing_job).status, 404);
  // A request with a body is charged once, at its headers, not again when
  // its body is in: with one token left it goes through.
  CHECK_EQ(call(relay, "producer", "POST", "/v1/queues/render/jobs", R"({"payload":1})").status, 201);
  auto refused = call(relay, "producer", "GET", missing_job);
  CHECK_EQ(refused.status, 429);
  CHECK_EQ(error_code(refused.body), "rate_limited");
  CHECK_MESSAGE(refused.body.find("request rate limit (0.001 requests/s, burst 3)") != std::string::npos,
                refused.body);
  // One token per 1000 s: the wait is most of that, and never 0.
  REQUIRE_FALSE(refused.retry_after.empty());
  long wait = std::stol(refused.retry_after);
  CHECK_GE(wait, 900);
  CHECK_LE(wait, 1000);
  // Every route costs a request: a submit too (refused at its headers).
  auto submit = call(relay, "producer", "POST", "/v1/queues/render/jobs", R"({"payload":1})");
  CHECK_EQ(submit.status, 429);
  CHECK_EQ(error_code(submit.body), "rate_limited");
  CHECK_EQ(metric(relay, rate_limited("producer", "requests")), 2);
  CHECK_EQ(metric(relay, "relay_http_requests_total{route=\"get_job\",status=\"429\"}"), 1);
  // Principals without limits (no "*" entry) are not limited.
  for (int i = 0; i < 5; ++i) CHECK_EQ(call(relay, "worker", "POST", "/v1/queues/render/lease", "{}").status, 200);
  CHECK_EQ(metric(relay, rate_limited("bunny", "requests")), -1);
  // A refusal is logged (repeats from one source collapse).
  CHECK(relay.proc->wait_for_line("\"event\":\"rate_limited\"").has_value());
}

TEST_CASE("rate limits: a principal over its rate is refused at the headers, its body never read") {
  relay_process relay({}, policy(R"("limits": [{"principal": "producer", "requests_per_s": 0.001, "burst": 1}])"));
  test::tls_pipe pipe(relay.api_port, "producer");
  pipe.send(get_request());
  CHECK(pipe.read_responses(1, 10000).rfind("HTTP/1.1 404", 0) == 0);
  // A body is announced and never sent: the answer comes anyway, and the
  // connection closes (its body was left unread).
  pipe.send("POST /v1/queues/render/jobs HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            "Content-Length: 100000\r\n\r\n");
  bool closed = false;
  std::string got = pipe.read_until_closed(10000, closed);
  CHECK_MESSAGE(got.rfind("HTTP/1.1 429", 0) == 0, got);
  CHECK(got.find("\r\nRetry-After: ") != std::string::npos);
  CHECK(got.find("\"code\":\"rate_limited\"") != std::string::npos);
  CHECK(closed);
}

TEST_CASE("job rate: a batch costs a token per job; one beyond jobs_burst is 413, never a 429 to wait out") {
  relay_process relay({}, policy(R"("limits": [{"principal": "producer", "jobs_per_s": 0.001, "jobs_burst": 10}])"));
  auto batch = [](int n) {
    std::string b = "[";
    for (int i = 0; i < n; ++i) b += std::string(i ? "," : "") + R"({"payload":)" + std::to_string(i) + "}";
    return b + "]";
  };
  auto too_big = call(relay, "producer", "POST", "/v1/queues/q/jobs", batch(11));
  CHECK_EQ(too_big.status, 413);
  CHECK_EQ(error_code(too_big.body), "batch_too_large");
  CHECK_MESSAGE(too_big.body.find("a batch of 11 jobs can never pass: the principal's jobs_burst is 10") !=
                    std::string::npos,
                too_big.body);
  CHECK(too_big.retry_after.empty());

  auto six = call(relay, "producer", "POST", "/v1/queues/q/jobs", batch(6));
  CHECK_EQ(six.status, 201);
  // 4 tokens left: a batch of 5 waits, whole (none of it goes in).
  auto five = call(relay, "producer", "POST", "/v1/queues/q/jobs", batch(5));
  CHECK_EQ(five.status, 429);
  CHECK_EQ(error_code(five.body), "rate_limited");
  CHECK(five.body.find("job rate limit (0.001 jobs/s, jobs_burst 10)") != std::string::npos);
  REQUIRE_FALSE(five.retry_after.empty());
  CHECK_GE(std::stol(five.retry_after), 900);
  CHECK_EQ(call(relay, "producer", "POST", "/v1/queues/q/jobs", batch(4)).status, 201);
  // Requests are not limited, only jobs: reads go on.
  CHECK_EQ(call(relay, "producer", "GET", missing_job).status, 404);

  // No job token left: a submit is refused at its headers, before its body.
  test::tls_pipe pipe(relay.api_port, "producer");
  pipe.send("POST /v1/queues/q/jobs HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            "Content-Length: 100000\r\n\r\n");
  bool closed = false;
  std::string got = pipe.read_until_closed(10000, closed);
  CHECK_MESSAGE(got.rfind("HTTP/1.1 429", 0) == 0, got);
  CHECK(got.find("\"code\":\"rate_limited\"") != std::string::npos);

  CHECK_EQ(metric(relay, rate_limited("producer", "jobs")), 3);
  CHECK_EQ(metric(relay, "relay_queue_jobs{queue=\"q\",state=\"queued\"}"), 10);
}

TEST_CASE("fairness: a producer flooding past its limit does not starve another producer") {
  // Both producers take the "*" limits, each with buckets of its own.
  relay_process relay({}, policy(R"("limits": [{"principal": "*", "requests_per_s": 0.001, "burst": 10}])"));
  test::tls_pipe flood(relay.api_port, "producer");
  std::string hundred;
  for (int i = 0; i < 100; ++i) hundred += get_request();
  size_t refused = 0, served = 0;
  for (int round = 0; round < 5; ++round) {
    // The noisy one: 100 pipelined requests on one connection.
    flood.send(hundred);
    std::string got = flood.read_responses(100, 20000);
    REQUIRE_EQ(test::tls_pipe::count(got, "HTTP/1.1 "), 100u);
    refused += test::tls_pipe::count(got, "HTTP/1.1 429");
    served += test::tls_pipe::count(got, "HTTP/1.1 404");
    CHECK_EQ(test::tls_pipe::count(got, "HTTP/1.1 429"), test::tls_pipe::count(got, "\r\nRetry-After: "));
    // The quiet one is served every time.
    auto r = call(relay, "producer2", "POST", "/v1/queues/shared/jobs", R"({"payload":)" + std::to_string(round) + "}");
    CHECK_MESSAGE(r.status == 201, r.body);
  }
  CHECK_EQ(served, 10u);
  CHECK_EQ(refused, 490u);
  CHECK_EQ(call(relay, "producer", "POST", "/v1/queues/shared/jobs", R"({"payload":9})").status, 429);
  CHECK_EQ(metric(relay, rate_limited("producer", "requests")), 491);
  CHECK_EQ(metric(relay, rate_limited("producer2", "requests")), -1);
  CHECK_EQ(metric(relay, "relay_queue_jobs{queue=\"shared\",state=\"queued\"}"), 5);
}

TEST_CASE("peers the policy does not name share one bucket, counted as (unmatched)") {
  relay_process relay({}, policy(R"("limits": [{"principal": "*", "requests_per_s": 0.001, "burst": 2}])"));
  // "nogrant" (CN nobody) matches no principal: denied, then limited.
  CHECK_EQ(call(relay, "nogrant", "GET", missing_job).status, 403);
  CHECK_EQ(call(relay, "nogrant", "POST", "/v1/queues/q/jobs", R"({"payload":1})").status, 403);
  CHECK_EQ(call(relay, "nogrant", "GET", missing_job).status, 429);
  CHECK_EQ(metric(relay, rate_limited("(unmatched)", "requests")), 1);
  // A named principal under "*" has buckets of its own.
  CHECK_EQ(call(relay, "producer", "GET", missing_job).status, 404);
  CHECK_EQ(call(relay, "producer", "GET", missing_job).status, 404);
  CHECK_EQ(call(relay, "producer", "GET", missing_job).status, 429);
}

TEST_CASE("queue depth: max_depth from the policy, else limits.max_queue_depth, gives 429 queue_full") {
  relay_process relay({"--set", "limits.max_queue_depth=4"},
                      policy(R"("queue_limits": [{"queues": ["capped"], "max_depth": 2}])"));
  const std::string capped = "/v1/queues/capped/jobs";
  CHECK_EQ(call(relay, "producer", "POST", capped, R"({"payload":1})").status, 201);
  CHECK_EQ(call(relay, "producer", "POST", capped, R"({"payload":2})").status, 201);
  auto full = call(relay, "producer", "POST", capped, R"({"payload":3})");
  CHECK_EQ(full.status, 429);
  CHECK_EQ(error_code(full.body), "queue_full");
  CHECK_MESSAGE(full.body.find("cap of 2 unfinished jobs (the policy's max_depth)") != std::string::npos, full.body);
  CHECK_EQ(full.retry_after, "1");
  // A leased job still counts; a finished one does not.
  auto l = call(relay, "worker", "POST", "/v1/queues/capped/lease", "{}");
  REQUIRE_EQ(l.status, 200);
  CHECK_EQ(call(relay, "producer", "POST", capped, R"({"payload":3})").status, 429);
  auto done = call(relay, "worker", "POST", "/v1/jobs/" + field(l.body, "id") + "/complete",
                   R"({"lease":")" + field(l.body, "lease") + R"(","result":true})");
  CHECK_EQ(done.status, 200);
  // Room for one: a batch of two is refused whole, one goes in.
  CHECK_EQ(call(relay, "producer", "POST", capped, R"([{"payload":3},{"payload":4}])").status, 429);
  CHECK_EQ(call(relay, "producer", "POST", capped, R"({"payload":3})").status, 201);

  // Other queues take the configured default.
  CHECK_EQ(call(relay, "producer", "POST", "/v1/queues/other/jobs", R"([{"payload":1},{"payload":2},{"payload":3},{"payload":4}])").status,
           201);
  auto other = call(relay, "producer", "POST", "/v1/queues/other/jobs", R"({"payload":5})");
  CHECK_EQ(other.status, 429);
  CHECK_EQ(error_code(other.body), "queue_full");
  CHECK(other.body.find("cap of 4 unfinished jobs (limits.max_queue_depth)") != std::string::npos);
  // A batch that could never fit a new queue does not create it.
  CHECK_EQ(call(relay, "producer2", "POST", "/v1/queues/fresh/jobs",
                R"([{"payload":1},{"payload":2},{"payload":3},{"payload":4},{"payload":5}])")
               .status,
           429);
  CHECK_EQ(call(relay, "admin", "GET", "/v1/queues/fresh").status, 404);

  CHECK_EQ(metric(relay, rate_limited("producer", "queue_full")), 4);
  CHECK_EQ(metric(relay, rate_limited("producer2", "queue_full")), 1);
  CHECK_EQ(metric(relay, "relay_queue_jobs{queue=\"capped\",state=\"queued\"}"), 2);
}

TEST_CASE("a policy reload keeps each principal's tokens and applies the new rates") {
  relay_process relay({"--set", "tls.reload_check_ms=0"},
                      policy(R"("limits": [{"principal": "producer", "requests_per_s": 0.001, "burst": 2}])"));
  CHECK_EQ(call(relay, "producer", "GET", missing_job).status, 404);
  CHECK_EQ(call(relay, "producer", "GET", missing_job).status, 404);
  CHECK_EQ(call(relay, "producer", "GET", missing_job).status, 429);

  // A reload that changes something else (and raises the burst): the empty
  // bucket stays empty. A bucket made afresh would let two through.
  reload(relay,
         policy(R"("limits": [{"principal": "producer", "requests_per_s": 0.001, "burst": 5},
                             {"principal": "producer2", "requests_per_s": 100}])"),
         1);
  CHECK_EQ(call(relay, "producer", "GET", missing_job).status, 429);
  CHECK_EQ(call(relay, "producer2", "GET", missing_job).status, 404);

  // A faster rate: from the first request decided under it, 1000 tokens a
  // second. The request after that one finds at least one token earned.
  reload(relay, policy(R"("limits": [{"principal": "producer", "requests_per_s": 1000, "burst": 1000}])"), 2);
  int first = call(relay, "producer", "GET", missing_job).status;
  CHECK((first == 404 || first == 429));
  std::this_thread::sleep_for(std::chrono::milliseconds(5));
  CHECK_EQ(call(relay, "producer", "GET", missing_job).status, 404);

  // Back to a slow rate: the tokens earned meanwhile are capped by the new
  // burst at once.
  reload(relay, policy(R"("limits": [{"principal": "producer", "requests_per_s": 0.001, "burst": 1}])"), 3);
  CHECK_EQ(call(relay, "producer", "GET", missing_job).status, 404);
  CHECK_EQ(call(relay, "producer", "GET", missing_job).status, 429);

  // Limits removed: not limited any more.
  reload(relay, policy(""), 4);
  for (int i = 0; i < 5; ++i) CHECK_EQ(call(relay, "producer", "GET", missing_job).status, 404);
}
