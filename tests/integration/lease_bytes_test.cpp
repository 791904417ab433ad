// Lease answers bounded in bytes (issue 11): a worker's answer cap is a
// number of bytes, so "max":N alone can ask for an answer it must drop
// (and the jobs in it stay leased, burning attempts). "max_bytes" bounds
// the answer's body exactly; the jobs left out stay queued, unleased.
#include <doctest/doctest.h>

#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include "../support/relay_fixture.h"

using test::field;
using test::relay_process;

namespace {

std::vector<std::string> submit_many(const relay_process& relay, int n, const std::string& payload) {
  std::vector<std::string> ids;
  for (int i = 0; i < n; ++i) {
    auto r = relay.curl("producer", "POST", "/v1/queues/render/jobs", R"({"payload":)" + payload + "}");
    REQUIRE_MESSAGE(r.status == 201, r.body);
    ids.push_back(field(r.body, "id"));
  }
  return ids;
}

size_t count(const std::string& s, const std::string& needle) {
  size_t n = 0;
  for (size_t at = s.find(needle); at != std::string::npos; at = s.find(needle, at + needle.size())) ++n;
  return n;
}

size_t jobs_in(const std::string& answer) { return count(answer, "\"lease_expires_ms\":"); }

// A payload of `n` bytes as stored: a JSON string.
std::string payload_of(size_t n) { return "\"" + std::string(n - 2, 'x') + "\""; }

// The exact answer to a lease of `jobs` jobs with `payload`-byte payloads,
// all as attempt 1 and with a 13-digit expiry (milliseconds since 1970,
// from 2001 to 2286).
size_t answer_bytes(size_t jobs, size_t payload) {
  const std::string one =
      R"({"id":"0000000000000000","attempt":1,"lease":"00000000000000000000000000000000","lease_expires_ms":1765000000000,"payload":})";
  return std::string(R"({"jobs":[]})").size() + jobs * (one.size() + payload) + (jobs ? jobs - 1 : 0);
}

}  // namespace

TEST_CASE("lease max_bytes: only the jobs whose answer fits are leased; the rest stay queued, no attempt used") {
  relay_process relay;
  const std::string payload = payload_of(100 * 1024);
  auto ids = submit_many(relay, 5, payload);

  auto r = relay.curl("worker", "POST", "/v1/queues/render/lease", R"({"max":5,"max_bytes":250000})");
  REQUIRE_EQ(r.status, 200);
  CHECK_EQ(jobs_in(r.body), 2u);
  CHECK_LE(r.body.size(), 250000u);
  CHECK_EQ(r.body.size(), answer_bytes(2, payload.size()));
  CHECK_NE(r.body.find(ids[0]), std::string::npos);
  CHECK_NE(r.body.find(ids[1]), std::string::npos);

  for (size_t i = 2; i < ids.size(); ++i) {
    auto j = relay.curl("producer", "GET", "/v1/jobs/" + ids[i]);
    CHECK_EQ(field(j.body, "state"), "queued");
    CHECK_EQ(field(j.body, "attempts"), "0");
  }
  // The three left out are leased next, each as its first attempt.
  auto rest = relay.curl("worker", "POST", "/v1/queues/render/lease", R"({"max":5})");
  REQUIRE_EQ(rest.status, 200);
  CHECK_EQ(jobs_in(rest.body), 3u);
  CHECK_EQ(count(rest.body, "\"attempt\":1,"), 3u);
  for (size_t i = 2; i < ids.size(); ++i) CHECK_NE(rest.body.find(ids[i]), std::string::npos);
}

