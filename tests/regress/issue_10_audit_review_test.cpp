// Issue 10, defects in the first audit trail found by the attack review:
// - repeats were collapsed by event, source and reason alone, so one decoy
//   denial hid the principal, queue and certificate of every other attempt
//   from that address for a second;
// - a job on a queue the caller may not see wrote an audit line and a
//   missing job none: the same answer, but not the same work (a timing
//   oracle, amplified by batches). Both now write one line of one shape;
// - a handshake that never finished was not audited.
#include <doctest/doctest.h>
#include <sys/socket.h>

#include <thread>

#include "../support/relay_fixture.h"

namespace {

struct audited {
  test::tmpdir adir;
  std::string path = adir / "audit.log";
  test::relay_process relay;
  explicit audited(std::vector<std::string> extra = {}, const std::string& policy = test::default_policy())
      : relay(with_audit(std::move(extra)), policy) {}
  std::vector<std::string> with_audit(std::vector<std::string> extra) {
    extra.insert(extra.end(), {"--set", "audit.path=" + path});
    return extra;
  }
  bool has(std::vector<std::string> needles, int timeout_ms = 5000) const {
    auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
    do {
      for (const auto& line : test::lines(test::read_file(path))) {
        bool all = true;
        for (const auto& n : needles) all = all && line.find(n) != std::string::npos;
        if (all) return true;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    } while (std::chrono::steady_clock::now() < until);
    return false;
  }
};

}  // namespace

TEST_CASE("a decoy denial from one address does not hide the next principal's attempt") {
  audited a;
  // Within one second, from 127.0.0.1: a decoy, then the attempt that matters.
  CHECK_EQ(a.relay.curl("nogrant", "GET", "/v1/queues").status, 403);
  CHECK_EQ(a.relay.curl("worker", "POST", "/v1/queues/payroll-secret/jobs", R"({"payload":1})").status, 403);
  CHECK_EQ(a.relay.curl("expired", "GET", "/v1/queues").status, 0);
  CHECK(a.has({"\"event\":\"authz_denied\"", "\"principal\":\"nobody\""}));
  CHECK_MESSAGE(a.has({"\"event\":\"authz_denied\"", "\"principal\":\"spiffe://test/ns/jobs/sa/bunny\"",
                       "\"queue\":\"payroll-secret\"", "\"permission\":\"submit\""}),
                test::read_file(a.path));
  CHECK(a.has({"\"event\":\"tls_handshake_failed\"", "\"subject\":\"CN=worker\""}));
}

TEST_CASE("a job the caller may not see and a missing job each write one audit line") {
  audited a({}, test::policy_with_grant(R"({"principal": "bunny", "allow": ["read"], "queues": ["render"]})"));
  auto r = a.relay.curl("producer", "POST", "/v1/queues/payroll-secret/jobs", R"({"payload":1})");
  REQUIRE_EQ(r.status, 201);
  std::string hidden = test::field(r.body, "id");
  CHECK_EQ(a.relay.curl("worker", "GET", "/v1/jobs/" + hidden).status, 404);
  CHECK_EQ(a.relay.curl("worker", "GET", "/v1/jobs/7fffffffffff0000").status, 404);
  CHECK(a.has({"\"event\":\"authz_denied\"", "\"queue\":\"payroll-secret\"", "\"route\":\"get_job\""}));
  CHECK_MESSAGE(a.has({"\"event\":\"job_not_found\"", "\"queue\":\"\"", "\"route\":\"get_job\"",
                       "\"reason\":\"no such job\""}),
                test::read_file(a.path));
}

TEST_CASE("a connection that never finishes its handshake is audited") {
  audited a({"--set", "limits.handshake_timeout_ms=300"});
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(a.relay.api_port);
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE_EQ(connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  CHECK(a.has({"\"event\":\"tls_handshake_failed\"", "no TLS handshake within limits.handshake_timeout_ms"}));
  ::close(fd);
}
