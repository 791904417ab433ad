#include <doctest/doctest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "../../support/journaled.h"
#include "../../support/tmpdir.h"
#include "journal/segment.h"
#include "../../support/counting_random.h"
#include "relay/journal.h"

using namespace relay;
using namespace relay::queue;

using test::counting_random;

using test::files;
using test::journaled;
using test::replay_dir;

TEST_CASE("CRC32C matches the standard check value") {
  CHECK_EQ(journal::crc32c("123456789", 9), 0xE3069283u);
  CHECK_EQ(journal::crc32c("", 0), 0u);
}

TEST_CASE("records survive encoding byte for byte") {
  record r;
  r.type = record_type::snapshot;
  r.id = 0x0123456789abcdefULL;
  r.at = -5;
  r.due = 1795000000000;
  r.created = 42;
  r.priority = 9;
  r.state = job_state::leased;
  r.max_attempts = 1000;
  r.attempts = 7;
  r.lease_ms = 86400000;
  for (size_t i = 0; i < 16; ++i) r.lease.bytes[i] = static_cast<uint8_t>(255 - i);
  std::string payload = "{\"x\":\"\\u00e9\"}" + std::string(1, '\0') + "tail";
  r.queue = "render";
  r.owner = "spiffe://x";
  r.idempotency_key = "k";
  r.payload = payload;
  r.text = "";
  std::string out;
  journal::encode(r, out);
  record d;
  REQUIRE(journal::decode(std::string_view(out).substr(journal::record_header_bytes), d));
  CHECK_EQ(d.id, r.id);
  CHECK_EQ(d.at, r.at);
  CHECK_EQ(d.due, r.due);
  CHECK_EQ(d.state, r.state);
  CHECK_EQ(d.attempts, 7);
  CHECK(d.lease.equals(r.lease));
  CHECK_EQ(d.payload, payload);
  CHECK_EQ(d.owner, "spiffe://x");
  // Any truncation of the body is refused.
  for (size_t cut = journal::record_header_bytes; cut < out.size(); ++cut)
    CHECK_FALSE(journal::decode(std::string_view(out).substr(journal::record_header_bytes, cut - journal::record_header_bytes), d));
}

TEST_CASE("what the writer wrote replays into the same state") {
  test::tmpdir dir;
  job_id a, c;
  lease_token held;
  {
    journaled j(dir.path());
    a = j.submit("{\"n\":1}");
    job_id b2 = j.submit("[2]");
    c = j.submit("\"three\"");
    std::vector<job*> got;
    j.b->lease("q", 2, 60000, j.worker, 1000, got);
    held = got[1]->lease;
    j.b->complete(a, got[0]->lease, j.worker, "{\"ok\":true}", 1001);
    j.b->cancel(c, 1002);
    REQUIRE(j.sync());
    CHECK_EQ(j.metrics.render().find("relay_journal_records_total 7") != std::string::npos, true);
    (void)b2;
  }
  journal::replay_result res;
  std::string error;
  auto b = replay_dir(dir.path(), res, error);
  REQUIRE_MESSAGE(b, error);
  CHECK_EQ(res.records, 7u);
  CHECK_EQ(res.skipped, 0u);
  CHECK_FALSE(res.truncated);
  CHECK_EQ(b->find(a)->state, job_state::succeeded);
  CHECK_EQ(b->find(a)->outcome, "{\"ok\":true}");
  CHECK_EQ(b->find(c)->state, job_state::cancelled);
  CHECK_EQ(b->find(a + 1)->state, job_state::leased);
  CHECK(b->find(a + 1)->lease.equals(held));
  CHECK_EQ(res.next_segment, 2u);
}

