// Issue 12 (attack review): when PostgreSQL refuses the journal's commits
// (disk full, a revoked grant, a partition problem -- simulated here by a
// trigger) while the leadership renewals still succeed, the journal thread
// retries the commit forever: the renewals keep extending the deadline, so
// "retried until the local deadline, then step-down" (SPEC) never happens.
// The request waiting for that commit gets no answer at all -- and every
// change after it, even the ones refused at once with a 503, is queued
// behind it in the journal's FIFO of waiters: they hang too. The leader
// never steps down, so no standby can take over. And SIGTERM then hangs
// for good: stop() joins the journal thread on the loop, the thread retries
// until the deadline passes, and the deadline is kept alive by the
// leadership thread, which stop() only stops after that join (/healthz is
// dead meanwhile; only SIGKILL ends it).
#include <doctest/doctest.h>

#include <sys/stat.h>

#include "../support/postgres.h"
#include "../support/relay_fixture.h"

TEST_CASE("issue 12: a change whose commit PostgreSQL keeps refusing is answered 503 within a few leases" * doctest::skip(!test::postgres_backend_testable())) {
  test::postgres_backend backend;
  auto& pg = backend.pg;
  test::relay_process r(backend.relay_args());
  auto ok = r.curl("producer", "POST", "/v1/queues/work/jobs", R"({"payload": 1})");
  REQUIRE_MESSAGE(ok.status == 201, ok.body);

  auto q = pg.psql(pg.primary_dsn(),
                   "CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN RAISE EXCEPTION 'could not extend file'; END "
                   "$$ LANGUAGE plpgsql; CREATE TRIGGER refuse BEFORE INSERT ON relay_journal_main FOR EACH ROW "
                   "EXECUTE FUNCTION refuse()");
  REQUIRE_MESSAGE(q.exit_code == 0, q.err);

  // Lease 1.5 s: 10 s is more than six leases.
  auto first = r.curl("producer", "POST", "/v1/queues/work/jobs", R"({"payload": 2})", {"--max-time", "10"});
  CHECK_MESSAGE(first.curl_exit == 0, "no answer in 10 s (curl exit " << first.curl_exit << ")");
  CHECK_EQ(first.status, 503);
  // The leader gave the shard up and started over (on another port: the
  // test's relay listens on port 0); no hang either way.
  CHECK(r.proc->wait_for_line("leadership_lost", 10000).has_value());
  auto second = r.curl("producer", "POST", "/v1/queues/work/jobs", R"({"payload": 3})", {"--max-time", "10"});
  CHECK_MESSAGE((second.curl_exit == 7 || second.status == 503),
                "curl exit " << second.curl_exit << ", status " << second.status);
  r.proc->signal(SIGTERM);
  int rc = r.proc->wait(20000);
  CHECK_MESSAGE(rc == 0, "SIGTERM: not exited after 20 s (" << rc << "): " << r.proc->log());
}
