// Issue 10, "Revocation and expiry reach live connections": a client whose
// certificate had expired was refused a full handshake but still served
// through TLS 1.3 session resumption, which verifies no certificate, for as
// long as the library's ticket lifetime (48 hours in BoringSSL). Now a
// session lives tls.session_lifetime_ms (5 minutes unless set), the ticket
// keys are replaced as often, and after every resumed handshake relay
// verifies the session's certificate again, now, against its current CA
// bundle and CRL, refusing it as a failed handshake.
#include <doctest/doctest.h>

#include <chrono>
#include <thread>

#include "../support/hostile.h"
#include "../support/private_ca.h"
#include "../support/relay_fixture.h"

namespace h = test::hostile;
using test::relay_process;

namespace {

// Runs the handshake and one request on a new connection of `ctx` (which
// offers its cached session), and lets the ticket that follows arrive.
struct attempt {
  bool handshake = false;
  bool resumed = false;
  int status = 0;  // 0: no answer
  std::string error;
};
attempt connect_and_lease(const std::shared_ptr<const relay::tls::context>& ctx, uint16_t port) {
  attempt a;
  h::tls_client c(ctx, port);
  a.handshake = c.handshake();
  a.resumed = c.resumed();
  if (a.handshake) {
    c.queue(h::post_request("/v1/queues/work/lease", R"({"max":1,"wait_ms":0})"));
    auto r = c.read_responses(1, 5000);
    if (!r.empty()) a.status = r[0].status;
    c.read_until_closed(200);  // NewSessionTicket, if any
    c.close_notify();
  }
  a.error = c.error();
  return a;
}

void sleep_ms(int ms) { std::this_thread::sleep_for(std::chrono::milliseconds(ms)); }

}  // namespace

TEST_CASE("a session of a certificate that has since expired is not resumed into service") {
  test::tmpdir dir;
  test::private_ca ca(dir.path());
  // bunny's identity, valid for a few seconds from now.
  const int valid_s = 4;
  auto issued = std::chrono::steady_clock::now();
  ca.issue("brief", "spiffe://test/ns/jobs/sa/bunny", {"-enddate", test::private_ca::utc_in(valid_s)});
  relay_process relay;
  auto ctx = ca.client("brief", true);

  attempt first = connect_and_lease(ctx, relay.api_port);
  REQUIRE_MESSAGE(first.status == 200, first.error);
  CHECK_FALSE(first.resumed);
  REQUIRE(ctx->cached_session() != nullptr);
  // Once the certificate has expired, its session is resumed by the TLS
  // library but refused by relay.
  std::this_thread::sleep_until(issued + std::chrono::seconds(valid_s + 2));
  attempt late = connect_and_lease(ctx, relay.api_port);
  MESSAGE("after expiry: handshake " << late.handshake << ", resumed " << late.resumed << ", status " << late.status
                                     << ", " << late.error);
  CHECK(late.resumed);  // the client offered the session and the library took the ticket
  CHECK_EQ(late.status, 0);  // but served nothing on it
  auto refused = relay.proc->wait_for_line("resumed session refused: certificate has expired", 5000);
  REQUIRE_MESSAGE(refused.has_value(), relay.proc->log());
  CHECK(refused->find("\"event\":\"tls_handshake_failed\"") != std::string::npos);
  // A full handshake with it fails as before.
  auto full = relay.curl("", "POST", "/v1/queues/work/lease", "{}",
                         {"--cert", dir / "brief.crt", "--key", dir / "brief.key"});
  CHECK_EQ(full.status, 0);
}

// Not a regression (each context always had keys of its own): a guard that
// a CRL reload ends resumption of sessions made under the old CRL.
TEST_CASE("after a CRL reload, a session of the revoked certificate is not resumed") {
  test::tmpdir dir;
  test::private_ca ca(dir.path());
  ca.issue("soon-revoked", "spiffe://test/ns/jobs/sa/bunny");
  const std::string crl = dir / "crl.pem";
  ca.write_crl(crl);
  relay_process relay({"--set", "tls.crl=" + crl, "--set", "tls.reload_check_ms=0"});
  auto ctx = ca.client("soon-revoked", true);
  REQUIRE_EQ(connect_and_lease(ctx, relay.api_port).status, 200);
  REQUIRE(connect_and_lease(ctx, relay.api_port).resumed);
  ca.revoke("soon-revoked");
  ca.write_crl(crl);
  relay.proc->signal(SIGHUP);
  REQUIRE(relay.proc->wait_for_line("\"event\":\"reloaded\"").has_value());
  // A reload makes new ticket keys, so the ticket is not even decrypted:
  // a full handshake follows, and the CRL refuses it.
  attempt late = connect_and_lease(ctx, relay.api_port);
  CHECK_FALSE(late.resumed);
  CHECK_EQ(late.status, 0);
}

