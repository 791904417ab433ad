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

// A relay configured with `dsn`, run to its end (or killed after 15 s).
struct refused_start {
  test::tmpdir dir;
  test::run_result check;
  int exit_code = -1;
  std::string log;

  explicit refused_start(const std::string& dsn) {
    std::vector<std::string> argv{test::env_or_fail("RELAY_BIN"), "--config", test::postgres_relay_config(dir, dsn)};
    test::child c(argv, dir / "relay.log");
    exit_code = c.wait(15000);
    log = c.log();
    argv.push_back("--check-config");
    check = test::run(argv, dir.path());
  }
};

}  // namespace

TEST_CASE("issue 12: a DSN that libpq cannot parse is refused without publishing its password" *
          doctest::skip(!RELAY_WITH_POSTGRES)) {
  struct probe {
    std::string dsn, secret;
  };
  for (const probe& c : {probe{"postgresql://relay:Hunter2%zzTopSecret@127.0.0.1:1/relay", "TopSecret"},
                         probe{"host=127.0.0.1 port=1 user=relay password=Hunter2 TopSecretTail dbname=relay",
                               "TopSecretTail"}}) {
    CAPTURE(c.dsn);
    // Before: relay ran as a standby whose /readyz (unauthenticated) and
    // log quoted libpq's parse error, password and all.
    refused_start r(c.dsn);
    CHECK_EQ(r.exit_code, 1);
    CHECK_MESSAGE(r.log.find("is not a valid libpq connection string") != std::string::npos, r.log);
    CHECK_MESSAGE(r.log.find(c.secret) == std::string::npos, "the log shows the password: " << r.log);
    CHECK_EQ(r.check.exit_code, 1);
    CHECK_NE(r.check.err.find("is not a valid libpq connection string"), std::string::npos);
    CHECK_MESSAGE(r.check.err.find(c.secret) == std::string::npos, "--check-config shows the password: " << r.check.err);
  }
}
