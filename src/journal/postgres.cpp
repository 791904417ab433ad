#include "relay/journal_postgres.h"

#include <pthread.h>

#include <algorithm>
#include <csignal>
#include <charconv>
#include <cassert>
#include <cstring>
#include <utility>

#include "journal/pg_conn.h"
#include "relay/log.h"

namespace relay::journal::postgres {
namespace {

// The format its rows are written in. Its records never carry blob
// references, and a version 3 record without them is the version 2 body
// byte for byte: writing 2 lets relays of the previous release, which read
// only 2, share a shard during a rolling upgrade. Rows of 2 or 3 are read.
constexpr uint16_t postgres_format_version = 2;

using std::chrono::milliseconds;

// The schema is created once by whichever relay gets there first; two
// starting together must not race on CREATE TABLE IF NOT EXISTS (which can
// fail on the catalog's unique index), so it is done under this lock.
constexpr const char* schema_lock = "SELECT pg_advisory_xact_lock(7146232350457120312)";

// The shard's table, and one partition a segment. A partition's name has a
// "." (quoted in SQL), which no shard name can hold: shard "main"'s
// segment 1 is never shard "main_1"'s table.
std::string table(const options& o) { return "relay_journal_" + o.shard; }
std::string partition_name(const options& o, uint64_t segment) { return table(o) + "." + std::to_string(segment); }
std::string partition(const options& o, uint64_t segment) { return "\"" + partition_name(o, segment) + "\""; }
// Segment numbers stay below this, so that a partition's name fits
// PostgreSQL's 63 bytes (14 + 32 + 1 + 12).
constexpr uint64_t max_segment = 999'999'999'999;
// Batches are merged into one row up to this many bytes (a single batch
// can be larger: it holds at least one record whole).
constexpr size_t max_row_bytes = 8u << 20;

uint64_t be64(const char* p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v = v << 8 | static_cast<uint8_t>(p[i]);
  return v;
}

// Signals are the loop's (relay's main() says why): its threads never take
// them.
void block_signals() {
  sigset_t all;
  sigfillset(&all);
  pthread_sigmask(SIG_BLOCK, &all, nullptr);
}

std::vector<double> count_bounds() {
  std::vector<double> b;
  for (double v = 1; v <= 65536; v *= 2) b.push_back(v);
  return b;
}

// Parameters as text, kept alive for the call.
struct text_params {
  std::vector<std::string> values;
  std::vector<param> list;
  text_params(std::initializer_list<std::string> v) : values(v) {
    for (const std::string& s : values) list.push_back({s.c_str(), static_cast<int>(s.size()), 0});
  }
};

// Creates the shared tables and this shard's partitioned table.
bool ensure_schema(conn& c, const options& o, steady::time_point until, std::string& error) {
  std::string sql = std::string("BEGIN; ") + schema_lock +
                    "; CREATE TABLE IF NOT EXISTS relay_leader (shard text PRIMARY KEY, epoch bigint NOT NULL, "
                    "holder text NOT NULL, lease_until timestamptz NOT NULL); "
                    "CREATE TABLE IF NOT EXISTS " + table(o) +
                    " (segment bigint NOT NULL, epoch bigint NOT NULL, seq bigint NOT NULL, format smallint NOT NULL, "
                    "records integer NOT NULL, body bytea NOT NULL, PRIMARY KEY (segment, epoch, seq)) "
                    "PARTITION BY RANGE (segment); COMMIT";
  if (!c.exec(sql.c_str(), until, error)) {
    // A failed transaction block would poison the connection: start over.
    c.reset();
    error = "cannot create relay's tables: " + error;
    return false;
  }
  // IF NOT EXISTS says nothing about what exists: it must be relay's.
  text_params p{table(o)};
  result r;
  if (!c.exec("SELECT relkind FROM pg_class WHERE oid = to_regclass($1)", p.list, until, r, error)) return false;
  if (cell(r.get(), 0, 0) != std::optional<std::string_view>("p")) {
    error = "the table " + table(o) + " exists but is not relay's partitioned journal table; refusing to use it";
    return false;
  }
  return true;
}

// What /readyz (unauthenticated) says when the database is out of reach:
// never libpq's text, which can quote pieces of the connection string; the
// log has the detail. relay's own findings about the server are kept.
std::string unreachable(const std::string& error) {
  if (error.starts_with("the database is a read-only standby")) return "standby: " + error;
  return "standby: cannot reach the database (the log's postgres_unavailable line says why)";
}

// The statement that renews the lease only if we still hold the epoch. The
// lease never moves back: a renewal that waited for the row lock behind a
// commit must not undo that commit's later lease_until.
std::string renew_sql() {
  return "UPDATE relay_leader SET lease_until = greatest(lease_until, now() + $4::bigint * interval '1 millisecond') "
         "WHERE shard = $1 AND epoch = $2::bigint AND holder = $3";
}

}  // namespace

// ---- The deadline ----

int64_t deadline::now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(steady::now().time_since_epoch()).count();
}

