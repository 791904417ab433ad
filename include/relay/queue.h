// The queue core: jobs, queues, leases, waiters and time, with no I/O.
//
// Every state change is first described as one `record`, handed to the
// record_sink (the journal), and then applied by a single function, apply().
// Replaying the journal calls apply() with the same records, so the state a
// replay rebuilds is by construction the state that existed. Changes that are
// a pure function of time (a delayed job becoming ready, a finished job's
// result being forgotten after its retention) are not records: advance()
// recomputes them from the clock after a replay as it does live.
//
// Time is passed in by the caller (milliseconds since the Unix epoch), so the
// core is deterministic and testable without a loop; wall-clock time is used
// because lease expiries and delays must mean the same after a restart.
//
// Single-threaded: every method runs on the loop thread.
#pragma once

#include <array>
#include <cstdint>
#include <cstring>
#include <ostream>
#include <deque>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <unordered_set>
#include <vector>

namespace relay::queue {

using time_ms = int64_t;
using job_id = uint64_t;
// Ids run from 1 to max_job_id and are never handed out twice: once the
// counter passes the maximum, submits fail (op_error::ids_exhausted) rather
// than wrap. 2^63 - 1 lasts 29,000 years at ten million submits a second,
// and leaves the counter (max_job_id + 1 when exhausted) far from wrapping.
inline constexpr job_id max_job_id = (job_id{1} << 63) - 1;

enum class job_state : uint8_t { queued, delayed, leased, succeeded, failed, dead, cancelled };
inline constexpr size_t job_state_count = 7;
std::string_view to_string(job_state s);
inline bool is_terminal(job_state s) {
  return s == job_state::succeeded || s == job_state::dead || s == job_state::cancelled;
}

inline constexpr int priority_levels = 10;  // 0 is served first
inline constexpr int default_priority = 5;

// Job ids are 64-bit, shown as 16 lowercase hex digits.
std::string format_job_id(job_id id);
// The same, appended to `out` (no temporary: responses list many ids).
void append_job_id(std::string& out, job_id id);
std::optional<job_id> parse_job_id(std::string_view s);

// 128 random bits naming one lease of one job; shown as 32 hex digits.
struct lease_token {
  std::array<uint8_t, 16> bytes{};
  std::string hex() const;
  void append_hex(std::string& out) const;
  static std::optional<lease_token> parse(std::string_view hex);
  // Constant time, so that a probe cannot learn a token byte by byte.
  bool equals(const lease_token& other) const;
};

// Interned principal name: equal names share one pointer.
using principal_ref = const std::string*;

// An immutable string in one pointer: a heap block [u32 length][bytes], or
// null when empty. A job holds three of these; a million queued jobs make the
// 24 bytes saved on each (against std::string) count.
class compact_string {
 public:
  compact_string() = default;
  compact_string(const compact_string&) = delete;
  compact_string& operator=(const compact_string&) = delete;
  compact_string(compact_string&& o) noexcept : _p(o._p) { o._p = nullptr; }
  compact_string& operator=(compact_string&& o) noexcept {
    std::swap(_p, o._p);
    return *this;
  }
  ~compact_string() { delete[] _p; }

  void assign(std::string_view s);
  void clear() {
    delete[] _p;
    _p = nullptr;
  }
  size_t size() const {
    uint32_t n = 0;
    if (_p) std::memcpy(&n, _p, sizeof n);
    return n;
  }
  bool empty() const { return _p == nullptr; }
  std::string_view view() const { return _p ? std::string_view(_p + sizeof(uint32_t), size()) : std::string_view(); }
  operator std::string_view() const { return view(); }
  friend bool operator==(const compact_string& a, std::string_view b) { return a.view() == b; }
  friend bool operator==(const compact_string& a, const compact_string& b) { return a.view() == b.view(); }
  friend std::ostream& operator<<(std::ostream& os, const compact_string& s) { return os << s.view(); }

