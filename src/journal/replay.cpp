#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

#include "journal/segment.h"
#include "relay/journal.h"

namespace relay::journal {

std::string segment_path(const std::string& dir, uint64_t number) {
  char name[64];
  std::snprintf(name, sizeof name, "segment-%016llu.log", static_cast<unsigned long long>(number));
  return dir + "/" + name;
}

std::vector<uint64_t> list_segments(const std::string& dir) {
  std::vector<uint64_t> out;
  DIR* d = opendir(dir.c_str());
  if (!d) return out;
  while (dirent* e = readdir(d)) {
    // Exactly what segment_path() writes: "segment-", 16 decimal digits,
    // ".log". (sscanf would also take signs and spaces, so that two names
    // could mean one number, or "-1" the largest.)
    std::string_view name(e->d_name);
    constexpr std::string_view prefix = "segment-", suffix = ".log";
    if (name.size() != prefix.size() + 16 + suffix.size() || !name.starts_with(prefix) || !name.ends_with(suffix))
      continue;
    std::string_view digits = name.substr(prefix.size(), 16);
    if (!std::all_of(digits.begin(), digits.end(), [](char c) { return c >= '0' && c <= '9'; })) continue;
    uint64_t n = 0;
    for (char c : digits) n = n * 10 + static_cast<uint64_t>(c - '0');
    out.push_back(n);
  }
  closedir(d);
  std::sort(out.begin(), out.end());
  return out;
}

void write_segment_header(std::string& out, uint64_t number) {
  out.append("RLYJ", 4);
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<char>(format_version >> (8 * i)));
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>(number >> (8 * i)));
}

namespace {

bool read_file(const std::string& path, std::string& out) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return false;
  std::ostringstream ss;
  ss << in.rdbuf();
  out = ss.str();
  return true;
}

uint32_t le32(const char* p) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v |= static_cast<uint32_t>(static_cast<uint8_t>(p[i])) << (8 * i);
  return v;
}

}  // namespace

namespace {

bool all_zero(std::string_view s) {
  return std::all_of(s.begin(), s.end(), [](char c) { return c == 0; });
}

// The first bad place in a segment: where, what, and whether it may be a
// torn write (only at the end of the newest segment; see journal.h).
struct damage {
  size_t at = std::string::npos;
  std::string problem;
  bool torn = false;
};

}  // namespace

