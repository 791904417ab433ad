// Large payloads and results (issue 13): content made to size from a seed
// (so a test keeps seeds, not bytes), what the built binaries accept, and
// answers checked byte for byte without reading them into memory twice.
#pragma once

#include <doctest/doctest.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

#include "process.h"

namespace test::large {

constexpr uint64_t KiB = 1024, MiB = 1024 * KiB;

// The largest body relay and bunny are to take (issue 13: "at least
// 256 MiB"). One constant: the probes below and every size follow it.
constexpr uint64_t max_bytes = 256 * MiB;

// The configuration keys that raise the limits. relay's exists today (up
// to 64 MiB); bunny's answer limit is a constant (16 MiB, agent.h
// max_answer_bytes) until part C of issue 13 adds limits.max_job_bytes
// (the largest payload bunny takes and result it uploads; its leases ask
// for answers of that plus 64 KiB; handler.max_output_bytes, up to 64 MiB
// today, may then not exceed it).
inline constexpr const char* relay_max_body_key = "limits.max_body_bytes";
inline constexpr const char* bunny_max_job_key = "limits.max_job_bytes";
inline constexpr const char* bunny_max_output_key = "handler.max_output_bytes";
// Part A's key: its presence is how the tests know relay spills values to
// <journal.dir>/blobs.
inline constexpr const char* relay_spill_key = "limits.spill_threshold_bytes";
// What bunny reads of one answer today, fixed (src/bunny/agent.h).
constexpr uint64_t bunny_fixed_answer_bytes = 16 * MiB;

// Room for what a body holds besides the payload or result ({"payload":
// ..., "lease":"...", "result": ..., the http handler's {"echo": ...}): a
// payload of n bytes needs bodies and answers of n + envelope_bytes.
constexpr uint64_t envelope_bytes = 4 * KiB;

// A fast, seeded generator (splitmix64): the same seed gives the same
// bytes in every build.
class rng {
 public:
  explicit rng(uint64_t seed) : _s(seed) {}
  uint64_t next() {
    uint64_t z = (_s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }

 private:
  uint64_t _s;
};

// Appends n characters of base64 of random bytes: each character carries
// six fresh random bits, so the text is what base64 of random data is
// (incompressible; no compression or dedup anywhere can make it cheap).
inline void append_base64(std::string& out, uint64_t seed, size_t n) {
  static constexpr char alphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  rng r(seed);
  size_t at = out.size();
  out.resize(at + n);
  char* p = out.data() + at;
  size_t i = 0;
  while (i + 10 <= n) {
    uint64_t v = r.next();
    for (int k = 0; k < 10; ++k, v >>= 6) p[i++] = alphabet[v & 63];
  }
  uint64_t v = r.next();
  while (i < n) {
    p[i++] = alphabet[v & 63];
    v >>= 6;
  }
}

// A JSON string of exactly n bytes (n >= 2): base64 of random data.
inline std::string string_payload(uint64_t seed, size_t n) {
  REQUIRE(n >= 2);
  std::string s;
  s.reserve(n);
  s += '"';
  append_base64(s, seed, n - 2);
  s += '"';
  return s;
}

// A JSON document of exactly n bytes (n >= 256) with structure all the way
// through: an object holding an array of records, each with nested objects
// and arrays, numbers in every form, literals, escapes, multi-byte UTF-8
// and \u escapes (a surrogate pair among them), and random base64 text.
// It contains no "payload" or "result" key: those names, cut out of a
// body by a spilling relay, appear only at the top level of the body.
inline std::string structured_payload(uint64_t seed, size_t n) {
  REQUIRE(n >= 256);
  rng r(seed);
  std::string s;
  s.reserve(n);
  s += R"({"kind":"structured","seed":)" + std::to_string(seed) + R"(,"rows":[)";
  const std::string tail = R"(],"end":true})";
  // Each row: about 1 KiB; the last is padded so the whole is exactly n.
  for (uint64_t i = 0;; ++i) {
    std::string row = R"({"i":)" + std::to_string(i) + R"(,"neg":-)" + std::to_string(r.next() % 100000) +
                      R"(,"f":)" + std::to_string(r.next() % 1000) + "." + std::to_string(r.next() % 1000) +
                      R"(e-3,"big":)" + std::to_string(r.next()) +
                      R"(,"flags":[true,false,null],"deep":{"a":[[[{"b":[]}]]],"c":{}},)"
                      R"("text":"Zo\u00eb \"quoted\" back\\slash\ttab\n\u2603 ✓ 𝄞 \ud834\udd1e","blob":")";
    append_base64(row, r.next(), 700 + r.next() % 200);
    row += "\"}";
    size_t sep = i ? 1 : 0;
    // Room for this row, a comma, the closing and at least a minimal last row.
    if (s.size() + sep + row.size() + tail.size() + 64 > n) {
      std::string last = std::string(sep ? "," : "") + R"({"i":)" + std::to_string(i) + R"(,"pad":")";
      size_t pad = n - s.size() - last.size() - 2 - tail.size();
      REQUIRE(s.size() + last.size() + 2 + tail.size() <= n);
      s += last;
      append_base64(s, r.next(), pad);
      s += "\"}";
      s += tail;
      break;
    }
    if (sep) s += ',';
    s += row;
  }
  REQUIRE_EQ(s.size(), n);
  return s;
}

// ---- What the built binaries accept ----

// Whether `bin --check-config --set key=value` gets past the key: an
// unknown key or one out of range is named in the error; anything else
// (a missing certificate file: no configuration is given) is not about it.
inline bool accepts_setting(const std::string& bin, const std::string& key, uint64_t value) {
  if (bin.empty()) return false;
  std::string scratch = "/tmp";
  if (const char* t = std::getenv("TMPDIR"); t && *t) scratch = t;
  auto r = run({bin, "--check-config", "--set", key + "=" + std::to_string(value)}, scratch, 10000);
  if (r.exit_code < 0) return false;
  return r.err.find(key) == std::string::npos;
}

inline std::string bin_from_env(const char* name) {
  const char* v = std::getenv(name);
  return v ? v : "";
}

// The largest relay.limits.max_body_bytes this relay takes, of max_bytes
// and the 64 MiB that is today's cap.
inline uint64_t relay_max_body() {
  static const uint64_t v = [] {
    std::string bin = bin_from_env("RELAY_BIN");
    if (accepts_setting(bin, relay_max_body_key, max_bytes)) return max_bytes;
    if (accepts_setting(bin, relay_max_body_key, 64 * MiB)) return 64 * MiB;
    return uint64_t{0};
  }();
  return v;
}

// Whether bunny has a limit key to raise its answer limit to max_bytes.
// (Alone: with part C, handler.max_output_bytes may not exceed it, so a
// probe of that key with the default limits.max_job_bytes would fail.)
inline bool bunny_limit_configurable() {
  static const bool v = accepts_setting(bin_from_env("BUNNY_BIN"), bunny_max_job_key, max_bytes);
  return v;
}

// The largest answer (a lease answer: payload + envelope) bunny can read.
inline uint64_t bunny_max_answer() { return bunny_limit_configurable() ? max_bytes : bunny_fixed_answer_bytes; }

// Whether relay spills large values to <journal.dir>/blobs (part A).
inline bool relay_spills() {
  static const bool v = accepts_setting(bin_from_env("RELAY_BIN"), relay_spill_key, 64 * KiB);
  return v;
}

// Whether a payload of n bytes can go relay -> bunny -> relay with the
// binaries built here.
inline bool round_trip_fits(uint64_t n) {
  return n + envelope_bytes <= relay_max_body() && n + envelope_bytes <= bunny_max_answer();
}

// ---- Answers on disk, read in place ----

// A file mapped read-only (an answer of up to twice max_bytes is compared
// where it lies, not copied).
class mapped_file {
 public:
  explicit mapped_file(const std::string& path) {
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return;
    struct stat st {};
    if (::fstat(fd, &st) == 0 && st.st_size > 0) {
      void* p = ::mmap(nullptr, static_cast<size_t>(st.st_size), PROT_READ, MAP_PRIVATE, fd, 0);
      if (p != MAP_FAILED) {
        _p = static_cast<const char*>(p);
        _n = static_cast<size_t>(st.st_size);
      }
    }
    ::close(fd);
  }
  mapped_file(const mapped_file&) = delete;
  mapped_file& operator=(const mapped_file&) = delete;
  ~mapped_file() {
    if (_p) ::munmap(const_cast<char*>(_p), _n);
  }
  std::string_view view() const { return {_p ? _p : "", _n}; }

