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
// File format, version 1 (bump `format_version` on any change):
//   segment  = header record*
//   header   = "RLYJ" u32 version u64 segment_number            (16 bytes)
//   record   = u32 length u32 crc32c(body) body[length]
//   body     = u8 type u64 id i64 at i64 due i64 created u8 priority u8 state
//              u16 max_attempts u16 attempts u32 lease_ms 16B lease
//              (u32 length, bytes) × queue owner idempotency_key payload text
// All integers little-endian.
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

inline constexpr uint32_t format_version = 1;
inline constexpr size_t segment_header_bytes = 16;
inline constexpr size_t record_header_bytes = 8;
inline constexpr uint32_t max_record_bytes = 64u << 20;

uint32_t crc32c(const void* data, size_t n, uint32_t crc = 0);

// Appends `r` as one framed record.
void encode(const queue::record& r, std::string& out);
// Decodes a record body (views point into `body`). False if malformed.
bool decode(std::string_view body, queue::record& r);

enum class fsync_mode : uint8_t { always, batch, off };

struct options {
  std::string dir;
  fsync_mode fsync = fsync_mode::always;
  uint32_t batch_interval_ms = 100;       // fsync period in batch mode: the window a crash may lose
  uint64_t segment_bytes = 64ull << 20;   // roll to a new segment past this size
  uint64_t max_unwritten_bytes = 256ull << 20;  // beyond this, writes are refused (503)
  uint32_t retry_ms = 1000;               // after a failed write, try again this often
  // Test hook, called on the writer thread before each write and fsync with
  // "write" or "fsync"; a non-zero errno makes that operation fail.
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

// Replays every segment of `dir` in order into `apply`. A torn or corrupt
// tail (a record that runs past the end of its segment, or a bad record with
// nothing after it) is truncated and noted. Corruption with data after it
// stops replay with an error naming the segment and offset, unless `repair`,
// which cuts the journal there (dropping that segment's rest and every later
// segment) and notes what it dropped.
bool replay(const std::string& dir, bool repair, const std::function<bool(const queue::record&)>& apply,
            replay_result& result, std::string& error);

// The writer: a record_sink for the queue core.
class writer final : public queue::record_sink {
 public:
  writer(uv_loop_t* loop, options o, ops::registry& metrics);
  writer(const writer&) = delete;
  writer& operator=(const writer&) = delete;
  ~writer() override;

  // Starts segment `first_segment` (after replay) and the writer thread.
  bool open(uint64_t first_segment, std::string& error);

  void append(const queue::record& r) override;

  // How many records have been appended so far; a request compares this
  // before and after to know whether it changed anything.
  uint64_t appended() const { return _appended; }
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
  void when_durable(std::function<void(bool ok)> fn);
  // False while writes are failing: new changes must be refused.
  bool accepting() const { return !_failing && _unwritten_bytes < _o.max_unwritten_bytes; }
  const std::string& failure() const { return _failure; }

  // Starts a new segment at the next batch; returns its number. Segments
  // before it can then be deleted once everything appended so far is durable.
  uint64_t roll();
  // Deletes segments numbered below `segment` (on the writer thread).
  void delete_before(uint64_t segment);
  uint64_t disk_bytes() const { return _disk_bytes.load(std::memory_order_relaxed); }
  uint64_t segments() const { return _segments.load(std::memory_order_relaxed); }

  // Writes what is pending, stops the thread and closes the async handle.
  void close();

 private:
  struct batch {
    uint64_t seq = 0;
    uint64_t records = 0;
    bool sync = false;            // a marker: fsync now (batch mode) or retry (after a failure)
    std::string bytes;
    uint64_t roll_to = 0;         // start this segment before writing
    uint64_t delete_before = 0;   // then delete older segments
  };
  struct waiter {
    uint64_t seq;  // due once this batch is durable (0: at once)
    bool failed;   // answer false: the write failed or writes were failing
    std::function<void(bool)> fn;
  };

  void hand_off();
  void publish();
  static void on_check(uv_check_t* h);
  static void on_async(uv_async_t* h);
  static void on_batch_timer(uv_timer_t* t);
  static void on_idle(uv_idle_t* h);
  bool front_due() const;
  // Runs up to `limit` due callbacks from the front of the queue, then
  // keeps the idle handle running exactly while the front is due.
  void run_due(size_t limit);
  void run();  // the writer thread
  bool write_batch(batch& b, std::string& error);
  bool sync(std::string& error);
  bool open_segment(uint64_t number, std::string& error);
  void report(uint64_t durable, bool failed, const std::string& error);

  uv_loop_t* _loop;
  options _o;
  uv_check_t _check{};
  uv_prepare_t _prepare{};
  uv_async_t _async{};
  uv_timer_t _batch_timer{};
  uv_idle_t _idle{};
  bool _open = false;
  bool _closed = false;

  // Loop side.
  std::unique_ptr<batch> _current;
  uint64_t _next_seq = 1;
  uint64_t _appended = 0;
  uint64_t _last_record_seq = 0;  // the batch holding the newest record
  uint64_t _unwritten_bytes = 0;
  std::deque<waiter> _waiters;
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
