// API keys (issue 10, part 6): the real relay in each auth mode, with curl
// and with the project's own clients (typed v1 calls, and raw HTTP where a
// test sends another Authorization header on each request of one
// connection or reads WWW-Authenticate: see raw_client.h), keys made and rotated as an operator
// would, and the audit lines a security team would read.
#include <doctest/doctest.h>

#include <csignal>
#include <initializer_list>
#include <sstream>

#include "../support/raw_client.h"
#include "../support/relay_fixture.h"
#include "relay/api_keys.h"
#include "relay/tls.h"

using test::field;
using test::relay_process;

namespace {

std::string digest_hex(const std::string& key) {
  uint8_t d[32];
  relay::tls::sha256(key, d);
  return relay::tls::to_hex(d, sizeof d);
}

// Keys as relayctl api-key new makes them (base64url of 32 random bytes);
// fixed here so that a failure can be reproduced.
const std::string producer_key = "pR0duc3r-kEy_aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const std::string bunny_key_1 = "bUnNy-kEy-1_bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
const std::string bunny_key_2 = "bUnNy-kEy-2_cccccccccccccccccccccccccccccccc";
const std::string bunny2_key = "bUnNy2-kEy_dddddddddddddddddddddddddddddddddd";
const std::string expired_key = "eXp1r3d-kEy_eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee";
const std::string wrong_key = "wR0ng-kEy_ffffffffffffffffffffffffffffffffff";

std::string key_entry(const std::string& principal, const std::string& key, const std::string& id,
                      const std::string& not_after = {}) {
  std::string e = R"({"principal":")" + principal + R"(","sha256":")" + digest_hex(key) + R"(","id":")" + id + "\"";
  if (!not_after.empty()) e += R"(,"not_after":")" + not_after + "\"";
  return e + "}";
}

std::string keys_file(std::initializer_list<std::string> entries) {
  std::string out = "{\"keys\":[";
  bool first = true;
  for (const auto& e : entries) {
    out += (first ? "" : ",\n") + e;
    first = false;
  }
  return out + "]}";
}

std::string default_keys() {
  return keys_file({key_entry("producer", producer_key, "producer-1"), key_entry("bunny", bunny_key_1, "bunny-1"),
                    key_entry("bunny", bunny_key_2, "bunny-2"), key_entry("bunny2", bunny2_key, "bunny2-1"),
                    key_entry("bunny", expired_key, "bunny-old", "2020-01-01T00:00:00Z")});
}

std::string bearer(const std::string& key) { return "Authorization: Bearer " + key + "\r\n"; }

// A relay in `mode` whose keys file the test owns (and may rewrite).
struct keyed_relay {
  explicit keyed_relay(const std::string& mode, std::vector<std::string> extra = {},
                       const std::string& keys = default_keys()) {
    test::write_file(keys_dir / "keys.json", keys);
    std::vector<std::string> args{"--set", "auth.mode=" + mode, "--set", "auth.api_keys=" + (keys_dir / "keys.json"),
                                  "--set", "tls.reload_check_ms=100"};
    args.insert(args.end(), extra.begin(), extra.end());
    relay = std::make_unique<relay_process>(args);
  }
  // curl with `who`'s certificate (none: "") and `key` (none: ""); the
  // response headers are kept in `headers`.
  test::http_result curl(const std::string& who, const std::string& key, const std::string& method,
                         const std::string& path, const std::string& body = {}) {
    std::vector<std::string> extra{"-D", relay->dir / "headers.txt"};
    if (!key.empty()) extra.insert(extra.end(), {"-H", "Authorization: Bearer " + key});
    auto r = relay->curl(who, method, path, body, extra);
    headers = test::read_file(relay->dir / "headers.txt");
    return r;
  }
  // The first audit line holding every one of `needles`.
  std::optional<std::string> audit(std::initializer_list<std::string> needles, int timeout_ms = 5000) const {
    auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
    for (;;) {
      std::istringstream lines(relay->proc->log());
      std::string line;
      while (std::getline(lines, line)) {
        if (line.find("\"audit\":true") == std::string::npos) continue;
        bool all = true;
        for (const auto& n : needles) all = all && line.find(n) != std::string::npos;
        if (all) return line;
      }
      if (std::chrono::steady_clock::now() >= until) return std::nullopt;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  }
  void rewrite_keys(const std::string& keys) {
    // Written aside and renamed, as a Secret update or an editor does.
    test::write_file(keys_dir / "keys.json.new", keys);
    REQUIRE_EQ(std::rename((keys_dir / "keys.json.new").c_str(), (keys_dir / "keys.json").c_str()), 0);
  }

  test::tmpdir keys_dir;
  std::unique_ptr<relay_process> relay;
  std::string headers;
};

bool has_header(const std::string& headers, const std::string& line) {
  return headers.find(line + "\r\n") != std::string::npos;
}

// No key, wrong or right, ever reaches a log or audit line.
void check_no_key_material(const relay_process& relay) {
  std::string log = relay.proc->log();
  for (const std::string* k : {&producer_key, &bunny_key_1, &bunny_key_2, &bunny2_key, &expired_key, &wrong_key}) {
    CHECK_MESSAGE(log.find(*k) == std::string::npos, "key material in relay's log: " << *k);
    CHECK_MESSAGE(log.find(digest_hex(*k)) == std::string::npos, "a key's full digest in relay's log");
  }
}

}  // namespace

