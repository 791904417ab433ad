// The journal: relay's durability. Every queue record is appended to
// segment files in journal.dir, each record framed with its length and a
// CRC32C; start-up replays them to rebuild the queue core exactly.
//
// The loop never blocks on disk. Records are encoded into a batch on the
// loop thread; at the end of each loop iteration the batch is handed to a
// writer thread through a lock-free single-producer/single-consumer ring.
// The writer appends, fsyncs as the mode says, and reports back through
// uv_async; answers that need durability wait for that report (group commit:
// one fsync covers every request of the batches it wrote).
//
// File format (bump `format_version` on any change; replay keeps reading
// every version below):
//   segment  = header record*
//   header   = "RLYJ" u32 version u64 segment_number            (16 bytes)
//   body     = u8 type u64 id i64 at i64 due i64 created u8 priority u8 state
//              u16 max_attempts u16 attempts u32 lease_ms 16B lease
//              (u32 length, bytes) × queue owner idempotency_key payload text
//              [u8 refs  (blob_ref: u64 file u64 offset u64 length u32 crc32c)
//               × payload_ref if refs & 1, text_ref if refs & 2]   version 3
// All integers little-endian. A segment holds records of its header's
// version only; the writer writes the current version.
//
// Version 3 (current, issue 13): a payload or result too large to hold in
// memory is kept in a blob file (relay/blob_store.h) and the record names
// it: the refs byte and the references follow the body. They are written
// only when there are any, so a record without them is the version 2 body
// byte for byte; only submit (payload), complete (text) and snapshot (both)
// carry them, and a referenced field's inline bytes are empty. Framing as
// version 2. Compaction's snapshots carry references, never the bytes.
// Durability of the files (the writer thread): in `always` mode each new
// blob file is fdatasynced, and the blobs directory fsynced, before the
// batch whose records first name it is written; in `batch` mode they are
// synced at the periodic fsync, just before the segment; `off` syncs none.
//
// Version 2:
//   record   = u32 length · u32 crc32c(body) · u32 crc32c(length · body crc) · body[length]
//   The header checksum covers the length word, so a damaged length is
//   detected before it is used: it can no longer pass for a record that runs
//   past the end of the file (a torn write) and swallow the records after it.
// Version 1 (read only, issue 4):
//   record   = u32 length · u32 crc32c(body) · body[length]
//   The length is covered by nothing. Replay treats a length above
//   max_record_bytes as corruption (the writer never made one); a smaller one
//   that runs past the end of the newest segment can only be taken as torn.
//
// Torn or corrupt. A crash can leave only the end of the newest segment
// damaged: the writer appends, and it syncs a segment completely before it
// creates the next one. So only the last record of the newest segment may be
// torn: cut short (its header or body runs past the end of the file), or
// with a bad checksum and nothing but zero bytes after it (a file extended
// before its data reached the disk). Anything else -- a bad header checksum,
// a bad record with data after it, damage in any older segment, a record
// whose checksum holds but whose content is invalid (such as an id that
// would wrap the id counter) -- is corruption.
#pragma once

#include <uv.h>

#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "relay/metrics.h"
#include "relay/queue.h"