 private:
  char* _p = nullptr;
};

// Where a value's bytes are kept when they are not held in memory: a range
// of a blob file, <journal.dir>/blobs/<file as %016x> (relay/blob_store.h),
// with the CRC32C of the range, checked whenever it is read back. A JSON
// value has at least one byte, so length 0 means "no reference".
struct blob_ref {
  uint64_t file = 0;
  uint64_t offset = 0;
  uint64_t length = 0;
  uint32_t crc32c = 0;
  bool valid() const { return length != 0; }
  friend bool operator==(const blob_ref&, const blob_ref&) = default;
};

// A job's payload or outcome: its bytes inline, or a blob_ref. One pointer,
// as compact_string (a heap block [u32 word][bytes], the word's top bit
// saying "reference", then a packed blob_ref): a million small jobs cost
// what they cost before references existed, and only spilled values pay
// for the 28 bytes of a reference.
class held_value {
 public:
  held_value() = default;
  held_value(const held_value&) = delete;
  held_value& operator=(const held_value&) = delete;
  held_value(held_value&& o) noexcept : _p(o._p) { o._p = nullptr; }
  held_value& operator=(held_value&& o) noexcept {
    std::swap(_p, o._p);
    return *this;
  }
  ~held_value() { delete[] _p; }

  void assign(std::string_view s);
  void assign(const blob_ref& r);
  void clear() {
    delete[] _p;
    _p = nullptr;
  }
  bool empty() const { return _p == nullptr; }
  bool is_ref() const { return _p && (word() & ref_bit); }
  // The reference; meaningful only when is_ref().
  blob_ref ref() const;
  // The value's size in bytes, wherever it is kept: what limits.max_held_bytes
  // and a lease's max_bytes count.
  size_t size() const { return is_ref() ? ref().length : (_p ? word() : 0); }
  // The bytes of an inline value; empty for a reference, whose bytes must be
  // read back from its blob file (never shown as empty by mistake: callers
  // that show values check is_ref() first).
  std::string_view view() const {
    return _p && !(word() & ref_bit) ? std::string_view(_p + sizeof(uint32_t), word()) : std::string_view();
  }
  operator std::string_view() const { return view(); }
  friend bool operator==(const held_value& a, std::string_view b) { return !a.is_ref() && a.view() == b; }
  friend std::ostream& operator<<(std::ostream& os, const held_value& s) { return os << s.view(); }

