// Issue 12 (attack review): the DSN is a secret (SPEC: "never argv/env"),
// yet libpq's parse errors quote pieces of the connection string, and relay
// puts the error verbatim into its log and into /readyz -- which the ops
// listener serves to anyone, without authentication. A password with a
// literal '%' in a URI DSN ("invalid percent-encoded token: \"<password>\"")
// or an unquoted space in a keyword/value DSN ("missing \"=\" after
// \"<rest of password>\"") is published. No PostgreSQL needed: the DSN never
// parses.
#include <doctest/doctest.h>

#include <sys/stat.h>

#include "../support/relay_fixture.h"

namespace {

struct standby_relay {
  test::tmpdir dir;
  std::unique_ptr<test::child> proc;
  std::string ops;

  explicit standby_relay(const std::string& dsn) {
    const std::string& p = test::pki();
    test::write_file(dir / "dsn", dsn + "\n");
    ::chmod((dir / "dsn").c_str(), 0600);
    test::write_file(dir / "policy.json", test::default_policy());
    test::write_file(dir / "relay.json", R"({"listen": "127.0.0.1:0", "ops_listen": "127.0.0.1:0",
      "tls": {"cert": ")" + p + R"(/server.crt", "key": ")" + p + R"(/server.key", "client_ca": ")" + p +
                                              R"(/ca.crt"},
      "policy": "policy.json", "journal": {"backend": "postgres", "postgres": {"dsn_file": ")" +
                                              (dir / "dsn") + R"(", "lease_ms": 1500, "renew_ms": 300}}})");
    proc = std::make_unique<test::child>(
        std::vector<std::string>{test::env_or_fail("RELAY_BIN"), "--config", dir / "relay.json"}, dir / "relay.log");
    auto line = proc->wait_for_line("\"listener\":\"ops\"");
    REQUIRE_MESSAGE(line.has_value(), proc->log());
    ops = test::json_field(*line, "addr");
  }

  std::string readyz() {
    auto r = test::run({"curl", "-sS", "--max-time", "10", "http://" + ops + "/readyz"}, dir.path());
    return r.out;
  }
};

}  // namespace

TEST_CASE("issue 12: a DSN that libpq cannot parse does not publish its password on /readyz or in the log") {
  if (!RELAY_WITH_POSTGRES) return;
  struct probe {
    std::string dsn, secret;
  };
  for (const probe& c : {probe{"postgresql://relay:Hunter2%zzTopSecret@127.0.0.1:1/relay", "TopSecret"},
                         probe{"host=127.0.0.1 port=1 user=relay password=Hunter2 TopSecretTail dbname=relay",
                               "TopSecretTail"}}) {
    CAPTURE(c.dsn);
    standby_relay r(c.dsn);
    REQUIRE(r.proc->wait_for_line("postgres_unavailable", 10000).has_value());
    std::string body = r.readyz();
    CHECK_MESSAGE(body.find("standby") != std::string::npos, body);
    CHECK_MESSAGE(body.find(c.secret) == std::string::npos, "/readyz (unauthenticated) shows the password: " << body);
    std::string log = r.proc->log();
    CHECK_MESSAGE(log.find(c.secret) == std::string::npos, "the log shows the password: " << log);
    r.proc->signal(SIGTERM);
    r.proc->wait(10000);
  }
}