void deadline::extend(int64_t until_ns) {
  int64_t cur = _until.load(std::memory_order_acquire);
  while (cur < until_ns && !_until.compare_exchange_weak(cur, until_ns, std::memory_order_acq_rel)) {
  }
}

bool deadline::valid() const { return now_ns() < _until.load(std::memory_order_acquire); }

namespace {

// The local deadline a renewal sent at `sent_ns` earns: lease_ms less a
// margin for clock-rate differences and scheduling (5%, at least 20 ms).
int64_t earned(const options& o, int64_t sent_ns) {
  int64_t lease = static_cast<int64_t>(o.lease_ms) * 1'000'000;
  return sent_ns + lease - std::max<int64_t>(lease / 20, 20'000'000);
}

}  // namespace

// ---- Leadership ----

leadership::leadership(uv_loop_t* loop, options o, deadline& d, ops::registry& m, callbacks cb)
    : _loop(loop),
      _o(std::move(o)),
      _deadline(d),
      _cb(std::move(cb)),
      _leader_gauge(m.get_gauge("relay_leader", "1 while this relay leads its journal shard (postgres backend), else 0.")),
      _epoch_gauge(m.get_gauge("relay_leadership_epoch", "The epoch of the shard this relay leads (0: standby).")),
      _changes(m.get_counter("relay_leadership_changes_total", "Times this relay took or lost its shard.")) {}

leadership::~leadership() { stop(false); }

void leadership::start() {
  uv_async_init(_loop, &_async, on_async);
  _async.data = this;
  _open = true;
  _thread = std::thread([this] {
    block_signals();
    run();
  });
}

std::string leadership::standby_status() const {
  std::lock_guard lock(_mu);
  return _status;
}

void leadership::stop(bool release) {
  if (!_open) return;
  _open = false;
  {
    std::lock_guard lock(_mu);
    // The thread knows whether it won the shard (the loop may not have
    // heard yet); a lost shard is not ours to release.
    _release = release && _lost.empty();
    _stop = true;
  }
  _wake.notify_all();
  _thread.join();
  uv_close(reinterpret_cast<uv_handle_t*>(&_async), nullptr);
}

void leadership::on_async(uv_async_t* h) {
  auto* self = static_cast<leadership*>(h->data);
  uint64_t acquired;
  std::string lost;
  {
    std::lock_guard lock(self->_mu);
    acquired = std::exchange(self->_acquired_epoch, 0);
    lost = self->_lost;
  }
  if (acquired && !self->_epoch) {
    self->_epoch = acquired;
    self->_leader_gauge.set(1);
    self->_epoch_gauge.set(static_cast<int64_t>(acquired));
    self->_changes.inc();
    log::info("leadership_acquired")
        .str("shard", self->_o.shard)
        .num("epoch", static_cast<int64_t>(acquired))
        .str("holder", self->_o.holder);
    if (self->_cb.on_acquired) self->_cb.on_acquired(acquired);
  }
  if (!lost.empty() && self->_epoch && !self->_lost_reported) {
    self->_lost_reported = true;
    self->_leader_gauge.set(0);
    self->_changes.inc();
    if (self->_cb.on_lost) self->_cb.on_lost(lost);
  }
}