bool replay(const std::string& dir, bool repair, const std::function<bool(const queue::record&)>& apply,
            replay_result& result, std::string& error) {
  std::vector<uint64_t> segments = list_segments(dir);
  result = {};
  result.next_segment = segments.empty() ? 1 : segments.back() + 1;
  for (size_t si = 0; si < segments.size(); ++si) {
    std::string path = segment_path(dir, segments[si]);
    std::string data;
    if (!read_file(path, data)) {
      error = path + ": cannot read: " + std::strerror(errno);
      return false;
    }
    ++result.segments;
    bool newest = si + 1 == segments.size();
    damage bad;
    uint32_t version = 0;
    if (data.size() < segment_header_bytes) {
      bad = {0, "a segment header cut short", newest};
    } else {
      version = le32(data.data() + 4);
      if (std::memcmp(data.data(), "RLYJ", 4) != 0 || version < oldest_format_version || version > format_version) {
        error = path + ": not a relay journal segment of format version " + std::to_string(oldest_format_version) +
                " to " + std::to_string(format_version);
        return false;
      }
      uint64_t number = 0;
      for (int i = 7; i >= 0; --i) number = number << 8 | static_cast<uint8_t>(data[8 + static_cast<size_t>(i)]);
      if (number != segments[si]) {
        // A renamed or copied segment would replay its records out of order.
        error = path + ": the segment header says it is segment " + std::to_string(number) +
                ", its name says " + std::to_string(segments[si]);
        return false;
      }
    }
    size_t header_bytes = version == 1 ? record_header_bytes_v1 : record_header_bytes;
    size_t pos = segment_header_bytes;
    while (bad.at == std::string::npos && pos < data.size()) {
      const char* p = data.data() + pos;
      size_t left = data.size() - pos;
      if (left < header_bytes) {
        bad = {pos, "a record header cut short", newest};
        break;
      }
      uint32_t len = le32(p), crc = le32(p + 4);
      if (version >= 2) {
        // The length is trusted only once its checksum holds. A header that
        // fails it is torn only if nothing but zeros (a file extended before
        // its data reached the disk) follows.
        if (crc32c(p, 8) != le32(p + 8)) {
          bad = {pos, "a record header whose checksum does not match", newest && all_zero(std::string_view(data).substr(pos))};
          break;
        }
      } else if (len > max_record_bytes) {
        // Version 1 does not check its lengths; the writer never made one
        // this large, and a torn write cannot change a length it wrote whole.
        bad = {pos, "a record length of " + std::to_string(len) + " bytes, above the maximum", false};
        break;
      }
      if (header_bytes + len > left) {
        // Runs past the end of the file: the last write was cut short.
        bad = {pos, "a record cut short", newest};
        break;
      }
      std::string_view body(p + header_bytes, len);
      size_t end = pos + header_bytes + len;
      if (crc32c(body.data(), body.size()) != crc) {
        bad = {pos, "a record whose checksum does not match", newest && all_zero(std::string_view(data).substr(end))};
        break;
      }
      // A checksum that holds says relay wrote these bytes: a record that
      // then does not decode or cannot be valid is never a torn write.
      queue::record r;
      if (!decode(body, r, version)) {
        bad = {pos, "a record whose checksum holds but which does not decode", false};
        break;
      }
      if (std::string_view why = invalid_reason(r); !why.empty()) {
        bad = {pos, "a record with " + std::string(why), false};
        break;
      }
      ++result.records;
      if (!apply(r)) ++result.skipped;
      pos = end;
    }
    if (bad.at == std::string::npos) {
      result.bytes += data.size();
      continue;
    }
    size_t later = segments.size() - si - 1;
    if (bad.torn) {
      result.truncated = true;
      result.note += "truncated a torn tail of " + path + " at offset " + std::to_string(bad.at) + " (" + bad.problem +
                     ", " + std::to_string(data.size() - bad.at) + " bytes dropped); ";
      int rc = bad.at < segment_header_bytes ? std::remove(path.c_str()) : truncate(path.c_str(), static_cast<off_t>(bad.at));
      if (rc != 0) {
        error = path + ": cannot truncate its torn tail: " + std::strerror(errno);
        return false;
      }
      result.bytes += bad.at;
      continue;
    }
    if (!repair) {
      error = "journal segment " + path + " is corrupt at offset " + std::to_string(bad.at) + " (" + bad.problem + ", " +
              std::to_string(data.size() - bad.at) +
              " bytes from there); refusing to start. Start with --repair-journal to cut the journal there, "
              "dropping the rest of this segment and " + std::to_string(later) + " later segment(s).";
      return false;
    }
    // Repair: drop this segment's rest and every later segment.
    for (size_t l = si + 1; l < segments.size(); ++l) std::remove(segment_path(dir, segments[l]).c_str());
    result.note += "repaired: cut " + path + " at offset " + std::to_string(bad.at) + " (" + bad.problem + "; dropped " +
                   std::to_string(data.size() - bad.at) + " bytes and " + std::to_string(later) + " later segment(s)); ";
    result.next_segment = segments[si] + 1;
    int rc = bad.at < segment_header_bytes ? std::remove(path.c_str()) : truncate(path.c_str(), static_cast<off_t>(bad.at));
    if (rc != 0) {
      error = path + ": cannot truncate for repair: " + std::strerror(errno);
      return false;
    }
    result.bytes += bad.at;
    return true;
  }
  return true;
}

}  // namespace relay::journal
