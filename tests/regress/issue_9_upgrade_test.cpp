// Issue 9, "Upgrade / CONNECT wedges the connection": a request with
// Upgrade (or the method CONNECT) was answered, and then llhttp's upgrade
// pause made the next pipelined request hang until the header timeout
// (408). relay speaks no other protocol: such a request is answered with a
// 4xx and Connection: close, and the connection closes, at once.
#include <doctest/doctest.h>

#include <chrono>

#include "../support/hostile.h"
#include "../support/relay_fixture.h"

namespace h = test::hostile;
using test::field;
using test::relay_process;

namespace {

void check_refused_and_closed(const relay_process& relay, const std::string& request, const std::string& job) {
  h::tls_client c(test::client_tls("producer"), relay.api_port);
  REQUIRE(c.handshake());
  auto t0 = h::clock::now();
  c.send(request + h::get_request("/v1/jobs/" + job));
  auto first = c.read_responses(1, 2000);
  double first_ms = h::ms_since(t0);
  bool closed = c.read_until_closed(2000);
  double closed_ms = h::ms_since(t0);
  auto rest = c.responses();
  MESSAGE("first answer " << (first.empty() ? 0 : first[0].status) << " after " << first_ms << " ms; closed " << closed
                          << " after " << closed_ms << " ms; " << rest.size() << " more answers");
  REQUIRE_EQ(first.size(), 1u);
  CHECK_GE(first[0].status, 400);
  CHECK((first[0].status < 500 || first[0].status == 501));
  CHECK(first[0].close);
  CHECK(closed);
  CHECK_LT(closed_ms, 2000);
  for (const auto& r : rest) CHECK_NE(r.status, 408);
  CHECK(rest.empty());  // the pipelined request after it is not taken
}

}  // namespace

TEST_CASE("a request asking to upgrade the connection is refused with a 4xx and the connection closes at once") {
  // The header timeout is the default 10 s: a wedged connection would sit
  // far beyond the 2 s allowed here.
  relay_process relay;
  auto created = relay.curl("producer", "POST", "/v1/queues/render/jobs", R"({"payload":1})");
  REQUIRE_EQ(created.status, 201);
  const std::string job = field(created.body, "id");

  SUBCASE("Connection: Upgrade with Upgrade: websocket") {
    check_refused_and_closed(relay,
                             "GET /v1/jobs/" + job +
                                 " HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                                 "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
                             job);
  }
  SUBCASE("an Upgrade: h2c header alone") {
    check_refused_and_closed(relay, "GET /v1/jobs/" + job + " HTTP/1.1\r\nHost: localhost\r\nUpgrade: h2c\r\n\r\n", job);
  }
  SUBCASE("a POST with a body asking to upgrade") {
    check_refused_and_closed(relay,
                             "POST /v1/queues/render/jobs HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\n"
                             "Upgrade: websocket\r\nContent-Type: application/json\r\nContent-Length: 13\r\n\r\n"
                             "{\"payload\":1}",
                             job);
  }
}

TEST_CASE("a CONNECT request is refused with a 4xx and the connection closes at once") {
  relay_process relay;
  auto created = relay.curl("producer", "POST", "/v1/queues/render/jobs", R"({"payload":1})");
  REQUIRE_EQ(created.status, 201);
  const std::string job = field(created.body, "id");
  check_refused_and_closed(relay, "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", job);
}
