// The PostgreSQL journal backend (journal.backend "postgres"): relay's
// records in a database that operators already run highly available, and
// leadership of a shard decided in the same database.
//
// Several relays may point at one shard; exactly one leads it. The row
// relay_leader(shard) holds (epoch, holder, lease_until). A relay takes the
// shard only once lease_until has passed by the database's clock, raising
// the epoch; the leader renews the lease every renew_ms and, in the same
// statement as each batch's records, checks its epoch and renews again. A
// statement that finds another epoch writes nothing: the relay has lost the
// shard and must step down.
//
// The leader also keeps a deadline of its own, on the monotonic clock: the
// moment the last successful renewal was *sent*, plus lease_ms, less a
// margin. The database's lease_until is at least that late in real time (it
// is computed after the statement arrived), so as long as the two clocks
// run at about the same rate, no standby can take the shard before the
// leader's own deadline passes. The leader delivers no acknowledgement after
// it (postgres::journal checks it before every callback it runs): a relay
// that was paused (SIGSTOP, a stall) or cut off wakes up to find its
// deadline gone and acknowledges nothing, even for records that committed.
//
// Records: each group-commit batch is one row, the framed records of the
// file journal (CRC32C and all) in a bytea, committed in one single-statement
// transaction with the fence. Its key (segment, epoch, seq) makes a retry
// of a commit whose outcome was lost idempotent. The rows of a shard are in
// relay_journal_<shard>, partitioned by segment, one partition a segment:
// compaction writes snapshots into a new segment and DROPs the older
// partitions (fenced), so the table follows live data without row deletes.
//
// Threads: leadership and the journal each own one connection and one
// thread, driven by libpq's asynchronous API with deadlines, so that neither
// can hang on a silent network and the loop never waits on the database.
// Their reports reach the loop through uv_async handles; every callback
// below runs on the loop thread, never inside the call that caused it.
//
// TLS: libpq links OpenSSL 3, whose unversioned symbol names Debian's
// BoringSSL shares; a process must never load both. This backend is built
// only with -Dtls=openssl (meson.build refuses the other combination).
#pragma once

#include <uv.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "relay/journal.h"
#include "relay/metrics.h"

namespace relay::journal::postgres {

// True if this relay was built with the postgres backend (meson.build
// defines RELAY_WITH_POSTGRES; the rest of this header is then linked in).
#ifndef RELAY_WITH_POSTGRES
#define RELAY_WITH_POSTGRES 0
#endif
inline constexpr bool available = RELAY_WITH_POSTGRES;

struct options {
  std::string dsn;            // a libpq connection string (read from journal.postgres.dsn_file)
  std::string shard = "main"; // [a-z0-9_]{1,32}
  uint32_t lease_ms = 5000;
  uint32_t renew_ms = 1000;
  uint32_t max_batch_records = 4096;
  uint64_t max_unwritten_bytes = 256ull << 20;  // beyond this, changes are refused (503)
  std::string holder;         // who we are, in relay_leader.holder and the log
};

// Checks that `dsn` is a libpq connection string. The error never quotes
// it (libpq's own messages do, password and all).
bool valid_dsn(const std::string& dsn, std::string& error);

// The leadership deadline, shared by the two threads and the loop: the
// steady-clock time (ns) until which this relay may act as leader.
class deadline {
 public:
  // Extends to `until_ns` if that is later.
  void extend(int64_t until_ns);
  void revoke() { _until.store(0, std::memory_order_release); }
  bool valid() const;
  int64_t until_ns() const { return _until.load(std::memory_order_acquire); }
  static int64_t now_ns();

 private:
  std::atomic<int64_t> _until{0};
};

// Leadership of one shard. start() connects and waits, as a standby, until
// the shard is free; then on_acquired(epoch) runs, and the lease is renewed
// until release() or until it is lost: on_lost(reason) runs once, and the
// relay must step down (stop acknowledging, restart as a standby).
class leadership {
 public:
  struct callbacks {
    std::function<void(uint64_t epoch)> on_acquired;
    std::function<void(const std::string& reason)> on_lost;
  };
  leadership(uv_loop_t* loop, options o, deadline& d, ops::registry& metrics, callbacks cb);
  leadership(const leadership&) = delete;
  leadership& operator=(const leadership&) = delete;
  ~leadership();

  void start();
  // Why this relay is not leading, for /readyz (starts with "standby").
  std::string standby_status() const;
  bool leading() const { return _epoch != 0; }
  uint64_t epoch() const { return _epoch; }
  // Stops the thread. With `release`, a leader first gives the shard up
  // (lease_until = -infinity) so that a standby takes it at once; call it
  // only after the journal's last commit.
  void stop(bool release);

 private:
  static void on_async(uv_async_t* h);
  void run();  // the thread