void leadership::run() {
  bool releasing = false;  // the release statement is not abandoned as "stopping"
  conn c(_o.dsn, [this, &releasing] { return _stop.load(std::memory_order_acquire) && !releasing; });
  uint64_t epoch = 0;
  bool schema = false;
  std::string last_problem;
  auto set_status = [&](std::string s) {
    std::lock_guard lock(_mu);
    _status = std::move(s);
  };
  auto report_problem = [&](const std::string& problem) {
    // Once per change, not once per retry.
    if (problem == last_problem) return;
    last_problem = problem;
    log::warn("postgres_unavailable").str("shard", _o.shard).str("reason", problem).boolean("leader", epoch != 0);
  };
  const std::string lease = std::to_string(_o.lease_ms);
  for (;;) {
    {
      std::unique_lock lock(_mu);
      if (_stop) break;
    }
    auto until = steady::now() + milliseconds(std::max<uint32_t>(_o.renew_ms, 1000));
    std::string error;
    if (!c.connect(until, error) || (!schema && !(schema = ensure_schema(c, _o, until, error)))) {
      schema = schema && c.ok();
      report_problem(error);
      if (!epoch) set_status(unreachable(error));
    } else if (!epoch) {
      // Take the shard if it is free (never held, released, or its lease
      // has passed by the database's clock).
      text_params p{_o.shard, _o.holder, lease};
      result r;
      int64_t sent = deadline::now_ns();
      std::string sql =
          "INSERT INTO relay_leader AS l (shard, epoch, holder, lease_until) "
          "VALUES ($1, 1, $2, now() + $3::bigint * interval '1 millisecond') "
          "ON CONFLICT (shard) DO UPDATE SET epoch = l.epoch + 1, holder = EXCLUDED.holder, "
          "lease_until = EXCLUDED.lease_until WHERE l.lease_until < now() RETURNING epoch";
      if (!c.exec(sql.c_str(), p.list, until, r, error)) {
        report_problem(error);
        set_status(unreachable(error));
      } else if (PQntuples(r.get()) == 1) {
        // The database is checked like any peer: an epoch that is not a
        // positive integer is refused, not taken.
        epoch = number_cell(r.get(), 0, 0).value_or(0);
        if (epoch == 0) {
          report_problem("the database answered the takeover with an epoch that is not a positive integer");
          std::unique_lock lock(_mu);
          _wake.wait_for(lock, milliseconds(_o.renew_ms), [this] { return _stop.load(); });
          continue;
        }
        _deadline.extend(earned(_o, sent));
        last_problem.clear();
        {
          std::lock_guard lock(_mu);
          _acquired_epoch = epoch;
          _status = "leader";
        }
        uv_async_send(&_async);
        continue;  // renew on the regular schedule from now
      } else {
        text_params q{_o.shard};
        result who;
        auto holder = cell(nullptr, 0, 0), held_epoch = holder, until_text = holder;
        if (c.exec("SELECT holder, epoch, lease_until FROM relay_leader WHERE shard = $1", q.list, until, who, error)) {
          holder = cell(who.get(), 0, 0);
          held_epoch = cell(who.get(), 0, 1);
          until_text = cell(who.get(), 0, 2);
        }
        std::string leader(holder.value_or("")), led_until(until_text.value_or(""));
        // Logged when the leader changes, not at each of its renewals.
        std::string who_leads = leader + "@" + std::string(held_epoch.value_or(""));
        if (last_problem != who_leads) {
          last_problem = who_leads;
          log::info("leadership_waiting")
              .str("shard", _o.shard)
              .str("holder", _o.holder)
              .str("leader", leader)
              .str("lease_until", led_until);
        }
        set_status(holder ? "standby: shard " + _o.shard + " is led by " + leader + " (epoch " +
                                std::string(held_epoch.value_or("?")) + ") until " + led_until
                          : "standby: shard " + _o.shard + " is led by another relay");
      }
    } else {
      text_params p{_o.shard, std::to_string(epoch), _o.holder, lease};
      result r;
      int64_t sent = deadline::now_ns();
      // A renewal must come back before the deadline it would extend.
      auto by = steady::now() + std::chrono::nanoseconds(std::max<int64_t>(_deadline.until_ns() - sent, 1'000'000));
      if (!c.exec(renew_sql().c_str(), p.list, by, r, error)) {
        report_problem(error);
      } else if (std::string_view(PQcmdTuples(r.get())) != "1") {
        std::lock_guard lock(_mu);
        _lost = "another relay took shard " + _o.shard + " (epoch " + std::to_string(epoch) + " is over)";
        _stop = true;
        uv_async_send(&_async);
        break;
      } else {
        _deadline.extend(earned(_o, sent));
        last_problem.clear();
      }
    }
    std::unique_lock lock(_mu);
    _wake.wait_for(lock, milliseconds(_o.renew_ms), [this] { return _stop.load(); });
  }
  if (_release && epoch && c.ok()) {
    // Give the shard up so that a standby need not wait out the lease.
    text_params p{_o.shard, std::to_string(epoch), _o.holder};
    std::string error;
    releasing = true;
    result r;
    bool ok = c.exec(
        "UPDATE relay_leader SET lease_until = '-infinity' WHERE shard = $1 AND epoch = $2::bigint AND holder = $3",
        p.list, steady::now() + milliseconds(2000), r, error);
    _deadline.revoke();
    if (ok && std::string_view(PQcmdTuples(r.get())) == "1")
      log::info("leadership_released").str("shard", _o.shard).num("epoch", static_cast<int64_t>(epoch));
    else
      log::warn("leadership_release_failed")
          .str("shard", _o.shard)
          .str("reason", ok ? "the shard had already passed to another relay" : error)
          .str("effect", "a standby takes the shard once the lease runs out");
  }
}

