// Blob files as the upload path (http::body_spool) leaves them, made by
// tests: bytes written to <dir>/<16 hex>, and the references and spool
// that name them.
#pragma once

#include <sys/stat.h>

#include <cstdint>
#include <fstream>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "relay/blob_store.h"
#include "relay/http.h"
#include "relay/journal.h"
#include "relay/queue.h"

namespace test {

// Writes `values` back to back into a new blob file of `dir` (created if
// missing) and returns a reference to each.
inline std::vector<relay::queue::blob_ref> write_blob(const std::string& dir, const std::vector<std::string>& values,
                                                      uint64_t file = 0) {
  ::mkdir(dir.c_str(), 0700);
  if (file == 0) {
    std::random_device rd;
    file = (static_cast<uint64_t>(rd()) << 32 | rd()) | 1;
  }
  std::ofstream out(dir + "/" + relay::journal::blob_store::name(file), std::ios::binary | std::ios::trunc);
  std::vector<relay::queue::blob_ref> refs;
  uint64_t at = 0;
  for (const auto& v : values) {
    out << v;
    refs.push_back({file, at, v.size(), relay::journal::crc32c(v.data(), v.size())});
    at += v.size();
  }
  return refs;
}

inline relay::queue::blob_ref write_blob(const std::string& dir, const std::string& value, uint64_t file = 0) {
  return write_blob(dir, std::vector<std::string>{value}, file)[0];
}

// A spool as the upload path attaches it to a request: `values` (item,
// key, bytes) written to a new file of `dir`; the request's body is then
// the skeleton, each value replaced by `null`.
struct spool_value {
  uint32_t item;
  std::string_view key;  // "payload" or "result"
  std::string bytes;
};
inline std::shared_ptr<relay::http::body_spool> make_spool(const std::string& dir, const std::vector<spool_value>& values,
                                                           uv_loop_t* loop = nullptr) {
  std::vector<std::string> bytes;
  for (const auto& v : values) bytes.push_back(v.bytes);
  auto refs = write_blob(dir, bytes);
  auto s = std::make_shared<relay::http::body_spool>();
  s->file = refs.empty() ? 0 : refs[0].file;
  s->dir = dir;
  s->loop = loop;
  for (size_t i = 0; i < values.size(); ++i) {
    s->values.push_back({values[i].item, values[i].key, refs[i].offset, refs[i].length, refs[i].crc32c});
    s->bytes += refs[i].length;
  }
  return s;
}

// Incompressible JSON: a string of `n` bytes in all (quotes included) of
// base64-like characters.
inline std::string random_json_string(size_t n, uint32_t seed) {
  static const char alphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::mt19937 rng(seed);
  std::string s(n, '"');
  for (size_t i = 1; i + 1 < n; ++i) s[i] = alphabet[rng() % 64];
  return s;
}

}  // namespace test
