#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cassert>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>

#include "journal/segment.h"
#include "relay/blob_store.h"
#include "relay/journal.h"
#include "relay/log.h"

namespace relay::journal {
namespace {

std::vector<double> count_bounds() {
  std::vector<double> b;
  for (double v = 1; v <= 65536; v *= 2) b.push_back(v);
  return b;
}

}  // namespace

// ---- The directory lock ----

dir_lock::~dir_lock() {
  if (_fd >= 0) ::close(_fd);
}

bool dir_lock::acquire(const std::string& dir, std::string& error) {
  if (_fd >= 0) return true;
  if (mkdir(dir.c_str(), 0700) != 0 && errno != EEXIST) {
    error = "journal.dir " + dir + ": " + std::strerror(errno);
    return false;
  }
  std::string path = dir + "/LOCK";
  int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (fd < 0) {
    error = "journal.dir " + dir + ": cannot open " + path + ": " + std::strerror(errno);
    return false;
  }
  if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    int e = errno;
    if (e == EWOULDBLOCK) {
      char buf[32] = {};
      ssize_t n = ::pread(fd, buf, sizeof buf - 1, 0);
      std::string pid(buf, n > 0 ? static_cast<size_t>(n) : 0);
      while (!pid.empty() && (pid.back() == '\n' || pid.back() == ' ')) pid.pop_back();
      error = "journal.dir " + dir + " is in use by another relay (pid " + (pid.empty() ? std::string("unknown") : pid) +
              ", holding " + path + "); two relays must never share a journal";
    } else {
      error = "journal.dir " + dir + ": cannot lock " + path + ": " + std::strerror(e);
    }
    ::close(fd);
    return false;
  }
  // Ours: say who holds it, for the error of the next one that tries.
  std::string pid = std::to_string(::getpid()) + "\n";
  if (::ftruncate(fd, 0) != 0 || ::pwrite(fd, pid.data(), pid.size(), 0) != static_cast<ssize_t>(pid.size())) {
    error = "journal.dir " + dir + ": cannot write " + path + ": " + std::strerror(errno);
    ::close(fd);
    return false;
  }
  _fd = fd;
  return true;
}

writer::writer(uv_loop_t* loop, options o, ops::registry& m)
    : _loop(loop),
      _o(std::move(o)),
      _current(std::make_unique<batch>()),
      _answers([this] { return _durable_seq.load(std::memory_order_acquire); }),
      _ring(new batch*[ring_size]),
      _records(m.get_counter("relay_journal_records_total", "Records appended to the journal.")),
      _fsyncs(m.get_counter("relay_journal_fsyncs_total", "fsync calls on journal segments.")),
      _write_errors(m.get_counter("relay_journal_write_errors_total", "Failed journal writes or fsyncs.")),
      _fsync_seconds(m.get_histogram("relay_journal_fsync_seconds", "Time per journal fsync.", ops::latency_bounds_seconds())),
      _records_per_fsync(m.get_histogram("relay_journal_records_per_fsync", "Records made durable by one fsync (group commit).", count_bounds())),
      _bytes_gauge(m.get_gauge("relay_journal_bytes", "Bytes in journal segments on disk.")),
      _segments_gauge(m.get_gauge("relay_journal_segments", "Journal segment files.")),
      _failing_gauge(m.get_gauge("relay_journal_failing", "1 while journal writes fail and changes are refused.")) {
  _current->seq = _next_seq++;
}

writer::~writer() {
  assert(!_thread.joinable() && "close() the writer before destroying it");
  delete[] _ring;
}