 private:
  static constexpr uint32_t ref_bit = 0x80000000u;
  uint32_t word() const {
    uint32_t n = 0;
    std::memcpy(&n, _p, sizeof n);
    return n;
  }
  char* _p = nullptr;
};

class job_queue;

struct job {
  job_id id = 0;
  job_queue* queue = nullptr;
  job_state state = job_state::queued;
  uint8_t priority = default_priority;
  uint8_t where = 0;  // which container holds the job; see broker.cpp
  uint16_t attempts = 0;  // times leased
  uint16_t max_attempts = 5;
  uint32_t lease_ms = 30000;  // default lease length for this job
  uint32_t heap_pos = 0;
  time_ms created_ms = 0;
  time_ms updated_ms = 0;
  time_ms due_ms = 0;  // delayed/failed: ready at; leased: lease expires at
  lease_token lease;
  principal_ref lease_owner = nullptr;
  job* prev = nullptr;  // intrusive links: ready FIFO or dead list
  job* next = nullptr;
  held_value payload;  // raw JSON as received (inline or a reference)
  held_value outcome;  // succeeded: raw result JSON (inline or a reference); failed/dead: error message
  compact_string idempotency_key;
  uint64_t record_no = 0;  // the sink's number of this job's latest record (record_sink::appended)
};

// One state change. Views point into the caller's memory and are valid only
// during the append()/apply() call that receives the record.
//
// Format version: the journal (issue 4) writes these fields in this order; a
// change here must bump the journal's record-format version.
enum class record_type : uint8_t {
  submit = 1,     // id, queue, priority, max_attempts, lease_ms, due (ready at), idempotency_key, payload
                  // (or payload_ref)
  lease = 2,      // id, lease, owner, due (lease expiry)
  heartbeat = 3,  // id, lease, due (new expiry)
  complete = 4,   // id, lease, text (result JSON) or text_ref
  fail = 5,       // id, lease, text (error), due (retry at)
  cancel = 6,     // id
  expire = 7,     // id: the lease ran out
  requeue = 8,    // id: a dead job is given fresh attempts
  snapshot = 9,   // a job's whole state (compaction): id, queue, state, attempts, max_attempts, priority,
                  // lease_ms, created, at (updated), due, lease, owner, idempotency_key, payload, text (outcome)
  meta = 10,      // id: the next job id to hand out (written at the start of each segment)
};

struct record {
  record_type type{};
  job_id id = 0;
  time_ms at = 0;
  time_ms due = 0;
  uint8_t priority = default_priority;
  uint16_t max_attempts = 0;
  uint32_t lease_ms = 0;
  job_state state = job_state::queued;  // snapshot
  uint16_t attempts = 0;                // snapshot
  time_ms created = 0;                  // snapshot
  lease_token lease;
  std::string_view queue;
  std::string_view owner;
  std::string_view idempotency_key;
  std::string_view payload;
  std::string_view text;
  // A payload / text kept in a blob file instead (journal format 3): when
  // valid, the view beside it is empty. Only submit, complete and snapshot
  // records carry them.
  blob_ref payload_ref;
  blob_ref text_ref;
};

class record_sink {
 public:
  virtual ~record_sink() = default;
  virtual void append(const record& r) = 0;
  // How many records have been appended so far, so the number of the last
  // one; 0 if the sink does not count. A job keeps the number of its latest
  // record (job::record_no): a reader can then tell whether the change it
  // would show is durable yet (journal::backend::durable_records).
  virtual uint64_t appended() const { return 0; }
};

// Broker callbacks (lease_waiter::on_leased, job_watcher::on_terminal) run
// inside the mutation that caused them: inside submit(), advance(),
// complete(), requeue_dead() and the rest, while that call -- and perhaps a
// batch of the caller's -- is half done. So a callback must not answer a
// request, continue a connection or call back into the broker (no submit,
// lease, park/unpark of another waiter, watch/unwatch of another watcher);
// it may only record what to answer and hand that to the loop. The API layer
// does so: its answers go through journal::writer::when_durable(), which
// never runs them on the caller's stack. Freeing itself (or arranging to) is
// allowed.

// The size in bytes of the answer that hands leased jobs to a worker:
// `empty` with no job, plus entry() for each job in it. The API layer,
// which writes the answer, says what these are; the broker adds them up so
// that a lease bounded in bytes (lease_waiter::max_bytes, broker::lease)
// takes only as many jobs as fit. entry() is given the job as it is before
// the lease, the attempt number and lease expiry the lease will give it,
// and whether it is the first job of the answer (no separator before it).
struct answer_size {
  size_t empty = 0;
  size_t (*entry)(const job& j, uint32_t attempt, time_ms expires, bool first) = nullptr;
};

// A worker's parked lease request. The broker calls on_leased() exactly once
// with at least one job, after unparking the waiter; the waiter may be
// destroyed inside the callback. Unpark a waiter whose request ends first.
class lease_waiter {
 public:
  virtual ~lease_waiter() = default;
  virtual void on_leased(const std::vector<job*>& jobs) = 0;

  size_t max = 1;
  // The answer's bound in bytes, by `size` (SIZE_MAX: none). The first job
  // is handed over whatever its size, so a waiter woken is never answered
  // with nothing; what does not fit stays ready for the next.
  size_t max_bytes = SIZE_MAX;
  answer_size size;
  uint32_t lease_ms = 0;  // 0: each job's own lease_ms
  principal_ref owner = nullptr;

 private:
  friend class broker;
  friend class job_queue;
  job_queue* _parked_on = nullptr;
  lease_waiter* _prev = nullptr;
  lease_waiter* _next = nullptr;
};

// Someone waiting for a job to reach a terminal state (GET ?wait_ms).
// on_terminal() runs once, after the watcher was removed.
class job_watcher {
 public:
  virtual ~job_watcher() = default;
  virtual void on_terminal(const job& j) = 0;