namespace relay::journal {

inline constexpr uint32_t format_version = 3;
inline constexpr uint32_t oldest_format_version = 1;
inline constexpr size_t segment_header_bytes = 16;
inline constexpr size_t record_header_bytes = 12;     // version 2
inline constexpr size_t record_header_bytes_v1 = 8;
inline constexpr uint32_t max_record_bytes = 64u << 20;  // version 1: a larger length is corruption

// The longest value a blob reference may name: limits.max_body_bytes at most.
inline constexpr uint64_t max_referenced_bytes = 256ull << 20;

uint32_t crc32c(const void* data, size_t n, uint32_t crc = 0);

// Appends `r` as one framed record of the current version.
void encode(const queue::record& r, std::string& out);
// Decodes a record body of format `version` (views point into `body`).
// False if malformed. Versions 1 and 2 have no references: bytes after the
// text are malformed there.
bool decode(std::string_view body, queue::record& r, uint32_t version = format_version);
// Why a decoded record cannot have been written by relay (empty if it
// can): ids outside 1..queue::max_job_id (the id counter of a meta record:
// up to max_job_id + 1), which would otherwise wrap the id counter.
std::string_view invalid_reason(const queue::record& r);

// Records counted while applying a run of them.
struct record_run {
  uint64_t records = 0;
  uint64_t skipped = 0;  // did not fit the state (superseded by a snapshot)
};
// Decodes `framed`, records of the current version back to back, into
// `apply`, checking every checksum and field. Nothing in it may be torn (a
// PostgreSQL row is committed whole or not at all): false, with `problem`
// naming what is wrong and its offset, at the first bad record.
bool for_each_record(std::string_view framed, const std::function<bool(const queue::record&)>& apply,
                     record_run& run, std::string& problem);

enum class fsync_mode : uint8_t { always, batch, off };

struct options {
  std::string dir;
  fsync_mode fsync = fsync_mode::always;
  uint32_t batch_interval_ms = 100;       // fsync period in batch mode: the window a crash may lose
  uint64_t segment_bytes = 64ull << 20;   // roll to a new segment past this size
  uint64_t max_unwritten_bytes = 256ull << 20;  // beyond this, writes are refused (503)
  uint32_t retry_ms = 1000;               // after a failed write, try again this often
  // Test hook, called on the writer thread before each write, fsync and
  // truncate (the cut of a failed write) with "write", "fsync" or
  // "truncate", and before the sync of a batch's new blob files with
  // "blob_sync"; a non-zero errno makes that operation fail.
  std::function<int(std::string_view op)> fault;
};

struct replay_result {
  uint64_t records = 0;
  uint64_t skipped = 0;  // records that did not fit the state (logged)
  uint64_t segments = 0;
  uint64_t bytes = 0;
  uint64_t next_segment = 1;
  bool truncated = false;  // a torn tail was cut off
  std::string note;        // what was truncated or repaired, for the log
};

// Replays every segment of `dir` in order into `apply`. A torn tail of the
// newest segment (see "Torn or corrupt" above) is truncated and noted.
// Corruption stops replay with an error naming the segment and offset,
// unless `repair`, which cuts the journal there (dropping that segment's rest
// and every later segment) and notes what it dropped.
bool replay(const std::string& dir, bool repair, const std::function<bool(const queue::record&)>& apply,
            replay_result& result, std::string& error);

// An exclusive lock on a journal directory: flock() on dir/LOCK, which
// holds the PID of the process that has it. The kernel drops the lock when
// the process exits, however it exits, so a stale file never blocks a start.
class dir_lock {
 public:
  dir_lock() = default;
  dir_lock(const dir_lock&) = delete;
  dir_lock& operator=(const dir_lock&) = delete;
  ~dir_lock();

  // Creates `dir` if needed and locks it. False if that fails or another
  // process holds the lock; `error` then names the directory (and the
  // holder's PID).
  bool acquire(const std::string& dir, std::string& error);
  bool held() const { return _fd >= 0; }

 private:
  int _fd = -1;
};

// The answers waiting for a backend to make their records durable: FIFO,
// each run from the loop -- from the backend's report, or from an idle
// handle while the front is due already -- never inside the call that
// queued it. Both backends keep their waiters here.
class answer_queue {
 public:
  // `durable()` is the batch up to which everything is durable. `may_succeed`
  // runs before an answer of true is given; false holds it back (the
  // backend has just failed everything: its lease ran out).
  answer_queue(std::function<uint64_t()> durable, std::function<bool()> may_succeed = {})
      : _durable(std::move(durable)), _may_succeed(std::move(may_succeed)) {}
  void start(uv_loop_t* loop);
  // Due once batch `seq` is durable (0: at once); `failed`: answer false.
  void push(uint64_t seq, bool failed, std::function<void(bool ok)> fn);
  // Every queued answer becomes false (the write failed, the lease is gone).
  void fail_all();
  // Those not durable yet become false (the backend has stopped).
  void fail_undurable();
  // Runs up to `limit` due answers from the front, then keeps the idle
  // handle running exactly while the front is due.
  void run(size_t limit);
  void run_all() { run(_waiters.size()); }
  bool empty() const { return _waiters.empty(); }
  void close();