bool writer::open(uint64_t first_segment, std::string& error) {
  // Creates the directory too.
  if (!_lock.acquire(_o.dir, error)) return false;
  // The first segment is opened here, before the thread starts, so that a
  // bad directory is a start-up error rather than a runtime one.
  if (!open_segment(first_segment, error)) return false;
  uint64_t bytes = 0, count = 0;
  for (uint64_t n : list_segments(_o.dir)) {
    struct stat st;
    if (stat(segment_path(_o.dir, n).c_str(), &st) == 0) bytes += static_cast<uint64_t>(st.st_size);
    ++count;
  }
  _disk_bytes = bytes;
  _segments = count;
  _next_segment = first_segment + 1;
  // Batches leave at the end of every loop phase that can append records:
  // the check handle runs after I/O callbacks (requests), the prepare handle
  // before the loop blocks (after timers such as lease expiry).
  uv_check_init(_loop, &_check);
  _check.data = this;
  uv_check_start(&_check, on_check);
  uv_prepare_init(_loop, &_prepare);
  _prepare.data = this;
  uv_prepare_start(&_prepare, [](uv_prepare_t* h) { static_cast<writer*>(h->data)->hand_off(); });
  uv_async_init(_loop, &_async, on_async);
  _async.data = this;
  uv_timer_init(_loop, &_batch_timer);
  _batch_timer.data = this;
  _answers.start(_loop);
  if (_o.fsync == fsync_mode::batch)
    uv_timer_start(&_batch_timer, on_batch_timer, _o.batch_interval_ms, _o.batch_interval_ms);
  _open = true;
  _thread = std::thread([this] { run(); });
  return true;
}

// ---- Loop side ----

void writer::append(const queue::record& r) {
  size_t before = _current->bytes.size();
  encode(r, _current->bytes);
  // A submit or complete names the blob file its request spooled: new to
  // the journal, so not yet known durable. (Snapshots name files that
  // earlier records made durable.) A batch submit names one file for many
  // jobs: consecutive repeats are skipped, and any left are harmless.
  if (r.type == queue::record_type::submit || r.type == queue::record_type::complete) {
    for (const queue::blob_ref* ref : {&r.payload_ref, &r.text_ref}) {
      if (ref->valid() && (_current->blobs.empty() || _current->blobs.back() != ref->file))
        _current->blobs.push_back(ref->file);
    }
  }
  ++_current->records;
  ++_appended;
  _last_record_seq = _current->seq;
  _unwritten_bytes += _current->bytes.size() - before;
  _records.inc();
  // Large batches go at once rather than at the end of the iteration.
  if (_current->bytes.size() >= (4u << 20)) hand_off();
}

void writer::when_durable(std::function<void(bool)> fn) {
  assert(!_closed && "when_durable() after close()");
  // Never called here, whatever the mode: queued, and run from the loop
  // (on_async when the writer reports, on_idle when it is due already). In
  // batch and off modes an answer does not wait for the disk (seq 0).
  uint64_t seq = _o.fsync == fsync_mode::always ? _last_record_seq : 0;
  _answers.push(seq, _failing, std::move(fn));
}

// ---- The answers waiting for the journal ----

void answer_queue::start(uv_loop_t* loop) {
  uv_idle_init(loop, &_idle);
  _idle.data = this;
  _started = true;
}

void answer_queue::push(uint64_t seq, bool failed, std::function<void(bool)> fn) {
  _waiters.push_back({seq, failed, std::move(fn)});
  if (_waiters.size() == 1 && front_due()) uv_idle_start(&_idle, on_idle);
}

void answer_queue::fail_all() {
  for (auto& w : _waiters) w.failed = true;
  if (!_waiters.empty()) uv_idle_start(&_idle, on_idle);
}

void answer_queue::fail_undurable() {
  uint64_t durable = _durable();
  for (auto& w : _waiters)
    if (w.seq > durable) w.failed = true;
}

bool answer_queue::front_due() const {
  const waiter& w = _waiters.front();
  return w.failed || w.seq == 0 || w.seq <= _durable();
}

void answer_queue::run(size_t limit) {
  // FIFO: the first one not yet due holds back those behind it (seqs only
  // grow, so they would not be due either).
  while (limit-- > 0 && !_waiters.empty() && front_due()) {
    if (!_waiters.front().failed && _may_succeed && !_may_succeed()) return;  // it failed them all: next turn
    bool ok = !_waiters.front().failed;
    auto fn = std::move(_waiters.front().fn);
    _waiters.pop_front();
    fn(ok);
  }
  // The idle handle keeps the loop from blocking in poll exactly while one
  // is due, including one queued by a callback above.
  if (!_waiters.empty() && front_due()) uv_idle_start(&_idle, on_idle);
  else uv_idle_stop(&_idle);
}