TEST_CASE("a torn tail is cut at every byte offset, keeping every earlier record") {
  test::tmpdir dir;
  std::vector<size_t> ends;  // file size after each record
  {
    journaled j(dir.path());
    for (int i = 0; i < 6; ++i) {
      j.submit("{\"i\":" + std::to_string(i) + ",\"pad\":\"" + std::string(static_cast<size_t>(i) * 7, 'x') + "\"}");
      REQUIRE(j.sync());
      ends.push_back(static_cast<size_t>(std::filesystem::file_size(journal::segment_path(dir.path(), 1))));
    }
  }
  std::string full;
  {
    std::ifstream in(journal::segment_path(dir.path(), 1), std::ios::binary);
    full.assign(std::istreambuf_iterator<char>(in), {});
  }
  // Every offset inside the last three records.
  for (size_t cut = ends[2]; cut < full.size(); ++cut) {
    test::tmpdir copy;
    std::ofstream(journal::segment_path(copy.path(), 1), std::ios::binary) << full.substr(0, cut);
    journal::replay_result res;
    std::string error;
    auto b = replay_dir(copy.path(), res, error);
    REQUIRE_MESSAGE(b, error);
    size_t complete = static_cast<size_t>(std::count_if(ends.begin(), ends.end(), [&](size_t e) { return e <= cut; }));
    CHECK_EQ(b->job_count(), complete);
    CHECK_EQ(res.truncated, cut != ends[complete - 1]);
    // The file was cut back to its last whole record.
    CHECK_EQ(std::filesystem::file_size(journal::segment_path(copy.path(), 1)), ends[complete - 1]);
  }
}

TEST_CASE("a flipped bit before the tail stops replay, naming the place; repair cuts there") {
  test::tmpdir dir;
  {
    journaled j(dir.path());
    for (int i = 0; i < 5; ++i) j.submit("\"" + std::string(40, static_cast<char>('a' + i)) + "\"");
    REQUIRE(j.sync());
  }
  std::string path = journal::segment_path(dir.path(), 1);
  std::string data;
  {
    std::ifstream in(path, std::ios::binary);
    data.assign(std::istreambuf_iterator<char>(in), {});
  }
  size_t victim = data.find("ccccc");
  REQUIRE(victim != std::string::npos);
  data[victim + 3] ^= 0x10;
  std::ofstream(path, std::ios::binary | std::ios::trunc) << data;

  journal::replay_result res;
  std::string error;
  CHECK(replay_dir(dir.path(), res, error) == nullptr);
  bool named = error.find(path + " is corrupt at offset ") != std::string::npos;
  CHECK_MESSAGE(named, error);
  CHECK(error.find("--repair-journal") != std::string::npos);

  auto repaired = replay_dir(dir.path(), res, error, true);
  REQUIRE_MESSAGE(repaired, error);
  CHECK_EQ(repaired->job_count(), 2u);
  CHECK(res.note.find("repaired") == 0);
}

TEST_CASE("a failing disk: nothing is acknowledged, changes are refused, and writing resumes by itself") {
  test::tmpdir dir;
  auto fail_writes = std::make_shared<std::atomic<int>>(0);
  journal::options o;
  o.retry_ms = 20;
  o.fault = [fail_writes](std::string_view op) { return fail_writes->load() && op == "fsync" ? ENOSPC : 0; };
  job_id before, during;
  {
    journaled j(dir.path(), o);
    before = j.submit("1");
    REQUIRE(j.sync());
    fail_writes->store(1);
    during = j.submit("2");
    CHECK_FALSE(j.sync());        // no false acknowledgement
    CHECK_FALSE(j.w->accepting());  // the API answers 503 meanwhile
    CHECK(j.w->failure().find("fsync") != std::string::npos);
    CHECK(j.metrics.render().find("relay_journal_failing 1") != std::string::npos);
    fail_writes->store(0);
    bool recovered = false;
    for (int i = 0; i < 2000 && !recovered; ++i) {
      uv_run(&j.loop, UV_RUN_ONCE);
      recovered = j.w->accepting();
    }
    REQUIRE(recovered);
    j.submit("3");
    CHECK(j.sync());
  }
  journal::replay_result res;
  std::string error;
  auto b = replay_dir(dir.path(), res, error);
  REQUIRE_MESSAGE(b, error);
  // The change made while failing was written by the retry, exactly once.
  CHECK_EQ(b->job_count(), 3u);
  CHECK_EQ(res.skipped, 0u);
  CHECK(b->find(before));
  CHECK(b->find(during));
}