 private:
  struct waiter {
    uint64_t seq;
    bool failed;
    std::function<void(bool)> fn;
  };
  bool front_due() const;
  static void on_idle(uv_idle_t* h);

  std::function<uint64_t()> _durable;
  std::function<bool()> _may_succeed;
  std::deque<waiter> _waiters;
  uv_idle_t _idle{};
  bool _started = false;
};

// What the queue core, the API and compaction need of a journal, whichever
// backend holds it: the segment files below (writer), or PostgreSQL
// (relay/journal_postgres.h). Every method runs on the loop thread.
class backend : public queue::record_sink {
 public:
  // Runs `fn(true)` once every record appended so far is durable, or
  // `fn(false)` if it may not be. fn never runs inside when_durable(); it
  // runs from the loop, in FIFO order (see writer::when_durable).
  virtual void when_durable(std::function<void(bool ok)> fn) = 0;
  // False while new changes must be refused (503).
  virtual bool accepting() const = 0;
  // The number (record_sink::appended) up to which every record is written
  // as the mode promises: a job whose record_no is above it shows a change
  // that may yet be lost, and is not shown while the journal fails.
  virtual uint64_t durable_records() const = 0;
  // False once this relay may no longer answer at all, reads included (it
  // lost the leadership of a shared journal: its state may be stale).
  virtual bool serving() const { return true; }
  // Why not accepting, for the answer and /readyz; empty: behind.
  virtual const std::string& failure() const = 0;
  // Starts a new segment at the next batch; returns its number.
  virtual uint64_t roll() = 0;
  // Drops every segment numbered below `segment`, once what was appended
  // before this call is durable (compaction's snapshots replace them).
  virtual void delete_before(uint64_t segment) = 0;
  // What the journal holds, in bytes (compaction's trigger).
  virtual uint64_t disk_bytes() const = 0;
  // Writes what is pending, stops its thread, answers every waiter.
  virtual void close() = 0;
};

// The file backend: a record_sink for the queue core.
//
// Segment numbers are the loop's alone: open() and roll() choose them, and
// the writer thread only ever opens a number it was handed. After a failed
// write it cuts the segment back to its last whole record and writes nothing
// (nor rolls) until that cut succeeds, so a damaged tail can only ever be at
// the end of the newest segment.
class writer final : public backend {
 public:
  writer(uv_loop_t* loop, options o, ops::registry& metrics);
  writer(const writer&) = delete;
  writer& operator=(const writer&) = delete;
  ~writer() override;

  // Locks journal.dir for this writer's lifetime (see dir_lock). Call it
  // before replaying the directory; open() takes the lock if not yet held.
  bool lock(std::string& error) { return _lock.acquire(_o.dir, error); }
  // Starts segment `first_segment` (after replay) and the writer thread.
  bool open(uint64_t first_segment, std::string& error);

  void append(const queue::record& r) override;

  // How many records have been appended so far; a request compares this
  // before and after to know whether it changed anything.
  uint64_t appended() const override { return _appended; }
  uint64_t durable_records() const override { return _durable_records; }
  // Runs `fn(true)` once every record appended so far is durable as the
  // mode requires (always: fsynced; batch/off: at once), or `fn(false)` if
  // writing them failed or writes are failing.
  //
  // fn never runs inside when_durable(); it runs from the loop, in order
  // (FIFO across every call, successes and failures alike, in every fsync
  // mode): from the writer's report, or for one that is due already from a
  // loop phase of its own (an idle handle, so the loop does not block while
  // one is queued). An answer released by fn therefore never runs on the
  // stack of the request, mutation or batch that queued it. fn may call
  // when_durable() again; that one runs on a later turn. Call it only
  // between open() and close(); close() runs whatever is still queued.
  void when_durable(std::function<void(bool ok)> fn) override;
  // False while writes are failing: new changes must be refused.
  bool accepting() const override { return !_failing && _unwritten_bytes < _o.max_unwritten_bytes; }
  const std::string& failure() const override { return _failure; }

