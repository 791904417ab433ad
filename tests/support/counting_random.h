// Deterministic "random" lease tokens for queue-core tests: a counter, so
// tests can tell leases apart and runs repeat exactly.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>

#include "relay/queue.h"

namespace test {

inline relay::queue::broker::random_source counting_random() {
  auto n = std::make_shared<uint64_t>(0);
  return [n](uint8_t* out, size_t len) {
    ++*n;
    std::memset(out, 0, len);
    std::memcpy(out, n.get(), std::min(len, sizeof(uint64_t)));
  };
}

}  // namespace test