// ---- The journal ----

journal::journal(uv_loop_t* loop, options o, deadline& d, ops::registry& m)
    : _loop(loop),
      _o(std::move(o)),
      _deadline(d),
      _current(std::make_unique<batch>()),
      _answers(
          [this] {
            std::lock_guard lock(_mu);
            return _committed_seq;
          },
          [this] { return may_acknowledge(); }),
      _records(m.get_counter("relay_journal_records_total", "Records appended to the journal.")),
      _commits(m.get_counter("relay_journal_commits_total", "Transactions committed to PostgreSQL (one a group-commit batch).")),
      _commit_errors(m.get_counter("relay_journal_write_errors_total", "Failed journal writes or fsyncs.")),
      _commit_seconds(m.get_histogram("relay_journal_commit_seconds", "Time per PostgreSQL journal commit, retries included.",
                                      ops::latency_bounds_seconds())),
      _records_per_commit(m.get_histogram("relay_journal_records_per_commit",
                                          "Records made durable by one PostgreSQL commit (group commit).", count_bounds())),
      _bytes_gauge(m.get_gauge("relay_journal_bytes", "Bytes the journal holds (segment files, or rows in PostgreSQL).")),
      _failing_gauge(m.get_gauge("relay_journal_failing", "1 while journal writes are failing and changes are refused.")) {
  _current->seq = _next_seq++;
}

journal::~journal() { close(); }

void journal::open(uint64_t epoch, std::function<bool(const queue::record&)> apply,
                   std::function<void(const std::string&, const replayed&)> done) {
  _apply = std::move(apply);
  _done = std::move(done);
  uv_async_init(_loop, &_async, on_async);
  _async.data = this;
  _answers.start(_loop);
  uv_check_init(_loop, &_check);
  _check.data = this;
  uv_prepare_init(_loop, &_prepare);
  _prepare.data = this;
  _handles = true;
  _thread = std::thread([this, epoch] {
    block_signals();
    run(epoch);
  });
}

// ---- Loop side ----

void journal::append(const queue::record& r) {
  // Once fenced nothing is written (and nothing acknowledged): the process
  // is on its way to restart as a standby.
  if (!_open || _fenced) return;
  // Bodies never spill with this backend (the threshold is forced to 0), so
  // its records never carry blob references: rows stay format 2 (below).
  assert(!r.payload_ref.valid() && !r.text_ref.valid());
  size_t before = _current->bytes.size();
  encode(r, _current->bytes);
  ++_current->records;
  ++_appended;
  _last_record_seq = _current->seq;
  _unwritten_bytes += _current->bytes.size() - before;
  _records.inc();
  if (_current->records >= _o.max_batch_records || _current->bytes.size() >= (4u << 20)) hand_off();
}

bool journal::accepting() const {
  return _open && !_fenced && !_failing && _unwritten_bytes < _o.max_unwritten_bytes && _deadline.valid();
}

void journal::when_durable(std::function<void(bool)> fn) {
  assert(!_closed && "when_durable() after close()");
  _answers.push(_last_record_seq, _failing || _fenced || !_open, std::move(fn));
}

bool journal::may_acknowledge() {
  // Nothing is acknowledged past the leadership deadline, committed or not:
  // another relay may lead by now.
  if (_fenced) return false;
  if (_deadline.valid()) return true;
  fence("the leadership lease ran out before the commit was acknowledged");
  return false;
}

void journal::hand_off() {
  if (!_open || _fenced) return;
  if (_current->bytes.empty() && !_current->roll_to && !_current->delete_before) return;
  if (_current->records) _batch_ends.emplace_back(_current->seq, _appended);
  {
    std::lock_guard lock(_mu);
    _todo.push_back(std::move(_current));
  }
  _wake.notify_all();
  _current = std::make_unique<batch>();
  _current->seq = _next_seq++;
}

uint64_t journal::roll() {
  uint64_t n = _next_segment++;
  hand_off();
  _current->roll_to = n;
  hand_off();
  return n;
}

void journal::delete_before(uint64_t segment) {
  _current->delete_before = segment;
  hand_off();
}

