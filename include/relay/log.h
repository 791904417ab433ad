// Structured logs: one JSON object per line on stderr.
//
// Every line starts with its "event" so that tools (and tests) can match on
// it, e.g. {"event":"listening","listener":"api","addr":"127.0.0.1:43123",...}.
//
// Logging never blocks the caller on I/O. A finished line is copied into a
// bounded in-memory buffer (buffer::default_capacity, 4 MiB) under a mutex
// that is only ever held for that copy; one writer thread per process takes
// the lines out and write(2)s them to stderr, in the order they were logged.
// If stderr stalls (a log collector that stops reading a pipe) the writer
// thread waits, the buffer fills, and further lines are dropped and counted
// (dropped_lines()); once half the buffer is free again a
// {"event":"log_lines_dropped","lines":N,...} line says how many were lost.
// Lines from one process never interleave with each other.
//
// Repeats collapse. A line may name its *source*: explicitly with
// .source(s), or implicitly through a "remote" field (.str("remote", addr)),
// whose host part — the peer's IP without the port — becomes the source.
// Operational lines are repeats when they have the same event, source and
// "reason" field (or both none); audit lines (relay/audit.h) when they have
// the same event, source and every field but "remote". The first is written
// in full and opens a one-second window; repeats inside the window are
// counted, not written; when the window ends, one line
// {"event":E,"source":S[,"reason":R | ,<audit fields>],"repeated":N,...}
// reports the N suppressed lines (none if N is 0). So a flood from one peer
// costs about two lines a second for each distinct reason, while different
// failures of one peer (an expired certificate, then a revoked one) each get
// their line, and in the audit stream each distinct principal, queue or
// certificate does. Lines without a source never collapse. At most
// buffer::max_sources windows are open at once; lines from further sources
// are written uncollapsed. Audit lines that are not repeats are budgeted per
// second, per source and in all (see buffer::append); string values longer
// than 1024 bytes are cut and marked.
//
// At process exit (std::atexit) and on flush(), the writer gets up to two
// seconds to write out what is pending, repeat counts included, so the last
// lines (start_failed, stopped) are not lost.
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace relay::log {

enum class level : uint8_t { debug, info, warn, error };

// Which stream a line belongs to: the operational log, or the audit stream
// (see relay/audit.h), which is never filtered by level.
enum class channel : uint8_t { ops, audit };

// Lines below `min` are discarded. Defaults to info.
void set_min_level(level min);
// "debug", "info", "warn" or "error"; anything else is info.
level parse_level(std::string_view name);
bool enabled(level l);

// A log line under construction; handed to the buffer when it goes out of
// scope.
//   log::info("listening").str("listener", "api").str("addr", addr);
//   log::warn("tls_handshake_failed").str("remote", "10.0.0.7:5133");  // source 10.0.0.7
class line {
 public:
  line(level l, std::string_view event, channel c = channel::ops);
  line(const line&) = delete;
  line& operator=(const line&) = delete;
  ~line();

  // "remote" is special: its host part also becomes the line's source,
  // unless source() set one. "reason" is part of what makes a repeat.
  line& str(std::string_view key, std::string_view value);
  line& num(std::string_view key, int64_t value);
  line& boolean(std::string_view key, bool value);
  // `raw` must already be valid JSON.
  line& raw(std::string_view key, std::string_view json);
  // Who caused the line, for collapsing repeats; written as "source".
  line& source(std::string_view s);

 private:
  // Longer string values are cut (at a character boundary) and marked.
  static constexpr size_t max_value_bytes = 1024;
  // The field just appended (from `field_start` in _buf) may be part of
  // what makes this line a repeat of another; see buffer::append.
  void collapse_on(std::string_view key, size_t field_start);

  level _level;
  channel _channel;
  bool _enabled;
  bool _source_set = false;
  size_t _event_len = 0;  // _buf holds the raw event, then `,"key":value`...
  std::string _buf;
  std::string _source;
  std::string _collapse;  // `,"key":value`... that repeats must share
};

inline line debug(std::string_view event) { return line(level::debug, event); }
inline line info(std::string_view event) { return line(level::info, event); }
inline line warn(std::string_view event) { return line(level::warn, event); }
inline line error(std::string_view event) { return line(level::error, event); }

// Lines dropped since the process started because the buffer was full (or
// stderr failed for good). Exported as relay_log_lines_dropped_total.
uint64_t dropped_lines();

// Waits up to `timeout` until every line logged so far (and every pending
// repeat count) has been written to stderr. True if it all was. Safe to call
// from any thread except from inside a log call.
bool flush(std::chrono::milliseconds timeout = std::chrono::milliseconds(2000));

// The audit stream's file (relay/audit.h wraps these).
bool open_audit_file(const std::string& path, std::string& error);
void reopen_audit_file();
uint64_t audit_dropped_lines();
uint64_t audit_reopens();
bool flush_audit(std::chrono::milliseconds timeout);

// "10.0.0.7:5133" → "10.0.0.7", "[::1]:80" → "::1"; anything else unchanged.
std::string_view host_of(std::string_view address);

// The bounded store between the threads that log and the thread that writes,
// with drop accounting and repeat collapsing. Not thread-safe by itself (the
// process-wide sink wraps it in a mutex); public so that tests can drive it
// with their own clock.
class buffer {
 public:
  static constexpr size_t default_capacity = size_t{4} << 20;
  static constexpr int64_t repeat_window_ms = 1000;
  static constexpr size_t max_sources = 1024;
  static constexpr uint32_t max_audit_lines_per_source = 32;
  static constexpr uint32_t max_audit_lines_per_window = 1024;
  // Milliseconds since the epoch; used for "ts_ms" and for repeat windows.
  using clock = std::function<int64_t()>;

  buffer(size_t capacity, clock now_ms);

  // One line: `fields` is `,"key":value...` (possibly empty). Writes
  // {"event":E<fields>[,"source":S],"level":L,"ts_ms":T}\n, or counts a
  // repeat, or drops the line when there is no room. False if not written.
  // Lines with a source repeat each other when they share event, source and
  // `collapse`, a `,"key":value...` fragment that the "repeated" line
  // echoes: an operational line's "reason" field; for an audit line every
  // field but "remote" (so each distinct principal, queue or certificate
  // keeps a line of its own). Audit lines with a source that are not
  // repeats are also budgeted: at most max_audit_lines_per_source a second
  // from one source and max_audit_lines_per_window in all; the rest are
  // counted into one {"event":"audit_lines_suppressed",...} line per source
  // a second.
  bool append(level l, std::string_view event, std::string_view source, std::string_view fields,
              std::string_view collapse = {}, bool audit = false);
  // Closes the repeat windows that are over, writing their "repeated" lines.
  // Returns when the next open window ends (clock ms), or -1 if none is open.
  int64_t expire();
  // Closes every open window now (at exit).
  void expire_all();

  // The oldest pending text, contiguous (possibly only part of what is
  // pending). It stays valid while append() runs; consume() releases it.
  std::string_view peek() const;
  void consume(size_t n);
  // Everything pending, released (tests).
  std::string take();

  size_t pending() const { return _size; }
  size_t capacity() const { return _ring.size(); }
  uint64_t dropped() const { return _dropped; }
  // Of those, audit lines.
  uint64_t audit_dropped() const { return _audit_dropped; }
  // Counts lines lost after they were buffered (stderr failed for good).
  void count_lost(uint64_t lines);

 private:
  struct window {
    int64_t ends = 0;
    uint64_t repeats = 0;
    level lvl = level::info;
  };
  bool put(std::string_view text);
  bool admit_audit_line(std::string_view source, int64_t now);
  void report_suppressed(int64_t new_epoch);
  void close_window(const std::string& key, const window& w);
  void maybe_report_drops();
  std::string finish(level l, int64_t now);

  std::vector<char> _ring;
  size_t _head = 0;  // first pending byte
  size_t _size = 0;  // pending bytes
  clock _now;
  uint64_t _dropped = 0;
  uint64_t _unreported = 0;  // dropped since the last log_lines_dropped line
  bool _dropping = false;    // full: drop until half the buffer is free
  // Open repeat windows by event + '\0' + source + '\0' + reason, and the
  // order they opened.
  std::unordered_map<std::string, window> _windows;
  std::deque<std::pair<int64_t, std::string>> _window_order;
  uint64_t _audit_dropped = 0;
  uint64_t _audit_unreported = 0;
  // The audit budget of the current second (_budget_epoch): lines admitted
  // per source and in all, and lines suppressed per source ("*": sources
  // beyond max_sources).
  int64_t _budget_epoch = 0;
  uint32_t _budget_lines = 0;
  std::unordered_map<std::string, uint32_t> _budgets;
  std::unordered_map<std::string, uint64_t> _suppressed;
  std::string _scratch;
};

}  // namespace relay::log
