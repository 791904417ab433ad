// Issue 10, "Identity: one name, matched exactly": policy::match() tried the
// URI SAN, then the DNS SAN, then the CN, so a certificate whose URI SAN was
// an unknown SPIFFE id but whose CN was ops-admin was granted admin, and one
// with DNS SAN producer.test could submit; and identity extraction skipped
// an unprintable first URI SAN, so a certificate whose second URI SAN was
// bunny's leased bunny's jobs. The principal is one name (first URI SAN,
// else first DNS SAN, else CN) matched only against matchers of its kind,
// and a certificate with a malformed name is refused at the handshake.
#include <doctest/doctest.h>

#include "../support/relay_fixture.h"

using test::relay_process;

TEST_CASE("an unknown URI SAN is not recognised by the certificate's CN or DNS SAN") {
  relay_process relay;
  auto as_admin = relay.curl("admin", "GET", "/v1/queues");
  REQUIRE_EQ(as_admin.status, 200);
  auto cn_behind = relay.curl("cn-behind-uri", "GET", "/v1/queues");
  MESSAGE("URI SAN spiffe://test/ns/evil/sa/anything with CN ops-admin, GET /v1/queues: " << cn_behind.status);
  CHECK_EQ(cn_behind.status, 403);

  REQUIRE_EQ(relay.curl("producer", "POST", "/v1/queues/render/jobs", R"({"payload":1})").status, 201);
  auto dns_behind = relay.curl("dns-behind-uri", "POST", "/v1/queues/render/jobs", R"({"payload":2})");
  MESSAGE("URI SAN spiffe://test/ns/evil/sa/anything with DNS SAN producer.test, submit: " << dns_behind.status);
  CHECK_EQ(dns_behind.status, 403);
}

TEST_CASE("a certificate with a malformed name is refused at the handshake, with the reason logged") {
  relay_process relay;
  relay.curl("producer", "POST", "/v1/queues/render/jobs", R"({"payload":1})");
  struct crafted {
    const char* cert;
    const char* reason;
  };
  for (crafted c : {crafted{"bad-first-uri", "peer certificate refused: a URI SAN holds control bytes or NUL"},
                    crafted{"two-cn", "peer certificate refused: the subject has more than one CN"}}) {
    CAPTURE(c.cert);
    auto r = relay.curl(c.cert, "POST", "/v1/queues/render/lease", R"({"max":1})");
    MESSAGE(std::string(c.cert) << ": status " << r.status << ", curl exit " << r.curl_exit);
    CHECK_EQ(r.status, 0);  // no HTTP answer at all
    CHECK_NE(r.curl_exit, 0);
    auto line = relay.proc->wait_for_line(c.reason, 5000);
    CHECK_MESSAGE(line.has_value(), relay.proc->log());
    if (line) CHECK(line->find("\"event\":\"tls_handshake_failed\"") != std::string::npos);
  }
  // The job is still there for bunny's real certificate.
  auto leased = relay.curl("worker", "POST", "/v1/queues/render/lease", R"({"max":1})");
  CHECK_EQ(leased.status, 200);
  CHECK(leased.body.find("\"id\"") != std::string::npos);
}