void answer_queue::on_idle(uv_idle_t* h) {
  auto* q = static_cast<answer_queue*>(h->data);
  // Only those queued before this turn: one queued meanwhile runs next turn.
  q->run(q->_waiters.size());
}

void answer_queue::close() {
  if (!_started) return;
  _started = false;
  uv_idle_stop(&_idle);
  uv_close(reinterpret_cast<uv_handle_t*>(&_idle), nullptr);
}

uint64_t writer::roll() {
  uint64_t n = _next_segment++;
  if (!_current->bytes.empty() || _current->roll_to) hand_off();
  _current->roll_to = n;
  hand_off();
  return n;
}

void writer::delete_before(uint64_t segment) {
  _current->delete_before = segment;
  hand_off();
}

void writer::hand_off() {
  if (_current->bytes.empty() && !_current->roll_to && !_current->delete_before && !_current->sync) return;
  if (_current->records) _batch_ends.emplace_back(_current->seq, _appended);
  _overflow.push_back(std::move(_current));
  _current = std::make_unique<batch>();
  _current->seq = _next_seq++;
  publish();
}

void writer::publish() {
  // Move what fits into the ring; the writer owns a batch once it is there.
  uint64_t head = _ring_head.load(std::memory_order_relaxed);
  while (!_overflow.empty() && head - _ring_tail.load(std::memory_order_acquire) < ring_size) {
    _ring[head % ring_size] = _overflow.front().release();
    _overflow.pop_front();
    ++head;
  }
  _ring_head.store(head, std::memory_order_release);
  _ring_head.notify_one();
}

void writer::on_check(uv_check_t* h) { static_cast<writer*>(h->data)->hand_off(); }

void writer::on_batch_timer(uv_timer_t* t) {
  auto* w = static_cast<writer*>(t->data);
  // batch mode: an fsync marker every interval; while failing: a nudge to retry.
  w->_current->sync = true;
  w->hand_off();
}

void writer::on_async(uv_async_t* h) {
  auto* w = static_cast<writer*>(h->data);
  bool failing = w->_writer_failing.load(std::memory_order_acquire);
  uint64_t written = w->_written_bytes.exchange(0, std::memory_order_acq_rel);
  w->_unwritten_bytes -= std::min(written, w->_unwritten_bytes);
  w->_bytes_gauge.set(static_cast<int64_t>(w->_disk_bytes.load()));
  w->_segments_gauge.set(static_cast<int64_t>(w->_segments.load()));
  for (uint64_t done = w->_durable_seq.load(std::memory_order_acquire);
       !w->_batch_ends.empty() && w->_batch_ends.front().first <= done; w->_batch_ends.pop_front())
    w->_durable_records = w->_batch_ends.front().second;
  // Those made durable first (before any failure this report brings).
  w->_answers.run_all();
  if (failing) {
    if (!w->_failing) {
      while (w->_error_lock.test_and_set(std::memory_order_acquire)) {
      }
      w->_failure = w->_writer_error;
      w->_error_lock.clear(std::memory_order_release);
      log::error("journal_write_failed").str("reason", w->_failure).str("effect", "refusing changes until writes succeed");
      w->_failing = true;
      w->_failing_gauge.set(1);
      if (w->_o.fsync != fsync_mode::batch) uv_timer_start(&w->_batch_timer, on_batch_timer, w->_o.retry_ms, w->_o.retry_ms);
    }
    // Nothing appended so far can be promised: the answers say so.
    w->_answers.fail_all();
    w->_answers.run_all();
  } else if (w->_failing) {
    w->_failing = false;
    w->_failing_gauge.set(0);
    log::info("journal_recovered");
    if (w->_o.fsync != fsync_mode::batch) uv_timer_stop(&w->_batch_timer);
  }
}

