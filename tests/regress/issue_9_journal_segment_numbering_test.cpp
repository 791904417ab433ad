// Issue 9: after a failed write whose truncate also failed, the writer
// thread opened segment `_segment + 1000000` on its own while the loop's
// numbering did not know; a later roll then opened a lower-numbered segment
// holding newer records, and replay (by number) applied them out of order.
#include <doctest/doctest.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <thread>

#include "../support/journaled.h"
#include "../support/tmpdir.h"
#include "journal/segment.h"

using namespace relay;
using namespace relay::queue;

TEST_CASE("a failed write whose truncate fails too never makes segments replay out of order") {
  test::tmpdir dir;
  auto broken = std::make_shared<std::atomic<bool>>(false);
  journal::options o;
  o.retry_ms = 20;
  o.fault = [broken](std::string_view op) { return broken->load() && (op == "write" || op == "truncate") ? EIO : 0; };
  job_id before = 0, during = 0;
  {
    test::journaled j(dir.path(), o);
    before = j.submit("\"before\"");
    REQUIRE(j.sync());
    broken->store(true);
    during = j.submit("\"during\"");
    CHECK_FALSE(j.sync());  // never acknowledged while failing
    broken->store(false);
    REQUIRE(j.recover());
    REQUIRE(j.sync());
    // A roll now must number its segment after every segment on disk.
    std::vector<uint64_t> on_disk = journal::list_segments(dir.path());
    uint64_t next = j.w->roll();
    CHECK_GT(next, on_disk.back());
    // Newer records go to the new segment: the job that was submitted
    // during the failure is leased and completed.
    std::vector<job*> got;
    REQUIRE(j.b->lease("q", 2, 60000, j.worker, 2000, got) == op_error::none);
    REQUIRE_EQ(got.size(), 2u);
    for (job* g : got) REQUIRE(j.b->complete(g->id, g->lease, j.worker, "\"done\"", 2001) == op_error::none);
    REQUIRE(j.sync());
  }
  journal::replay_result res;
  std::string error;
  auto b = test::replay_dir(dir.path(), res, error);
  REQUIRE_MESSAGE(b, error);
  CHECK_EQ(res.skipped, 0u);
  REQUIRE(b->find(before));
  REQUIRE(b->find(during));
  CHECK_EQ(b->find(before)->state, job_state::succeeded);
  CHECK_EQ(b->find(during)->state, job_state::succeeded);
}

TEST_CASE("while the cut after a failed write keeps failing, nothing is written, rolled or acknowledged") {
  test::tmpdir dir;
  auto stage = std::make_shared<std::atomic<int>>(0);  // 1: writes and cuts fail; 2: cuts only
  journal::options o;
  o.retry_ms = 10;
  o.fault = [stage](std::string_view op) {
    int s = stage->load();
    if (s == 1 && (op == "write" || op == "truncate")) return EIO;
    if (s == 2 && op == "truncate") return EIO;
    return 0;
  };
  job_id during = 0;
  {
    test::journaled j(dir.path(), o);
    j.submit("\"before\"");
    REQUIRE(j.sync());
    uint64_t size_before = std::filesystem::file_size(journal::segment_path(dir.path(), 1));
    stage->store(1);
    during = j.submit("\"during\"");
    CHECK_FALSE(j.sync());
    stage->store(2);
    j.w->roll();
    // Retries happen (every 10 ms) but the cut keeps failing.
    for (int i = 0; i < 20; ++i) {
      uv_run(&j.loop, UV_RUN_ONCE);
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    CHECK_FALSE(j.w->accepting());
    CHECK_EQ(journal::list_segments(dir.path()), std::vector<uint64_t>{1});
    CHECK_EQ(std::filesystem::file_size(journal::segment_path(dir.path(), 1)), size_before);
    stage->store(0);
    REQUIRE(j.recover());
    REQUIRE(j.sync());
  }
  journal::replay_result res;
  std::string error;
  auto b = test::replay_dir(dir.path(), res, error);
  REQUIRE_MESSAGE(b, error);
  CHECK(b->find(during));
  CHECK_EQ(journal::list_segments(dir.path()), (std::vector<uint64_t>{1, 2}));
}
