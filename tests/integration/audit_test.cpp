// The audit stream (issue 10, part 5): one JSON line for every refused
// handshake, authorisation denial, admin action, reload and start/stop, in
// its own file, never a payload, rotation-friendly, repeats collapsed.
#include <doctest/doctest.h>
#include <signal.h>

#include <thread>

#include "../support/relay_fixture.h"

using test::relay_process;

namespace {

struct audited_relay {
  test::tmpdir adir;
  std::string path = adir / "audit.log";
  relay_process relay{{"--set", "audit.path=" + path}};

  std::string text() const { return test::read_file(path); }
  // The first line of the audit file holding every needle, waiting up to
  // timeout_ms for it.
  std::optional<std::string> wait_for(std::vector<std::string> needles, int timeout_ms = 5000,
                                      const std::string& file = {}) const {
    auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
    do {
      std::string all = test::read_file(file.empty() ? path : file);
      size_t start = 0;
      while (start < all.size()) {
        size_t end = all.find('\n', start);
        if (end == std::string::npos) break;
        std::string line = all.substr(start, end - start);
        bool every = true;
        for (const auto& n : needles) every = every && line.find(n) != std::string::npos;
        if (every) return line;
        start = end + 1;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    } while (std::chrono::steady_clock::now() < until);
    return std::nullopt;
  }
};

// "AB:CD:..." from `openssl x509 -fingerprint` → "abcd...".
std::string openssl_sha256(const std::string& cert) {
  auto r = test::run({"openssl", "x509", "-in", cert, "-noout", "-fingerprint", "-sha256"}, test::pki());
  REQUIRE_EQ(r.exit_code, 0);
  std::string hex;
  for (char c : r.out.substr(r.out.find('=') + 1))
    if (std::isxdigit(static_cast<unsigned char>(c))) hex += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return hex;
}

std::string count_lines(const std::string& text, const std::string& needle) {
  size_t n = 0;
  for (size_t p = text.find(needle); p != std::string::npos; p = text.find(needle, p + 1)) ++n;
  return std::to_string(n);
}

}  // namespace

TEST_CASE("start, refused handshakes, denials, admin actions, reloads and stop each write an audit line") {
  audited_relay a;
  auto& relay = a.relay;
  auto started = a.wait_for({"\"event\":\"started\"", "\"audit\":true", "\"auth_mode\":\"mtls\""});
  REQUIRE_MESSAGE(started.has_value(), a.text());
  std::string policy_sha = relay::tls::sha256_hex(test::read_file(relay.dir / "policy.json"));
  CHECK(started->find("\"policy_sha256\":\"" + policy_sha + "\"") != std::string::npos);
  CHECK(started->find("\"cert_sha256\":\"" + openssl_sha256(test::pki() + "/server.crt") + "\"") != std::string::npos);

  SUBCASE("a refused handshake names the certificate that was presented") {
    CHECK_EQ(relay.curl("expired", "GET", "/v1/queues").status, 0);
    auto line = a.wait_for({"\"event\":\"tls_handshake_failed\"", "\"subject\":"});
    REQUIRE_MESSAGE(line.has_value(), a.text());
    CHECK(line->find("CN=worker") != std::string::npos);
    CHECK(line->find("\"sha256\":\"" + openssl_sha256(test::pki() + "/expired.crt") + "\"") != std::string::npos);
    CHECK(line->find("\"serial\":\"") != std::string::npos);
    CHECK(line->find("\"remote\":\"127.0.0.1:") != std::string::npos);
    CHECK(line->find("expired") != std::string::npos);
  }

  SUBCASE("denials, a dead-job requeue and a cancellation; no payload ever") {
    CHECK_EQ(relay.curl("nogrant", "GET", "/v1/queues").status, 403);
    auto denied = a.wait_for({"\"event\":\"authz_denied\"", "\"principal\":\"nobody\"", "\"permission\":\"admin\""});
    CHECK_MESSAGE(denied.has_value(), a.text());

    auto secret = relay.curl("producer", "POST", "/v1/queues/payroll/jobs", R"({"payload":"SECRET-PAYLOAD-MARKER"})");
    REQUIRE_EQ(secret.status, 201);
    std::string secret_id = test::field(secret.body, "id");
    auto r = relay.curl("worker", "POST", "/v1/results",
                        R"([{"id":")" + secret_id + R"(","lease":"00000000000000000000000000000000","result":1}])");
    CHECK_EQ(r.status, 200);
    auto item = a.wait_for({"\"event\":\"authz_denied\"", "\"route\":\"results\"", "\"queue\":\"payroll\""});
    CHECK_MESSAGE(item.has_value(), a.text());

    auto doomed = relay.curl("producer", "POST", "/v1/queues/render/jobs",
                             R"({"payload":"SECRET-PAYLOAD-MARKER","max_attempts":1})");
    REQUIRE_EQ(doomed.status, 201);
    auto leased = relay.curl("worker", "POST", "/v1/queues/render/lease", R"({"max":1})");
    REQUIRE_EQ(leased.status, 200);
    std::string id = test::field(leased.body, "id");
    auto failed = relay.curl("worker", "POST", "/v1/jobs/" + id + "/fail",
                             R"({"lease":")" + test::field(leased.body, "lease") + R"(","error":"SECRET-RESULT-MARKER"})");
    REQUIRE_EQ(failed.status, 200);
    REQUIRE_EQ(relay.curl("admin", "POST", "/v1/queues/render/dead/requeue", "{}").status, 200);
    auto requeue = a.wait_for({"\"event\":\"admin_action\"", "\"action\":\"requeue_dead\"", "\"count\":1",
                               "\"principal\":\"ops-admin\"", "\"queue\":\"render\""});
    CHECK_MESSAGE(requeue.has_value(), a.text());

    REQUIRE_EQ(relay.curl("producer", "DELETE", "/v1/jobs/" + id).status, 200);
    auto cancel = a.wait_for({"\"event\":\"admin_action\"", "\"action\":\"cancel\"", "\"job\":\"" + id + "\"",
                              "\"principal\":\"producer.test\""});
    CHECK_MESSAGE(cancel.has_value(), a.text());

    CHECK(a.text().find("SECRET-PAYLOAD-MARKER") == std::string::npos);
    CHECK(a.text().find("SECRET-RESULT-MARKER") == std::string::npos);
    // With audit.path set, the operational log does not repeat them.
    CHECK(relay.proc->log().find("authz_denied") == std::string::npos);
  }

  SUBCASE("a reload says what changed, a refused one why") {
    test::write_file(relay.dir / "policy.json", test::policy_with_grant(
                                                    R"({"principal": "nobody", "allow": ["read"], "queues": ["x"]})"));
    relay.proc->signal(SIGHUP);
    auto reloaded = a.wait_for({"\"event\":\"reloaded\"", "\"policy_changed\":true", "\"cert_changed\":false",
                                "\"client_ca_changed\":false"});
    REQUIRE_MESSAGE(reloaded.has_value(), a.text());
    std::string new_sha = relay::tls::sha256_hex(test::read_file(relay.dir / "policy.json"));
    CHECK(reloaded->find(new_sha) != std::string::npos);

    test::write_file(relay.dir / "policy.json", "{ not json");
    relay.proc->signal(SIGHUP);
    auto refused = a.wait_for({"\"event\":\"reload_failed\"", "not valid JSON", "\"kept\":"});
    CHECK_MESSAGE(refused.has_value(), a.text());
  }

  SUBCASE("a moved audit file is replaced by a new one, and SIGHUP reopens it") {
    std::string rotated = a.path + ".1";
    REQUIRE_EQ(std::rename(a.path.c_str(), rotated.c_str()), 0);
    // Checked once a second: the first denial may still land in the moved file.
    std::optional<std::string> in_new;
    for (int i = 0; i < 40 && !in_new; ++i) {
      relay.curl("nogrant", "GET", "/v1/queues/render");
      in_new = a.wait_for({"\"event\":\"authz_denied\"", "\"principal\":\"nobody\""}, 200);
    }
    CHECK_MESSAGE(in_new.has_value(), "no line in the new audit file");
    CHECK(a.wait_for({"\"event\":\"started\""}, 100, rotated).has_value());

    REQUIRE_EQ(std::rename(a.path.c_str(), (a.path + ".2").c_str()), 0);
    relay.proc->signal(SIGHUP);
    auto after_hup = a.wait_for({"\"event\":\"reloaded\""}, 5000);
    CHECK_MESSAGE(after_hup.has_value(), "SIGHUP did not reopen the audit file");
  }

  relay.proc->signal(SIGTERM);
  CHECK_EQ(relay.proc->wait(10000), 0);
  CHECK_MESSAGE(a.wait_for({"\"event\":\"stopped\"", "\"connections_cut\":"}, 2000).has_value(), a.text());
}

TEST_CASE("a flood of denials from one source collapses into a few audit lines with a count") {
  audited_relay a;
  test::tls_pipe pipe(a.relay.api_port, "nogrant");
  std::string burst;
  for (int i = 0; i < 200; ++i) burst += "GET /v1/queues HTTP/1.1\r\nHost: x\r\n\r\n";
  pipe.send(burst);
  std::string answers = pipe.read_responses(200, 10000);
  REQUIRE_EQ(test::tls_pipe::count(answers, "HTTP/1.1 403"), 200u);
  auto repeated = a.wait_for({"\"event\":\"authz_denied\"", "\"repeated\":"}, 5000);
  REQUIRE_MESSAGE(repeated.has_value(), a.text());
  std::string text = a.text();
  size_t full = 0;
  for (size_t p = text.find("\"principal\":\"nobody\""); p != std::string::npos; p = text.find("\"principal\":\"nobody\"", p + 1)) ++full;
  MESSAGE(full << " full authz_denied lines for 200 denials; " << count_lines(text, "\"repeated\":") << " repeat lines");
  CHECK_LT(full, 20u);
}

TEST_CASE("without audit.path, audit lines go to stderr marked \"audit\":true") {
  relay_process relay;
  CHECK_EQ(relay.curl("nogrant", "GET", "/v1/queues").status, 403);
  auto line = relay.proc->wait_for_line("\"event\":\"authz_denied\"", 5000);
  REQUIRE(line.has_value());
  CHECK(line->find("\"audit\":true") != std::string::npos);
  CHECK(relay.proc->wait_for_line("\"event\":\"started\",\"audit\":true", 5000).has_value());
}

TEST_CASE("an audit.path that cannot be opened stops relay at start with a message naming it") {
  test::tmpdir d;
  test::write_file(d / "policy.json", test::default_policy());
  const std::string& p = test::pki();
  test::write_file(d / "relay.json", R"({"listen": "127.0.0.1:0", "ops_listen": "127.0.0.1:0",
      "tls": {"cert": ")" + p + R"(/server.crt", "key": ")" + p + R"(/server.key", "client_ca": ")" + p + R"(/ca.crt"},
      "policy": "policy.json", "journal": {"dir": "journal"}, "audit": {"path": "no/such/dir/audit.log"}})");
  auto r = test::run({test::env_or_fail("RELAY_BIN"), "--config", d / "relay.json"}, d.path(), 10000);
  CHECK_EQ(r.exit_code, 1);
  CHECK_MESSAGE(r.err.find("audit.path") != std::string::npos, r.err);
  CHECK(r.err.find("no/such/dir/audit.log") != std::string::npos);
}