void writer::close() {
  if (!_open) return;
  _open = false;
  hand_off();
  // Whatever is still in the overflow must reach the ring before the stop.
  while (!_overflow.empty()) {
    publish();
    if (!_overflow.empty()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  // The stop flag first, then a marker batch: the writer waits for the
  // ring head to change, so it must see a new batch to wake up.
  _stop.store(true, std::memory_order_release);
  _current->sync = true;
  hand_off();
  // Blocks only at shutdown, while the last batches are written and synced.
  _thread.join();
  // The writer may stop before it takes the last marker batch.
  for (uint64_t t = _ring_tail.load(); t != _ring_head.load(); ++t) delete _ring[t % ring_size];
  on_async(&_async);
  // The writer is gone: what is still queued (queued by the callbacks just
  // run, or not durable) is answered now, as durable or not.
  while (!_answers.empty()) {
    _answers.fail_undurable();
    _answers.run_all();
  }
  _closed = true;
  _answers.close();
  uv_check_stop(&_check);
  uv_prepare_stop(&_prepare);
  uv_timer_stop(&_batch_timer);
  uv_close(reinterpret_cast<uv_handle_t*>(&_check), nullptr);
  uv_close(reinterpret_cast<uv_handle_t*>(&_prepare), nullptr);
  uv_close(reinterpret_cast<uv_handle_t*>(&_async), nullptr);
  uv_close(reinterpret_cast<uv_handle_t*>(&_batch_timer), nullptr);
  if (_fd >= 0) ::close(_fd);
  _fd = -1;
}

// ---- Writer thread ----

bool writer::open_segment(uint64_t number, std::string& error) {
  std::string path = segment_path(_o.dir, number);
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) {
    error = path + ": " + std::strerror(errno);
    return false;
  }
  std::string header;
  write_segment_header(header, number);
  if (::write(fd, header.data(), header.size()) != static_cast<ssize_t>(header.size())) {
    error = path + ": cannot write the header: " + std::strerror(errno);
    ::close(fd);
    return false;
  }
  if (_fd >= 0) ::close(_fd);
  _fd = fd;
  _segment = number;
  _segment_size = _synced_size = header.size();
  _disk_bytes.fetch_add(header.size());
  _segments.fetch_add(1);
  // The new file's name must be durable too.
  int dfd = ::open(_o.dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
  return true;
}

bool writer::write_batch(batch& b, std::string& error) {
  if (_o.fault) {
    if (int e = _o.fault("write")) {
      error = std::string("write ") + segment_path(_o.dir, _segment) + ": " + std::strerror(e);
      return false;
    }
  }
  const char* p = b.bytes.data();
  size_t left = b.bytes.size();
  while (left > 0) {
    ssize_t n = ::write(_fd, p, left);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      error = std::string("write ") + segment_path(_o.dir, _segment) + ": " + std::strerror(n < 0 ? errno : ENOSPC);
      return false;
    }
    p += n;
    left -= static_cast<size_t>(n);
  }
  _segment_size += b.bytes.size();
  _disk_bytes.fetch_add(b.bytes.size());
  return true;
}

bool writer::sync_blob_files(std::vector<uint64_t>& files, std::string& error) {
  if (files.empty()) return true;
  if (_o.fault) {
    if (int e = _o.fault("blob_sync")) {
      error = "fsync of blob files in " + _o.dir + "/blobs: " + std::strerror(e);
      return false;
    }
  }
  std::string dir = _o.dir + "/blobs";
  std::sort(files.begin(), files.end());
  files.erase(std::unique(files.begin(), files.end()), files.end());
  for (uint64_t file : files) {
    std::string path = dir + "/" + blob_store::name(file);
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    // Batch mode syncs at the periodic fsync the files of records already
    // written (and acknowledged); by then a job may have been cancelled and
    // forgotten (result TTL) and its file deleted by the blob store. Nothing
    // names such a file any more: there is nothing to make durable, and
    // failing on it would fail every retry too (the journal wedged). In
    // always mode the file is synced before its record is written and
    // acknowledged, so a missing one stays an error.
    if (fd < 0 && errno == ENOENT && _o.fsync != fsync_mode::always) continue;
    if (fd < 0 || ::fdatasync(fd) != 0) {
      error = "fsync " + path + ": " + std::strerror(errno);
      if (fd >= 0) ::close(fd);
      return false;
    }
    ::close(fd);
  }
  // The files' names: a file whose directory entry is lost is lost.
  int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd < 0 || ::fsync(dfd) != 0) {
    error = "fsync " + dir + ": " + std::strerror(errno);
    if (dfd >= 0) ::close(dfd);
    return false;
  }
  ::close(dfd);
  _fsyncs.inc();
  files.clear();  // a retry after a later failure need not sync them again
  return true;
}

