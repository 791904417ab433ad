// Issue 9, found by the attack review: segment file names were parsed with
// sscanf("%16llu"), which takes signs and spaces, so "segment-+000000000000001.log"
// beside "segment-0000000000000001.log" was segment 1 twice (its records
// replayed twice), and "segment--000000000000001.log" was segment 2^64-1;
// and nothing compared a segment's header with its name, so a renamed or
// copied segment replayed its records out of order. A segment is named
// exactly as relay writes it, and its header must agree.
#include <doctest/doctest.h>

#include <filesystem>

#include "../support/journaled.h"
#include "../support/relay_fixture.h"

using namespace relay;

namespace {

// One segment holding `n` acknowledged submits.
std::vector<queue::job_id> fill(const std::string& dir, int n) {
  std::vector<queue::job_id> ids;
  test::journaled j(dir);
  for (int i = 0; i < n; ++i) ids.push_back(j.submit(std::to_string(i)));
  REQUIRE(j.sync());
  return ids;
}

}  // namespace

TEST_CASE("names that sscanf would read as a segment number are not segments") {
  test::tmpdir dir;
  auto ids = fill(dir.path(), 3);
  std::string one = journal::segment_path(dir.path(), 1);
  for (const char* alias : {"segment-+000000000000001.log", "segment- 000000000000001.log",
                            "segment--000000000000001.log", "segment-00000000000000x1.log"})
    std::filesystem::copy_file(one, dir / alias);
  CHECK_EQ(journal::list_segments(dir.path()), std::vector<uint64_t>{1});

  journal::replay_result res;
  std::string error;
  auto broker = test::replay_dir(dir.path(), res, error);
  REQUIRE_MESSAGE(broker, error);
  CHECK_EQ(broker->job_count(), ids.size());
  CHECK_EQ(res.segments, 1u);
}

TEST_CASE("a segment whose header disagrees with its name is refused, naming both") {
  test::tmpdir dir;
  fill(dir.path(), 3);
  std::string one = journal::segment_path(dir.path(), 1), seven = journal::segment_path(dir.path(), 7);
  std::filesystem::copy_file(one, seven);
  journal::replay_result res;
  std::string error;
  CHECK(test::replay_dir(dir.path(), res, error) == nullptr);
  CHECK_MESSAGE(error.find(seven + ": the segment header says it is segment 1, its name says 7") != std::string::npos,
                error);
}
