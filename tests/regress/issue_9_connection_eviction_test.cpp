// Issue 9, two defects of the full-listener eviction that admits a new
// connection by closing the oldest quiet one:
// - "Eviction frees the per-source entry it is about to use": when the
//   victim was the last connection of the new one's own source, closing it
//   erased that source's count while the admission still held it (a
//   use-after-free under AddressSanitizer; a wrong count otherwise).
// - "Idle keep-alive connections are never evicted": only connections in
//   their handshake could make room, so clients that had finished a request
//   and kept their connection open (every HTTP/1.1 client) held the listener
//   full for idle_timeout_ms and new clients were refused. Connections idle
//   between requests with nothing left to send are quiet too; busy ones (a
//   parked long poll) are never evicted.
#include <doctest/doctest.h>

#include <chrono>
#include <thread>

#include "../support/hostile.h"
#include "../support/relay_fixture.h"

namespace h = test::hostile;
using test::relay_process;

namespace {

double open_connections(const relay_process& relay, const std::string& listener) {
  return h::metric(relay.ops_get("/metrics").body, "relay_connections_open{listener=\"" + listener + "\"}");
}

struct fds {
  std::vector<int> v;
  fds() = default;
  fds(const fds&) = delete;
  fds& operator=(const fds&) = delete;
  ~fds() {
    for (int fd : v) ::close(fd);
  }
};

}  // namespace

TEST_CASE("a full ops listener admits a connection whose own source holds the oldest quiet slot") {
  relay_process relay;
  const uint16_t ops_port = static_cast<uint16_t>(std::stoi(relay.ops.substr(relay.ops.rfind(':') + 1)));
  // The ops listener's 64 slots, one per source, 127.0.0.2 the oldest.
  fds silent;
  for (int i = 0; i < 64; ++i) {
    int fd = h::tcp_connect(ops_port, h::loopback(2 + i));
    REQUIRE_GE(fd, 0);
    silent.v.push_back(fd);
    std::this_thread::sleep_for(std::chrono::milliseconds(2));  // keep the accept order
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  // From 127.0.0.2 again: it evicts 127.0.0.2's own connection.
  int again = h::tcp_connect(ops_port, h::loopback(2));
  REQUIRE_GE(again, 0);
  silent.v.push_back(again);
  CHECK(h::wait_peer_closed(silent.v.front(), 2000));
  // The new connection was admitted and works.
  h::send_all(again, h::get_request("/healthz"), 2000);
  std::string answer;
  auto until = h::clock::now() + std::chrono::seconds(5);
  while (answer.find("\r\n\r\n") == std::string::npos && h::ms_left(until) > 0) {
    pollfd p{again, POLLIN, 0};
    if (::poll(&p, 1, h::ms_left(until)) <= 0) break;
    char buf[4096];
    ssize_t n = ::recv(again, buf, sizeof buf, 0);
    if (n <= 0) break;
    answer.append(buf, static_cast<size_t>(n));
  }
  MESSAGE("the connection from 127.0.0.2 that evicted its own source's slot was answered: "
          << answer.substr(0, answer.find("\r\n")));
  CHECK_EQ(answer.rfind("HTTP/1.1 200", 0), 0u);
  // relay is alive and its counts add up: the 63 others, the new one, and
  // the probe's own connection (which evicted the next oldest).
  CHECK_EQ(relay.ops_get("/healthz").status, 200);
  double open = open_connections(relay, "ops");
  MESSAGE("ops connections open: " << open);
  CHECK_LE(open, 64);
}

TEST_CASE("a full listener evicts an idle keep-alive connection, never a parked long poll") {
  relay_process relay({"--set", "limits.max_connections=8", "--set", "limits.idle_timeout_ms=600000"});
  auto bunny = test::client_tls("worker");
  auto producer = test::client_tls("producer");
  // Seven long polls parked on an empty queue, then one producer that
  // finished its request and keeps the connection open.
  std::vector<std::unique_ptr<h::tls_client>> polls;
  for (int i = 0; i < 7; ++i) {
    polls.push_back(std::make_unique<h::tls_client>(bunny, relay.api_port));
    REQUIRE(polls.back()->handshake());
    polls.back()->queue(h::post_request("/v1/queues/work/lease", R"({"max":1,"wait_ms":30000})"));
    REQUIRE(polls.back()->flush(2000));
  }
  auto idle = std::make_unique<h::tls_client>(producer, relay.api_port);
  REQUIRE(idle->handshake());
  idle->queue(h::get_request("/v1/jobs/0000000000000001"));
  auto first = idle->read_responses(1, 5000);
  REQUIRE_EQ(first.size(), 1u);
  REQUIRE_EQ(first[0].status, 404);
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  REQUIRE_EQ(open_connections(relay, "api"), 8);

  // A new client is admitted in the idle one's place.
  auto t0 = h::clock::now();
  h::tls_client fresh(producer, relay.api_port);
  REQUIRE(fresh.handshake());
  fresh.queue(h::get_request("/v1/jobs/0000000000000001"));
  auto got = fresh.read_responses(1, 5000);
  MESSAGE("with 7 parked long polls and 1 idle keep-alive connection in 8 slots, a new client: "
          << (got.empty() ? 0 : got[0].status) << " in " << h::ms_since(t0) << " ms");
  REQUIRE_EQ(got.size(), 1u);
  CHECK_EQ(got[0].status, 404);
  CHECK(idle->read_until_closed(2000));

  // Every parked poll is still there: a submit is leased by one of them.
  fresh.queue(h::post_request("/v1/queues/work/jobs", R"({"payload":{"n":1}})"));
  auto submitted = fresh.read_responses(1, 5000);
  REQUIRE_EQ(submitted.size(), 1u);
  CHECK_EQ(submitted[0].status, 201);
  int leased = 0, closed = 0;
  h::tls_client* winner = nullptr;
  h::pump_all(polls, 5000, [&] {
    for (auto& p : polls) {
      if (p->closed()) continue;
      for (auto& r : p->responses())
        if (r.status == 200 && r.body.find("\"id\"") != std::string::npos) {
          ++leased;
          winner = p.get();
        }
    }
    return leased > 0;
  });
  for (auto& p : polls) closed += p->closed();
  MESSAGE("parked polls closed: " << closed << " of 7; leased the new job: " << leased);
  CHECK_EQ(closed, 0);
  CHECK_EQ(leased, 1);

  // With every slot busy (the poll that was answered and the new client
  // park again) a ninth client is refused: nothing is quiet.
  REQUIRE(winner);
  for (h::tls_client* c : {winner, &fresh}) {
    c->queue(h::post_request("/v1/queues/work/lease", R"({"max":1,"wait_ms":30000})"));
    REQUIRE(c->flush(2000));
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  h::tls_client ninth(producer, relay.api_port);
  bool ok = ninth.handshake(3000);
  MESSAGE("ninth client with every slot busy: handshake " << ok << " (" << ninth.error() << ")");
  CHECK_FALSE(ok);
}
