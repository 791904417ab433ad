#include "relay/log.h"

#include <unistd.h>

#include <cerrno>
#include <chrono>

#include "relay/json.h"

namespace relay::log {
namespace {

level g_min_level = level::info;  // Process-wide sink setting, not per-listener state.

std::string_view level_name(level l) {
  switch (l) {
    case level::debug: return "debug";
    case level::info: return "info";
    case level::warn: return "warn";
    case level::error: return "error";
  }
  return "info";
}

}  // namespace

void set_min_level(level min) { g_min_level = min; }

level parse_level(std::string_view name) {
  if (name == "debug") return level::debug;
  if (name == "warn") return level::warn;
  if (name == "error") return level::error;
  return level::info;
}
bool enabled(level l) { return l >= g_min_level; }

line::line(level l, std::string_view event) : _level(l), _enabled(enabled(l)) {
  if (!_enabled) return;
  _buf.reserve(160);
  _buf += "{\"event\":";
  json::append_string(_buf, event);
}

line::~line() {
  if (!_enabled) return;
  auto now = std::chrono::duration_cast<std::chrono::milliseconds>(
                 std::chrono::system_clock::now().time_since_epoch())
                 .count();
  _buf += ",\"level\":\"";
  _buf += level_name(_level);
  _buf += "\",\"ts_ms\":";
  _buf += std::to_string(now);
  _buf += "}\n";
  const char* p = _buf.data();
  size_t left = _buf.size();
  while (left > 0) {
    ssize_t n = ::write(STDERR_FILENO, p, left);
    if (n < 0) {
      if (errno == EINTR) continue;
      return;  // Nowhere left to report a failing log sink.
    }
    p += n;
    left -= static_cast<size_t>(n);
  }
}

line& line::str(std::string_view key, std::string_view value) {
  if (!_enabled) return *this;
  _buf += ',';
  json::append_key(_buf, key);
  json::append_string(_buf, value);
  return *this;
}

line& line::num(std::string_view key, int64_t value) {
  if (!_enabled) return *this;
  _buf += ',';
  json::append_key(_buf, key);
  json::append_int(_buf, value);
  return *this;
}

line& line::boolean(std::string_view key, bool value) {
  if (!_enabled) return *this;
  _buf += ',';
  json::append_key(_buf, key);
  _buf += value ? "true" : "false";
  return *this;
}

line& line::raw(std::string_view key, std::string_view json_value) {
  if (!_enabled) return *this;
  _buf += ',';
  json::append_key(_buf, key);
  _buf += json_value;
  return *this;
}

}  // namespace relay::log