  // Starts a new segment at the next batch; returns its number. Segments
  // before it can then be deleted once everything appended so far is durable.
  uint64_t roll() override;
  // Deletes segments numbered below `segment` (on the writer thread).
  void delete_before(uint64_t segment) override;
  uint64_t disk_bytes() const override { return _disk_bytes.load(std::memory_order_relaxed); }
  uint64_t segments() const { return _segments.load(std::memory_order_relaxed); }

  // Writes what is pending, stops the thread and closes the async handle.
  void close() override;

 private:
  struct batch {
    uint64_t seq = 0;
    uint64_t records = 0;
    bool sync = false;            // a marker: fsync now (batch mode) or retry (after a failure)
    std::string bytes;
    uint64_t roll_to = 0;         // start this segment before writing
    uint64_t delete_before = 0;   // then delete older segments
    // Blob files first named by a record of this batch: in always mode
    // they are fdatasynced, and the blobs directory fsynced, before the
    // batch is written, so no durable record names bytes that are not.
    std::vector<uint64_t> blobs;
  };
  void hand_off();
  void publish();
  static void on_check(uv_check_t* h);
  static void on_async(uv_async_t* h);
  static void on_batch_timer(uv_timer_t* t);
  void run();  // the writer thread
  bool write_batch(batch& b, std::string& error);
  // Always mode: syncs the batch's new blob files before it is written;
  // batch mode: sets them aside for the next periodic fsync.
  bool sync_blobs(batch& b, std::string& error);
  bool sync_blob_files(std::vector<uint64_t>& files, std::string& error);
  bool sync(std::string& error);
  // Cuts the segment back to _segment_size (what was written whole).
  bool cut(std::string& error);
  bool open_segment(uint64_t number, std::string& error);
  void report(uint64_t durable, bool failed, const std::string& error);

  uv_loop_t* _loop;
  options _o;
  uv_check_t _check{};
  uv_prepare_t _prepare{};
  uv_async_t _async{};
  uv_timer_t _batch_timer{};
  bool _open = false;
  bool _closed = false;
  dir_lock _lock;

  // Loop side.
  std::unique_ptr<batch> _current;
  uint64_t _next_seq = 1;
  uint64_t _appended = 0;
  uint64_t _last_record_seq = 0;  // the batch holding the newest record
  // Handed-off batches not yet reported written: (seq, number of its last
  // record), to move _durable_records as the writer reports.
  std::deque<std::pair<uint64_t, uint64_t>> _batch_ends;
  uint64_t _durable_records = 0;
  uint64_t _unwritten_bytes = 0;
  answer_queue _answers;
  bool _failing = false;
  std::string _failure;
  uint64_t _next_segment = 1;

  // The SPSC ring: the loop produces batches, the writer consumes them.
  static constexpr size_t ring_size = 4096;
  batch** _ring;
  std::atomic<uint64_t> _ring_head{0};  // next slot the loop writes
  std::atomic<uint64_t> _ring_tail{0};  // next slot the writer reads
  std::deque<std::unique_ptr<batch>> _overflow;  // loop side, when the ring is full

  // Writer side (only the writer thread touches these after open()).
  std::thread _thread;
  std::atomic<bool> _stop{false};
  int _fd = -1;
  uint64_t _segment = 0;
  uint64_t _segment_size = 0;     // bytes written to the current segment
  uint64_t _synced_size = 0;      // bytes of it known to be on disk
  bool _cut_pending = false;      // a failed write or fsync left bytes past _segment_size
  std::vector<uint64_t> _unsynced_blobs;  // batch mode: blob files named by written, unsynced records

  // Writer → loop.
  std::atomic<uint64_t> _durable_seq{0};
  std::atomic<uint64_t> _written_bytes{0};
  std::atomic<bool> _writer_failing{false};
  std::atomic<uint64_t> _disk_bytes{0};
  std::atomic<uint64_t> _segments{0};
  std::string _writer_error;  // guarded by _error_lock
  std::atomic_flag _error_lock = ATOMIC_FLAG_INIT;

  ops::counter& _records;
  ops::counter& _fsyncs;
  ops::counter& _write_errors;
  ops::histogram& _fsync_seconds;
  ops::histogram& _records_per_fsync;
  ops::gauge& _bytes_gauge;
  ops::gauge& _segments_gauge;
  ops::gauge& _failing_gauge;
};

}  // namespace relay::journal