 private:
  friend class broker;
  job_id _watching = 0;
};

// Counters per queue, exported as metrics.
struct queue_counters {
  uint64_t submitted = 0, leased = 0, completed = 0, failed = 0, expired = 0, dead = 0,
           cancelled = 0, requeued = 0;
};

class job_queue {
 public:
  explicit job_queue(std::string name) : _name(std::move(name)) {}
  const std::string& name() const { return _name; }
  size_t count(job_state s) const { return _counts[static_cast<size_t>(s)]; }
  size_t ready() const { return count(job_state::queued); }
  size_t waiting_workers() const { return _waiters; }
  const queue_counters& counters() const { return _counters; }
  // When the oldest ready job became ready (0 when none is ready).
  time_ms oldest_ready_since() const;

 private:
  friend class broker;
  struct fifo {
    job* head = nullptr;
    job* tail = nullptr;
  };
  std::string _name;
  // Ready jobs per priority: fresh submits arrive in id order and go to a
  // FIFO; jobs that come back (redelivered, retried, requeued, delayed) go to
  // a heap by id. Serving the smaller id of the two heads keeps "priority,
  // then age" exact while the common case stays O(1).
  std::array<fifo, priority_levels> _fresh{};
  std::array<std::vector<job*>, priority_levels> _returned{};
  fifo _dead;
  lease_waiter* _wait_head = nullptr;
  lease_waiter* _wait_tail = nullptr;
  size_t _waiters = 0;
  std::array<size_t, job_state_count> _counts{};
  size_t _jobs = 0;  // held, any state: a queue with none is not listed
  queue_counters _counters;
};

struct broker_limits {
  size_t max_jobs = 2'000'000;    // jobs held (any state) before submits get queue_full
  size_t max_held_bytes = size_t{1} << 30;  // payload + result + error bytes held, likewise
  size_t max_queues = 10'000;
  // Jobs one queue may hold that are not finished (queued, delayed, leased,
  // failed) before submits to it get queue_depth; 0: no cap. A submit can
  // name a cap of its own (submit_params::max_depth).
  size_t max_queue_depth = 0;
  time_ms result_ttl_ms = 24 * 3600 * 1000;  // how long a finished job stays readable
  time_ms max_backoff_ms = 3600 * 1000;
  uint16_t max_attempts_limit = 1000;
};

enum class op_error : uint8_t {
  none,
  not_found,        // no such job
  lease_lost,       // not leased, or leased under another token
  wrong_owner,      // right token, presented by another principal
  not_cancellable,  // leased or terminal
  queue_full,       // max_jobs reached
  too_many_queues,  // max_queues reached
  queue_depth,      // the queue holds its cap of unfinished jobs (max_queue_depth)
  ids_exhausted,    // every job id up to max_job_id was handed out
};

struct submit_params {
  std::string_view queue;
  std::string_view payload;  // raw JSON, already validated
  blob_ref payload_ref;      // or, when valid, the payload's bytes in a blob file (payload then empty)
  std::string_view idempotency_key;
  uint8_t priority = default_priority;
  time_ms delay_ms = 0;
  uint16_t max_attempts = 5;
  uint32_t lease_ms = 30000;
  size_t max_depth = 0;  // the queue's depth cap; 0: limits.max_queue_depth
};

struct submit_result {
  op_error error = op_error::none;
  const job* j = nullptr;
  bool created = false;  // false: the idempotency key named an existing job
};

class broker {
 public:
  using random_source = std::function<void(uint8_t* out, size_t n)>;

  broker(broker_limits limits, random_source random, record_sink* sink = nullptr);
  broker(const broker&) = delete;
  broker& operator=(const broker&) = delete;
  ~broker();

  principal_ref intern(std::string_view principal);
  // Where records go from now on (null: nowhere, e.g. during replay).
  void set_sink(record_sink* sink) { _sink = sink; }

  submit_result submit(const submit_params& p, time_ms now);

