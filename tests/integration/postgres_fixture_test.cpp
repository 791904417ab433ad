// The fixture that the postgres journal backend's fault tests stand on
// (tests/support/postgres.h, issue 12): a primary and a synchronous standby
// on loopback; a committed row is on the standby; after the primary is
// SIGKILLed and the standby promoted, the row is still there and the new
// primary takes writes. Where PostgreSQL cannot be started (binaries
// missing, no non-root user to run it as) the suite reports itself skipped
// (exit 77), never passed.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>
#include <signal.h>

#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <filesystem>

#include "../support/postgres.h"

TEST_CASE("a row committed on the primary is on the synchronous standby and survives the primary's SIGKILL") {
  std::string dir;
  pid_t primary = -1;
  pid_t standby = -1;
  {
    test::postgres_cluster pg;
    pg.start();
    dir = pg.dir();
    primary = pg.primary_pid();
    standby = pg.standby_pid();
    MESSAGE("servers run as " << pg.server_user_name() << "; primary " << pg.primary_dsn() << "; standby "
                              << pg.standby_dsn());

    // Synchronous replication is in force, and commits wait for the standby
    // to apply them.
    auto r = pg.psql(pg.primary_dsn(),
                     "SELECT sync_state, current_setting('synchronous_commit') FROM pg_stat_replication "
                     "WHERE application_name = 'standby1'");
    REQUIRE_MESSAGE(r.exit_code == 0, r.err);
    CHECK_EQ(r.out, "sync|remote_apply\n");
    r = pg.psql(pg.primary_dsn(), "SELECT slot_name, active FROM pg_replication_slots");
    CHECK_EQ(r.out, "standby1|t\n");

    r = pg.psql(pg.primary_dsn(), "CREATE TABLE jobs (id bigint PRIMARY KEY, body text NOT NULL)");
    REQUIRE_MESSAGE(r.exit_code == 0, r.err);
    r = pg.psql(pg.primary_dsn(), "INSERT INTO jobs VALUES (1, 'acknowledged')");
    REQUIRE_MESSAGE(r.exit_code == 0, r.err);
    // remote_apply: the INSERT returned, so the standby shows the row now.
    r = pg.psql(pg.standby_dsn(), "SELECT id, body FROM jobs");
    CHECK_MESSAGE(r.out == "1|acknowledged\n", r.out << r.err);
    r = pg.psql(pg.standby_dsn(), "SELECT pg_is_in_recovery()");
    CHECK_EQ(r.out, "t\n");

    pg.stop_primary_immediate();
    CHECK_FALSE(pg.primary_running());
    CHECK_EQ(::kill(primary, 0), -1);
    r = pg.psql(pg.primary_dsn(), "SELECT 1", 5000);
    CHECK_MESSAGE(r.exit_code != 0, "the SIGKILLed primary still answers: " << r.out);

    pg.promote_standby();
    r = pg.psql(pg.standby_dsn(), "SELECT id, body FROM jobs");
    CHECK_MESSAGE(r.out == "1|acknowledged\n", r.out << r.err);
    r = pg.psql(pg.standby_dsn(), "INSERT INTO jobs VALUES (2, 'after failover')");
    CHECK_MESSAGE(r.exit_code == 0, r.err << pg.standby_log());
    r = pg.psql(pg.standby_dsn(), "SELECT count(*) FROM jobs");
    CHECK_EQ(r.out, "2\n");
  }
  // The destructor stopped what was left and removed the directory.
  CHECK_FALSE(std::filesystem::exists(dir));
  CHECK((::kill(standby, 0) == -1 && errno == ESRCH));
}

TEST_CASE("with the synchronous standby dead, a commit on the primary does not return") {
  test::postgres_cluster pg;
  pg.start();
  auto r = pg.psql(pg.primary_dsn(), "CREATE TABLE jobs (id bigint PRIMARY KEY)");
  REQUIRE_MESSAGE(r.exit_code == 0, r.err);
  pg.stop_standby_immediate();
  auto started = std::chrono::steady_clock::now();
  r = pg.psql(pg.primary_dsn(), "INSERT INTO jobs VALUES (1)", 1500);
  // Killed by the fixture at 1.5 s: still waiting for the standby. (The
  // backend warns that the transaction "has already committed locally" when
  // its client goes: the postgres journal must treat a commit that did not
  // return as unknown, never as acknowledged, and never as absent.)
  CHECK_MESSAGE(r.exit_code == -1, "the INSERT returned (" << r.exit_code << ") without a standby: " << r.out << r.err);
  CHECK(std::chrono::steady_clock::now() - started >= std::chrono::milliseconds(1500));
}

int main(int argc, char** argv) {
  std::signal(SIGPIPE, SIG_IGN);
  if (auto why = test::postgres_cluster::unavailable_reason()) {
    std::fprintf(stderr, "SKIP: cannot start PostgreSQL here (%s): the postgres fixture test did not run\n",
                 why->c_str());
    return 77;
  }
  doctest::Context context(argc, argv);
  return context.run();
}
