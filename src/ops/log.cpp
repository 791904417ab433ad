#include "relay/log.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>

#include "relay/json.h"

namespace relay::log {
namespace {

// Process-wide sink setting, not per-listener state; atomic because the
// journal writer thread logs too.
std::atomic<level> g_min_level{level::info};

std::string_view level_name(level l) {
  switch (l) {
    case level::debug: return "debug";
    case level::info: return "info";
    case level::warn: return "warn";
    case level::error: return "error";
  }
  return "info";
}

int64_t wall_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// Whole lines per write(2) where they fit, so that a reader sees lines, and
// few enough bytes that one write never holds much.
constexpr size_t max_write_bytes = 64 * 1024;

// A buffer and the thread that writes it out: the operational log's to
// stderr, the audit stream's to stderr or to its own file. Never destroyed:
// the writer thread may still be blocked in write(2) on a stalled pipe when
// the process exits, and must not find the buffer gone.
class sink {
 public:
  // The operational log (stderr).
  static sink& get() {
    static sink* s = new sink(STDERR_FILENO, {});
    return *s;
  }
  // The audit stream's own file, once audit::open() named one.
  static std::atomic<sink*>& audit_file() {
    static std::atomic<sink*> s{nullptr};
    return s;
  }

  sink(int fd, std::string path) : _buf(buffer::default_capacity, wall_ms), _fd(fd), _path(std::move(path)) {
    if (!_path.empty()) _checked_ms = wall_ms();
    try {
      std::thread([this] { run(); }).detach();
    } catch (const std::system_error&) {
      // No thread to be had: write synchronously, as before there was one.
      _no_thread = true;
    }
    if (_path.empty()) {
      std::atexit([] {
        if (sink* a = sink::audit_file().load()) a->flush(std::chrono::milliseconds(2000));
        sink::get().flush(std::chrono::milliseconds(2000));
      });
    }
  }

  // The file is reopened by the writer thread before its next write: after
  // SIGHUP, or when the path no longer names the open file (logrotate moved
  // it). Never on the caller's thread: opening may block.
  void request_reopen() {
    std::lock_guard lock(_mu);
    _reopen = true;
    if (_writer_waiting) _wake.notify_one();
  }

  void append(level l, std::string_view event, std::string_view source, std::string_view fields,
              std::string_view collapse, bool audit) {
    std::lock_guard lock(_mu);
    _buf.append(l, event, source, fields, collapse, audit);
    if (_no_thread) {
      write_out_locked();
      return;
    }
    if (_writer_waiting) _wake.notify_one();
  }

  uint64_t dropped() {
    std::lock_guard lock(_mu);
    return _buf.dropped();
  }

  uint64_t audit_dropped() {
    std::lock_guard lock(_mu);
    return _buf.audit_dropped();
  }

  const std::string& path() const { return _path; }

  uint64_t reopened() {
    std::lock_guard lock(_mu);
    return _reopens;
  }

  bool flush(std::chrono::milliseconds timeout) {
    std::unique_lock lock(_mu);
    _buf.expire_all();
    if (_no_thread) {
      write_out_locked();
      return _buf.pending() == 0;
    }
    _wake.notify_one();
    return _idle.wait_for(lock, timeout, [this] { return _buf.pending() == 0 && !_writing; });
  }

 private:
  // How often the writer checks that the path still names its file.
  static constexpr int64_t moved_check_ms = 1000;

  void run() {
    std::unique_lock lock(_mu);
    for (;;) {
      if (!_path.empty()) maybe_reopen(lock);
      int64_t next = _buf.expire();
      std::string_view text = _buf.peek();
      if (!text.empty()) {
        size_t n = whole_lines(text);
        _writing = true;
        lock.unlock();
        // peek()'s bytes stay put while loggers append: the lock is not
        // needed to read them, and write(2) may block for as long as the
        // reader of stderr likes.
        int err = 0;
        bool ok = write_all(_fd, text.data(), n, err);
        if (!_path.empty() && ok == _write_failing) {
          // The audit file failed (a full disk) or recovered: say so once,
          // in the operational log, so that someone looks.
          _write_failing = !ok;
          if (ok) log::line(level::warn, "audit_write_recovered").str("path", _path);
          else log::line(level::error, "audit_write_failed").str("path", _path).str("reason", std::strerror(err));
        }
        lock.lock();
        _writing = false;
        if (!ok) _buf.count_lost(lines_in(text.substr(0, n)));
        _buf.consume(n);
        continue;
      }
      _idle.notify_all();
      _writer_waiting = true;
      if (!_path.empty() && (next < 0 || next > _checked_ms + moved_check_ms)) next = _checked_ms + moved_check_ms;
      if (next < 0) _wake.wait(lock);
      else _wake.wait_for(lock, std::chrono::milliseconds(std::max<int64_t>(1, next - wall_ms())));
      _writer_waiting = false;
    }
  }

