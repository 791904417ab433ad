// Issue 12 (attack review): the postgres backend trusts the shape of the
// database's answers. A server (or anything answering on its address: a
// proxy, a pooler, an attacker on an unencrypted path) that answers
// "SELECT pg_is_in_recovery()" with a row of no columns makes PQgetvalue
// return NULL, which conn::connect puts into a std::string_view: SIGSEGV, on
// a standby that has not even taken the shard. (The same pattern: the
// "SELECT holder, epoch, lease_until, now()" answer in leadership::run, and
// std::stoull on the compaction recount, which throws -> std::terminate.)
// A fake server speaking the wire protocol, on loopback.
#include <doctest/doctest.h>

#include <arpa/inet.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <thread>

#include "../support/relay_fixture.h"

namespace {

std::string message(char type, const std::string& payload) {
  std::string m(1, type);
  uint32_t n = htonl(static_cast<uint32_t>(payload.size() + 4));
  m.append(reinterpret_cast<const char*>(&n), 4);
  return m + payload;
}

bool read_exact(int fd, char* p, size_t n) {
  while (n > 0) {
    ssize_t r = ::recv(fd, p, n, 0);
    if (r <= 0) return false;
    p += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}

// Answers every simple query with one row of zero columns.
void serve(int c) {
  char len[4];
  if (!read_exact(c, len, 4)) return;
  uint32_t n;
  std::memcpy(&n, len, 4);
  std::string startup(ntohl(n) - 4, '\0');
  if (!read_exact(c, startup.data(), startup.size())) return;
  std::string hello = message('R', std::string(4, '\0'));
  for (auto [k, v] : {std::pair{"server_version", "15.0"}, {"client_encoding", "UTF8"},
                      {"standard_conforming_strings", "on"}, {"integer_datetimes", "on"}})
    hello += message('S', std::string(k) + '\0' + v + '\0');
  hello += message('K', std::string(8, '\1')) + message('Z', "I");
  ::send(c, hello.data(), hello.size(), MSG_NOSIGNAL);
  for (;;) {
    char head[5];
    if (!read_exact(c, head, 5)) return;
    std::memcpy(&n, head + 1, 4);
    std::string body(ntohl(n) - 4, '\0');
    if (!read_exact(c, body.data(), body.size())) return;
    if (head[0] == 'X') return;
    if (head[0] != 'Q') continue;
    std::string out = message('T', std::string(2, '\0'))     // a row description with no fields
                      + message('D', std::string(2, '\0'))   // and a row with no columns
                      + message('C', std::string("SELECT 1") + '\0') + message('Z', "I");
    ::send(c, out.data(), out.size(), MSG_NOSIGNAL);
  }
}

}  // namespace

TEST_CASE("issue 12: a database answer of an unexpected shape does not crash relay" * doctest::skip(!RELAY_WITH_POSTGRES)) {
  uint16_t port = 0;
  int ls = test::loopback_listener(16, port);
  std::atomic<bool> done{false};
  std::thread server([&] {
    std::vector<std::thread> conns;
    while (!done) {
      pollfd p{ls, POLLIN, 0};
      if (::poll(&p, 1, 50) <= 0) continue;
      int c = ::accept(ls, nullptr, nullptr);
      if (c >= 0) conns.emplace_back([c] { serve(c); ::close(c); });
    }
    for (auto& t : conns) t.join();
  });

  test::tmpdir dir;
  std::string config = test::postgres_relay_config(
      dir, "host=127.0.0.1 port=" + std::to_string(port) + " user=relay dbname=relay sslmode=disable");
  {
    test::child relay({test::env_or_fail("RELAY_BIN"), "--config", config}, dir / "relay.log");
    REQUIRE(relay.wait_for_line("\"listener\":\"ops\"").has_value());
    // Several connection attempts' worth of time.
    int rc = relay.wait(3000);
    CHECK_MESSAGE(rc < 0, "relay exited (" << rc << ") on a malformed answer: " << relay.log());
    if (rc < 0) {
      relay.signal(SIGTERM);
      CHECK_EQ(relay.wait(10000), 0);
    }
  }
  done = true;
  server.join();
  ::close(ls);
}
