// Issue 9: after compaction and a restart, retention entries were re-added
// in id order and popped only while the front was due, so a finished job
// outlived result_ttl_ms until a lower-id job's retention came due.
#include <doctest/doctest.h>

#include "../support/journaled.h"
#include "../support/tmpdir.h"

using namespace relay;
using namespace relay::queue;

TEST_CASE("after compaction and replay a result is forgotten when its own retention is due") {
  test::tmpdir dir;
  broker_limits limits;
  limits.result_ttl_ms = 10'000;
  job_id late = 0, early = 0;
  {
    test::journaled j(dir.path(), {}, 1, limits);
    late = j.submit("\"finishes late\"");
    early = j.submit("\"finishes early\"");
    std::vector<job*> got;
    REQUIRE(j.b->lease("q", 2, 100'000, j.worker, 1000, got) == op_error::none);
    REQUIRE_EQ(got.size(), 2u);
    // The higher id finishes first: retention due at 12,000 and 60,000.
    REQUIRE(j.b->complete(early, got[1]->lease, j.worker, "\"e\"", 2000) == op_error::none);
    REQUIRE(j.b->complete(late, got[0]->lease, j.worker, "\"l\"", 50'000) == op_error::none);
    REQUIRE(j.sync());
    // Compaction, as relay does it: a new segment, the id counter, one
    // snapshot per job in id order, then the old segments go.
    uint64_t next = j.w->roll();
    j.w->append(j.b->meta_record(50'000));
    for (job_id id : j.b->job_ids()) j.w->append(j.b->snapshot_of(*j.b->find(id)));
    j.w->delete_before(next);
    REQUIRE(j.sync());
  }
  journal::replay_result res;
  std::string error;
  auto b = test::replay_dir(dir.path(), res, error, false, limits);
  REQUIRE_MESSAGE(b, error);
  REQUIRE_EQ(b->job_count(), 2u);
  REQUIRE(b->next_deadline().has_value());
  CHECK_EQ(*b->next_deadline(), 12'000);
  b->advance(20'000);
  CHECK_MESSAGE(b->find(early) == nullptr, "a result outlived result_ttl_ms after compaction");
  CHECK(b->find(late) != nullptr);
  CHECK_EQ(*b->next_deadline(), 60'000);
  b->advance(60'000);
  CHECK_EQ(b->job_count(), 0u);
  CHECK_FALSE(b->next_deadline().has_value());
}