TEST_CASE("api key mode: a good key is served with or without a client certificate; missing, wrong and expired "
          "keys get 401 with a Bearer challenge, and are audited") {
  keyed_relay k("api_key");
  auto started = k.relay->proc->wait_for_line("\"event\":\"relay_started\"");
  REQUIRE(started.has_value());
  CHECK(started->find("\"auth_mode\":\"api_key\",\"api_keys\":5") != std::string::npos);

  SUBCASE("curl") {
    // No client certificate at all: TLS authenticates relay, the key the client.
    auto sub = k.curl("", producer_key, "POST", "/v1/queues/render/jobs", R"({"payload":1})");
    CHECK_EQ(sub.curl_exit, 0);
    CHECK_EQ(sub.status, 201);
    CHECK_EQ(k.curl("", producer_key, "GET", "/v1/jobs/" + field(sub.body, "id")).status, 200);

    auto missing = k.curl("", "", "GET", "/v1/queues");
    CHECK_EQ(missing.status, 401);
    CHECK_EQ(field(missing.body, "code"), "unauthenticated");
    CHECK_MESSAGE(has_header(k.headers, "WWW-Authenticate: Bearer realm=\"relay\""), k.headers);

    auto wrong = k.curl("", wrong_key, "POST", "/v1/queues/render/jobs", R"({"payload":2})");
    CHECK_EQ(wrong.status, 401);
    CHECK_MESSAGE(has_header(k.headers, "WWW-Authenticate: Bearer realm=\"relay\", error=\"invalid_token\""), k.headers);
    // A body behind a refused key is never read: the answer closes.
    CHECK_MESSAGE(has_header(k.headers, "Connection: close"), k.headers);

    auto expired = k.curl("", expired_key, "POST", "/v1/queues/render/lease", "{}");
    CHECK_EQ(expired.status, 401);
    // The same answer as an unknown key: only the audit line says why.
    CHECK_EQ(expired.body, wrong.body);
    CHECK(has_header(k.headers, "WWW-Authenticate: Bearer realm=\"relay\", error=\"invalid_token\""));

    auto malformed = k.relay->curl("", "GET", "/v1/queues", {}, {"-H", "Authorization: Basic cHJvZHVjZXI6eA=="});
    CHECK_EQ(malformed.status, 401);

    auto a_missing = k.audit({"\"event\":\"api_key_refused\"", "\"reason\":\"missing\""});
    REQUIRE(a_missing.has_value());
    CHECK(a_missing->find("\"remote\":\"127.0.0.1:") != std::string::npos);
    CHECK(a_missing->find("\"route\":\"list_queues\"") != std::string::npos);
    auto a_unknown = k.audit({"\"event\":\"api_key_refused\"", "\"reason\":\"unknown\""});
    REQUIRE(a_unknown.has_value());
    CHECK(a_unknown->find("\"key_sha256_prefix\":\"" + digest_hex(wrong_key).substr(0, 8) + "\"") != std::string::npos);
    auto a_expired = k.audit({"\"event\":\"api_key_refused\"", "\"reason\":\"expired\""});
    REQUIRE(a_expired.has_value());
    CHECK(a_expired->find("\"key_id\":\"bunny-old\"") != std::string::npos);
    CHECK(a_expired->find("\"key_principal\":\"bunny\"") != std::string::npos);
    CHECK(k.audit({"\"event\":\"api_key_refused\"", "\"reason\":\"malformed\""}).has_value());

    auto metrics = k.relay->ops_get("/metrics").body;
    CHECK(metrics.find("relay_api_key_failures_total{reason=\"unknown\"} 1") != std::string::npos);
    CHECK(metrics.find("relay_api_key_failures_total{reason=\"expired\"} 1") != std::string::npos);
    CHECK(metrics.find("relay_api_keys 5") != std::string::npos);
  }

  SUBCASE("the project's client, without a certificate") {
    test::raw_client own(k.relay->api_port, "");
    auto ok = own.call("POST", "/v1/queues/render/jobs", R"({"payload":1})", bearer(producer_key));
    REQUIRE_MESSAGE(!ok.error, ok.error.message);
    CHECK_EQ(ok.response.status, 201);
    // Keep-alive: the next request on the same connection is checked afresh.
    auto none = own.call("GET", "/v1/queues", {});
    REQUIRE_MESSAGE(!none.error, none.error.message);
    CHECK_EQ(none.response.status, 401);
    CHECK_EQ(none.response.www_authenticate, "Bearer realm=\"relay\"");
    auto wrong = own.call("GET", "/v1/queues", {}, bearer(wrong_key));
    CHECK_EQ(wrong.response.status, 401);
    CHECK_EQ(wrong.response.www_authenticate, "Bearer realm=\"relay\", error=\"invalid_token\"");
    test::raw_client own2(k.relay->api_port, "");
    auto expired = own2.call("GET", "/v1/queues", {}, bearer(expired_key));
    CHECK_EQ(expired.response.status, 401);
    // Two Authorization headers: which one counts would be a guess.
    test::raw_client own3(k.relay->api_port, "");
    auto two = own3.call("GET", "/v1/queues", {}, bearer(producer_key) + bearer(wrong_key));
    CHECK_EQ(two.response.status, 400);
  }

  SUBCASE("a certificate is optional, verified if presented, and never the identity") {
    // The worker's certificate with the producer's key acts as the producer.
    CHECK_EQ(k.curl("worker", producer_key, "POST", "/v1/queues/render/jobs", R"({"payload":1})").status, 201);
    // ... and with no key it is nobody.
    CHECK_EQ(k.curl("worker", "", "POST", "/v1/queues/render/lease", "{}").status, 401);
    // A certificate from another CA is refused in the handshake, key or not.
    auto foreign = k.curl("foreign", producer_key, "GET", "/v1/queues");
    CHECK_NE(foreign.curl_exit, 0);
    CHECK(k.relay->proc->wait_for_line("unable to get local issuer certificate").has_value());
  }
  check_no_key_material(*k.relay);
}

