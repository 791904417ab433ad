// Statistics for the bench harness: a log-bucketed histogram (HDR-style:
// 32 sub-buckets per power of two, so any percentile is within ~3% of the
// true value) and key=value output parsing helpers.
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <map>
#include <sstream>
#include <string>

namespace bench {

class log_histogram {
 public:
  static constexpr int sub_bits = 5;
  static constexpr int subs = 1 << sub_bits;

  void add(uint64_t v) {
    ++_counts[index(v)];
    ++_total;
    if (v > _max) _max = v;
  }
  uint64_t count() const { return _total; }
  uint64_t max() const { return _max; }
  // The value at quantile q (0..1): the upper edge of its bucket.
  uint64_t quantile(double q) const {
    if (_total == 0) return 0;
    auto rank = static_cast<uint64_t>(std::ceil(q * static_cast<double>(_total)));
    if (rank == 0) rank = 1;
    uint64_t seen = 0;
    for (size_t i = 0; i < _counts.size(); ++i) {
      seen += _counts[i];
      if (seen >= rank) return std::min(upper(i), _max);
    }
    return _max;
  }
  void merge(const log_histogram& o) {
    for (size_t i = 0; i < _counts.size(); ++i) _counts[i] += o._counts[i];
    _total += o._total;
    if (o._max > _max) _max = o._max;
  }

  static size_t index(uint64_t v) {
    if (v < subs) return static_cast<size_t>(v);
    int msb = 63 - __builtin_clzll(v);
    int shift = msb - sub_bits;
    auto sub = static_cast<size_t>((v >> shift) & (subs - 1));
    return static_cast<size_t>(shift + 1) * subs + sub;
  }
  static uint64_t upper(size_t i) {
    if (i < subs) return i;
    size_t shift = i / subs - 1;
    uint64_t base = (uint64_t{subs} + (i % subs)) << shift;
    return base + ((uint64_t{1} << shift) - 1);
  }

 private:
  std::array<uint64_t, 64 * subs> _counts{};
  uint64_t _total = 0;
  uint64_t _max = 0;
};

// Parses one "key=value key=value" line (the harness's output format).
inline std::map<std::string, std::string> parse_kv(const std::string& line) {
  std::map<std::string, std::string> out;
  std::istringstream in(line);
  std::string tok;
  while (in >> tok) {
    auto eq = tok.find('=');
    if (eq != std::string::npos && eq > 0) out[tok.substr(0, eq)] = tok.substr(eq + 1);
  }
  return out;
}

}  // namespace bench