TEST_CASE("rolling to a new segment and deleting the old ones") {
  test::tmpdir dir;
  {
    journaled j(dir.path());
    j.submit("1");
    REQUIRE(j.sync());
    uint64_t next = j.w->roll();
    CHECK_EQ(next, 2u);
    CHECK(j.b->apply(j.b->meta_record(2000)));
    j.w->append(j.b->meta_record(2000));
    for (job_id id : j.b->job_ids()) j.w->append(j.b->snapshot_of(*j.b->find(id)));
    j.w->delete_before(next);
    REQUIRE(j.sync());
    j.submit("2");
    REQUIRE(j.sync());
    CHECK_EQ(j.w->segments(), 1u);
  }
  CHECK_EQ(files(dir.path()), (std::vector<std::string>{"LOCK", "segment-0000000000000002.log"}));
  journal::replay_result res;
  std::string error;
  auto b = replay_dir(dir.path(), res, error);
  REQUIRE_MESSAGE(b, error);
  CHECK_EQ(b->job_count(), 2u);
  CHECK_EQ(res.next_segment, 3u);
}

TEST_CASE("a segment that is not a journal is refused by name") {
  test::tmpdir dir;
  std::ofstream(journal::segment_path(dir.path(), 3), std::ios::binary) << "this is not a journal at all";
  journal::replay_result res;
  std::string error;
  CHECK(replay_dir(dir.path(), res, error) == nullptr);
  CHECK(error.find("segment-0000000000000003.log: not a relay journal segment") != std::string::npos);
}

namespace {

// Five acknowledged submits in segment 1 of `dir`; returns the segment's bytes.
std::string five_jobs(const std::string& dir) {
  {
    journaled j(dir);
    for (int i = 0; i < 5; ++i) j.submit("\"" + std::string(20 + static_cast<size_t>(i), static_cast<char>('a' + i)) + "\"");
    REQUIRE(j.sync());
  }
  return test::read_bytes(journal::segment_path(dir, 1));
}

// Rewrites version-2 segment bytes as version 1: the same bodies, framed by
// length and body checksum only.
std::string as_version_1(const std::string& v2) {
  std::string out = v2.substr(0, journal::segment_header_bytes);
  out[4] = 1;
  for (size_t at : test::record_offsets(v2)) {
    out.append(v2, at, 8);  // length, body checksum
    uint32_t len = 0;
    for (int i = 0; i < 4; ++i) len |= static_cast<uint32_t>(static_cast<uint8_t>(v2[at + static_cast<size_t>(i)])) << (8 * i);
    out.append(v2, at + journal::record_header_bytes, len);
  }
  return out;
}

bool refused_at(const std::string& dir, const std::string& path, size_t offset, std::string& error) {
  journal::replay_result res;
  bool refused = replay_dir(dir, res, error) == nullptr;
  return refused && error.find(path + " is corrupt at offset " + std::to_string(offset) + " ") != std::string::npos;
}

}  // namespace

TEST_CASE("every flipped bit of every record header is corruption, the last record's too") {
  test::tmpdir dir;
  std::string data = five_jobs(dir.path());
  std::string path = journal::segment_path(dir.path(), 1);
  std::vector<size_t> at = test::record_offsets(data);
  REQUIRE_EQ(at.size(), 5u);
  for (size_t r = 0; r < at.size(); ++r) {
    for (size_t bit = 0; bit < 8 * journal::record_header_bytes; ++bit) {
      std::string bad = data;
      bad[at[r] + bit / 8] = static_cast<char>(bad[at[r] + bit / 8] ^ (1 << (bit % 8)));
      test::write_bytes(path, bad);
      std::string error;
      CHECK_MESSAGE(refused_at(dir.path(), path, at[r], error), "record " << r << " bit " << bit << ": " << error);
      CHECK_EQ(test::read_bytes(path), bad);  // nothing cut without --repair-journal
    }
  }
}