TEST_CASE("sessions live tls.session_lifetime_ms, then a full handshake verifies the certificate again") {
  relay_process relay({"--set", "tls.session_lifetime_ms=2000"});
  relay::tls::client_options o;
  o.cert_file = test::pki() + "/worker.crt";
  o.key_file = test::pki() + "/worker.key";
  o.ca_file = test::pki() + "/ca.crt";
  o.resume_sessions = true;
  std::string error;
  auto ctx = relay::tls::context::make_client(o, error);
  REQUIRE_MESSAGE(ctx, error);
  REQUIRE_EQ(connect_and_lease(ctx, relay.api_port).status, 200);
  attempt soon = connect_and_lease(ctx, relay.api_port);
  CHECK_EQ(soon.status, 200);
  CHECK(soon.resumed);
  sleep_ms(4500);  // the libraries count whole seconds
  attempt later = connect_and_lease(ctx, relay.api_port);
  CHECK_EQ(later.status, 200);
  CHECK_FALSE(later.resumed);
}

TEST_CASE("tls.session_lifetime_ms=0 turns resumption off; the setting is validated") {
  relay_process relay({"--set", "tls.session_lifetime_ms=0"});
  relay::tls::client_options o;
  o.cert_file = test::pki() + "/worker.crt";
  o.key_file = test::pki() + "/worker.key";
  o.ca_file = test::pki() + "/ca.crt";
  o.resume_sessions = true;
  std::string error;
  auto client = relay::tls::context::make_client(o, error);
  REQUIRE_MESSAGE(client, error);
  CHECK_EQ(connect_and_lease(client, relay.api_port).status, 200);
  attempt again = connect_and_lease(client, relay.api_port);
  CHECK_EQ(again.status, 200);
  CHECK_FALSE(again.resumed);

  auto bad = test::run({test::env_or_fail("RELAY_BIN"), "--config", relay.dir / "relay.json", "--set",
                        "tls.session_lifetime_ms=86400001", "--check-config"},
                       relay.dir.path());
  CHECK_NE(bad.exit_code, 0);
  CHECK(bad.err.find("tls.session_lifetime_ms") != std::string::npos);
}

TEST_CASE("rotated ticket keys end resumption of the tickets issued before") {
  // The TLS layer alone, in memory: a server context, a client that caches.
  relay::tls::server_options so;
  so.cert_file = test::pki() + "/server.crt";
  so.key_file = test::pki() + "/server.key";
  so.client_ca_file = test::pki() + "/ca.crt";
  std::string error;
  auto server_ctx = relay::tls::context::make_server(so, error);
  REQUIRE_MESSAGE(server_ctx, error);
  relay::tls::client_options co;
  co.cert_file = test::pki() + "/worker.crt";
  co.key_file = test::pki() + "/worker.key";
  co.ca_file = test::pki() + "/ca.crt";
  co.resume_sessions = true;
  auto client_ctx = relay::tls::context::make_client(co, error);
  REQUIRE_MESSAGE(client_ctx, error);

  auto handshake = [&] {
    relay::tls::session client(client_ctx, "localhost");
    relay::tls::session server(server_ctx);
    client.start();
    std::string bytes, plain;
    // A few rounds carry the handshake and then the tickets.
    for (int i = 0; i < 6; ++i) {
      client.take_output(bytes);
      server.feed(bytes.data(), bytes.size());
      bytes.clear();
      REQUIRE(server.read(plain) != relay::tls::session::status::error);
      server.take_output(bytes);
      client.feed(bytes.data(), bytes.size());
      bytes.clear();
      REQUIRE(client.read(plain) != relay::tls::session::status::error);
      // An answer, as relay gives one: BoringSSL sends its tickets with it.
      if (server.handshake_complete() && i == 2) REQUIRE(server.write("answer") == relay::tls::session::status::ok);
    }
    REQUIRE(server.handshake_complete());
    client.shutdown();  // OpenSSL resumes only sessions ended with close_notify
    return server.resumed();
  };
  CHECK_FALSE(handshake());
  REQUIRE(client_ctx->cached_session() != nullptr);
  // One rotation: a ticket of the key in use until now still resumes...
  REQUIRE(server_ctx->rotate_ticket_keys(error));
  CHECK(handshake());
  // ...two: a ticket older than the previous key does not. (A fresh
  // client, whose ticket comes from a full handshake: OpenSSL 3.0 does not
  // resume a ticket received on a resumed connection.)
  client_ctx = relay::tls::context::make_client(co, error);
  REQUIRE_MESSAGE(client_ctx, error);
  CHECK_FALSE(handshake());
  REQUIRE(server_ctx->rotate_ticket_keys(error));
  REQUIRE(server_ctx->rotate_ticket_keys(error));
  CHECK_FALSE(handshake());  // a full handshake
  CHECK(handshake());        // whose new ticket resumes
}
