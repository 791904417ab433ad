// Issue 13 part B: values kept by reference in blob files -- the queue
// core's accounting and lifetimes, journal format 3, the writer's ordering
// of blob syncs before the records that name them, and the blob store.
#include <doctest/doctest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <set>

#include "../../support/blobs.h"
#include "../../support/counting_random.h"
#include "../../support/journaled.h"
#include "../../support/tmpdir.h"
#include "relay/blob_store.h"
#include "relay/journal.h"

using namespace relay;
using namespace relay::queue;

namespace {

blob_ref ref_of(uint64_t file, uint64_t offset, uint64_t length, uint32_t crc = 7) {
  return {file, offset, length, crc};
}

job_id submit_ref(broker& b, const blob_ref& r, time_ms now = 1000) {
  submit_params p;
  p.queue = "q";
  p.payload_ref = r;
  auto res = b.submit(p, now);
  REQUIRE(res.error == op_error::none);
  return res.j->id;
}

// Runs `loop` until `done` (at most ~10 s).
template <class Done>
bool run_until(uv_loop_t* loop, Done done, int turns = 2000) {
  uv_timer_t tick;
  uv_timer_init(loop, &tick);
  uv_timer_start(&tick, [](uv_timer_t*) {}, 5, 5);
  for (int i = 0; i < turns && !done(); ++i) uv_run(loop, UV_RUN_ONCE);
  uv_close(reinterpret_cast<uv_handle_t*>(&tick), nullptr);
  uv_run(loop, UV_RUN_NOWAIT);
  return done();
}

}  // namespace

TEST_CASE("a held value is one pointer whether inline or a reference") {
  static_assert(sizeof(held_value) == sizeof(void*));
  held_value v;
  CHECK(v.empty());
  v.assign(std::string_view("[1,2]"));
  CHECK_FALSE(v.is_ref());
  CHECK_EQ(v.size(), 5u);
  CHECK_EQ(v.view(), "[1,2]");
  blob_ref r = ref_of(0xfeedfacecafebeefULL, 1ull << 40, 256ull << 20, 0xdeadbeef);
  v.assign(r);
  CHECK(v.is_ref());
  CHECK(v.ref() == r);
  CHECK_EQ(v.size(), 256u << 20);
  CHECK(v.view().empty());  // a reference never passes for an (empty) value
  CHECK_FALSE(v == "");
}

TEST_CASE("the broker holds references: bytes counted, files released once no job names them") {
  broker_limits limits;
  limits.max_held_bytes = 3u << 20;
  limits.result_ttl_ms = 10;
  broker b(limits, test::counting_random());
  std::vector<uint64_t> released;
  b.on_blob_unreferenced([&](uint64_t f) { released.push_back(f); });
  principal_ref w = b.intern("w");
  // Two jobs share file 1 (a batch submit spools once), one has file 2.
  job_id a = submit_ref(b, ref_of(1, 0, 1u << 20));
  job_id c = submit_ref(b, ref_of(1, 1u << 20, 1u << 20));
  CHECK_EQ(b.held_bytes(), 2u << 20);
  CHECK_EQ(b.referenced_bytes(), 2u << 20);
  CHECK(b.blob_referenced(1));
  // max_held_bytes counts referenced bytes: it bounds the disk they take.
  CHECK_FALSE(b.has_room(1, (1u << 20) + 1));
  submit_params big;
  big.queue = "q";
  big.payload_ref = ref_of(3, 0, (1u << 20) + 1);
  CHECK(b.submit(big, 1000).error == op_error::queue_full);
  CHECK_FALSE(b.blob_referenced(3));

  // A lease bounded in bytes measures the reference's length.
  std::vector<job*> got;
  answer_size size{0, [](const job& j, uint32_t, time_ms, bool) { return j.payload.size(); }};
  b.lease("q", 2, (1u << 20) + 10, size, 0, w, 1000, got);
  REQUIRE_EQ(got.size(), 1u);
  CHECK_EQ(got[0]->id, a);
  CHECK(got[0]->payload.is_ref());
  // A result kept by reference.
  REQUIRE(b.complete(a, got[0]->lease, w, {}, 1001, ref_of(2, 0, 1000)) == op_error::none);
  const job* ja = b.find(a);
  REQUIRE(ja);
  CHECK_EQ(ja->state, job_state::succeeded);
  CHECK(ja->outcome.is_ref());
  CHECK_EQ(ja->outcome.ref().file, 2u);
  CHECK_EQ(b.held_bytes(), (2u << 20) + 1000);
  CHECK(released.empty());

  // The snapshot carries references, not bytes.
  record snap = b.snapshot_of(*ja);
  CHECK(snap.payload.empty());
  CHECK(snap.payload_ref == ref_of(1, 0, 1u << 20));
  CHECK(snap.text_ref == ref_of(2, 0, 1000));

  // a is forgotten after its retention: file 2 goes, file 1 stays (c).
  b.advance(1001 + 11);
  CHECK_EQ(b.find(a), nullptr);
  CHECK_EQ(released, std::vector<uint64_t>{2});
  CHECK(b.blob_referenced(1));
  REQUIRE(b.cancel(c, 2000) == op_error::none);
  b.advance(2000 + 11);
  CHECK_EQ(released, (std::vector<uint64_t>{2, 1}));
  CHECK_EQ(b.held_bytes(), 0u);
  CHECK_EQ(b.referenced_bytes(), 0u);
  CHECK_EQ(b.blob_files(), 0u);
}

