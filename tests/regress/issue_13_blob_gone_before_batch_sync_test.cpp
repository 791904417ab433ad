// Issue 13, attack review: in `batch` fsync mode the journal writer syncs
// the blob files that written records name at the periodic fsync
// (journal.batch_interval_ms, up to 60 s). A job acknowledged at write
// (batch mode) can be cancelled and forgotten (limits.result_ttl_ms, from
// 1 s) before that fsync: the broker then releases its blob file and the
// blob store deletes it. The writer's fsync of the blob files then failed
// on the missing file -- and, the list being kept for the retry, failed
// for ever: every later change was refused (503) until a restart. Any
// submitter could wedge the journal of a relay whose batch interval
// exceeds its result TTL, and a disk outage longer than the TTL did it in
// any configuration. A file deleted because nothing holds it any more has
// nothing left to make durable.
#include <doctest/doctest.h>

#include <filesystem>

#include "../support/blobs.h"
#include "../support/journaled.h"
#include "../support/tmpdir.h"
#include "relay/blob_store.h"
#include "relay/journal.h"

using namespace relay;

TEST_CASE("issue 13: a blob file deleted by GC before batch mode's periodic fsync does not wedge the journal") {
  test::tmpdir dir;
  journal::options o;
  o.fsync = journal::fsync_mode::batch;
  o.batch_interval_ms = 300;  // longer than the steps below take
  o.retry_ms = 20;
  queue::broker_limits limits;
  limits.result_ttl_ms = 1000;
  test::journaled j(dir.path(), o, 1, limits);
  std::string blobs = dir / "blobs";
  // What relay_server wires: a file nothing names is deleted.
  j.b->on_blob_unreferenced([&](uint64_t file) { std::filesystem::remove(blobs + "/" + journal::blob_store::name(file)); });

  queue::blob_ref r = test::write_blob(blobs, std::string(100000, 'z'));
  queue::submit_params p;
  p.queue = "q";
  p.payload_ref = r;
  auto s = j.b->submit(p, 1000);
  REQUIRE(s.error == queue::op_error::none);
  queue::job_id id = s.j->id;
  REQUIRE(j.sync());  // batch mode: acknowledged once written
  REQUIRE(j.b->cancel(id, 1001) == queue::op_error::none);
  REQUIRE(j.sync());
  j.b->advance(1001 + limits.result_ttl_ms);  // the result TTL forgets it
  REQUIRE_FALSE(std::filesystem::exists(blobs + "/" + journal::blob_store::name(r.file)));

  // The periodic fsync comes; the journal must go on accepting changes.
  uint64_t before = j.metrics.get_counter("relay_journal_fsyncs_total", "").value();
  CHECK(j.run_until([&] { return j.metrics.get_counter("relay_journal_fsyncs_total", "").value() > before || !j.w->accepting(); }));
  CHECK_MESSAGE(j.w->accepting(), j.w->failure());
  j.submit("{\"after\":1}", 2100);
  CHECK(j.sync());
  CHECK(j.run_until([&] { return j.w->accepting(); }));
  CHECK_MESSAGE(j.w->failure().empty(), j.w->failure());
}
