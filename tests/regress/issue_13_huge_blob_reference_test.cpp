// Issue 13, attack review: the disk is untrusted input. A journal record
// whose blob reference names a length far beyond any request body (with a
// sparse file of that size, the start-up check of the file passes) made a
// GET read it back into an answer of that length: std::bad_alloc on the
// threadpool, and relay terminated. Such a record is now corruption, named
// at replay like any other impossible record.
#include <doctest/doctest.h>

#include <string>

#include "relay/journal.h"
#include "relay/queue.h"

using namespace relay;

namespace {

std::string framed_submit(uint64_t length) {
  queue::record r;
  r.type = queue::record_type::submit;
  r.id = 7;
  r.queue = "big";
  r.max_attempts = 5;
  r.lease_ms = 30000;
  r.payload_ref = {0x1234, 0, length, 0};
  std::string out;
  journal::encode(r, out);
  return out;
}

bool replays(const std::string& framed, std::string& problem) {
  journal::record_run run;
  return journal::for_each_record(framed, [](const queue::record&) { return true; }, run, problem);
}

}  // namespace

TEST_CASE("issue 13: a blob reference longer than any body relay takes is refused at replay") {
  std::string problem;
  CHECK(replays(framed_submit(journal::max_referenced_bytes), problem));
  CHECK_FALSE(replays(framed_submit(journal::max_referenced_bytes + 1), problem));
  CHECK_MESSAGE(problem.find("blob reference longer than any request body") != std::string::npos, problem);
  CHECK_FALSE(replays(framed_submit(uint64_t{1} << 40), problem));
}