TEST_CASE("a snapshot restores references; drop() forgets a job and its references") {
  broker a(broker_limits{}, test::counting_random());
  job_id id = submit_ref(a, ref_of(9, 4, 100, 0x1234));
  record snap = a.snapshot_of(*a.find(id));
  broker b(broker_limits{}, test::counting_random());
  REQUIRE(b.apply(snap));
  const job* j = b.find(id);
  REQUIRE(j);
  CHECK(j->payload.ref() == ref_of(9, 4, 100, 0x1234));
  CHECK_EQ(b.held_bytes(), 100u);
  // The same snapshot again (an interrupted compaction) upserts: counted once.
  REQUIRE(b.apply(snap));
  int seen = 0;
  b.for_each_blob_ref([&](const job& jj, const blob_ref& r) {
    ++seen;
    CHECK_EQ(jj.id, id);
    CHECK_EQ(r.file, 9u);
  });
  CHECK_EQ(seen, 1);
  CHECK(b.drop(id));
  CHECK_EQ(b.job_count(), 0u);
  CHECK_EQ(b.held_bytes(), 0u);
  CHECK_FALSE(b.blob_referenced(9));
}

TEST_CASE("format 3 records carry references; without them they are the version 2 body") {
  record r;
  r.type = record_type::snapshot;
  r.id = 77;
  r.queue = "render";
  r.state = job_state::succeeded;
  r.max_attempts = 5;
  r.payload_ref = ref_of(0x0123456789abcdefULL, 17, 1u << 30, 0xa5a5a5a5);
  r.text_ref = ref_of(0xfedcba9876543210ULL, 0, 3, 1);
  std::string out;
  journal::encode(r, out);
  std::string_view body = std::string_view(out).substr(journal::record_header_bytes);
  record d;
  REQUIRE(journal::decode(body, d, 3));
  CHECK(d.payload_ref == r.payload_ref);
  CHECK(d.text_ref == r.text_ref);
  CHECK(d.payload.empty());
  // Version 2 has no references: the same bytes are malformed there.
  CHECK_FALSE(journal::decode(body, d, 2));
  // Any truncation is refused, but the one that drops exactly the refs
  // section: that is a whole record without references (the optional tail
  // that keeps format 3 free for small jobs). The framing's checksum is
  // what catches a cut body.
  size_t refs_at = body.size() - 1 - 2 * 28;
  for (size_t cut = 0; cut < body.size(); ++cut)
    if (cut != refs_at) CHECK_FALSE(journal::decode(body.substr(0, cut), d, 3));
  REQUIRE(journal::decode(body.substr(0, refs_at), d, 3));
  CHECK_FALSE(d.payload_ref.valid());

  // Only the payload reference on a submit.
  record s;
  s.type = record_type::submit;
  s.id = 1;
  s.queue = "q";
  s.max_attempts = 5;
  s.payload_ref = ref_of(5, 0, 10);
  out.clear();
  journal::encode(s, out);
  REQUIRE(journal::decode(std::string_view(out).substr(journal::record_header_bytes), d));
  CHECK(d.payload_ref == s.payload_ref);
  CHECK_FALSE(d.text_ref.valid());

  // No references: byte for byte the version 2 body, read by both.
  record plain = s;
  plain.payload_ref = {};
  plain.payload = "{\"x\":1}";
  out.clear();
  journal::encode(plain, out);
  body = std::string_view(out).substr(journal::record_header_bytes);
  REQUIRE(journal::decode(body, d, 2));
  REQUIRE(journal::decode(body, d, 3));
  CHECK_EQ(d.payload, "{\"x\":1}");
  CHECK_FALSE(d.payload_ref.valid());

  // Malformed reference sections: an empty mask, unknown bits, a zero
  // length, a reference on a record that cannot carry one, a reference
  // beside inline bytes.
  auto with_tail = [&](record base, std::string tail) {
    std::string o;
    journal::encode(base, o);
    std::string b2 = o.substr(journal::record_header_bytes) + tail;
    record x;
    return journal::decode(b2, x, 3);
  };
  std::string zero_ref(28, '\0');
  CHECK_FALSE(with_tail(plain, std::string(1, '\0')));
  CHECK_FALSE(with_tail(plain, std::string(1, '\x04') + zero_ref));
  record nopay = plain;
  nopay.payload = {};
  std::string len0 = std::string(1, '\x01') + zero_ref;
  CHECK_FALSE(with_tail(nopay, len0));
  std::string ok_ref = std::string(1, '\x01') + std::string(16, '\0') + std::string(1, '\x05') + std::string(11, '\0');
  CHECK(with_tail(nopay, ok_ref));
  CHECK_FALSE(with_tail(plain, ok_ref));  // inline payload and a reference
  record lease = nopay;
  lease.type = record_type::lease;
  CHECK_FALSE(with_tail(lease, ok_ref));
}

