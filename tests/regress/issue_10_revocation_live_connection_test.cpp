// Issue 10, "Revocation and expiry reach live connections": after a CRL
// reload, a connection opened with the now-revoked certificate kept being
// served (3 of 3 requests 200), and a long-polling worker never goes idle,
// so it lasted indefinitely. On every reload relay now verifies each live
// connection's peer certificates again against the new CA bundle and CRL
// and closes those that fail (relay_connections_revoked_total, an audit
// line); a parked long poll on such a connection is dropped, never answered.
#include <doctest/doctest.h>

#include <chrono>
#include <csignal>
#include <thread>

#include "../support/hostile.h"
#include "../support/private_ca.h"
#include "../support/relay_fixture.h"

namespace h = test::hostile;
using test::relay_process;

TEST_CASE("a certificate revoked by a reloaded CRL loses its live connections; others stay") {
  test::tmpdir dir;
  test::private_ca ca(dir.path());
  // The "revoked" principal of the test policy may consume any queue.
  ca.issue("late", "spiffe://test/ns/jobs/sa/revoked");
  const std::string crl = dir / "crl.pem";
  ca.write_crl(crl);  // does not list it yet
  relay_process relay({"--set", "tls.crl=" + crl, "--set", "tls.reload_check_ms=0"});

  // A worker with the soon-revoked certificate parks a long poll; another
  // connection of it is idle between requests; a healthy worker is too.
  h::tls_client parked(ca.client("late"), relay.api_port);
  h::tls_client idle(ca.client("late"), relay.api_port);
  h::tls_client healthy(test::client_tls("worker"), relay.api_port);
  for (auto* c : {&parked, &idle, &healthy}) REQUIRE_MESSAGE(c->handshake(), c->error());
  const std::string no_wait = h::post_request("/v1/queues/work/lease", R"({"max":1,"wait_ms":0})");
  for (auto* c : {&idle, &healthy}) {
    c->queue(no_wait);
    auto r = c->read_responses(1, 5000);
    REQUIRE_EQ(r.size(), 1u);
    REQUIRE_EQ(r[0].status, 200);
  }
  REQUIRE(parked.send(h::post_request("/v1/queues/work/lease", R"({"max":1,"wait_ms":30000})")));
  // Parked, not answered.
  CHECK(parked.read_responses(1, 300).empty());

  ca.revoke("late");
  ca.write_crl(crl);
  relay.proc->signal(SIGHUP);
  REQUIRE(relay.proc->wait_for_line("\"event\":\"reloaded\"").has_value());
  auto swept = relay.proc->wait_for_line("\"event\":\"peers_reverified\"", 5000);
  CHECK_MESSAGE(swept.has_value(), relay.proc->log());

  // Both connections of the revoked certificate are closed, with no answer:
  // the parked poll is dropped, not answered with an empty lease.
  CHECK(parked.read_until_closed(5000));
  CHECK(parked.responses().empty());
  CHECK(idle.read_until_closed(5000));
  CHECK(idle.responses().empty());
  // A request on it goes nowhere, and a new connection is refused.
  idle.queue(no_wait);
  CHECK(idle.read_responses(1, 500).empty());
  h::tls_client again(ca.client("late"), relay.api_port);
  bool connected = again.handshake();
  if (connected) {
    again.queue(no_wait);
    CHECK(again.read_responses(1, 2000).empty());
  }

  // The healthy worker's connection is still up and served, and a job
  // submitted now goes to it, not to the dropped waiter.
  REQUIRE(relay.curl("producer", "POST", "/v1/queues/work/jobs", R"({"payload":"after"})").status == 201);
  healthy.queue(no_wait);
  auto served = healthy.read_responses(1, 5000);
  REQUIRE_EQ(served.size(), 1u);
  CHECK_EQ(served[0].status, 200);
  CHECK(served[0].body.find("\"after\"") != std::string::npos);
  CHECK_FALSE(healthy.closed());

  auto metrics = relay.ops_get("/metrics");
  CHECK_EQ(h::metric(metrics.body, "relay_connections_revoked_total{listener=\"api\"}"), 2);
  auto audit = relay.proc->wait_for_line("\"event\":\"connection_revoked\"", 3000);
  REQUIRE_MESSAGE(audit.has_value(), relay.proc->log());
  CHECK(audit->find("\"audit\":true") != std::string::npos);
  CHECK(audit->find("\"principal\":\"spiffe://test/ns/jobs/sa/revoked\"") != std::string::npos);
  CHECK(audit->find("\"reason\":\"certificate revoked\"") != std::string::npos);
  CHECK(audit->find("\"remote\":\"127.0.0.1:") != std::string::npos);
}