TEST_CASE("api key mode: leases belong to the key's principal, whichever of its keys is used") {
  keyed_relay k("api_key");
  REQUIRE_EQ(k.curl("", producer_key, "POST", "/v1/queues/render/jobs", R"({"payload":"x"})").status, 201);
  auto with_key = [&](const std::string& key) {
    auto o = test::v1_options(k.relay->api_port, "");
    o.extra_headers = bearer(key);
    return o;
  };
  relay::v1::blocking_client worker(with_key(bunny_key_1));
  relay::v1::lease_request one;
  one.queue = "render";
  auto lease = worker.lease(one);
  REQUIRE_MESSAGE(!lease.err, lease.err.message);
  REQUIRE_EQ(lease.value.jobs.size(), 1u);
  std::string id = lease.value.jobs[0].id, token = lease.value.jobs[0].lease;
  REQUIRE_EQ(token.size(), 32u);
  std::string hb = R"({"lease":")" + token + R"("})";
  // Another principal's key, with or without the bunny's certificate.
  CHECK_EQ(k.curl("", bunny2_key, "POST", "/v1/jobs/" + id + "/heartbeat", hb).status, 403);
  CHECK_EQ(k.curl("worker", bunny2_key, "POST", "/v1/jobs/" + id + "/heartbeat", hb).status, 403);
  auto denied = k.relay->proc->wait_for_line("lease of another principal");
  REQUIRE(denied.has_value());
  CHECK(denied->find("\"principal\":\"apikey:bunny2\"") != std::string::npos);
  // The bunny's second key (a rotation in progress) still owns the lease.
  relay::v1::blocking_client worker_key_2(with_key(bunny_key_2));
  auto done = worker_key_2.complete(id, token, R"("ok")");
  CHECK_MESSAGE(!done, done.message);  // 200
  CHECK_EQ(field(k.curl("", producer_key, "GET", "/v1/jobs/" + id).body, "state"), "succeeded");
}