TEST_CASE("a journal with references replays them; version 2 segments still replay") {
  test::tmpdir dir;
  blob_ref pref = ref_of(11, 0, 5000, 3), rref = ref_of(12, 100, 7, 4);
  job_id a, c;
  {
    // fsync off: these references name no real file (the writer would
    // refuse to write them in always mode; see the next case).
    journal::options o;
    o.fsync = journal::fsync_mode::off;
    test::journaled j(dir.path(), o);
    a = submit_ref(*j.b, pref);
    c = j.submit("\"inline\"");
    std::vector<job*> got;
    j.b->lease("q", 1, 60000, j.worker, 1000, got);
    REQUIRE_EQ(got.size(), 1u);
    REQUIRE(j.b->complete(a, got[0]->lease, j.worker, {}, 1001, rref) == op_error::none);
    REQUIRE(j.sync());
  }
  journal::replay_result res;
  std::string error;
  auto b = test::replay_dir(dir.path(), res, error);
  REQUIRE_MESSAGE(b, error);
  const job* ja = b->find(a);
  REQUIRE(ja);
  CHECK(ja->payload.ref() == pref);
  CHECK(ja->outcome.ref() == rref);
  CHECK_EQ(b->find(c)->payload.view(), "\"inline\"");

  // A segment whose header says version 2 and whose records have no
  // references replays as before.
  test::tmpdir dir2;
  {
    test::journaled j(dir2.path());
    j.submit("{\"v\":2}");
    REQUIRE(j.sync());
  }
  std::string path = journal::segment_path(dir2.path(), 1);
  std::string data = test::read_bytes(path);
  CHECK_EQ(data[4], 3);
  data[4] = 2;
  test::write_bytes(path, data);
  auto b2 = test::replay_dir(dir2.path(), res, error);
  REQUIRE_MESSAGE(b2, error);
  CHECK_EQ(b2->job_count(), 1u);
  // But a version 2 segment cannot hold a reference.
  std::string refs = test::read_bytes(journal::segment_path(dir.path(), 1));
  refs[4] = 2;
  test::write_bytes(journal::segment_path(dir.path(), 1), refs);
  CHECK_FALSE(test::replay_dir(dir.path(), res, error));
  CHECK_NE(error.find("does not decode"), std::string::npos);
}

