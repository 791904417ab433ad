// Runs relay::http::json_scanner over a body cut into given pieces and
// rebuilds the body from the skeleton and the cut values, for the unit
// tests and the json_scanner fuzzer.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "relay/json_scanner.h"

namespace relay::test {

struct scan_result {
  http::json_scanner::status status = http::json_scanner::status::ok;
  std::string skeleton;
  std::string error;
  struct cut {
    uint32_t item;
    std::string key;
    size_t skeleton_offset;
    std::string bytes;
  };
  std::vector<cut> cuts;
  bool sink_ok = true;  // begin/bytes/end arrived in order, lengths agree

  // The skeleton with each `null` placeholder replaced by its value.
  std::string reassemble() const {
    std::string out;
    size_t from = 0;
    for (const cut& c : cuts) {
      out.append(skeleton, from, c.skeleton_offset - from);
      out += c.bytes;
      from = c.skeleton_offset + 4;
    }
    out.append(skeleton, from, std::string::npos);
    return out;
  }
};

class recording_sink : public http::json_scanner::sink {
 public:
  explicit recording_sink(scan_result& r) : _r(r) {}
  void on_cut_begin(uint32_t item, std::string_view key) override {
    if (_open) _r.sink_ok = false;
    _open = true;
    _r.cuts.push_back({item, std::string(key), 0, {}});
  }
  void on_cut_bytes(const char* data, size_t len) override {
    if (!_open) _r.sink_ok = false;
    else _r.cuts.back().bytes.append(data, len);
  }
  void on_cut_end(size_t skeleton_offset, uint64_t length) override {
    if (!_open || _r.cuts.back().bytes.size() != length) _r.sink_ok = false;
    _open = false;
    if (!_r.cuts.empty()) _r.cuts.back().skeleton_offset = skeleton_offset;
  }

 private:
  scan_result& _r;
  bool _open = false;
};

inline scan_result scan(const std::vector<std::string_view>& pieces, uint64_t threshold,
                        size_t max_skeleton = 8u << 20) {
  scan_result r;
  recording_sink s(r);
  http::json_scanner sc(s, threshold, max_skeleton);
  for (std::string_view p : pieces) {
    r.status = sc.feed(p.data(), p.size());
    if (r.status != http::json_scanner::status::ok) break;
  }
  if (r.status == http::json_scanner::status::ok) r.status = sc.finish();
  r.skeleton = sc.skeleton();
  r.error = sc.error();
  return r;
}

}  // namespace relay::test