TEST_CASE("api key rotation: a reload removes a key, which gets 401 from the next request on, even on an open "
          "connection; a bad keys file keeps the keys in use") {
  keyed_relay k("api_key");
  test::raw_client conn(k.relay->api_port, "");
  CHECK_EQ(conn.call("POST", "/v1/queues/render/lease", "{}", bearer(bunny_key_1)).response.status, 200);
  CHECK_EQ(conn.call("POST", "/v1/queues/render/lease", "{}", bearer(bunny_key_2)).response.status, 200);

  // The operator retires bunny-1; SIGHUP reloads at once.
  std::string rotated = keys_file({key_entry("producer", producer_key, "producer-1"),
                                   key_entry("bunny", bunny_key_2, "bunny-2")});
  k.rewrite_keys(rotated);
  k.relay->proc->signal(SIGHUP);
  auto reloaded = k.audit({"\"event\":\"reloaded\"", "\"what\":\"api_keys\""});
  REQUIRE(reloaded.has_value());
  CHECK(reloaded->find("\"api_keys\":2") != std::string::npos);
  CHECK(reloaded->find("\"api_keys_sha256\":\"" + digest_hex(rotated) + "\"") != std::string::npos);

  auto old_key = conn.call("POST", "/v1/queues/render/lease", "{}", bearer(bunny_key_1));
  REQUIRE_MESSAGE(!old_key.error, old_key.error.message);
  CHECK_EQ(old_key.response.status, 401);
  test::raw_client conn2(k.relay->api_port, "");
  CHECK_EQ(conn2.call("POST", "/v1/queues/render/lease", "{}", bearer(bunny_key_2)).response.status, 200);
  CHECK_EQ(k.curl("", bunny_key_1, "POST", "/v1/queues/render/lease", "{}").status, 401);
  CHECK_EQ(k.curl("", bunny_key_2, "POST", "/v1/queues/render/lease", "{}").status, 200);
  CHECK(k.audit({"\"event\":\"api_key_refused\"", "\"reason\":\"unknown\""}).has_value());

  // A file with the same key twice is refused, by file and index; the keys
  // in force stay (picked up by the file watch this time, no SIGHUP).
  k.rewrite_keys(keys_file({key_entry("bunny", bunny_key_2, "bunny-2"), key_entry("producer", bunny_key_2, "x")}));
  auto refused = k.audit({"\"event\":\"reload_failed\"", "\"what\":\"api_keys\""});
  REQUIRE(refused.has_value());
  CHECK(refused->find("keys.json: keys[1].sha256 is the same key as keys[0]") != std::string::npos);
  CHECK(refused->find("\"kept\":\"previous API keys\"") != std::string::npos);
  CHECK_EQ(k.curl("", producer_key, "POST", "/v1/queues/render/jobs", R"({"payload":1})").status, 201);
  CHECK_EQ(k.curl("", bunny_key_2, "POST", "/v1/queues/render/lease", "{}").status, 200);
  CHECK_EQ(k.curl("", bunny_key_1, "POST", "/v1/queues/render/lease", "{}").status, 401);

  // Adding a key back by the watch alone.
  k.rewrite_keys(default_keys());
  auto again = k.audit({"\"event\":\"reloaded\"", "\"what\":\"api_keys\"", "\"api_keys\":5"});
  REQUIRE(again.has_value());
  CHECK(again->find("\"api_keys_expired\":1") != std::string::npos);
  CHECK_EQ(k.curl("", bunny_key_1, "POST", "/v1/queues/render/lease", "{}").status, 200);
  check_no_key_material(*k.relay);
}