TEST_CASE("in always mode a batch naming a new blob file is written only after that file is synced") {
  test::tmpdir dir;
  journal::options o;
  o.fsync = journal::fsync_mode::always;
  o.retry_ms = 20;
  std::atomic<int> blob_syncs{0}, fail_blob_sync{0};
  o.fault = [&](std::string_view op) {
    if (op == "blob_sync") {
      ++blob_syncs;
      if (fail_blob_sync > 0) return EIO;
    }
    return 0;
  };
  test::journaled j(dir.path(), o);
  blob_ref r = test::write_blob(dir / "blobs", std::string(1000, 'x'));
  fail_blob_sync = 1;
  submit_ref(*j.b, r);
  // The sync fails: nothing acknowledged, and the record is not written.
  CHECK_FALSE(j.sync());
  size_t header_only = journal::segment_header_bytes;
  auto segment_records = [&] {
    return test::record_offsets(test::read_bytes(journal::segment_path(dir.path(), 1))).size();
  };
  CHECK_LE(test::read_bytes(journal::segment_path(dir.path(), 1)).size(), header_only);
  fail_blob_sync = 0;
  REQUIRE(j.recover());
  CHECK(j.sync());
  CHECK_EQ(segment_records(), 1u);
  CHECK_GE(blob_syncs.load(), 2);
  // A missing file fails the sync the same way (its name is in the error).
  blob_ref gone = ref_of(0x42, 0, 10);
  submit_ref(*j.b, gone);
  CHECK_FALSE(j.sync());
  CHECK_NE(j.w->failure().find(journal::blob_store::name(0x42)), std::string::npos);
}

TEST_CASE("in batch mode the blob files a batch names are synced at the periodic fsync, before the segment") {
  test::tmpdir dir;
  journal::options o;
  o.fsync = journal::fsync_mode::batch;
  o.batch_interval_ms = 20;
  std::atomic<int> blob_syncs{0}, segment_syncs_after{0};
  o.fault = [&](std::string_view op) {
    if (op == "blob_sync") ++blob_syncs;
    if (op == "fsync" && blob_syncs > 0) ++segment_syncs_after;
    return 0;
  };
  test::journaled j(dir.path(), o);
  blob_ref r = test::write_blob(dir / "blobs", std::string(100, 'y'));
  submit_ref(*j.b, r);
  CHECK(j.sync());  // batch mode: at once
  REQUIRE(j.run_until([&] { return segment_syncs_after > 0; }));
  CHECK_EQ(blob_syncs.load(), 1);
}

