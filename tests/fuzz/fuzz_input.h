// Helpers shared by the fuzz targets: taking control bytes off the front of
// an input, and cutting the rest into pieces at points the input chooses (so
// that the fuzzer explores how a stream parser copes with arbitrary reads).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string_view>
#include <vector>

namespace relay::fuzz {

// Reads control bytes from the front of the input; past its end, zeros.
class input {
 public:
  input(const uint8_t* data, size_t size) : _rest(reinterpret_cast<const char*>(data), size) {}
  uint8_t byte() {
    if (_rest.empty()) return 0;
    auto b = static_cast<uint8_t>(_rest.front());
    _rest.remove_prefix(1);
    return b;
  }
  uint16_t u16() {
    uint16_t lo = byte();
    return static_cast<uint16_t>(lo | (byte() << 8));
  }
  std::string_view rest() const { return _rest; }

 private:
  std::string_view _rest;
};

// Up to 7 cut points, chosen by one count byte and two bytes per point,
// reduced modulo the stream length; the pieces of `stream` in order (an
// empty piece is kept: parsers must take zero bytes too).
inline std::vector<std::string_view> split(input& in) {
  size_t n = in.byte() % 8;
  std::vector<uint16_t> raw;
  for (size_t i = 0; i < n; ++i) raw.push_back(in.u16());
  std::string_view stream = in.rest();
  std::vector<size_t> cuts;
  for (uint16_t r : raw) cuts.push_back(stream.empty() ? 0 : r % (stream.size() + 1));
  std::sort(cuts.begin(), cuts.end());
  std::vector<std::string_view> pieces;
  size_t at = 0;
  for (size_t c : cuts) {
    pieces.push_back(stream.substr(at, c - at));
    at = c;
  }
  pieces.push_back(stream.substr(at));
  return pieces;
}

// A broken invariant: say which, then abort so that libFuzzer keeps the input.
[[noreturn]] inline void violated(const char* what, const char* file, int line) {
  std::fprintf(stderr, "fuzz invariant violated at %s:%d: %s\n", file, line, what);
  std::abort();
}

}  // namespace relay::fuzz

// Like assert, but also in release builds and with the expression printed.
#define FUZZ_CHECK(cond) \
  do {                   \
    if (!(cond)) ::relay::fuzz::violated(#cond, __FILE__, __LINE__); \
  } while (0)