void journal::fence(const std::string& reason) {
  if (_fenced) return;
  _fenced = true;
  // Clients see _failure; the reason, which can quote the server, goes to
  // the log (on_fenced: leadership_lost).
  _failure = "this relay no longer leads shard " + _o.shard;
  _failing_gauge.set(1);
  {
    std::lock_guard lock(_mu);
    _stop = true;
    _todo.clear();
  }
  _wake.notify_all();
  _answers.fail_all();
  if (_on_fenced) _on_fenced(reason);
}

void journal::apply_replayed() {
  std::deque<std::string> rows;
  bool done;
  std::string error;
  {
    std::lock_guard lock(_mu);
    rows.swap(_rows);
    _rows_bytes = 0;
    done = _rows_done;
    error = _thread_error;
  }
  _wake.notify_all();  // room for more
  for (const std::string& row : rows) {
    if (!_replay_error.empty()) break;
    // The row's key heads it (see run()): segment, epoch, seq.
    std::string_view key(row.data(), 24), body(row.data() + 24, row.size() - 24);
    std::string problem;
    ++_replayed.rows;
    _replayed.bytes += body.size();
    if (!for_each_record(body, _apply, _replayed.run, problem)) {
      _replayed.corrupt = true;
      _replay_error = "journal row (segment " + std::to_string(be64(key.data())) + ", epoch " +
                      std::to_string(be64(key.data() + 8)) + ", seq " + std::to_string(be64(key.data() + 16)) +
                      ") of shard " + _o.shard + " is corrupt: " + problem + "; refusing to lead";
    }
  }
  if (!_replay_error.empty() || (done && !error.empty())) {
    std::string e = _replay_error.empty() ? error : _replay_error;
    {
      std::lock_guard lock(_mu);
      _stop = true;
    }
    _wake.notify_all();
    auto d = std::move(_done);
    _done = nullptr;
    if (d) d(e, _replayed);
    return;
  }
  if (!done) return;
  {
    std::lock_guard lock(_mu);
    _next_segment = _first_segment + 1;
  }
  _open = true;
  _disk_bytes.store(_replayed.bytes);
  _bytes_gauge.set(static_cast<int64_t>(_replayed.bytes));
  // Batches leave at the end of every loop phase that can append records
  // (as in the file writer).
  uv_check_start(&_check, [](uv_check_t* h) { static_cast<journal*>(h->data)->hand_off(); });
  uv_prepare_start(&_prepare, [](uv_prepare_t* h) { static_cast<journal*>(h->data)->hand_off(); });
  auto d = std::move(_done);
  _done = nullptr;
  if (d) d({}, _replayed);
}

void journal::on_async(uv_async_t* h) {
  auto* self = static_cast<journal*>(h->data);
  if (!self->_open && self->_done) {
    self->apply_replayed();
    return;
  }
  uint64_t written, committed;
  bool failing;
  std::string error, fenced;
  {
    std::lock_guard lock(self->_mu);
    committed = self->_committed_seq;
    written = std::exchange(self->_written_bytes, 0);
    failing = self->_thread_failing;
    error = self->_thread_error;
    fenced = self->_fence_reason;
  }
  self->_unwritten_bytes -= std::min(written, self->_unwritten_bytes);
  for (; !self->_batch_ends.empty() && self->_batch_ends.front().first <= committed; self->_batch_ends.pop_front())
    self->_durable_records = self->_batch_ends.front().second;
  self->_bytes_gauge.set(static_cast<int64_t>(self->_disk_bytes.load()));
  if (!fenced.empty()) {
    self->fence(fenced);
    return;
  }
  self->_answers.run_all();
  if (failing && !self->_failing) {
    self->_failing = true;
    // Clients see this; the server's own words go only to the log.
    self->_failure = "cannot commit to PostgreSQL (relay's log says why)";
    self->_failing_gauge.set(1);
    log::error("journal_write_failed")
        .str("backend", "postgres")
        .str("reason", error)
        .str("effect", "refusing changes until a commit succeeds or leadership is lost");
  } else if (!failing && self->_failing && !self->_fenced) {
    self->_failing = false;
    self->_failure.clear();
    self->_failing_gauge.set(0);
    log::info("journal_recovered").str("backend", "postgres");
  }
}