  uv_loop_t* _loop;
  options _o;
  deadline& _deadline;
  callbacks _cb;
  uv_async_t _async{};
  bool _open = false;
  std::thread _thread;
  std::atomic<bool> _stop{false};
  std::atomic<bool> _release{false};
  mutable std::mutex _mu;         // guards the fields below and _wake
  std::condition_variable _wake;
  uint64_t _acquired_epoch = 0;   // thread → loop: won at this epoch
  std::string _lost;              // thread → loop: why the shard was lost
  std::string _status = "standby: connecting to the database";
  uint64_t _epoch = 0;            // loop side: the epoch we lead, 0 if none
  bool _lost_reported = false;
  ops::gauge& _leader_gauge;
  ops::gauge& _epoch_gauge;
  ops::counter& _changes;
};

// The journal of the shard this relay leads: replay, then group commits.
class journal final : public backend {
 public:
  journal(uv_loop_t* loop, options o, deadline& d, ops::registry& metrics);
  journal(const journal&) = delete;
  journal& operator=(const journal&) = delete;
  ~journal() override;

  struct replayed {
    uint64_t rows = 0;
    record_run run;
    uint64_t bytes = 0;
    bool corrupt = false;  // a row failed its checks (else: the database failed)
  };
  // Connects and replays every row of the shard, oldest first, into
  // `apply` on the loop (in slices, so the loop keeps serving /healthz),
  // then starts a new segment and takes appends. `done(error)` runs once,
  // on the loop: empty error when the journal is open; otherwise the
  // journal stays closed. Call once, after leadership was acquired at
  // `epoch`.
  void open(uint64_t epoch, std::function<bool(const queue::record&)> apply,
            std::function<void(const std::string& error, const replayed&)> done);

  void append(const queue::record& r) override;
  void when_durable(std::function<void(bool ok)> fn) override;
  bool accepting() const override;
  uint64_t appended() const override { return _appended; }
  uint64_t durable_records() const override { return _durable_records; }
  bool serving() const override { return _open && !_fenced && _deadline.valid(); }
  const std::string& failure() const override { return _failure; }
  uint64_t roll() override;
  void delete_before(uint64_t segment) override;
  uint64_t disk_bytes() const override { return _disk_bytes.load(std::memory_order_relaxed); }
  // Commits what is pending (while the lease holds), stops the thread,
  // and answers every waiter: ok only if committed while leading.
  void close() override;
  // Leadership is gone: every waiter is answered false now, nothing is
  // committed any more, and close() commits nothing.
  void fence(const std::string& reason);
  // Runs `fn(reason)` on the loop when a commit finds another epoch in
  // relay_leader or the deadline has passed with commits pending.
  void on_fenced(std::function<void(const std::string&)> fn) { _on_fenced = std::move(fn); }

 private:
  struct batch {
    uint64_t seq = 0;
    uint64_t records = 0;
    std::string bytes;
    uint64_t roll_to = 0;        // start this segment (a partition) first
    uint64_t delete_before = 0;  // then drop older segments
  };
  static void on_async(uv_async_t* h);
  void hand_off();
  // Before an answer of true: false (and every answer failed) once the
  // leadership deadline has passed, committed or not.
  bool may_acknowledge();
  void apply_replayed();
  void run(uint64_t epoch);  // the thread

  uv_loop_t* _loop;
  options _o;
  deadline& _deadline;
  uv_async_t _async{};
  uv_check_t _check{};
  uv_prepare_t _prepare{};
  bool _handles = false;
  bool _open = false;
  bool _closed = false;
  bool _fenced = false;
  std::function<void(const std::string&)> _on_fenced;

  // Loop side.
  std::unique_ptr<batch> _current;
  uint64_t _next_seq = 1;
  uint64_t _last_record_seq = 0;
  uint64_t _appended = 0;
  std::deque<std::pair<uint64_t, uint64_t>> _batch_ends;  // (seq, its last record's number), not yet committed
  uint64_t _durable_records = 0;
  uint64_t _unwritten_bytes = 0;
  uint64_t _next_segment = 0;
  answer_queue _answers;
  bool _failing = false;
  std::string _failure;
  std::function<bool(const queue::record&)> _apply;
  std::function<void(const std::string&, const replayed&)> _done;
  replayed _replayed;
  std::string _replay_error;

  // Shared, under _mu.
  std::thread _thread;
  mutable std::mutex _mu;
  std::condition_variable _wake;       // the thread waits for batches, the replay for room
  std::deque<std::unique_ptr<batch>> _todo;
  std::deque<std::string> _rows;       // replayed rows not yet applied
  uint64_t _rows_bytes = 0;
  bool _rows_done = false;             // every row fetched (or _thread_error)
  uint64_t _first_segment = 0;         // the segment the thread started after replay
  bool _stop = false;
  uint64_t _committed_seq = 0;         // every batch up to it is committed
  uint64_t _written_bytes = 0;         // committed since the last report
  bool _thread_failing = false;
  std::string _thread_error;
  std::string _fence_reason;           // set when a commit found another epoch
  std::atomic<uint64_t> _disk_bytes{0};

  ops::counter& _records;
  ops::counter& _commits;
  ops::counter& _commit_errors;
  ops::histogram& _commit_seconds;
  ops::histogram& _records_per_commit;
  ops::gauge& _bytes_gauge;
  ops::gauge& _failing_gauge;
};

}  // namespace relay::journal::postgres
