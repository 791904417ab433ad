// Issue 12 (attack review): while the journal is not accepting (a commit
// failing, or "behind"), api::service::send() answers reads at once, from
// memory -- which holds changes that were applied but never committed (the
// change's own request is still waiting, or got a 503). A producer whose
// submit timed out looks the job up, sees it queued, and does not resubmit;
// the leader then dies or steps down and the job never existed (the next
// leader answers 404, and may hand the same id to another job). The
// comment there ("they can show nothing that was acknowledged and lost")
// misses changes that were never acknowledged.
#include <doctest/doctest.h>

#include <sys/stat.h>

#include <cstdio>

#include "../support/postgres.h"
#include "../support/relay_fixture.h"

TEST_CASE("issue 12: a read does not show a change that PostgreSQL has not committed" * doctest::skip(!test::postgres_backend_testable())) {
  test::postgres_backend backend;
  auto& pg = backend.pg;
  test::relay_process r(backend.relay_args());
  auto ok = r.curl("producer", "POST", "/v1/queues/work/jobs", R"({"payload": "committed"})");
  REQUIRE_MESSAGE(ok.status == 201, ok.body);
  unsigned long long first = std::stoull(test::field(ok.body, "id"), nullptr, 16);

  auto q = pg.psql(pg.primary_dsn(),
                   "CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN RAISE EXCEPTION 'could not extend file'; END "
                   "$$ LANGUAGE plpgsql; CREATE TRIGGER refuse BEFORE INSERT ON relay_journal_main FOR EACH ROW "
                   "EXECUTE FUNCTION refuse()");
  REQUIRE_MESSAGE(q.exit_code == 0, q.err);
  auto lost = r.curl("producer", "POST", "/v1/queues/work/jobs", R"({"payload": "never committed"})",
                     {"--max-time", "3"});
  CHECK_NE(lost.status, 201);  // not acknowledged: it was never committed

  char id[17];
  std::snprintf(id, sizeof id, "%016llx", first + 1);
  auto look = r.curl("producer", "GET", std::string("/v1/jobs/") + id);
  CHECK_MESSAGE(look.body.find("never committed") == std::string::npos,
                "a read shows a job that is not in PostgreSQL (" << look.status << "): " << look.body);
  r.proc->signal(SIGKILL);
  r.proc->wait(5000);
}
