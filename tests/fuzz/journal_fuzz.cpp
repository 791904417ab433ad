// The journal codec (decode, encode) and replay over arbitrary segment files,
// replayed into a fresh broker as relay does at start-up.
//
// Input: [mode byte] [rest]. Mode bits 0-1: 1 to 3 segments (3 also for 3);
// bit 2: replay with repair (--repair-journal); bit 3: structured.
//   raw:        [u16 cut]×(segments-1) then bytes cut into the segment files
//               segment 1, 2, 3 (written verbatim: headers, lengths and
//               checksums as the input has them).
//   structured: chunks [u8 kind] [u16 length] [bytes]; kind 0: a record body,
//               kept if decode() takes it and then written through encode()
//               (so that well-formed records with any field values reach the
//               broker); 1: bytes appended verbatim (torn or corrupt data);
//               2: start the next segment with a proper header.
//
// Invariants: decode() → encode() → decode() gives back the same bytes;
// replay never crashes, and replaying what a successful replay left behind
// succeeds, cuts nothing more and rebuilds the same jobs; the broker then
// takes time passing, snapshots every job and hands out a fresh id.
#include <dirent.h>
#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

#include <cstring>
#include <set>
#include <string>
#include <vector>

#include "../support/counting_random.h"
#include "fuzz_input.h"
#include "journal/segment.h"
#include "relay/journal.h"

using namespace relay;
using namespace relay::queue;