  // Leases up to `max` ready jobs of `queue` to `owner`, oldest first within
  // priority. lease_ms 0 uses each job's own lease length.
  op_error lease(std::string_view queue, size_t max, uint32_t lease_ms, principal_ref owner,
                 time_ms now, std::vector<job*>& out);
  // The same, also stopping before the job that would take the answer,
  // measured by `size`, over `max_bytes`; the first job is always taken.
  // Jobs left out stay ready, with no attempt used.
  op_error lease(std::string_view queue, size_t max, size_t max_bytes, const answer_size& size, uint32_t lease_ms,
                 principal_ref owner, time_ms now, std::vector<job*>& out);
  // Parks `w` on `queue` (FIFO among waiters) until a job is ready for it.
  // Call only after lease() returned nothing. Parking does not create the
  // queue: a queue that holds no job is neither listed nor counted towards
  // limits.max_queues, whoever waits on it (waiters are bounded by the
  // connections that hold them), and it is forgotten once nobody waits.
  void park(std::string_view queue, lease_waiter& w);
  void unpark(lease_waiter& w);

  struct heartbeat_result {
    op_error error = op_error::none;
    time_ms expires_ms = 0;
  };
  heartbeat_result heartbeat(job_id id, const lease_token& t, principal_ref who, uint32_t extend_ms,
                             time_ms now);
  // `result_ref`, when valid, holds the result in a blob file (`result`
  // is then empty).
  op_error complete(job_id id, const lease_token& t, principal_ref who, std::string_view result,
                    time_ms now, const blob_ref& result_ref = {});
  // retry_delay_ms is the backoff base: the wait before the next attempt is
  // base * 2^(attempts-1), capped at limits.max_backoff_ms.
  op_error fail(job_id id, const lease_token& t, principal_ref who, std::string_view error,
                uint32_t retry_delay_ms, time_ms now);
  op_error cancel(job_id id, time_ms now);
  // Gives dead jobs of `queue` fresh attempts: the listed ids, or (ids empty)
  // up to `max` of the oldest. Returns the ids requeued.
  std::vector<job_id> requeue_dead(std::string_view queue, const std::vector<job_id>& ids,
                                   size_t max, time_ms now);

  void watch(job_id id, job_watcher& w);
  void unwatch(job_watcher& w);

  // Applies every change that is due at `now`: delayed jobs become ready,
  // leases expire, old results are forgotten.
  void advance(time_ms now);
  // The earliest time advance() has work to do, if any.
  std::optional<time_ms> next_deadline() const;

  // Replays one journal record; live changes go through the methods above.
  // Records come from disk, so they are checked: one that does not fit the
  // current state (unknown job, wrong state, a repeated submit) is not
  // applied and false is returned.
  bool apply(const record& r);

  // For compaction: the ids of every job held, and a record that recreates
  // a job's whole state (replay upserts it).
  std::vector<job_id> job_ids() const;
  record snapshot_of(const job& j) const;
  record meta_record(time_ms now) const;

  // Blob files. The broker counts, per file, the held values that reference
  // it; `fn` runs (inside the mutation that dropped it, so it must only
  // schedule work) when a file's count falls to zero: nothing held names it
  // any more and it may be deleted. Set it after replay: files unreferenced
  // during replay are left to the orphan sweep.
  void on_blob_unreferenced(std::function<void(uint64_t file)> fn) { _on_unreferenced = std::move(fn); }
  bool blob_referenced(uint64_t file) const { return _blob_counts.count(file) != 0; }
  size_t blob_files() const { return _blob_counts.size(); }
  // Every held job with a reference, with each reference (payload, then
  // outcome): replay's checks.
  void for_each_blob_ref(const std::function<void(const job&, const blob_ref&)>& fn) const;
  // Removes a job without a record. Only for replay's checks: a job whose
  // blob file was lost in the window batch/off fsync modes may lose; the
  // next replay drops it again, and compaction then forgets it.
  bool drop(job_id id);