TEST_CASE("a zero-filled tail after the last whole record is torn; zeros with records after them are corruption") {
  test::tmpdir dir;
  std::string data = five_jobs(dir.path());
  std::string path = journal::segment_path(dir.path(), 1);
  std::vector<size_t> at = test::record_offsets(data);
  // The file grew but its last blocks never reached the disk.
  test::write_bytes(path, data + std::string(300, '\0'));
  journal::replay_result res;
  std::string error;
  auto b = replay_dir(dir.path(), res, error);
  REQUIRE_MESSAGE(b, error);
  CHECK_EQ(b->job_count(), 5u);
  CHECK(res.truncated);
  CHECK_EQ(std::filesystem::file_size(path), data.size());
  // The last record's body zeroed, zeros after it: torn as well.
  std::string zeroed = data.substr(0, at[4] + journal::record_header_bytes) +
                       std::string(data.size() - at[4] - journal::record_header_bytes + 50, '\0');
  test::write_bytes(path, zeroed);
  b = replay_dir(dir.path(), res, error);
  REQUIRE_MESSAGE(b, error);
  CHECK_EQ(b->job_count(), 4u);
  CHECK_EQ(std::filesystem::file_size(path), at[4]);
  // Zeros where the 3rd record was, whole records after them: corruption.
  std::string holed = data;
  std::fill(holed.begin() + static_cast<std::ptrdiff_t>(at[2]), holed.begin() + static_cast<std::ptrdiff_t>(at[3]), '\0');
  test::write_bytes(path, holed);
  CHECK_MESSAGE(refused_at(dir.path(), path, at[2], error), error);
}

TEST_CASE("only the newest segment may have a torn tail; an older one cut short is corruption") {
  test::tmpdir dir;
  std::string data = five_jobs(dir.path());
  std::string first = journal::segment_path(dir.path(), 1);
  std::vector<size_t> at = test::record_offsets(data);
  {
    journaled j(dir.path(), {}, 2);
    j.submit("\"newer\"");
    REQUIRE(j.sync());
  }
  for (size_t cut : {at[4] + 3, at[4] + journal::record_header_bytes + 2, data.size() - 1}) {
    test::write_bytes(first, data.substr(0, cut));
    std::string error;
    CHECK_MESSAGE(refused_at(dir.path(), first, at[4], error), "cut at " << cut << ": " << error);
    CHECK(error.find("1 later segment(s)") != std::string::npos);
    CHECK_EQ(std::filesystem::file_size(first), cut);
  }
  // An older segment whose header is cut short.
  test::write_bytes(first, data.substr(0, 9));
  std::string error;
  CHECK_MESSAGE(refused_at(dir.path(), first, 0, error), error);
}

