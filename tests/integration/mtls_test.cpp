// Who may connect, and who may do what: the real relay binary, the real
// curl, certificates made by the openssl CLI.
#include <doctest/doctest.h>

#include <chrono>
#include <thread>

#include "../support/raw_client.h"
#include "../support/relay_fixture.h"

using test::field;
using test::relay_process;

TEST_CASE("a client without a certificate is refused in the handshake") {
  relay_process relay;
  auto r = relay.curl("", "GET", "/v1/queues");
  CHECK_NE(r.curl_exit, 0);
  CHECK_EQ(r.status, 0);
  CHECK_MESSAGE(r.err.find("certificate required") != std::string::npos, r.err);
  // BoringSSL and OpenSSL spell the reason differently.
  auto line = relay.proc->wait_for_line("tls_handshake_failed");
  REQUIRE(line.has_value());
  bool named = line->find("PEER_DID_NOT_RETURN_A_CERTIFICATE") != std::string::npos ||
               line->find("peer did not return a certificate") != std::string::npos;
  CHECK_MESSAGE(named, *line);

  test::raw_client own(relay.api_port, "");
  auto o = own.call("GET", "/v1/queues");
  CHECK_EQ(o.error.what, relay::http::client_error::kind::tls);
  CHECK_EQ(o.response.status, 0);
}

TEST_CASE("certificates from another CA, expired or revoked are refused") {
  relay_process relay({"--set", "tls.crl=" + test::pki() + "/crl.pem"});
  auto foreign = relay.curl("foreign", "GET", "/v1/queues");
  CHECK_NE(foreign.curl_exit, 0);
  CHECK(relay.proc->wait_for_line("unable to get local issuer certificate").has_value());

  auto expired = relay.curl("expired", "GET", "/v1/queues");
  CHECK_NE(expired.curl_exit, 0);
  CHECK(relay.proc->wait_for_line("certificate has expired").has_value());

  auto revoked = relay.curl("revoked", "POST", "/v1/queues/render/lease", "{}");
  CHECK_NE(revoked.curl_exit, 0);
  CHECK(relay.proc->wait_for_line("certificate revoked").has_value());

  // The same CA's valid certificates still work with the CRL in force.
  auto ok = relay.curl("producer", "POST", "/v1/queues/render/jobs", R"({"payload":1})");
  CHECK_EQ(ok.status, 201);
  auto metrics = relay.ops_get("/metrics");
  CHECK(metrics.body.find("relay_tls_handshake_failures_total{listener=\"api\"} 3") != std::string::npos);
}

TEST_CASE("relay's own certificate is checked by name on the client side") {
  relay_process relay;
  test::raw_client wrong(relay.api_port, "producer", "wrong.test");
  auto r = wrong.call("GET", "/v1/queues");
  CHECK_EQ(r.error.what, relay::http::client_error::kind::tls);
  // The message is for people; these say it names the reason, in either
  // library's spelling.
  bool refused = r.error.message.find("CERTIFICATE_VERIFY_FAILED") != std::string::npos ||
                 r.error.message.find("certificate verify failed") != std::string::npos;
  CHECK_MESSAGE(refused, r.error.message);
  CHECK_MESSAGE(r.error.message.find("ostname mismatch") != std::string::npos, r.error.message);
}