  const job* find(job_id id) const;
  // Queues that hold at least one job (in any state); the others are not
  // shown.
  const job_queue* find_queue(std::string_view name) const;
  void for_each_queue(const std::function<void(const job_queue&)>& fn) const;
  size_t queue_count() const { return _queues_with_jobs; }
  // Up to `limit` dead jobs of `queue`, oldest death first.
  std::vector<const job*> dead_jobs(std::string_view queue, size_t limit) const;
  size_t job_count() const { return _jobs.size(); }
  size_t held_bytes() const { return _held_bytes; }
  // The part of held_bytes() kept in blob files rather than in memory (and
  // the journal).
  size_t referenced_bytes() const { return _referenced_bytes; }
  // Whether `jobs` more jobs carrying `bytes` of payload fit the limits
  // (and the ids left).
  bool has_room(size_t jobs, size_t bytes) const {
    return _jobs.size() + jobs <= _limits.max_jobs && _held_bytes + bytes <= _limits.max_held_bytes &&
           jobs <= max_job_id + 1 - _next_id;
  }
  // Jobs of `queue` that are held and not finished: queued, delayed,
  // leased or failed (awaiting a retry). What a depth cap bounds.
  size_t depth(std::string_view queue) const;
  // Whether `jobs` more jobs fit under the depth cap of `queue`: `max_depth`,
  // or limits.max_queue_depth when that is 0; no cap when both are 0.
  bool has_depth_room(std::string_view queue, size_t jobs, size_t max_depth = 0) const {
    size_t cap = max_depth ? max_depth : _limits.max_queue_depth;
    return cap == 0 || (jobs <= cap && depth(queue) <= cap - jobs);
  }
  const broker_limits& limits() const { return _limits; }

 private:
  // lookup: existing queues only. create: for a job, within
  // limits.max_queues (a live request). restore: for a job, always (a record
  // whose limits were checked when made). wait: for a waiter, uncounted.
  enum class open_mode : uint8_t { lookup, create, restore, wait };
  job_queue* queue_for(std::string_view name, open_mode mode, op_error& err);
  // Drops `q` once it holds no job and no waiter.
  void forget_if_unused(job_queue& q);
  void commit(const record& r);
  void set_state(job& j, job_state s);
  void make_ready(job& j, bool fresh);
  void remove_from_container(job& j);
  void finish(job& j, job_state terminal, time_ms at);
  void dispatch(job_queue& q, time_ms now);
  job* pop_ready(job_queue& q);
  op_error check_lease(job* j, const lease_token& t, principal_ref who) const;
  job* find_mutable(job_id id);
  void forget(job& j);
  void grant(job& j, uint32_t lease_ms, principal_ref owner, time_ms now);
  // Leases ready jobs of `q` into `out` within the bounds (see lease()).
  void take(job_queue& q, size_t max, size_t max_bytes, const answer_size& size, uint32_t lease_ms,
            principal_ref owner, time_ms now, std::vector<job*>& out);
  void set_outcome(job& j, std::string_view text, const blob_ref& ref = {});
  // Counts a reference taken or dropped (see on_blob_unreferenced).
  void hold_blob(const held_value& v);
  void release_blob(const held_value& v);
  bool apply_snapshot(const record& r);
  // A job created from a submit or snapshot record: its queue, identity,
  // limits, payload and idempotency key, counted and indexed; the caller
  // sets its state.
  job& restore_job(const record& r);
  void place(job& j);

  // Timed heap: delayed, failed (awaiting retry) and leased jobs by due_ms.
  void timed_push(job& j);
  void timed_remove(job& j);
  void timed_update(job& j);

  broker_limits _limits;
  random_source _random;
  record_sink* _sink;
  job_id _next_id = 1;
  size_t _held_bytes = 0;
  std::unordered_map<job_id, job> _jobs;
  std::unordered_map<std::string, std::unique_ptr<job_queue>> _queues;
  size_t _queues_with_jobs = 0;
  std::unordered_map<std::string, job_id> _idempotency;  // queue + '\0' + key
  std::unordered_set<std::string> _principals;
  std::vector<job*> _timed;
  // (forget at, id): a min-heap by due time. Jobs finish, and replay brings
  // them back (snapshots arrive in id order), in any order of due time.
  std::vector<std::pair<time_ms, job_id>> _retention;
  void retain(time_ms due, job_id id);
  std::unordered_map<job_id, std::vector<job_watcher*>> _watchers;
  // Held values per blob file; only spilled values have entries.
  std::unordered_map<uint64_t, uint32_t> _blob_counts;
  std::function<void(uint64_t)> _on_unreferenced;
  size_t _referenced_bytes = 0;
};

}  // namespace relay::queue