TEST_CASE("lease max_bytes: the bound is exact, and one job is always leased") {
  relay_process relay;
  const std::string payload = payload_of(1000);
  submit_many(relay, 6, payload);
  const size_t two = answer_bytes(2, payload.size());

  // Exactly the size of two jobs: two, and the answer is that size.
  auto r = relay.curl("worker", "POST", "/v1/queues/render/lease", R"({"max":5,"max_bytes":)" + std::to_string(two) + "}");
  REQUIRE_EQ(r.status, 200);
  CHECK_EQ(jobs_in(r.body), 2u);
  CHECK_EQ(r.body.size(), two);

  // One byte less: one job.
  r = relay.curl("worker", "POST", "/v1/queues/render/lease", R"({"max":5,"max_bytes":)" + std::to_string(two - 1) + "}");
  REQUIRE_EQ(r.status, 200);
  CHECK_EQ(jobs_in(r.body), 1u);
  CHECK_EQ(r.body.size(), answer_bytes(1, payload.size()));

  // Smaller than one job: still that one job (a job alone fits
  // limits.max_body_bytes, which stays below the worker's cap).
  r = relay.curl("worker", "POST", "/v1/queues/render/lease", R"({"max":5,"max_bytes":1})");
  REQUIRE_EQ(r.status, 200);
  CHECK_EQ(jobs_in(r.body), 1u);

  // Without the field, max alone decides.
  r = relay.curl("worker", "POST", "/v1/queues/render/lease", R"({"max":5})");
  REQUIRE_EQ(r.status, 200);
  CHECK_EQ(jobs_in(r.body), 2u);
}

TEST_CASE("lease max_bytes: a parked long poll woken later keeps its bound") {
  relay_process relay;
  // Parked first, on an empty queue; woken by the first of a batch of
  // three. Its bound is below one job, so it gets that one; the others wait.
  test::test_loop loop;
  relay::v1::client worker(&loop.loop, test::v1_options(relay.api_port, "worker"));
  relay::v1::lease_request bounded;
  bounded.queue = "render";
  bounded.max = 5;
  bounded.max_bytes = 100;
  bounded.wait_ms = 20000;
  relay::v1::error err;
  relay::v1::lease_answer got;
  bool done = false;
  worker.lease(bounded, [&](const relay::v1::error& e, relay::v1::lease_answer& a) { err = e, got = std::move(a), done = true; });
  bool parked = false;
  for (int i = 0; i < 500 && !parked; ++i) {
    uv_run(&loop.loop, UV_RUN_NOWAIT);
    // A queue with waiters only is no queue (issue 10): read the metrics.
    parked = relay.ops_get("/metrics").body.find("relay_parked_requests{kind=\"lease\"} 1\n") != std::string::npos;
    if (!parked) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  REQUIRE(parked);
  const std::string job = R"({"payload":)" + payload_of(1000) + "}";
  auto b = relay.curl("producer", "POST", "/v1/queues/render/jobs", "[" + job + "," + job + "," + job + "]");
  REQUIRE_MESSAGE(b.status == 201, b.body);
  auto t0 = std::chrono::steady_clock::now();
  while (!done && std::chrono::steady_clock::now() - t0 < std::chrono::seconds(15)) uv_run(&loop.loop, UV_RUN_ONCE);
  REQUIRE(done);
  REQUIRE_MESSAGE(!err, err.message);
  CHECK_EQ(got.jobs.size(), 1u);
  CHECK(got.rejected.empty());
  auto rest = relay.curl("worker", "POST", "/v1/queues/render/lease", R"({"max":5})");
  CHECK_EQ(jobs_in(rest.body), 2u);
  CHECK_EQ(count(rest.body, "\"attempt\":1,"), 2u);
}

TEST_CASE("lease max_bytes: bad values are refused with 400, naming the field") {
  relay_process relay;
  submit_many(relay, 1, "1");
  for (const char* body : {R"({"max_bytes":0})", R"({"max_bytes":-5})", R"({"max_bytes":"250000"})",
                           R"({"max_bytes":2.5})", R"({"max_bytes":true})", R"({"max_bytes":1e30})"}) {
    auto r = relay.curl("worker", "POST", "/v1/queues/render/lease", body);
    CHECK_MESSAGE(r.status == 400, body);
    CHECK_EQ(field(r.body, "code"), "invalid_field");
    CHECK_MESSAGE(r.body.find("max_bytes") != std::string::npos, r.body);
  }
  // Nothing was leased by the refused requests.
  auto r = relay.curl("worker", "POST", "/v1/queues/render/lease", R"({"max":5})");
  CHECK_EQ(jobs_in(r.body), 1u);
  CHECK_EQ(count(r.body, "\"attempt\":1,"), 1u);
}