bool writer::sync_blobs(batch& b, std::string& error) {
  if (b.blobs.empty()) return true;
  if (_o.fsync == fsync_mode::always) return sync_blob_files(b.blobs, error);
  // Batch mode: synced with the segment, at the periodic fsync (so a record
  // made durable there never names bytes that are not); off mode: never.
  if (_o.fsync == fsync_mode::batch) _unsynced_blobs.insert(_unsynced_blobs.end(), b.blobs.begin(), b.blobs.end());
  b.blobs.clear();
  return true;
}

bool writer::sync(std::string& error) {
  if (_o.fault) {
    if (int e = _o.fault("fsync")) {
      error = std::string("fsync ") + segment_path(_o.dir, _segment) + ": " + std::strerror(e);
      return false;
    }
  }
  auto t0 = std::chrono::steady_clock::now();
  if (::fdatasync(_fd) != 0) {
    error = std::string("fsync ") + segment_path(_o.dir, _segment) + ": " + std::strerror(errno);
    return false;
  }
  _fsync_seconds.observe(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  _fsyncs.inc();
  _synced_size = _segment_size;
  return true;
}

void writer::report(uint64_t durable, bool failed, const std::string& error) {
  if (failed) {
    while (_error_lock.test_and_set(std::memory_order_acquire)) {
    }
    _writer_error = error;
    _error_lock.clear(std::memory_order_release);
  }
  if (durable) _durable_seq.store(durable, std::memory_order_release);
  _writer_failing.store(failed, std::memory_order_release);
  uv_async_send(&_async);
}

bool writer::cut(std::string& error) {
  int e = _o.fault ? _o.fault("truncate") : 0;
  if (e == 0 && (::ftruncate(_fd, static_cast<off_t>(_segment_size)) != 0 || ::lseek(_fd, 0, SEEK_END) < 0)) e = errno;
  if (e) {
    error = "truncate " + segment_path(_o.dir, _segment) + " to " + std::to_string(_segment_size) +
            " bytes: " + std::strerror(e);
    return false;
  }
  _cut_pending = false;
  return true;
}

void writer::run() {
  std::deque<std::unique_ptr<batch>> todo;  // received, not yet written
  std::vector<std::unique_ptr<batch>> unsynced;
  bool failing = false;
  for (;;) {
    // The stop flag before the ring: once it is seen, every batch the loop
    // published before setting it is seen too.
    bool stopping = _stop.load(std::memory_order_acquire);
    uint64_t tail = _ring_tail.load(std::memory_order_relaxed);
    uint64_t head = _ring_head.load(std::memory_order_acquire);
    bool nudged = false;
    while (tail != head) {
      std::unique_ptr<batch> b(_ring[tail % ring_size]);
      ++tail;
      nudged = nudged || b->sync;
      todo.push_back(std::move(b));
    }
    _ring_tail.store(tail, std::memory_order_release);
    // After a failure, try again when the loop's retry timer nudges (or at
    // shutdown), not in a hot loop against a failing disk.
    if ((todo.empty() && unsynced.empty() && !nudged) || (failing && !nudged && !stopping)) {
      if (stopping) break;
      _ring_head.wait(head, std::memory_order_acquire);
      continue;
    }

    std::string error;
    bool ok = true;
    uint64_t written_seq = 0, records = 0, bytes = 0;
    // What was written since the last good fsync is in doubt after a failed
    // fsync: cut it off and write it again (in off mode nothing is held to
    // write again, so the fsync is only retried).
    auto sync_failed = [&] {
      if (_o.fsync == fsync_mode::off) return;
      _disk_bytes.fetch_sub(_segment_size - _synced_size);
      _segment_size = _synced_size;
      _cut_pending = true;
      for (auto it = unsynced.rbegin(); it != unsynced.rend(); ++it) todo.push_front(std::move(*it));
      unsynced.clear();
      written_seq = 0;
      std::string cut_error;
      if (!cut(cut_error)) error += "; cutting it off failed too: " + cut_error;
    };
    // Bytes past _segment_size (a failed write's or fsync's) are cut off
    // before anything else is written, synced or rolled: a retry never
    // leaves garbage inside a segment, and a damaged tail is only ever at
    // the end of the newest segment (replay's rule). While the cut fails,
    // the writer fails; it never escapes to a segment of its own choosing
    // (segment numbers are the loop's).
    if (_cut_pending) ok = cut(error);
    while (ok && !todo.empty()) {
      batch& b = *todo.front();
      if (b.roll_to && b.roll_to != _segment) {
        // The old segment is complete on disk before the next one exists,
        // in every mode: replay takes only the newest segment's tail for torn.
        if (_segment_size != _synced_size && !(ok = sync_blob_files(_unsynced_blobs, error) && sync(error))) {
          sync_failed();
          break;
        }
        for (auto& u : unsynced) written_seq = std::max(written_seq, u->seq);
        unsynced.clear();
        if (!(ok = open_segment(b.roll_to, error))) break;
      }
      // Nothing of the batch is written yet if this fails: nothing to cut;
      // the batch stays at the front and is retried like a failed write.
      if (!(ok = sync_blobs(b, error))) break;
      if (!b.bytes.empty()) {
        ok = write_batch(b, error);
        if (!ok) {
          // Part of it may be on disk: cut it off before any retry.
          _cut_pending = true;
          std::string cut_error;
          if (!cut(cut_error)) error += "; cutting the partial write off failed too: " + cut_error;
          break;
        }
        records += b.records;
        bytes += b.bytes.size();
      }
      if (b.delete_before) {
        // Deleting is safe only once everything before it is on disk (in
        // every mode: the snapshots replace what is deleted).
        if (_segment_size != _synced_size && !(ok = sync_blob_files(_unsynced_blobs, error) && sync(error))) {
          sync_failed();
          break;
        }
        for (uint64_t n : list_segments(_o.dir)) {
          if (n >= b.delete_before || n == _segment) continue;
          std::string path = segment_path(_o.dir, n);
          struct stat st;
          if (stat(path.c_str(), &st) == 0 && ::unlink(path.c_str()) == 0) {
            _disk_bytes.fetch_sub(static_cast<uint64_t>(st.st_size));
            _segments.fetch_sub(1);
          }
        }
      }
      written_seq = std::max(written_seq, b.seq);
      unsynced.push_back(std::move(todo.front()));
      todo.pop_front();
    }
    bool want_sync = _o.fsync == fsync_mode::always || (_o.fsync == fsync_mode::batch && (nudged || stopping));
    if (ok && want_sync && _segment_size != _synced_size) {
      // Batch mode: the blob files its records name first (nothing to cut
      // if this fails: the segment is simply not synced yet).
      ok = sync_blob_files(_unsynced_blobs, error);
      if (ok) ok = sync(error);
      if (ok) _records_per_fsync.observe(static_cast<double>(records));
      else sync_failed();
    }
    if (ok) {
      if (_o.fsync == fsync_mode::always || _segment_size == _synced_size) unsynced.clear();
      else if (_o.fsync == fsync_mode::off) unsynced.clear();
    } else {
      _write_errors.inc();
    }
    _written_bytes.fetch_add(bytes, std::memory_order_relaxed);
    // Only a cycle that fully succeeded (in always mode: fsync included)
    // may move the durable mark; a failure never acknowledges anything.
    uint64_t durable = ok ? written_seq : 0;
    if (!ok || failing || durable) report(durable, !ok, error);
    failing = !ok;
    if (stopping) break;  // done, or giving up: unwritten changes were never acknowledged
  }
}

}  // namespace relay::journal