TEST_CASE("mtls+api_key: the certificate and the key must both pass and name the same principal") {
  keyed_relay k("mtls+api_key");
  SUBCASE("curl") {
    CHECK_EQ(k.curl("producer", producer_key, "POST", "/v1/queues/render/jobs", R"({"payload":1})").status, 201);
    // The producer's certificate with a bunny's key, and the other way round.
    auto mismatch = k.curl("producer", bunny_key_1, "POST", "/v1/queues/render/jobs", R"({"payload":1})");
    CHECK_EQ(mismatch.status, 401);
    CHECK(has_header(k.headers, "WWW-Authenticate: Bearer realm=\"relay\", error=\"invalid_token\""));
    CHECK_EQ(k.curl("worker", producer_key, "POST", "/v1/queues/render/jobs", R"({"payload":1})").status, 401);
    // A certificate the policy does not know, with any key.
    CHECK_EQ(k.curl("nogrant", producer_key, "GET", "/v1/queues").status, 401);
    // The right certificate without its key.
    CHECK_EQ(k.curl("producer", "", "GET", "/v1/jobs/0000000000000001").status, 401);
    // The key without a certificate: refused in the handshake.
    auto no_cert = k.curl("", producer_key, "GET", "/v1/queues");
    CHECK_NE(no_cert.curl_exit, 0);
    CHECK_EQ(no_cert.status, 0);

    auto a = k.audit({"\"event\":\"api_key_refused\"", "\"reason\":\"principal mismatch\""});
    REQUIRE(a.has_value());
    CHECK(a->find("\"auth_mode\":\"mtls+api_key\"") != std::string::npos);
    CHECK(a->find("\"key_id\":\"bunny-1\"") != std::string::npos);
    CHECK(a->find("\"principal\":\"producer.test\"") != std::string::npos);
    CHECK(a->find("\"policy_principal\":\"producer\"") != std::string::npos);
  }
  SUBCASE("the project's client") {
    test::raw_client worker(k.relay->api_port, "worker");
    CHECK_EQ(worker.call("POST", "/v1/queues/render/lease", "{}", bearer(bunny_key_1)).response.status, 200);
    auto mismatch = worker.call("POST", "/v1/queues/render/lease", "{}", bearer(bunny2_key));
    CHECK_EQ(mismatch.response.status, 401);
    CHECK_EQ(mismatch.response.www_authenticate, "Bearer realm=\"relay\", error=\"invalid_token\"");
    test::raw_client worker_again(k.relay->api_port, "worker");
    auto none = worker_again.call("GET", "/v1/queues", {});
    CHECK_EQ(none.response.status, 401);
    test::raw_client anonymous(k.relay->api_port, "");
    auto refused = anonymous.call("GET", "/v1/queues", {}, bearer(producer_key));
    CHECK_EQ(refused.error.what, relay::http::client_error::kind::tls);
    CHECK_EQ(refused.response.status, 0);
  }
  check_no_key_material(*k.relay);
}

