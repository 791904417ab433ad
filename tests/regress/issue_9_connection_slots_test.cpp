// Issue 9, "Connection slots taken by sockets that never handshake": with
// max_connections N, N bare TCP connections that send nothing locked out
// every legitimate client until header_timeout_ms (10 s) passed; the ops
// listener's 64 slots likewise (kubelet probes then fail). relay needs a
// per-source-address cap (limits.max_connections_per_ip), a handshake
// timeout of its own (limits.handshake_timeout_ms), and, when a listener is
// full, evicts the oldest connection still in its handshake (TLS) or that
// has not sent a byte (ops) to admit the new one.
#include <doctest/doctest.h>

#include <chrono>
#include <thread>

#include "../support/hostile.h"
#include "../support/relay_fixture.h"

namespace h = test::hostile;
using test::field;
using test::relay_process;

namespace {

// Waits until relay reports `n` open connections on `listener`.
bool wait_open(const relay_process& relay, const std::string& listener, double n, int timeout_ms) {
  auto until = h::clock::now() + std::chrono::milliseconds(timeout_ms);
  double seen = -1;
  while (h::clock::now() < until) {
    seen = h::metric(relay.ops_get("/metrics").body, "relay_connections_open{listener=\"" + listener + "\"}");
    if (seen >= n) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  MESSAGE("relay_connections_open{listener=\"" << listener << "\"} stayed at " << seen << ", wanted " << n);
  return false;
}

// One mTLS request on a new connection from 127.0.0.1; its status (0 if
// the connection failed) and how long it took.
std::pair<int, double> legitimate_request(uint16_t port, const std::string& target) {
  auto t0 = h::clock::now();
  h::tls_client c(test::client_tls("producer"), port);
  if (!c.handshake(5000)) {
    MESSAGE("legitimate client: " << c.error());
    return {0, h::ms_since(t0)};
  }
  c.queue(h::get_request(target));
  auto got = c.read_responses(1, 5000);
  if (got.empty()) MESSAGE("legitimate client: no answer (" << c.error() << ")");
  return {got.empty() ? 0 : got[0].status, h::ms_since(t0)};
}

}  // namespace

TEST_CASE("a legitimate client completes a request while max_connections bare TCP connections that never send are open") {
  // The handshake timeout is long, so only eviction can free a slot.
  relay_process relay({"--set", "limits.max_connections=50", "--set", "limits.handshake_timeout_ms=60000", "--set",
                       "limits.header_timeout_ms=60000"});
  h::sockets bare;
  for (int i = 0; i < 50; ++i) {
    int fd = h::tcp_connect(relay.api_port);
    REQUIRE_GE(fd, 0);
    bare.v.push_back(fd);
  }
  REQUIRE(wait_open(relay, "api", 50, 5000));
  auto [status, ms] = legitimate_request(relay.api_port, "/v1/jobs/0000000000000001");
  MESSAGE("with 50 of 50 slots held by bare connections: status " << status << " in " << ms << " ms");
  CHECK_EQ(status, 404);  // served (no such job), not refused
  CHECK_LT(ms, 2000);
  // The oldest connection still in its handshake made room.
  CHECK(h::wait_peer_closed(bare.v.front(), 1000));
}

TEST_CASE("connections from one address beyond max_connections_per_ip are closed at once while other addresses are served") {
  relay_process relay({"--set", "limits.max_connections_per_ip=8"});
  h::sockets from2;
  for (int i = 0; i < 20; ++i) {
    int fd = h::tcp_connect(relay.api_port, h::loopback(2));
    REQUIRE_MESSAGE(fd >= 0, "cannot connect from 127.0.0.2: " << std::strerror(errno));
    from2.v.push_back(fd);
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  int closed_within_cap = 0, closed_beyond = 0;
  for (size_t i = 0; i < from2.v.size(); ++i) {
    bool closed = h::peer_closed_now(from2.v[i]);
    (i < 8 ? closed_within_cap : closed_beyond) += closed;
  }
  MESSAGE("from 127.0.0.2 with a cap of 8: " << closed_within_cap << " of the first 8 and " << closed_beyond
                                             << " of the other 12 were closed within 500 ms");
  CHECK_EQ(closed_within_cap, 0);
  CHECK_EQ(closed_beyond, 12);
  auto [status, ms] = legitimate_request(relay.api_port, "/v1/jobs/0000000000000001");
  CHECK_EQ(status, 404);
  CHECK_LT(ms, 2000);
}

TEST_CASE("a connection that does not complete its TLS handshake is closed after handshake_timeout_ms, not header_timeout_ms") {
  relay_process relay({"--set", "limits.handshake_timeout_ms=500", "--set", "limits.header_timeout_ms=10000"});
  SUBCASE("a bare TCP connection") {
    int fd = h::tcp_connect(relay.api_port);
    REQUIRE_GE(fd, 0);
    auto t0 = h::clock::now();
    bool closed = h::wait_peer_closed(fd, 3000);
    double ms = h::ms_since(t0);
    ::close(fd);
    MESSAGE("bare connection closed: " << closed << " after " << ms << " ms (handshake_timeout_ms=500)");
    CHECK(closed);
    CHECK_GE(ms, 400);
  }
  SUBCASE("a connection that sent half a ClientHello") {
    // A handshake record announcing a 512-byte ClientHello, and only its
    // first bytes: the handshake can never finish.
    int fd = h::tcp_connect(relay.api_port);
    REQUIRE_GE(fd, 0);
    h::send_all(fd, std::string("\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 11), 1000);
    auto t0 = h::clock::now();
    bool closed = h::wait_peer_closed(fd, 3000);
    double ms = h::ms_since(t0);
    ::close(fd);
    MESSAGE("half a ClientHello: closed " << closed << " after " << ms << " ms");
    CHECK(closed);
    CHECK_GE(ms, 400);
  }
}

TEST_CASE("64 silent connections to the ops listener do not lock out /healthz") {
  relay_process relay;
  const uint16_t ops_port = static_cast<uint16_t>(std::stoi(relay.ops.substr(relay.ops.rfind(':') + 1)));
  // relay's default ops_listen is 127.0.0.1: every local client, a probe
  // included, shares one source address with the silent sockets.
  std::string source;
  SUBCASE("from the probe's own address") { source = h::loopback(1); }
  SUBCASE("from another address") { source = h::loopback(2); }
  CAPTURE(source);
  h::sockets silent;
  for (int i = 0; i < 64; ++i) {
    int fd = h::tcp_connect(ops_port, source);
    REQUIRE_GE(fd, 0);
    silent.v.push_back(fd);
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  auto t0 = h::clock::now();
  auto health = relay.ops_get("/healthz");
  double ms = h::ms_since(t0);
  MESSAGE("/healthz with 64 silent ops connections from " << source << ": " << health.status << " (curl exit "
                                                          << health.curl_exit << ") in " << ms << " ms");
  CHECK_EQ(health.status, 200);
  CHECK_LT(ms, 2000);
  CHECK(h::wait_peer_closed(silent.v.front(), 1000));
}

TEST_CASE("a legitimate client completes a request while 10,000 handshake-less sockets are open") {
  constexpr int sockets = 10000;
  constexpr int per_address = 200;  // under the default max_connections_per_ip (256)
  rlim_t limit = h::raise_nofile();
  if (limit < static_cast<rlim_t>(sockets + 512)) {
    MESSAGE("SKIPPED: needs " << sockets + 512 << " open files, the hard limit allows " << limit);
    return;
  }
  // The listener is exactly full (max_connections is the default 10000), and
  // the handshake timeout is long: only eviction can admit the client.
  relay_process relay({"--set", "limits.max_connections=" + std::to_string(sockets), "--set",
                       "limits.handshake_timeout_ms=120000", "--set", "limits.header_timeout_ms=120000"});
  const pid_t pid = relay.proc->pid();
  long rss_before = h::rss_kib(pid);
  h::sockets bare;
  auto t0 = h::clock::now();
  for (int i = 0; i < sockets; ++i) {
    int fd = h::tcp_connect(relay.api_port, h::loopback(2 + i / per_address), true);
    REQUIRE_MESSAGE(fd >= 0, "socket " << i << ": " << std::strerror(errno));
    bare.v.push_back(fd);
    // Pace the connects so that relay's accept backlog never overflows
    // (overflowing costs SYN retransmits, seconds each).
    if (i % 500 == 499) REQUIRE(wait_open(relay, "api", i + 1 - 500, 30000));
  }
  REQUIRE(wait_open(relay, "api", sockets, 60000));
  double open_ms = h::ms_since(t0);
  long rss_full = h::rss_kib(pid);
  auto [status, ms] = legitimate_request(relay.api_port, "/v1/jobs/0000000000000001");
  MESSAGE(sockets << " handshake-less sockets open after " << open_ms << " ms; relay RSS " << rss_before << " -> "
                  << rss_full << " KiB; the legitimate request: status " << status << " in " << ms << " ms");
  CHECK_EQ(status, 404);
  CHECK_LT(ms, 5000);
  CHECK_EQ(relay.ops_get("/healthz").status, 200);
}
