// Issue 10, "No existence or queue-name oracle": an identity without a grant
// got `403 principal is not allowed to read on queue payroll-secret` for an
// existing job and a different 403 for an unknown id; POST /v1/results said
// 403 or 404 per item. Ids are sequential, so every job and its queue name
// could be enumerated. A caller without the grant on a job's queue now gets
// exactly what it gets for a job that does not exist, in every route and in
// batches, and no answer names a queue.
#include <doctest/doctest.h>

#include "../support/relay_fixture.h"

using test::relay_process;

namespace {

// bunny may also read "render"; nothing on payroll-secret.
std::string policy() {
  return test::policy_with_grant(R"({"principal": "bunny", "allow": ["read", "submit"], "queues": ["render"]})");
}

std::string submit(const relay_process& relay, const std::string& queue) {
  auto r = relay.curl("producer", "POST", "/v1/queues/" + queue + "/jobs", R"({"payload":{"salary":1}})");
  REQUIRE_EQ(r.status, 201);
  return test::field(r.body, "id");
}

}  // namespace

TEST_CASE("a job on a queue the caller may not see answers as a job that does not exist") {
  relay_process relay({}, policy());
  std::string secret = submit(relay, "payroll-secret");
  std::string missing = "7fffffffffff0000";
  struct step {
    const char* method;
    std::string suffix;
    std::string body;
  };
  for (step s : {step{"GET", "", ""}, step{"DELETE", "", ""},
                 step{"POST", "/heartbeat", R"({"lease":"00000000000000000000000000000000"})"},
                 step{"POST", "/complete", R"({"lease":"00000000000000000000000000000000","result":1})"},
                 step{"POST", "/fail", R"({"lease":"00000000000000000000000000000000","error":"x"})"}}) {
    CAPTURE(s.method);
    CAPTURE(s.suffix);
    auto existing = relay.curl("worker", s.method, "/v1/jobs/" + secret + s.suffix, s.body);
    auto unknown = relay.curl("worker", s.method, "/v1/jobs/" + missing + s.suffix, s.body);
    CHECK_EQ(existing.status, unknown.status);
    CHECK_EQ(existing.body, unknown.body);
    CHECK(existing.body.find("payroll") == std::string::npos);
  }
  // The owner of the grant still sees it.
  CHECK_EQ(relay.curl("producer", "GET", "/v1/jobs/" + secret).status, 200);
}

TEST_CASE("a caller with no grant of the permission anywhere gets one answer, whatever the id") {
  relay_process relay({}, policy());
  std::string secret = submit(relay, "payroll-secret");
  auto existing = relay.curl("nogrant", "GET", "/v1/jobs/" + secret);
  auto unknown = relay.curl("nogrant", "GET", "/v1/jobs/7fffffffffff0000");
  CHECK_EQ(existing.status, 403);
  CHECK_EQ(existing.status, unknown.status);
  CHECK_EQ(existing.body, unknown.body);
  CHECK(existing.body.find("payroll") == std::string::npos);
}

TEST_CASE("POST /v1/results answers an item on an unseen queue as an unknown id, and audits it") {
  relay_process relay({}, policy());
  std::string secret = submit(relay, "payroll-secret");
  std::string body = R"([{"id":")" + secret + R"(","lease":"00000000000000000000000000000000","result":1},)" +
                     R"({"id":"7fffffffffff0000","lease":"00000000000000000000000000000000","result":1}])";
  auto r = relay.curl("worker", "POST", "/v1/results", body);
  REQUIRE_EQ(r.status, 200);
  MESSAGE(r.body);
  auto first = r.body.find("\"status\":404");
  REQUIRE(first != std::string::npos);
  CHECK(r.body.find("\"status\":404", first + 1) != std::string::npos);
  CHECK(r.body.find("403") == std::string::npos);
  CHECK(r.body.find("payroll") == std::string::npos);
  auto denial = relay.proc->wait_for_line("\"queue\":\"payroll-secret\"", 5000);
  CHECK_MESSAGE(denial.has_value(), relay.proc->log());
  if (denial) CHECK(denial->find("authz_denied") != std::string::npos);
}

TEST_CASE("a denial on a named queue does not echo the queue") {
  relay_process relay({}, policy());
  auto r = relay.curl("worker", "POST", "/v1/queues/payroll-secret/jobs", R"({"payload":1})");
  CHECK_EQ(r.status, 403);
  CHECK(r.body.find("payroll") == std::string::npos);
}