TEST_CASE("a reload that changes nothing for a certificate keeps its connection") {
  relay_process relay({"--set", "tls.reload_check_ms=0"});
  h::tls_client worker(test::client_tls("worker"), relay.api_port);
  REQUIRE(worker.handshake());
  REQUIRE(worker.send(h::post_request("/v1/queues/work/lease", R"({"max":1,"wait_ms":20000})")));
  relay.proc->signal(SIGHUP);
  REQUIRE(relay.proc->wait_for_line("\"event\":\"peers_reverified\"", 5000).has_value());
  // The parked poll is still parked and gets the job submitted now.
  REQUIRE_EQ(relay.curl("producer", "POST", "/v1/queues/work/jobs", R"({"payload":7})").status, 201);
  auto r = worker.read_responses(1, 5000);
  REQUIRE_EQ(r.size(), 1u);
  CHECK_EQ(r[0].status, 200);
  CHECK(r[0].body.find("\"payload\":7") != std::string::npos);
  CHECK_EQ(h::metric(relay.ops_get("/metrics").body, "relay_connections_revoked_total{listener=\"api\"}"), 0);
}

TEST_CASE("tls::context::verify_peer judges a kept chain as a handshake would, against the context's CRL") {
  test::tmpdir dir;
  test::private_ca ca(dir.path());
  ca.issue("late", "spiffe://test/ns/jobs/sa/revoked");
  const std::string crl = dir / "crl.pem";
  ca.write_crl(crl);
  relay::tls::server_options o;
  o.cert_file = test::pki() + "/server.crt";
  o.key_file = test::pki() + "/server.key";
  o.client_ca_file = test::pki() + "/ca.crt";
  o.crl_file = crl;
  std::string error;
  auto before = relay::tls::context::make_server(o, error);
  REQUIRE_MESSAGE(before, error);

  // A chain as a server keeps it: from a real handshake, in memory.
  auto client = relay::tls::session(ca.client("late"), "localhost");
  auto server = relay::tls::session(before);
  client.start();
  std::string a, b, plain;
  for (int i = 0; i < 10 && !(client.handshake_complete() && server.handshake_complete()); ++i) {
    client.take_output(a);
    server.feed(a.data(), a.size());
    a.clear();
    server.read(plain);
    server.take_output(b);
    client.feed(b.data(), b.size());
    b.clear();
    client.read(plain);
  }
  REQUIRE(server.handshake_complete());
  relay::tls::peer_chain chain = server.peer_certificates();
  REQUIRE_FALSE(chain.empty());
  CHECK_EQ(before->verify_peer(chain), "");
  REQUIRE(chain.ms_until_expiry().has_value());
  CHECK_GT(*chain.ms_until_expiry(), 0);

  ca.revoke("late");
  ca.write_crl(crl);
  auto after = relay::tls::context::make_server(o, error);
  REQUIRE_MESSAGE(after, error);
  CHECK_GT(after->generation(), before->generation());
  CHECK_EQ(after->verify_peer(chain), "certificate revoked");
  CHECK_EQ(before->verify_peer(chain), "");  // the old context's CRL is what it was

  // A CA bundle that no longer holds the issuer.
  o.client_ca_file = test::pki() + "/foreignca.crt";
  o.crl_file.reset();
  auto other = relay::tls::context::make_server(o, error);
  REQUIRE_MESSAGE(other, error);
  // ("unable to get local issuer certificate"; with OpenSSL, whose client
  // sends the root too, "self-signed certificate in certificate chain").
  CHECK_NE(other->verify_peer(chain), "");

  // Cost of one verification with a CRL (a figure, not a bound).
  const int n = 2000;
  auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < n; ++i) (void)before->verify_peer(chain);
  double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() / n;
  MESSAGE("verify_peer with a CRL: " << us << " us per connection");
}
