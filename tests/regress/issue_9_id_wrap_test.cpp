// Issue 9: an id near 2^64 wrapped the id counter. A meta or submit record
// with id 2^64-1 made the next submits reuse one id (in a release build two
// jobs on different queues both got ffffffffffffffff).
#include <doctest/doctest.h>

#include "../support/journaled.h"
#include "../support/tmpdir.h"

using namespace relay;
using namespace relay::queue;

namespace {

constexpr job_id top = ~job_id{0};                  // 2^64 - 1
constexpr job_id largest = (job_id{1} << 63) - 1;   // the largest id relay hands out

record meta(job_id next) {
  record r;
  r.type = record_type::meta;
  r.id = next;
  r.at = 1000;
  return r;
}

record submit_record(job_id id, std::string_view queue) {
  record r;
  r.type = record_type::submit;
  r.id = id;
  r.at = r.due = 1000;
  r.queue = queue;
  r.max_attempts = 5;
  r.lease_ms = 30000;
  r.payload = "1";
  return r;
}

}  // namespace

TEST_CASE("a meta record with id 2^64-1 is refused as corruption, naming segment and offset") {
  test::tmpdir dir;
  {
    test::journaled j(dir.path());
    j.submit("1");
    j.w->append(meta(top));
    j.submit("2");
    REQUIRE(j.sync());
  }
  std::string path = journal::segment_path(dir.path(), 1);
  std::vector<size_t> at = test::record_offsets(test::read_bytes(path));
  REQUIRE_GE(at.size(), 2u);
  journal::replay_result res;
  std::string error;
  CHECK(test::replay_dir(dir.path(), res, error) == nullptr);
  bool named = error.find(path + " is corrupt at offset " + std::to_string(at[1])) != std::string::npos;
  CHECK_MESSAGE(named, error);
}

TEST_CASE("a submit record with id 2^64-1 is refused as corruption, even as the last record") {
  test::tmpdir dir;
  {
    test::journaled j(dir.path());
    j.submit("1");
    j.w->append(submit_record(top, "other"));
    REQUIRE(j.sync());
  }
  std::string path = journal::segment_path(dir.path(), 1);
  std::vector<size_t> at = test::record_offsets(test::read_bytes(path));
  REQUIRE_EQ(at.size(), 2u);
  journal::replay_result res;
  std::string error;
  CHECK(test::replay_dir(dir.path(), res, error) == nullptr);
  bool named = error.find(path + " is corrupt at offset " + std::to_string(at[1])) != std::string::npos;
  CHECK_MESSAGE(named, error);
}

TEST_CASE("replay refuses records whose id would wrap the id counter") {
  broker b(broker_limits{}, test::counting_random());
  // Records from disk that would wrap the counter are refused.
  CHECK_FALSE(b.apply(meta(top)));
  CHECK_FALSE(b.apply(submit_record(top, "q")));
  CHECK_FALSE(b.apply(submit_record(largest + 1, "q")));
  CHECK_EQ(b.job_count(), 0u);
}

TEST_CASE("at the end of the id space submits fail cleanly instead of reusing an id") {
  broker b(broker_limits{}, test::counting_random());
  REQUIRE(b.apply(meta(largest)));
  submit_params p;
  p.queue = "q";
  p.payload = "1";
  auto first = b.submit(p, 1000);
  REQUIRE(first.j != nullptr);
  CHECK_EQ(first.j->id, largest);
  CHECK_FALSE(b.has_room(1, 0));
  p.queue = "r";
  for (int i = 0; i < 3; ++i) {
    auto again = b.submit(p, 1000);
    CHECK(again.error != op_error::none);
    CHECK(again.j == nullptr);
  }
  CHECK_EQ(b.job_count(), 1u);
  CHECK_EQ(b.find(largest)->queue->name(), "q");
  // The counter also survives a replay of the meta record a segment starts with.
  broker c(broker_limits{}, test::counting_random());
  CHECK(c.apply(b.meta_record(2000)));
  CHECK(c.submit(p, 2000).j == nullptr);
}