TEST_CASE("the blob store reads values back checked, bounds what it holds, and deletes what nothing pins") {
  test::tmpdir dir;
  uv_loop_t loop;
  uv_loop_init(&loop);
  ops::registry metrics;
  {
    std::string blobs = dir / "blobs";
    std::string v1 = test::random_json_string(300000, 1), v2 = "{\"k\":[1,2,3]}";
    auto refs = test::write_blob(blobs, {v1, v2});
    journal::blob_store store(&loop, blobs, 100000, metrics);
    CHECK(store.check(refs[1]).empty());
    CHECK_NE(store.check(ref_of(refs[1].file, refs[1].offset, refs[1].length + 1)).find("holds"), std::string::npos);
    CHECK_NE(store.check(ref_of(0x77, 0, 1)).find("No such file"), std::string::npos);

    // Two values into one answer, in place.
    journal::answer_template t;
    t.text = "{\"a\":";
    t.hole(refs[0]);
    t.text += ",\"b\":";
    t.hole(refs[1]);
    t.text += "}";
    std::string got, err;
    bool done = false;
    journal::blob_store::reservation held;
    store.fill(std::move(t), [&](std::string body, std::string e, journal::blob_store::reservation h) {
      got = std::move(body);
      err = std::move(e);
      held = std::move(h);
      done = true;
    });
    CHECK_FALSE(done);  // never inside fill()
    REQUIRE(run_until(&loop, [&] { return done; }));
    CHECK_EQ(err, "");
    CHECK(got == "{\"a\":" + v1 + ",\"b\":" + v2 + "}");
    // The bound: one answer is always allowed, even above it; the next
    // waits until the first is answered (its reservation dropped).
    CHECK_EQ(store.reading_bytes(), got.size());
    bool second = false;
    journal::answer_template t2;
    t2.hole(refs[1]);
    store.fill(std::move(t2), [&](std::string body, std::string e, journal::blob_store::reservation) {
      CHECK_EQ(body, v2);
      CHECK_EQ(e, "");
      second = true;
    });
    CHECK_EQ(store.waiting(), 1u);
    run_until(&loop, [&] { return second; }, 40);
    CHECK_FALSE(second);
    held = {};
    REQUIRE(run_until(&loop, [&] { return second; }));
    CHECK_EQ(store.reading_bytes(), 0u);

    // A flipped byte: an error naming the file, never the wrong bytes.
    {
      std::string path = store.path(refs[0].file);
      std::string data = test::read_bytes(path);
      data[12345] ^= 1;
      test::write_bytes(path, data);
    }
    journal::answer_template t3;
    t3.hole(refs[0]);
    done = false;
    store.fill(std::move(t3), [&](std::string body, std::string e, journal::blob_store::reservation) {
      got = std::move(body);
      err = std::move(e);
      done = true;
    });
    REQUIRE(run_until(&loop, [&] { return done; }));
    CHECK(got.empty());
    CHECK_NE(err.find(journal::blob_store::name(refs[0].file)), std::string::npos);
    CHECK_NE(err.find("checksum"), std::string::npos);

    // Released while a read pins it: deleted only after the read.
    journal::answer_template t4;
    t4.hole(refs[1]);
    done = false;
    store.fill(std::move(t4), [&](std::string, std::string, journal::blob_store::reservation) { done = true; });
    store.release(refs[1].file);
    CHECK(std::filesystem::exists(store.path(refs[1].file)));
    REQUIRE(run_until(&loop, [&] { return done && !std::filesystem::exists(store.path(refs[1].file)); }));

    // The sweep deletes blob-named files nothing references, nothing else.
    blob_ref keep = test::write_blob(blobs, "1");
    blob_ref orphan = test::write_blob(blobs, "2");
    test::write_bytes(blobs + "/README", "not a blob");
    CHECK_EQ(store.sweep([&](uint64_t f) { return f == keep.file; }), 1u);
    CHECK(std::filesystem::exists(store.path(keep.file)));
    CHECK_FALSE(std::filesystem::exists(store.path(orphan.file)));
    CHECK(std::filesystem::exists(blobs + "/README"));
    store.close();
  }
  uv_run(&loop, UV_RUN_DEFAULT);
  CHECK_EQ(uv_loop_close(&loop), 0);
}

TEST_CASE("the test spool helper builds what the upload path hands over") {
  test::tmpdir dir;
  auto s = test::make_spool(dir / "blobs", {{0, "payload", "\"aaaa\""}, {1, "payload", "[1]"}});
  CHECK_EQ(s->values.size(), 2u);
  CHECK_EQ(s->values[1].offset, 6u);
  CHECK_EQ(s->bytes, 9u);
  CHECK_EQ(test::read_bytes(s->path()), "\"aaaa\"[1]");
  std::string p = s->path();
  s.reset();  // not kept: removed
  CHECK_FALSE(std::filesystem::exists(p));
}
