// Structured logs: one JSON object per line on stderr.
//
// Every line starts with its "event" so that tools (and tests) can match on
// it, e.g. {"event":"listening","listener":"api","addr":"127.0.0.1:43123",...}.
// A line is written with a single write(2) so lines from one process never
// interleave. Writing blocks if stderr is a full pipe; the process's
// supervisor is expected to drain it.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace relay::log {

enum class level : uint8_t { debug, info, warn, error };

// Lines below `min` are discarded. Defaults to info.
void set_min_level(level min);
// "debug", "info", "warn" or "error"; anything else is info.
level parse_level(std::string_view name);
bool enabled(level l);

// A log line under construction; written when it goes out of scope.
//   log::info("listening").str("listener", "api").str("addr", addr);
class line {
 public:
  line(level l, std::string_view event);
  line(const line&) = delete;
  line& operator=(const line&) = delete;
  ~line();

  line& str(std::string_view key, std::string_view value);
  line& num(std::string_view key, int64_t value);
  line& boolean(std::string_view key, bool value);
  // `raw` must already be valid JSON.
  line& raw(std::string_view key, std::string_view json);

 private:
  level _level;
  bool _enabled;
  std::string _buf;
};

inline line debug(std::string_view event) { return line(level::debug, event); }
inline line info(std::string_view event) { return line(level::info, event); }
inline line warn(std::string_view event) { return line(level::warn, event); }
inline line error(std::string_view event) { return line(level::error, event); }

}  // namespace relay::log
