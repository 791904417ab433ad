#include <doctest/doctest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "../../support/tmpdir.h"
#include "journal/segment.h"
#include "../../support/counting_random.h"
#include "relay/journal.h"

using namespace relay;
using namespace relay::queue;

using test::counting_random;

namespace {

// A loop, a writer and a broker that journals into it.
struct journaled {
  uv_loop_t loop;
  ops::registry metrics;
  std::unique_ptr<journal::writer> w;
  std::unique_ptr<broker> b;
  principal_ref worker = nullptr;

  explicit journaled(const std::string& dir, journal::options o = {}, uint64_t first_segment = 1) {
    uv_loop_init(&loop);
    o.dir = dir;
    w = std::make_unique<journal::writer>(&loop, o, metrics);
    std::string error;
    REQUIRE_MESSAGE(w->open(first_segment, error), error);
    b = std::make_unique<broker>(broker_limits{}, counting_random(), w.get());
    worker = b->intern("w");
  }
  ~journaled() {
    w->close();
    uv_run(&loop, UV_RUN_DEFAULT);
    CHECK_EQ(uv_loop_close(&loop), 0);
  }
  // Waits (running the loop) until everything appended is durable.
  bool sync() {
    int result = -1;
    w->when_durable([&](bool ok) { result = ok ? 1 : 0; });
    for (int i = 0; i < 2000 && result < 0; ++i) uv_run(&loop, UV_RUN_ONCE);
    return result == 1;
  }
  job_id submit(const std::string& payload) {
    submit_params p;
    p.queue = "q";
    p.payload = payload;
    return b->submit(p, 1000).j->id;
  }
};

std::unique_ptr<broker> replay_dir(const std::string& dir, journal::replay_result& res, std::string& error,
                                   bool repair = false) {
  auto b = std::make_unique<broker>(broker_limits{}, counting_random());
  if (!journal::replay(dir, repair, [&](const record& r) { return b->apply(r); }, res, error)) return nullptr;
  return b;
}

std::vector<std::string> files(const std::string& dir) {
  std::vector<std::string> out;
  for (auto& e : std::filesystem::directory_iterator(dir)) out.push_back(e.path().filename());
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace

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
  CHECK_EQ(files(dir.path()), std::vector<std::string>{"segment-0000000000000002.log"});
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
