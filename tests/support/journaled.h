// A queue core journaling into a real journal writer on a private loop, and
// a replay of a journal directory into a fresh core: the journal's tests
// (unit and regression) drive the real writer thread and real files.
#pragma once

#include <doctest/doctest.h>
#include <uv.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "counting_random.h"
#include "journal/segment.h"
#include "relay/journal.h"
#include "relay/metrics.h"
#include "relay/queue.h"

namespace test {

struct journaled {
  uv_loop_t loop;
  relay::ops::registry metrics;
  std::unique_ptr<relay::journal::writer> w;
  std::unique_ptr<relay::queue::broker> b;
  relay::queue::principal_ref worker = nullptr;
  uv_timer_t tick{};  // wakes the loop while a test waits, so no wait blocks forever

  explicit journaled(const std::string& dir, relay::journal::options o = {}, uint64_t first_segment = 1,
                     relay::queue::broker_limits limits = {}) {
    uv_loop_init(&loop);
    uv_timer_init(&loop, &tick);
    o.dir = dir;
    w = std::make_unique<relay::journal::writer>(&loop, o, metrics);
    std::string error;
    REQUIRE_MESSAGE(w->open(first_segment, error), error);
    b = std::make_unique<relay::queue::broker>(limits, counting_random(), w.get());
    worker = b->intern("w");
  }
  journaled(const journaled&) = delete;
  journaled& operator=(const journaled&) = delete;
  ~journaled() {
    uv_close(reinterpret_cast<uv_handle_t*>(&tick), nullptr);
    w->close();
    uv_run(&loop, UV_RUN_DEFAULT);
    CHECK_EQ(uv_loop_close(&loop), 0);
  }
  // Runs the loop until `done` (at most about 20 s).
  template <class Done>
  bool run_until(Done done) {
    uv_timer_start(&tick, [](uv_timer_t*) {}, 10, 10);
    for (int i = 0; i < 2000 && !done(); ++i) uv_run(&loop, UV_RUN_ONCE);
    uv_timer_stop(&tick);
    return done();
  }
  // Waits until everything appended is durable.
  bool sync() {
    int result = -1;
    w->when_durable([&](bool ok) { result = ok ? 1 : 0; });
    run_until([&] { return result >= 0; });
    return result == 1;
  }
  // Runs the loop until the writer accepts changes again.
  bool recover() {
    return run_until([&] { return w->accepting(); });
  }
  relay::queue::job_id submit(const std::string& payload, relay::queue::time_ms now = 1000) {
    relay::queue::submit_params p;
    p.queue = "q";
    p.payload = payload;
    auto r = b->submit(p, now);
    REQUIRE(r.j != nullptr);
    return r.j->id;
  }
};

inline std::unique_ptr<relay::queue::broker> replay_dir(const std::string& dir, relay::journal::replay_result& res,
                                                        std::string& error, bool repair = false,
                                                        relay::queue::broker_limits limits = {}) {
  auto b = std::make_unique<relay::queue::broker>(limits, counting_random());
  if (!relay::journal::replay(dir, repair, [&](const relay::queue::record& r) { return b->apply(r); }, res, error))
    return nullptr;
  return b;
}

inline std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

inline void write_bytes(const std::string& path, const std::string& data) {
  std::ofstream(path, std::ios::binary | std::ios::trunc) << data;
}

// The offset of every record in a segment's bytes (walking the length
// words; stops at anything that does not fit).
inline std::vector<size_t> record_offsets(const std::string& data) {
  std::vector<size_t> out;
  size_t pos = relay::journal::segment_header_bytes;
  while (pos + relay::journal::record_header_bytes <= data.size()) {
    uint32_t len = 0;
    for (int i = 0; i < 4; ++i) len |= static_cast<uint32_t>(static_cast<uint8_t>(data[pos + static_cast<size_t>(i)])) << (8 * i);
    if (pos + relay::journal::record_header_bytes + len > data.size()) break;
    out.push_back(pos);
    pos += relay::journal::record_header_bytes + len;
  }
  return out;
}

inline std::vector<std::string> files(const std::string& dir) {
  std::vector<std::string> out;
  for (auto& e : std::filesystem::directory_iterator(dir)) out.push_back(e.path().filename());
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace test
