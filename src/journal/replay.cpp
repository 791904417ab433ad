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
    unsigned long long n = 0;
    char tail[8] = "";
    if (std::sscanf(e->d_name, "segment-%16llu.%3s", &n, tail) == 2 && std::strcmp(tail, "log") == 0 &&
        std::strlen(e->d_name) == 28)
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
    bool last = si + 1 == segments.size();
    // Where a torn tail starts (-1: none) and where corruption is (-1: none).
    size_t cut = std::string::npos;
    std::string problem;
    if (data.size() < segment_header_bytes) {
      cut = 0;
      problem = "a segment header cut short";
    } else if (std::memcmp(data.data(), "RLYJ", 4) != 0 || le32(data.data() + 4) != format_version) {
      error = path + ": not a relay journal segment of format version " + std::to_string(format_version);
      return false;
    }
    size_t pos = segment_header_bytes;
    while (cut == std::string::npos && pos < data.size()) {
      size_t left = data.size() - pos;
      if (left < record_header_bytes) {
        cut = pos;
        problem = "a record header cut short";
        break;
      }
      uint32_t len = le32(data.data() + pos), crc = le32(data.data() + pos + 4);
      if (len > max_record_bytes || record_header_bytes + len > left) {
        // Runs past the end of the segment: the last write was torn.
        cut = pos;
        problem = "a record cut short";
        break;
      }
      std::string_view body(data.data() + pos + record_header_bytes, len);
      queue::record r;
      bool good = crc32c(body.data(), body.size()) == crc && decode(body, r);
      if (!good) {
        size_t end = pos + record_header_bytes + len;
        if (end == data.size()) {
          // Nothing follows: a write that did not complete.
          cut = pos;
          problem = "a record whose checksum does not match";
          break;
        }
        if (!repair) {
          error = "journal segment " + path + " is corrupt at offset " + std::to_string(pos) +
                  " (record checksum mismatch, " + std::to_string(data.size() - pos) +
                  " bytes follow); refusing to start. Start with --repair-journal to cut the journal there, "
                  "dropping the rest of this segment and " + std::to_string(segments.size() - si - 1) +
                  " later segment(s).";
          return false;
        }
        // Repair: drop this segment's rest and every later segment.
        for (size_t later = si + 1; later < segments.size(); ++later) std::remove(segment_path(dir, segments[later]).c_str());
        result.note += "repaired: cut " + path + " at offset " + std::to_string(pos) + " (dropped " +
                       std::to_string(data.size() - pos) + " bytes and " + std::to_string(segments.size() - si - 1) +
                       " later segment(s)); ";
        result.next_segment = segments[si] + 1;
        if (truncate(path.c_str(), static_cast<off_t>(pos)) != 0) {
          error = path + ": cannot truncate for repair: " + std::strerror(errno);
          return false;
        }
        result.bytes += pos;
        return true;
      }
      ++result.records;
      if (!apply(r)) ++result.skipped;
      pos += record_header_bytes + len;
    }
    if (cut != std::string::npos) {
      result.truncated = true;
      result.note += "truncated a torn tail of " + path + " at offset " + std::to_string(cut) + " (" + problem + ", " +
                     std::to_string(data.size() - cut) + " bytes dropped); ";
      if (!last) result.note += "(not the newest segment); ";
      int rc = cut < segment_header_bytes ? std::remove(path.c_str()) : truncate(path.c_str(), static_cast<off_t>(cut));
      if (rc != 0) {
        error = path + ": cannot truncate its torn tail: " + std::strerror(errno);
        return false;
      }
      data.resize(cut);
    }
    result.bytes += data.size();
  }
  return true;
}

}  // namespace relay::journal