namespace {

void clear_dir(const std::string& d);

// A scratch directory for the segments, made once and removed at exit.
struct scratch {
  std::string path;
  scratch() {
    // TMPDIR first: ci/fuzz points it at a directory it removes, which also
    // catches what a crashed run (no destructors) leaves behind.
    const char* base = getenv("TMPDIR");
    if (!base || !*base) base = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp";
    path = std::string(base) + "/relay-journal-fuzz-XXXXXX";
    if (!mkdtemp(path.data())) std::abort();
  }
  ~scratch() {
    clear_dir(path);
    rmdir(path.c_str());
  }
};

const std::string& dir() {
  static scratch s;
  return s.path;
}

void clear_dir(const std::string& d) {
  DIR* dp = opendir(d.c_str());
  if (!dp) std::abort();
  while (dirent* e = readdir(dp))
    if (e->d_name[0] != '.') unlink((d + "/" + e->d_name).c_str());
  closedir(dp);
}

void write_file(const std::string& path, std::string_view bytes) {
  int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
  if (fd < 0) std::abort();
  size_t off = 0;
  while (off < bytes.size()) {
    ssize_t n = write(fd, bytes.data() + off, bytes.size() - off);
    if (n <= 0) std::abort();
    off += static_cast<size_t>(n);
  }
  close(fd);
}

// decode() → encode() → decode() → encode() must be stable.
void check_round_trip(const record& r) {
  std::string once;
  journal::encode(r, once);
  FUZZ_CHECK(once.size() >= journal::record_header_bytes);
  record again;
  FUZZ_CHECK(journal::decode(std::string_view(once).substr(journal::record_header_bytes), again));
  std::string twice;
  journal::encode(again, twice);
  FUZZ_CHECK(once == twice);
}

struct replayed {
  bool ok = false;
  journal::replay_result result;
  std::string state;  // every job's snapshot record, encoded, in id order
};

replayed replay_once(bool repair) {
  replayed out;
  broker b(broker_limits{}, test::counting_random());
  std::string error;
  out.ok = journal::replay(dir(), repair, [&](const record& r) { return b.apply(r); }, out.result, error);
  if (!out.ok) {
    FUZZ_CHECK(!error.empty());
    return out;
  }
  FUZZ_CHECK(out.result.skipped <= out.result.records);
  // Blob references (format 3): every one counted once per held value, and
  // their bytes part of what is held.
  size_t refs = 0;
  std::set<uint64_t> files;
  b.for_each_blob_ref([&](const job&, const blob_ref& r) {
    ++refs;
    files.insert(r.file);
    FUZZ_CHECK(r.valid());
  });
  FUZZ_CHECK(files.size() == b.blob_files());
  FUZZ_CHECK(b.referenced_bytes() <= b.held_bytes());
  std::vector<job_id> ids = b.job_ids();
  std::sort(ids.begin(), ids.end());
  for (job_id id : ids) {
    const job* j = b.find(id);
    FUZZ_CHECK(j != nullptr);
    record s = b.snapshot_of(*j);
    check_round_trip(s);
    journal::encode(s, out.state);
  }
  check_round_trip(b.meta_record(0));
  // Time passes: delayed jobs become ready, leases expire, results go.
  std::set<uint64_t> released;
  b.on_blob_unreferenced([&](uint64_t f) {
    FUZZ_CHECK(released.insert(f).second);  // once per file
    FUZZ_CHECK(files.count(f) == 1);
  });
  for (time_ms now : {time_ms{0}, time_ms{1} << 40, time_ms{1} << 62}) b.advance(now);
  for (uint64_t f : released) FUZZ_CHECK(!b.blob_referenced(f));
  (void)refs;
  // A new job gets an id no job still held has.
  std::vector<job_id> before = b.job_ids();
  submit_params p;
  p.queue = "fuzz";
  p.payload = "{}";
  submit_result s = b.submit(p, time_ms{1} << 62);
  if (s.error == op_error::none && s.created) {
    FUZZ_CHECK(s.j != nullptr);
    FUZZ_CHECK(std::find(before.begin(), before.end(), s.j->id) == before.end());
    FUZZ_CHECK(b.job_count() == before.size() + 1);
  }
  return out;
}

void write_structured(std::string_view rest, size_t max_segments) {
  fuzz::input in(reinterpret_cast<const uint8_t*>(rest.data()), rest.size());
  uint64_t number = 1;
  std::string seg;
  journal::write_segment_header(seg, number);
  while (!in.rest().empty()) {
    uint8_t kind = in.byte() % 3;
    size_t len = std::min<size_t>(in.u16(), in.rest().size());
    std::string_view bytes = in.rest().substr(0, len);
    in = fuzz::input(reinterpret_cast<const uint8_t*>(in.rest().data() + len), in.rest().size() - len);
    if (kind == 0) {
      record r;
      // Format 3 reads every version 2 body as version 2 does.
      if (journal::decode(bytes, r, 2)) {
        record r3;
        FUZZ_CHECK(journal::decode(bytes, r3, 3));
        std::string e2, e3;
        journal::encode(r, e2);
        journal::encode(r3, e3);
        FUZZ_CHECK(e2 == e3);
      }
      if (journal::decode(bytes, r)) {
        check_round_trip(r);
        journal::encode(r, seg);
      }
    } else if (kind == 1) {
      seg.append(bytes);
    } else if (number < max_segments) {
      write_file(journal::segment_path(dir(), number), seg);
      seg.clear();
      journal::write_segment_header(seg, ++number);
    }
  }
  write_file(journal::segment_path(dir(), number), seg);
}

void write_raw(fuzz::input& in, size_t segments) {
  std::vector<uint16_t> raw;
  for (size_t i = 1; i < segments; ++i) raw.push_back(in.u16());
  std::string_view bytes = in.rest();
  std::vector<size_t> cuts;
  for (uint16_t c : raw) cuts.push_back(c % (bytes.size() + 1));
  std::sort(cuts.begin(), cuts.end());
  size_t at = 0;
  for (size_t i = 0; i < segments; ++i) {
    size_t end = i < cuts.size() ? cuts[i] : bytes.size();
    write_file(journal::segment_path(dir(), i + 1), bytes.substr(at, end - at));
    at = end;
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  fuzz::input in(data, size);
  uint8_t mode = in.byte();
  size_t segments = std::min<size_t>((mode & 3) + 1, 3);
  bool repair = (mode & 4) != 0;

  // The codec alone, on the input as one record body.
  record r;
  if (journal::decode(in.rest(), r)) check_round_trip(r);

  clear_dir(dir());
  if (mode & 8) write_structured(in.rest(), segments);
  else write_raw(in, segments);

  replayed first = replay_once(repair);
  if (first.ok) {
    replayed second = replay_once(repair);
    FUZZ_CHECK(second.ok);
    FUZZ_CHECK(!second.result.truncated);
    FUZZ_CHECK(second.state == first.state);
  }
  return 0;
}
