// Issue 10, found by the attack review: a long poll parked before a policy
// reload took the caller's grant away still delivered -- a lease wait got
// the next job with a lease, a job wait the job with its payload -- while a
// fresh request was refused. A reload now answers such waits at once.
#include <doctest/doctest.h>
#include <signal.h>

#include <thread>

#include "../support/relay_fixture.h"

namespace {

std::string post(const std::string& path, const std::string& body) {
  return "POST " + path + " HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: " +
         std::to_string(body.size()) + "\r\n\r\n" + body;
}

bool parked(const test::relay_process& relay, const std::string& kind, int n) {
  for (int i = 0; i < 100; ++i) {
    if (relay.ops_get("/metrics").body.find("relay_parked_requests{kind=\"" + kind + "\"} " + std::to_string(n)) !=
        std::string::npos)
      return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return false;
}

// The default policy without bunny2's consume grant and the producer's
// read.
std::string revoked_policy() {
  std::string p = test::default_policy();
  auto erase = [&](const std::string& s) {
    auto at = p.find(s);
    REQUIRE(at != std::string::npos);
    p.erase(at, s.size());
  };
  erase(R"({"principal": "bunny2", "allow": ["consume"], "queues": ["render", "encode-*", "work"]},)");
  erase(R"("submit", "read")");
  p.insert(p.find(R"("principal": "producer", "allow": [)") + std::string(R"("principal": "producer", "allow": [)").size(),
           R"("submit")");
  return p;
}

}  // namespace

TEST_CASE("a reload that revokes a grant answers the long polls parked under it") {
  test::relay_process relay;
  auto job = relay.curl("producer", "POST", "/v1/queues/work/jobs", R"({"payload":"SECRET","delay_ms":60000})");
  REQUIRE_EQ(job.status, 201);
  std::string id = test::field(job.body, "id");

  test::tls_pipe lease(relay.api_port, "worker2");
  lease.send(post("/v1/queues/render/lease", R"({"max":1,"wait_ms":20000})"));
  test::tls_pipe read(relay.api_port, "producer");
  read.send("GET /v1/jobs/" + id + "?wait_ms=20000 HTTP/1.1\r\nHost: x\r\n\r\n");
  REQUIRE(parked(relay, "lease", 1));
  REQUIRE(parked(relay, "job", 1));

  test::write_file(relay.dir / "policy.json", revoked_policy());
  relay.proc->signal(SIGHUP);
  REQUIRE(relay.proc->wait_for_line("\"event\":\"reloaded\"", 5000).has_value());

  std::string lease_answer = lease.read_responses(1, 5000);
  CHECK_MESSAGE(lease_answer.find("\"jobs\":[]") != std::string::npos, lease_answer);
  std::string read_answer = read.read_responses(1, 5000);
  CHECK_MESSAGE(read_answer.find("HTTP/1.1 403") != std::string::npos, read_answer);
  CHECK(read_answer.find("SECRET") == std::string::npos);

  // A job submitted now is not leased to the revoked worker, and its next
  // lease is refused.
  REQUIRE_EQ(relay.curl("producer", "POST", "/v1/queues/render/jobs", R"({"payload":"SECRET2"})").status, 201);
  CHECK_EQ(relay.curl("worker2", "POST", "/v1/queues/render/lease", R"({"max":1})").status, 403);
  auto kept = relay.curl("worker", "POST", "/v1/queues/render/lease", R"({"max":1})");
  CHECK(kept.body.find("SECRET2") != std::string::npos);
}