TEST_CASE("each permission is enforced, and denials are audited") {
  relay_process relay;
  SUBCASE("an identity with no grants is denied everything") {
    CHECK_EQ(relay.curl("nogrant", "POST", "/v1/queues/render/jobs", R"({"payload":1})").status, 403);
    CHECK_EQ(relay.curl("nogrant", "POST", "/v1/queues/render/lease", "{}").status, 403);
    CHECK_EQ(relay.curl("nogrant", "GET", "/v1/queues").status, 403);
    CHECK_EQ(relay.curl("nogrant", "GET", "/v1/jobs/0000000000000001").status, 403);
    auto line = relay.proc->wait_for_line("\"event\":\"authz_denied\"");
    REQUIRE(line.has_value());
    CHECK(line->find("\"policy_principal\":\"nobody\"") != std::string::npos);
  }
  SUBCASE("a worker cannot submit, read or administer") {
    auto r = relay.curl("worker", "POST", "/v1/queues/render/jobs", R"({"payload":1})");
    CHECK_EQ(r.status, 403);
    CHECK_EQ(field(r.body, "code"), "forbidden");
    CHECK_EQ(relay.curl("worker", "GET", "/v1/queues/render").status, 403);
  }
  SUBCASE("a worker may consume only its granted queues") {
    CHECK_EQ(relay.curl("worker", "POST", "/v1/queues/encode-h264/lease", "{}").status, 200);
    CHECK_EQ(relay.curl("worker", "POST", "/v1/queues/billing/lease", "{}").status, 403);
  }
  SUBCASE("a producer cannot lease") {
    CHECK_EQ(relay.curl("producer", "POST", "/v1/queues/render/lease", "{}").status, 403);
  }
  SUBCASE("a second worker presenting another worker's lease gets 403 and changes nothing") {
    auto sub = relay.curl("producer", "POST", "/v1/queues/render/jobs", R"({"payload":"x"})");
    REQUIRE_EQ(sub.status, 201);
    auto lease = relay.curl("worker", "POST", "/v1/queues/render/lease", "{}");
    std::string id = field(lease.body, "id"), token = field(lease.body, "lease");
    REQUIRE_EQ(token.size(), 32u);
    auto steal = relay.curl("worker2", "POST", "/v1/jobs/" + id + "/complete",
                            R"({"lease":")" + token + R"(","result":"stolen"})");
    CHECK_EQ(steal.status, 403);
    CHECK_EQ(relay.curl("worker2", "POST", "/v1/jobs/" + id + "/heartbeat", R"({"lease":")" + token + R"("})").status, 403);
    auto job = relay.curl("producer", "GET", "/v1/jobs/" + id);
    CHECK_EQ(field(job.body, "state"), "leased");
    CHECK_EQ(relay.curl("worker", "POST", "/v1/jobs/" + id + "/complete",
                        R"({"lease":")" + token + R"(","result":"mine"})").status, 200);
    CHECK_EQ(field(relay.curl("producer", "GET", "/v1/jobs/" + id).body, "result"), "mine");
  }
  SUBCASE("relay takes the principal from the certificate's URI SAN") {
    relay.curl("producer", "POST", "/v1/queues/work/jobs", R"({"payload":1})");
    test::raw_client own(relay.api_port, "worker");
    auto r = own.call("POST", "/v1/queues/work/lease", "{}");
    CHECK_EQ(r.response.status, 200);
    CHECK_EQ(own.conn().server_identity().dns_san, "localhost");
    CHECK_EQ(relay.curl("worker", "POST", "/v1/queues/billing/lease", "{}").status, 403);
    auto line = relay.proc->wait_for_line("\"queue\":\"billing\"");
    REQUIRE(line.has_value());
    CHECK(line->find("\"principal\":\"spiffe://test/ns/jobs/sa/bunny\"") != std::string::npos);
  }
}

TEST_CASE("a resumed TLS session is still the same principal, held to the same policy") {
  relay_process relay;
  relay.curl("producer", "POST", "/v1/queues/work/jobs", R"({"payload":1})");
  const std::string& p = test::pki();
  relay::tls::client_options o;
  o.cert_file = p + "/worker.crt";
  o.key_file = p + "/worker.key";
  o.ca_file = p + "/ca.crt";
  o.resume_sessions = true;
  std::string error;
  auto ctx = relay::tls::context::make_client(o, error);
  REQUIRE_MESSAGE(ctx, error);
  uv_loop_t loop;
  uv_loop_init(&loop);
  auto call = [&](relay::http::client_conn* c, const std::string& method, const std::string& path, const std::string& body) {
    relay::http::client_response out;
    bool done = false;
    c->request(method, path, body, [&](const relay::http::client_error& e, relay::http::client_response& r) {
      CHECK_MESSAGE(!e, e.message);
      out = std::move(r);
      done = true;
    }, 10000);
    while (!done) uv_run(&loop, UV_RUN_ONCE);
    return out;
  };
  relay::http::client_conn::options co;
  co.host = "127.0.0.1";
  co.port = relay.api_port;
  co.server_name = "localhost";
  co.tls = ctx;
  auto* first = relay::http::client_conn::create(&loop, co);
  CHECK_EQ(call(first, "POST", "/v1/queues/work/lease", "{}").status, 200);
  CHECK_FALSE(first->resumed());
  // Let the session ticket that follows the handshake arrive.
  for (int i = 0; i < 20; ++i) uv_run(&loop, UV_RUN_NOWAIT), std::this_thread::sleep_for(std::chrono::milliseconds(5));
  first->close();
  REQUIRE(ctx->cached_session() != nullptr);

  auto* second = relay::http::client_conn::create(&loop, co);
  CHECK_EQ(call(second, "POST", "/v1/queues/work/lease", "{}").status, 200);
  CHECK(second->resumed());
  CHECK_EQ(call(second, "POST", "/v1/queues/work/jobs", R"({"payload":2})").status, 403);
  second->close();
  uv_run(&loop, UV_RUN_DEFAULT);
  CHECK_EQ(uv_loop_close(&loop), 0);
  auto denied = relay.proc->wait_for_line("\"permission\":\"submit\"");
  REQUIRE(denied.has_value());
  CHECK(denied->find("\"principal\":\"spiffe://test/ns/jobs/sa/bunny\"") != std::string::npos);
}