void journal::close() {
  if (_closed) return;
  _closed = true;
  _on_fenced = nullptr;  // the caller is shutting down already
  if (_open && !_fenced) hand_off();
  {
    std::lock_guard lock(_mu);
    _stop = true;
  }
  _wake.notify_all();
  if (_thread.joinable()) _thread.join();
  if (_handles) {
    // What the thread committed before it stopped is answered as such.
    on_async(&_async);
    while (!_answers.empty()) {
      _answers.fail_undurable();
      _answers.run_all();
    }
    _answers.close();
    uv_check_stop(&_check);
    uv_prepare_stop(&_prepare);
    for (auto* h : {reinterpret_cast<uv_handle_t*>(&_async), reinterpret_cast<uv_handle_t*>(&_check),
                    reinterpret_cast<uv_handle_t*>(&_prepare)})
      uv_close(h, nullptr);
  }
  _open = false;
}

// ---- The thread ----

void journal::run(uint64_t epoch) {
  conn c(_o.dsn, [this] {
    // Stop waiting on the database once told to stop and the lease is gone
    // (nothing committed then could be acknowledged anyway); while it holds,
    // a stop still commits what is pending.
    std::lock_guard lock(_mu);
    return _stop && (!_deadline.valid() || !_fence_reason.empty());
  });
  auto fail = [&](const std::string& error) {
    std::lock_guard lock(_mu);
    _thread_error = error;
    _rows_done = true;
    uv_async_send(&_async);
  };
  auto stopping = [&] {
    std::lock_guard lock(_mu);
    return _stop;
  };
  auto lease_until = [&] {
    return steady::time_point(std::chrono::nanoseconds(std::max<int64_t>(_deadline.until_ns(), 0)));
  };
  std::string error;
  // Connect and replay while the lease holds.
  while (!c.connect(lease_until(), error)) {
    if (stopping() || !_deadline.valid()) return fail("cannot open the journal: " + error);
    std::this_thread::sleep_for(milliseconds(100));
  }
  const std::string epoch_text = std::to_string(epoch), lease = std::to_string(_o.lease_ms);
  std::string select = "SELECT segment, epoch, seq, format, records, body FROM " + table(_o) +
                       " ORDER BY segment, epoch, seq";
  bool streamed = c.stream(
      select.c_str(), {},
      [&](const PGresult* r) {
        bool shaped = PQntuples(r) == 1 && PQnfields(r) == 6;
        for (int col = 0; shaped && col < 6; ++col) shaped = !PQgetisnull(r, 0, col);
        if (!shaped || PQgetlength(r, 0, 0) != 8 || PQgetlength(r, 0, 1) != 8 || PQgetlength(r, 0, 2) != 8 ||
            PQgetlength(r, 0, 3) != 2) {
          error = "a journal row of shard " + _o.shard + " has columns of unexpected types";
          return false;
        }
        auto format = static_cast<uint16_t>(static_cast<uint8_t>(PQgetvalue(r, 0, 3)[0]) << 8 |
                                            static_cast<uint8_t>(PQgetvalue(r, 0, 3)[1]));
        if (format < postgres_format_version || format > format_version) {
          error = "a journal row of shard " + _o.shard + " has record format " + std::to_string(format) +
                  "; this relay reads formats " + std::to_string(postgres_format_version) + " to " +
                  std::to_string(format_version);
          return false;
        }
        std::string row;
        int len = PQgetlength(r, 0, 5);
        row.reserve(24 + static_cast<size_t>(len));
        for (int col = 0; col < 3; ++col) row.append(PQgetvalue(r, 0, col), 8);
        row.append(PQgetvalue(r, 0, 5), static_cast<size_t>(len));
        std::unique_lock lock(_mu);
        // The loop applies rows as they come; at most 8 MiB wait for it.
        _wake.wait(lock, [&] { return _rows_bytes < (8u << 20) || _stop; });
        if (_stop) {
          error = "stopped during replay";
          return false;
        }
        _rows_bytes += row.size();
        _rows.push_back(std::move(row));
        uv_async_send(&_async);
        return true;
      },
      error);
  if (!streamed) return fail("cannot replay shard " + _o.shard + " from PostgreSQL: " + error);

  // A fenced transaction: BEGIN, renew the lease only if we hold the epoch,
  // then `sql`, COMMIT. False with `fenced` set if the epoch is gone.
  auto fenced_ddl = [&](const std::string& sql, bool& fenced) {
    fenced = false;
    auto until = lease_until();
    result r;
    text_params p{_o.shard, epoch_text, _o.holder, lease};
    // Any failure drops the connection: a transaction left open would
    // poison the next statement.
    bool ok = c.exec("BEGIN", until, error) && c.exec(renew_sql().c_str(), p.list, until, r, error);
    fenced = ok && std::string_view(PQcmdTuples(r.get())) != "1";
    ok = ok && !fenced && c.exec(sql.c_str(), until, error) && c.exec("COMMIT", until, error);
    if (!ok) c.reset();
    return ok;
  };
  auto segments = [&](std::vector<uint64_t>& out) {
    result r;
    text_params p{table(_o)};
    if (!c.exec("SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                "WHERE i.inhparent = $1::regclass",
                p.list, lease_until(), r, error))
      return false;
    std::string prefix = table(_o) + ".";
    out.clear();
    for (int i = 0; i < PQntuples(r.get()); ++i) {
      std::string_view name = cell(r.get(), i, 0).value_or("");
      uint64_t n = 0;
      if (!name.starts_with(prefix)) continue;
      std::string_view digits = name.substr(prefix.size());
      auto [end, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), n);
      if (ec == std::errc() && end == digits.data() + digits.size() && n >= 1 && n <= max_segment) out.push_back(n);
    }
    std::sort(out.begin(), out.end());
    return true;
  };
  std::vector<uint64_t> existing;
  if (!segments(existing)) return fail("cannot list the journal's segments: " + error);
  uint64_t segment = existing.empty() ? 1 : existing.back() + 1;
  auto create_segment = [&](uint64_t n, bool& fenced) {
    if (n > max_segment) {
      error = "segment numbers are used up (" + std::to_string(max_segment) + ")";
      return false;
    }
    if (!fenced_ddl("CREATE TABLE IF NOT EXISTS " + partition(_o, n) + " PARTITION OF " + table(_o) +
                        " FOR VALUES FROM (" + std::to_string(n) + ") TO (" + std::to_string(n + 1) + ")",
                    fenced))
      return false;
    // A table of that name that is not this partition would take no rows.
    std::vector<uint64_t> now;
    if (!segments(now)) return false;
    if (!std::binary_search(now.begin(), now.end(), n)) {
      error = "the table " + partition_name(_o, n) + " exists but is not a partition of " + table(_o);
      return false;
    }
    return true;
  };
  bool fenced = false;
  if (!create_segment(segment, fenced))
    return fail(fenced ? "lost the shard before it could be opened" : "cannot start a journal segment: " + error);
  {
    std::lock_guard lock(_mu);
    _first_segment = segment;
    _rows_done = true;
  }
  uv_async_send(&_async);

  // Group commits: each batch (or several, up to max_batch_records) is one
  // row in one single-statement transaction that also checks the epoch.
  const std::string commit_sql =
      "WITH fence AS (UPDATE relay_leader SET lease_until = greatest(lease_until, now() + $3::bigint * interval "
      "'1 millisecond') "
      "WHERE shard = $1 AND epoch = $2::bigint AND holder = $9 RETURNING 1), "
      "ins AS (INSERT INTO " + table(_o) +
      " (segment, epoch, seq, format, records, body) SELECT $4::bigint, $2::bigint, $5::bigint, $6::smallint, "
      "$7::integer, $8::bytea FROM fence ON CONFLICT DO NOTHING RETURNING 1) "
      "SELECT (SELECT count(*) FROM fence), (SELECT count(*) FROM ins)";
  // How long a failing commit or segment start is retried: while leading,
  // one lease (renewals can go on succeeding while commits fail -- a full
  // disk, a revoked grant, a trigger -- and a leader that cannot write must
  // not keep the shard from one that might); once stopping, 2 s; never past
  // the deadline, after which nothing could be acknowledged anyway.
  auto give_up = [&](steady::time_point since) {
    auto limit = stopping() ? milliseconds(2000) : milliseconds(_o.lease_ms);
    return steady::now() - since >= limit || !_deadline.valid();
  };
  auto report = [&](auto&& change) {
    {
      std::lock_guard lock(_mu);
      change();
    }
    uv_async_send(&_async);
  };
  for (;;) {
    std::vector<std::unique_ptr<batch>> take;
    {
      std::unique_lock lock(_mu);
      _wake.wait(lock, [&] { return !_todo.empty() || _stop; });
      if (!_fence_reason.empty() || _todo.empty()) return;  // stopped with nothing left
      // A roll or a drop is done on its own, between rows; records are
      // gathered up to max_batch_records and max_row_bytes into one row.
      uint64_t records = 0, bytes = 0;
      while (!_todo.empty()) {
        batch& b = *_todo.front();
        bool ddl = b.roll_to || b.delete_before;
        if (!take.empty() &&
            (ddl || records + b.records > _o.max_batch_records || bytes + b.bytes.size() > max_row_bytes))
          break;
        records += b.records;
        bytes += b.bytes.size();
        take.push_back(std::move(_todo.front()));
        _todo.pop_front();
        if (ddl) break;
      }
    }
    batch& first = *take.front();
    if (first.roll_to && first.roll_to > segment) {
      for (auto since = steady::now(); !create_segment(first.roll_to, fenced);) {
        if (fenced) return report([&] { _fence_reason = "another relay took shard " + _o.shard; });
        std::string why = "cannot start journal segment " + std::to_string(first.roll_to) + ": " + error;
        if (give_up(since)) return report([&] { _fence_reason = why; });
        report([&] {
          _thread_failing = true;
          _thread_error = why;
        });
        std::this_thread::sleep_for(milliseconds(100));
        c.connect(lease_until(), error);
      }
      segment = first.roll_to;
    }
    std::string body;
    uint64_t records = 0, seq = 0;
    for (auto& b : take) {
      body += b->bytes;
      records += b->records;
      seq = b->seq;
    }
    if (!body.empty()) {
      const std::string seg_text = std::to_string(segment), seq_text = std::to_string(seq),
                        format_text = std::to_string(postgres_format_version), records_text = std::to_string(records);
      std::vector<param> p = {
          {_o.shard.c_str(), static_cast<int>(_o.shard.size())},
          {epoch_text.c_str(), static_cast<int>(epoch_text.size())},
          {lease.c_str(), static_cast<int>(lease.size())},
          {seg_text.c_str(), static_cast<int>(seg_text.size())},
          {seq_text.c_str(), static_cast<int>(seq_text.size())},
          {format_text.c_str(), static_cast<int>(format_text.size())},
          {records_text.c_str(), static_cast<int>(records_text.size())},
          {body.data(), static_cast<int>(body.size()), 1},
          {_o.holder.c_str(), static_cast<int>(_o.holder.size())},
      };
      auto t0 = steady::now();
      for (;;) {
        result r;
        int64_t sent = deadline::now_ns();
        bool ok = c.connect(lease_until(), error) && c.exec(commit_sql.c_str(), p, lease_until(), r, error);
        std::string_view fence = ok && PQntuples(r.get()) == 1 && PQnfields(r.get()) == 2 ? PQgetvalue(r.get(), 0, 0) : "";
        if (fence == "0")
          return report([&] { _fence_reason = "a commit found another relay leading shard " + _o.shard; });
        if (ok && fence != "1") {
          ok = false;
          error = "the database answered a commit with an unexpected result";
        }
        if (ok) {
          // The commit renewed the lease too.
          _deadline.extend(earned(_o, sent));
          // Inserted now, or by an earlier attempt whose answer was lost
          // (the key is taken): committed either way.
          _commit_seconds.observe(std::chrono::duration<double>(steady::now() - t0).count());
          _records_per_commit.observe(static_cast<double>(records));
          _commits.inc();
          _disk_bytes.fetch_add(body.size());
          report([&] {
            _committed_seq = seq;
            _written_bytes += body.size();
            _thread_failing = false;
          });
          break;
        }
        _commit_errors.inc();
        std::string why = "cannot commit to PostgreSQL: " + error;
        if (give_up(t0)) return report([&] { _fence_reason = why; });
        report([&] {
          _thread_failing = true;
          _thread_error = why;
        });
        std::this_thread::sleep_for(milliseconds(50));
      }
    } else {
      report([&] { _committed_seq = std::max(_committed_seq, seq); });
    }
    if (uint64_t before = take.back()->delete_before) {
      // Compaction: the snapshots are committed; drop whole segments.
      std::vector<uint64_t> old;
      if (segments(old)) {
        std::string drop;
        for (uint64_t n : old)
          if (n < before && n != segment) drop += (drop.empty() ? "" : ", ") + partition(_o, n);
        if (!drop.empty() && !fenced_ddl("DROP TABLE IF EXISTS " + drop, fenced)) {
          if (fenced) return report([&] { _fence_reason = "another relay took shard " + _o.shard; });
          log::warn("journal_compaction_drop_failed").str("reason", error).str("effect", "retried at the next compaction");
        } else if (!drop.empty()) {
          // The dropped rows' bytes are no longer held: recount.
          result r;
          if (c.exec(("SELECT coalesce(sum(length(body)), 0) FROM " + table(_o)).c_str(), {}, lease_until(), r, error))
            if (auto bytes = number_cell(r.get(), 0, 0)) _disk_bytes.store(*bytes);
          report([] {});
        }
      }
    }
  }
}

}  // namespace relay::journal::postgres