// The attack review found that the first version answered 429 to every key
// from a limited address, so a guesser (or one stale client) behind the same
// NAT or load balancer locked out every client with a good key.
TEST_CASE("api key failures are rate limited per source address: bad keys get 429 with Retry-After, a good key still passes") {
  keyed_relay k("api_key", {"--set", "auth.max_failures=3", "--set", "auth.failure_window_ms=60000"});
  test::raw_client own(k.relay->api_port, "");
  for (int i = 0; i < 3; ++i) {
    auto r = own.call("GET", "/v1/queues", {}, bearer(wrong_key));
    REQUIRE_MESSAGE(!r.error, r.error.message);
    CHECK_EQ(r.response.status, 401);
  }
  // The next bad key from this address waits out the window.
  auto limited = own.call("GET", "/v1/queues", {}, bearer(wrong_key));
  REQUIRE_MESSAGE(!limited.error, limited.error.message);
  CHECK_EQ(limited.response.status, 429);
  CHECK_EQ(field(limited.response.body, "code"), "too_many_auth_failures");
  int retry_after = std::atoi(limited.response.retry_after.c_str());
  CHECK_GT(retry_after, 50);
  CHECK_LE(retry_after, 60);
  auto by_curl = k.curl("", "", "GET", "/v1/queues");  // no key at all counts as a failure too
  CHECK_EQ(by_curl.status, 429);
  CHECK(k.headers.find("Retry-After: ") != std::string::npos);
  // A good key from the same address is served.
  auto good = own.call("POST", "/v1/queues/render/jobs", R"({"payload":1})", bearer(producer_key));
  REQUIRE_MESSAGE(!good.error, good.error.message);
  CHECK_EQ(good.response.status, 201);

  auto a = k.audit({"\"event\":\"api_key_rate_limited\""});
  REQUIRE(a.has_value());
  CHECK(a->find("\"remote\":\"127.0.0.1:") != std::string::npos);
  CHECK(a->find("\"retry_after_s\":") != std::string::npos);
  auto metrics = k.relay->ops_get("/metrics").body;
  CHECK(metrics.find("relay_api_key_failures_total{reason=\"unknown\"} 3") != std::string::npos);
  CHECK(metrics.find("relay_api_key_rate_limited_total 2") != std::string::npos);
}

TEST_CASE("mtls mode: an Authorization header is neither needed nor looked at") {
  relay_process relay;
  auto r = relay.curl("producer", "POST", "/v1/queues/render/jobs", R"({"payload":1})", {"-H", "Authorization: Bearer x"});
  CHECK_EQ(r.status, 201);
  CHECK_EQ(relay.curl("producer", "GET", "/v1/queues/render").status, 403);
  CHECK(relay.proc->log().find("api_key_refused") == std::string::npos);
}

TEST_CASE("--check-config validates the api key modes and their keys file") {
  const std::string& p = test::pki();
  test::tmpdir dir;
  test::write_file(dir / "policy.json", test::default_policy());
  auto config = [&](const std::string& auth) {
    test::write_file(dir / "relay.json", R"({"tls": {"cert": ")" + p + R"(/server.crt", "key": ")" + p +
                                             R"(/server.key", "client_ca": ")" + p + R"(/ca.crt"},
      "policy": "policy.json", "auth": )" + auth + "}");
    return test::run({test::env_or_fail("RELAY_BIN"), "--config", dir / "relay.json", "--check-config"}, dir.path());
  };
  auto no_file = config(R"({"mode": "api_key"})");
  CHECK_EQ(no_file.exit_code, 2);
  CHECK_MESSAGE(no_file.err.find("\"auth.api_keys\" (the keys file) is required when \"auth.mode\" is \"api_key\"") !=
                    std::string::npos,
                no_file.err);
  auto missing = config(R"({"mode": "mtls+api_key", "api_keys": "keys.json"})");
  CHECK_EQ(missing.exit_code, 1);
  CHECK_MESSAGE(missing.err.find("auth.api_keys " + (dir / "keys.json")) != std::string::npos, missing.err);
  test::write_file(dir / "keys.json", keys_file({key_entry("bunny", "a", "one"), key_entry("ops", "a", "two")}));
  auto duplicate = config(R"({"mode": "api_key", "api_keys": "keys.json"})");
  CHECK_EQ(duplicate.exit_code, 1);
  CHECK_MESSAGE(duplicate.err.find(dir / "keys.json: keys[1].sha256 is the same key as keys[0]") != std::string::npos,
                duplicate.err);
  test::write_file(dir / "keys.json", default_keys());
  auto good = config(R"({"mode": "api_key", "api_keys": "keys.json"})");
  CHECK_MESSAGE(good.exit_code == 0, good.err);
  CHECK(good.out.find("\"mode\": \"api_key\"") != std::string::npos);
  CHECK(good.out.find("\"api_keys\": \"" + (dir / "keys.json") + "\"") != std::string::npos);
}