  // Called with the lock held; drops it around the file system calls.
  void maybe_reopen(std::unique_lock<std::mutex>& lock) {
    int64_t now = wall_ms();
    if (!_reopen && now < _checked_ms + moved_check_ms) return;
    bool asked = _reopen;
    _reopen = false;
    _checked_ms = now;
    lock.unlock();
    bool moved = false;
    if (!asked) {
      struct stat by_path{}, open_file{};
      moved = ::stat(_path.c_str(), &by_path) != 0 || ::fstat(_fd, &open_file) != 0 ||
              by_path.st_ino != open_file.st_ino || by_path.st_dev != open_file.st_dev;
    }
    int fd = -1;
    if (asked || moved) fd = ::open(_path.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
    lock.lock();
    if (fd < 0) return;  // keep writing to the file we have (and retry later)
    ::close(_fd);
    _fd = fd;
    ++_reopens;
  }

  // Without a writer thread (thread creation failed): the old synchronous way.
  void write_out_locked() {
    _buf.expire();
    for (std::string_view text = _buf.peek(); !text.empty(); text = _buf.peek()) {
      size_t n = whole_lines(text);
      int err = 0;
      if (!write_all(_fd, text.data(), n, err)) _buf.count_lost(lines_in(text.substr(0, n)));
      _buf.consume(n);
    }
  }

  static size_t whole_lines(std::string_view text) {
    if (text.size() <= max_write_bytes) return text.size();
    size_t nl = text.rfind('\n', max_write_bytes - 1);
    return nl == std::string_view::npos ? max_write_bytes : nl + 1;
  }

  static uint64_t lines_in(std::string_view text) {
    uint64_t n = 0;
    for (char c : text) n += c == '\n';
    return n;
  }

  // False if the output failed for good (closed, or not writable at all).
  static bool write_all(int fd, const char* p, size_t left, int& err) {
    while (left > 0) {
      ssize_t n = ::write(fd, p, left);
      if (n < 0) {
        err = errno;
        if (errno == EINTR) continue;
        if (errno == EAGAIN) {
          // Someone made stderr non-blocking; wait for room, on this thread.
          pollfd pfd{fd, POLLOUT, 0};
          ::poll(&pfd, 1, 1000);
          continue;
        }
        return false;
      }
      p += n;
      left -= static_cast<size_t>(n);
    }
    return true;
  }

  std::mutex _mu;
  std::condition_variable _wake;  // lines (or flush) for the writer
  std::condition_variable _idle;  // the writer has written everything
  buffer _buf;
  bool _writer_waiting = false;
  bool _writing = false;
  bool _no_thread = false;
  // The writer thread's alone (the atexit flush runs after it has written).
  int _fd;
  const std::string _path;  // empty: never reopened
  int64_t _checked_ms = 0;
  bool _write_failing = false;  // the writer thread's
  bool _reopen = false;      // under _mu
  uint64_t _reopens = 0;     // under _mu
};

sink& sink_for(channel c) {
  if (c == channel::audit) {
    if (sink* a = sink::audit_file().load(std::memory_order_acquire)) return *a;
  }
  return sink::get();
}

}  // namespace

void set_min_level(level min) { g_min_level.store(min, std::memory_order_relaxed); }

level parse_level(std::string_view name) {
  if (name == "debug") return level::debug;
  if (name == "warn") return level::warn;
  if (name == "error") return level::error;
  return level::info;
}
bool enabled(level l) { return l >= g_min_level.load(std::memory_order_relaxed); }

uint64_t dropped_lines() { return sink::get().dropped(); }

bool open_audit_file(const std::string& path, std::string& error) {
  int fd = ::open(path.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
  if (fd < 0) {
    error = path + ": cannot open for appending: " + std::strerror(errno);
    return false;
  }
  // Once per process, at start-up, before any other thread logs.
  if (sink* open = sink::audit_file().load()) {
    ::close(fd);
    error = path + ": the audit stream is already open on " + open->path();
    return false;
  }
  sink::audit_file().store(new sink(fd, path), std::memory_order_release);
  return true;
}

void reopen_audit_file() {
  if (sink* a = sink::audit_file().load(std::memory_order_acquire)) a->request_reopen();
}

uint64_t audit_dropped_lines() {
  sink* a = sink::audit_file().load(std::memory_order_acquire);
  return a ? a->dropped() : sink::get().audit_dropped();
}

uint64_t audit_reopens() {
  sink* a = sink::audit_file().load(std::memory_order_acquire);
  return a ? a->reopened() : 0;
}

bool flush_audit(std::chrono::milliseconds timeout) {
  return sink_for(channel::audit).flush(timeout);
}

bool flush(std::chrono::milliseconds timeout) { return sink::get().flush(timeout); }

std::string_view host_of(std::string_view address) {
  if (!address.empty() && address.front() == '[') {
    size_t end = address.find(']');
    return end == std::string_view::npos ? address : address.substr(1, end - 1);
  }
  size_t colon = address.find(':');
  // One colon: IPv4 (or a name) with a port. More: a bare IPv6 address.
  if (colon != std::string_view::npos && address.find(':', colon + 1) == std::string_view::npos)
    return address.substr(0, colon);
  return address;
}

// ---- line ----

line::line(level l, std::string_view event, channel c)
    : _level(l), _channel(c), _enabled(c == channel::audit || enabled(l)) {
  if (!_enabled) return;
  _buf.reserve(160);
  _buf += event;
  _event_len = event.size();
  // The marker that tells audit lines apart where they share stderr with
  // the operational log, and that a SIEM can filter on anywhere.
  if (c == channel::audit) {
    _buf += ",\"audit\":true";
    _collapse = ",\"audit\":true";
  }
}

line::~line() {
  if (!_enabled) return;
  std::string_view all = _buf;
  sink_for(_channel).append(_level, all.substr(0, _event_len), _source, all.substr(_event_len), _collapse,
                            _channel == channel::audit);
}

void line::collapse_on(std::string_view key, size_t field_start) {
  // An audit line repeats another only if everything but the peer's port
  // is the same: principal, queue, route, certificate... so a flood
  // collapses while every distinct actor and target keeps its own line.
  // Operational lines collapse on their reason alone.
  if (_channel == channel::audit) {
    if (key != "remote") _collapse.append(_buf, field_start);
  } else if (key == "reason") {
    _collapse.assign(_buf, field_start);
  }
}

line& line::str(std::string_view key, std::string_view value) {
  if (!_enabled) return *this;
  size_t start = _buf.size();
  _buf += ',';
  json::append_key(_buf, key);
  if (value.size() > max_value_bytes) {
    // Cut at a character boundary, and say so: a peer-supplied value (a
    // certificate subject, a name) must not make one line huge.
    size_t cut = max_value_bytes;
    while (cut > 0 && (static_cast<unsigned char>(value[cut]) & 0xc0) == 0x80) --cut;
    std::string shortened(value.substr(0, cut));
    shortened += "...(" + std::to_string(value.size()) + " bytes)";
    json::append_string(_buf, shortened);
  } else {
    json::append_string(_buf, value);
  }
  if (key == "remote" && !_source_set) _source = host_of(value);
  collapse_on(key, start);
  return *this;
}

line& line::num(std::string_view key, int64_t value) {
  if (!_enabled) return *this;
  size_t start = _buf.size();
  _buf += ',';
  json::append_key(_buf, key);
  json::append_int(_buf, value);
  collapse_on(key, start);
  return *this;
}

line& line::boolean(std::string_view key, bool value) {
  if (!_enabled) return *this;
  size_t start = _buf.size();
  _buf += ',';
  json::append_key(_buf, key);
  _buf += value ? "true" : "false";
  collapse_on(key, start);
  return *this;
}

line& line::raw(std::string_view key, std::string_view json_value) {
  if (!_enabled) return *this;
  size_t start = _buf.size();
  _buf += ',';
  json::append_key(_buf, key);
  _buf += json_value;
  collapse_on(key, start);
  return *this;
}

line& line::source(std::string_view s) {
  if (!_enabled) return *this;
  _source = s;
  _source_set = true;
  return *this;
}

// ---- buffer ----

buffer::buffer(size_t capacity, clock now_ms) : _ring(capacity), _now(std::move(now_ms)) {}

std::string buffer::finish(level l, int64_t now) {
  std::string tail = ",\"level\":\"";
  tail += level_name(l);
  tail += "\",\"ts_ms\":";
  tail += std::to_string(now);
  tail += "}\n";
  return tail;
}

bool buffer::append(level l, std::string_view event, std::string_view source, std::string_view fields,
                    std::string_view collapse, bool audit) {
  int64_t now = _now();
  if (!source.empty()) {
    std::string key;
    key.reserve(event.size() + source.size() + collapse.size() + 2);
    key += event;
    key += '\0';
    key += source;
    key += '\0';
    key += collapse;
    auto it = _windows.find(key);
    if (it != _windows.end()) {
      window& w = it->second;
      // A window ends a second after it opened, or at once if the clock
      // stepped back past its start.
      bool over = now >= w.ends || now < w.ends - 2 * repeat_window_ms;
      if (!over) {
        ++w.repeats;
        return false;
      }
      close_window(it->first, w);
      _windows.erase(it);
    }
    // Audit lines that are not repeats still cost the writer and the disk:
    // a peer can make every line distinct (a new certificate per attempt).
    if (audit && !admit_audit_line(source, now)) return false;
    if (_windows.size() < max_sources) {
      _windows.emplace(key, window{now + repeat_window_ms, 0, l});
      _window_order.emplace_back(now + repeat_window_ms, std::move(key));
    }
  }
  _scratch.clear();
  _scratch += "{\"event\":";
  json::append_string(_scratch, event);
  _scratch += fields;
  if (!source.empty()) {
    _scratch += ",\"source\":";
    json::append_string(_scratch, source);
  }
  _scratch += finish(l, now);
  bool written = put(_scratch);
  if (!written && audit) {
    ++_audit_dropped;
    ++_audit_unreported;
  }
  return written;
}

bool buffer::admit_audit_line(std::string_view source, int64_t now) {
  int64_t epoch = now / repeat_window_ms;
  if (epoch != _budget_epoch) report_suppressed(epoch);
  auto it = _budgets.find(std::string(source));
  if (it == _budgets.end() && _budgets.size() < max_sources) it = _budgets.emplace(std::string(source), 0).first;
  uint32_t* from_source = it != _budgets.end() ? &it->second : nullptr;
  bool admit = _budget_lines < max_audit_lines_per_window &&
               (!from_source || *from_source < max_audit_lines_per_source);
  if (admit) {
    ++_budget_lines;
    if (from_source) ++*from_source;
    return true;
  }
  auto& s = _suppressed[from_source ? std::string(source) : std::string("*")];
  ++s;
  return false;
}

void buffer::report_suppressed(int64_t new_epoch) {
  for (const auto& [source, lines] : _suppressed) {
    _scratch.clear();
    _scratch += "{\"event\":\"audit_lines_suppressed\",\"audit\":true,\"source\":";
    json::append_string(_scratch, source);
    _scratch += ",\"lines\":";
    _scratch += std::to_string(lines);
    _scratch += ",\"window_ms\":";
    _scratch += std::to_string(repeat_window_ms);
    _scratch += ",\"why\":\"more distinct audit lines than ";
    _scratch += std::to_string(source == "*" ? max_audit_lines_per_window : max_audit_lines_per_source);
    _scratch += source == "*" ? " a second in all" : " a second from one source";
    _scratch += '"';
    _scratch += finish(level::warn, _now());
    if (!put(_scratch)) {
      ++_audit_dropped;
      ++_audit_unreported;
    }
  }
  _suppressed.clear();
  _budgets.clear();
  _budget_lines = 0;
  _budget_epoch = new_epoch;
}

void buffer::close_window(const std::string& key, const window& w) {
  if (w.repeats == 0) return;
  std::string_view k = key;
  size_t nul1 = k.find('\0');
  size_t nul2 = k.find('\0', nul1 + 1);
  _scratch.clear();
  _scratch += "{\"event\":";
  json::append_string(_scratch, k.substr(0, nul1));
  _scratch += ",\"source\":";
  json::append_string(_scratch, k.substr(nul1 + 1, nul2 - nul1 - 1));
  // What made these lines repeats: their reason, or for audit lines every
  // field but the peer's port (the "audit" marker among them).
  _scratch += k.substr(nul2 + 1);
  _scratch += ",\"repeated\":";
  _scratch += std::to_string(w.repeats);
  _scratch += ",\"window_ms\":";
  _scratch += std::to_string(repeat_window_ms);
  _scratch += finish(w.lvl, _now());
  put(_scratch);
}

int64_t buffer::expire() {
  int64_t now = _now();
  if (!_suppressed.empty() && now / repeat_window_ms != _budget_epoch) report_suppressed(now / repeat_window_ms);
  while (!_window_order.empty()) {
    auto& [ends, key] = _window_order.front();
    auto it = _windows.find(key);
    if (it == _windows.end() || it->second.ends != ends) {
      _window_order.pop_front();  // closed already, by a later line of its own
      continue;
    }
    bool over = now >= ends || now < ends - 2 * repeat_window_ms;
    if (!over) return ends;
    close_window(it->first, it->second);
    _windows.erase(it);
    _window_order.pop_front();
  }
  return -1;
}

void buffer::expire_all() {
  if (!_suppressed.empty()) report_suppressed(_budget_epoch + 1);
  for (auto& [key, w] : _windows) close_window(key, w);
  _windows.clear();
  _window_order.clear();
}

bool buffer::put(std::string_view text) {
  size_t cap = _ring.size();
  if (_dropping && _size <= cap / 2) {
    _dropping = false;
    maybe_report_drops();
  }
  if (_dropping || text.size() > cap - _size) {
    // Dropping goes on until half the buffer is free, so that a stalled
    // reader costs one report per stall, not one per line.
    _dropping = true;
    ++_dropped;
    ++_unreported;
    return false;
  }
  size_t tail = (_head + _size) % cap;
  size_t first = std::min(text.size(), cap - tail);
  std::memcpy(_ring.data() + tail, text.data(), first);
  std::memcpy(_ring.data(), text.data() + first, text.size() - first);
  _size += text.size();
  return true;
}

void buffer::maybe_report_drops() {
  if (_unreported == 0) return;
  std::string report = "{\"event\":\"log_lines_dropped\",\"lines\":";
  report += std::to_string(_unreported);
  report += ",\"total\":";
  report += std::to_string(_dropped);
  if (_audit_unreported > 0) {
    // Audit lines were among them: the SIEM must see that it lost some.
    report += ",\"audit_lines\":";
    report += std::to_string(_audit_unreported);
    report += ",\"audit\":true";
    _audit_unreported = 0;
  }
  report += ",\"why\":\"the output was not written fast enough; the buffer was full\"";
  report += finish(level::warn, _now());
  _unreported = 0;
  put(report);
}

std::string_view buffer::peek() const {
  return {_ring.data() + _head, std::min(_size, _ring.size() - _head)};
}

void buffer::consume(size_t n) {
  n = std::min(n, _size);
  _head = (_head + n) % _ring.size();
  _size -= n;
  if (_size == 0) _head = 0;  // keep the next text contiguous
  if (_dropping && _size <= _ring.size() / 2) {
    _dropping = false;
    maybe_report_drops();
  }
}

std::string buffer::take() {
  std::string out;
  for (std::string_view t = peek(); !t.empty(); t = peek()) {
    out += t;
    consume(t.size());
  }
  return out;
}

void buffer::count_lost(uint64_t lines) {
  _dropped += lines;
}

}  // namespace relay::log