TEST_CASE("version 1 segments still replay; their torn tail is cut, a length above the maximum is corruption") {
  test::tmpdir dir;
  std::string v1 = as_version_1(five_jobs(dir.path()));
  std::string path = journal::segment_path(dir.path(), 1);
  test::write_bytes(path, v1);
  journal::replay_result res;
  std::string error;
  auto b = replay_dir(dir.path(), res, error);
  REQUIRE_MESSAGE(b, error);
  CHECK_EQ(b->job_count(), 5u);
  CHECK_FALSE(res.truncated);

  // Torn at every offset of its last record.
  std::vector<size_t> at;
  for (size_t pos = journal::segment_header_bytes; pos < v1.size();) {
    at.push_back(pos);
    uint32_t len = 0;
    for (int i = 0; i < 4; ++i) len |= static_cast<uint32_t>(static_cast<uint8_t>(v1[pos + static_cast<size_t>(i)])) << (8 * i);
    pos += journal::record_header_bytes_v1 + len;
  }
  REQUIRE_EQ(at.size(), 5u);
  for (size_t cut = at[4] + 1; cut < v1.size(); ++cut) {
    test::write_bytes(path, v1.substr(0, cut));
    b = replay_dir(dir.path(), res, error);
    REQUIRE_MESSAGE(b, error);
    CHECK_EQ(b->job_count(), 4u);
    CHECK(res.truncated);
    CHECK_EQ(std::filesystem::file_size(path), at[4]);
  }
  // The high bit of a middle record's length: no writer made that length.
  std::string bad = v1;
  bad[at[2] + 3] = static_cast<char>(bad[at[2] + 3] | 0x80);
  test::write_bytes(path, bad);
  CHECK_MESSAGE(refused_at(dir.path(), path, at[2], error), error);
  CHECK_EQ(test::read_bytes(path), bad);

  // After an upgrade the writer goes on in a version-2 segment.
  test::write_bytes(path, v1);
  b = replay_dir(dir.path(), res, error);
  REQUIRE_MESSAGE(b, error);
  {
    journaled j(dir.path(), {}, res.next_segment);
    j.b = std::move(b);
    j.b->set_sink(j.w.get());
    j.submit("\"after upgrade\"");
    REQUIRE(j.sync());
  }
  b = replay_dir(dir.path(), res, error);
  REQUIRE_MESSAGE(b, error);
  CHECK_EQ(b->job_count(), 6u);
  CHECK_EQ(test::read_bytes(journal::segment_path(dir.path(), 2)).substr(4, 1),
           std::string(1, static_cast<char>(journal::format_version)));
}

TEST_CASE("a failed fsync whose cut fails too writes every record exactly once after recovery") {
  test::tmpdir dir;
  auto broken = std::make_shared<std::atomic<bool>>(false);
  journal::options o;
  o.retry_ms = 10;
  o.fault = [broken](std::string_view op) { return broken->load() && (op == "fsync" || op == "truncate") ? EIO : 0; };
  std::vector<job_id> ids;
  {
    journaled j(dir.path(), o);
    ids.push_back(j.submit("1"));
    REQUIRE(j.sync());
    broken->store(true);
    ids.push_back(j.submit("2"));
    CHECK_FALSE(j.sync());
    CHECK(j.w->failure().find("truncate") != std::string::npos);
    broken->store(false);
    REQUIRE(j.recover());
    ids.push_back(j.submit("3"));
    REQUIRE(j.sync());
  }
  journal::replay_result res;
  std::string error;
  auto b = replay_dir(dir.path(), res, error);
  REQUIRE_MESSAGE(b, error);
  CHECK_EQ(res.skipped, 0u);
  CHECK_EQ(res.records, 3u);
  for (job_id id : ids) CHECK(b->find(id));
}

TEST_CASE("a journal directory is locked by one writer at a time, naming the holder's pid") {
  test::tmpdir dir;
  journal::dir_lock first;
  std::string error;
  REQUIRE_MESSAGE(first.acquire(dir.path(), error), error);
  CHECK_EQ(test::read_bytes(dir / "LOCK"), std::to_string(getpid()) + "\n");
  ops::registry metrics;
  uv_loop_t loop;
  uv_loop_init(&loop);
  {
    journal::options o;
    o.dir = dir.path();
    journal::writer w(&loop, o, metrics);
    CHECK_FALSE(w.lock(error));
    CHECK_MESSAGE(error.find("in use by another relay (pid " + std::to_string(getpid()) + ",") != std::string::npos, error);
    CHECK_FALSE(w.open(1, error));  // open() takes the lock as well
    CHECK(journal::list_segments(dir.path()).empty());
  }
  CHECK_EQ(uv_loop_close(&loop), 0);
  // A directory that cannot be created names the key.
  journal::dir_lock other;
  CHECK_FALSE(other.acquire(dir / "LOCK/sub", error));
  CHECK(error.rfind("journal.dir ", 0) == 0);
}