 private:
  const char* _p = nullptr;
  size_t _n = 0;
};

// Where `a` and `b` first differ, or npos if they are equal (a short
// description for a failure message, never the bytes themselves).
inline std::string first_difference(std::string_view a, std::string_view b) {
  if (a == b) return {};
  size_t n = std::min(a.size(), b.size()), i = 0;
  while (i < n && a[i] == b[i]) ++i;
  return "sizes " + std::to_string(a.size()) + " and " + std::to_string(b.size()) + ", first difference at byte " +
         std::to_string(i) + (i < n ? " ('" + std::string(1, a[i]) + "' vs '" + std::string(1, b[i]) + "')" : "");
}

// The raw JSON value of top-level member `key` in a job view answer whose
// members come in relay's order (id, queue, state, attempts, payload,
// result, error, ...): found by its position, not by searching inside
// values. Empty if the shape is not that.
inline std::string_view job_member(std::string_view body, std::string_view key, std::string_view next_key) {
  std::string k = "\"" + std::string(key) + "\":";
  std::string nk = ",\"" + std::string(next_key) + "\":";
  size_t at = body.find(k);
  if (at == std::string_view::npos) return {};
  at += k.size();
  // The value ends where the next member starts; search from the end,
  // since the value itself may contain anything.
  size_t end = body.rfind(nk);
  if (end == std::string_view::npos || end < at) return {};
  return body.substr(at, end - at);
}

}  // namespace test::large
