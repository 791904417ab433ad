// Issue 12 (attack review): SIGTERM on a leader drains and then exits
// (SPEC). If the shard is lost while it drains -- the lease runs out because
// the database is slow or unreachable, which is just when operators restart
// things, or another relay takes it -- step_down() sets _restart and the
// process re-execs itself as a standby: the SIGTERM is forgotten. The new
// image is a fresh standby that may well take the shard again and serve as
// leader, until its supervisor gives up and SIGKILLs it (no final commit,
// no release: the next leader waits out a whole lease).
#include <doctest/doctest.h>

#include <sys/stat.h>

#include "../support/postgres.h"
#include "../support/relay_fixture.h"

TEST_CASE("issue 12: a leader told to stop exits even if it loses the shard while draining" * doctest::skip(!test::postgres_backend_testable())) {
  test::postgres_backend backend;
  auto& pg = backend.pg;
  test::relay_process r(backend.relay_args({"--set", "limits.drain_timeout_ms=20000"}));
  const std::string& p = test::pki();
  // A request whose body never completes keeps the drain going.
  test::write_file(r.dir / "partial.sh",
                   "(printf 'POST /v1/queues/work/jobs HTTP/1.1\\r\\nHost: x\\r\\nContent-Type: application/json\\r\\n"
                   "Content-Length: 100\\r\\n\\r\\n{\"payload\":'; sleep 30) | openssl s_client -quiet -connect " +
                       r.api + " -cert " + p + "/producer.crt -key " + p + "/producer.key -CAfile " + p +
                       "/ca.crt >/dev/null 2>&1\n");
  test::child slow({"sh", r.dir / "partial.sh"}, r.dir / "slow.log");
  std::this_thread::sleep_for(std::chrono::milliseconds(1500));

  r.proc->signal(SIGTERM);
  REQUIRE(r.proc->wait_for_line("\"draining\"", 5000).has_value());
  // The shard passes to another epoch while the leader drains.
  auto q = pg.psql(pg.primary_dsn(), "UPDATE relay_leader SET epoch = epoch + 1, lease_until = now() + interval '1 hour'");
  REQUIRE_MESSAGE(q.exit_code == 0, q.err);
  int rc = r.proc->wait(15000);
  CHECK_MESSAGE(rc >= 0, "still running 15 s after SIGTERM: " << r.proc->log());
  CHECK_MESSAGE(r.proc->log().find("restarting_as_standby") == std::string::npos,
                "re-exec'd as a standby instead of exiting on SIGTERM: " << r.proc->log());
  slow.signal(SIGKILL);
}
