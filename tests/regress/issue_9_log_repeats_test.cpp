// Issue 9: every failed handshake and every denial was a log line, so an
// unauthenticated peer could flood the log. Repeats of one event from one
// source address within a second now collapse into one line plus a count.
#include <doctest/doctest.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>

#include <chrono>
#include <string>

#include "../support/relay_fixture.h"

namespace {

// Lines of `event` from `source`, and the repeats their "repeated" lines
// report; together they account for every occurrence.
struct tally {
  size_t full_lines = 0;
  uint64_t repeats = 0;
  uint64_t total() const { return full_lines + repeats; }
};

tally count_event(const std::string& log, const std::string& event, const std::string& source) {
  tally t;
  for (const auto& l : test::lines(log)) {
    if (l.rfind("{\"event\":\"" + event + "\"", 0) != 0) continue;
    if (l.find("\"source\":\"" + source + "\"") == std::string::npos) continue;
    if (l.find("\"repeated\":") != std::string::npos) t.repeats += std::stoull(test::field(l, "repeated"));
    else ++t.full_lines;
  }
  return t;
}

tally wait_for_total(const test::relay_process& relay, const std::string& event, uint64_t n) {
  auto until = std::chrono::steady_clock::now() + std::chrono::seconds(15);
  tally t;
  while (std::chrono::steady_clock::now() < until) {
    t = count_event(relay.proc->log(), event, "127.0.0.1");
    if (t.total() >= n) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return t;
}

// A plaintext request where relay expects a ClientHello; waits for relay to
// close the connection.
void bad_handshake(uint16_t port) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  REQUIRE_GE(fd, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE_EQ(connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  static const char junk[] = "GET / HTTP/1.1\r\nHost: x\r\n\r\n";
  CHECK_GT(::send(fd, junk, sizeof junk - 1, MSG_NOSIGNAL), 0);
  char buf[4096];
  for (;;) {
    pollfd p{fd, POLLIN, 0};
    if (poll(&p, 1, 10000) <= 0 || ::recv(fd, buf, sizeof buf, 0) <= 0) break;
  }
  ::close(fd);
}

}  // namespace

TEST_CASE("Failed handshakes from one address collapse into one line a second plus a repeat count") {
  test::relay_process relay;
  constexpr int n = 200;
  auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < n; ++i) bad_handshake(relay.api_port);
  double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  tally t = wait_for_total(relay, "tls_handshake_failed", n);
  INFO("log: " << relay.proc->log());
  CHECK_EQ(t.total(), static_cast<uint64_t>(n));
  // One full line per window of a second, not one per handshake.
  CHECK_LE(t.full_lines, static_cast<size_t>(seconds) + 2);
  CHECK_GT(t.repeats, 0u);
  // Every failure is still counted in the metrics.
  auto m = relay.ops_get("/metrics");
  CHECK_NE(m.body.find("relay_tls_handshake_failures_total{listener=\"api\"} " + std::to_string(n)), std::string::npos);
}

TEST_CASE("Authorisation denials from one address collapse into one line a second plus a repeat count") {
  test::relay_process relay;
  constexpr int n = 10;
  // nogrant has a valid certificate and no grant: each submit is denied.
  for (int i = 0; i < n; ++i) CHECK_EQ(relay.curl("nogrant", "POST", "/v1/queues/render/jobs", R"({"payload":1})").status, 403);
  tally t = wait_for_total(relay, "authz_denied", n);
  INFO("log: " << relay.proc->log());
  CHECK_EQ(t.total(), static_cast<uint64_t>(n));
  CHECK_LT(t.full_lines, static_cast<size_t>(n));
}
