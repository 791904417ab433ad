// Metrics: counters, gauges and histograms rendered in the Prometheus text
// exposition format (version 0.0.4).
//
// A registry belongs to one process component (relay's server, bunny's agent);
// there is no global registry, so two servers in one test process keep
// separate figures. Metric objects live as long as their registry and never
// move: callers look a series up once and keep the reference on the hot path.
// Values are atomics so a helper thread (the journal writer) may update them.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace relay::ops {

class counter {
 public:
  void inc(uint64_t n = 1) { _value.fetch_add(n, std::memory_order_relaxed); }
  uint64_t value() const { return _value.load(std::memory_order_relaxed); }

 private:
  std::atomic<uint64_t> _value{0};
};

class gauge {
 public:
  void set(int64_t v) { _value.store(v, std::memory_order_relaxed); }
  void add(int64_t d) { _value.fetch_add(d, std::memory_order_relaxed); }
  int64_t value() const { return _value.load(std::memory_order_relaxed); }

 private:
  std::atomic<int64_t> _value{0};
};

// Cumulative histogram with fixed upper bounds (in the metric's unit, usually
// seconds). Observations are stored in integer micro-units so that updates
// stay lock-free.
class histogram {
 public:
  explicit histogram(std::vector<double> upper_bounds);
  void observe(double v);
  const std::vector<double>& bounds() const { return _bounds; }
  uint64_t bucket(size_t i) const { return _buckets[i].load(std::memory_order_relaxed); }
  uint64_t count() const { return _count.load(std::memory_order_relaxed); }
  double sum() const { return static_cast<double>(_sum_micro.load(std::memory_order_relaxed)) / 1e6; }

 private:
  std::vector<double> _bounds;
  std::unique_ptr<std::atomic<uint64_t>[]> _buckets;  // non-cumulative; +Inf is count
  std::atomic<uint64_t> _count{0};
  std::atomic<uint64_t> _sum_micro{0};
};

// Exponential bounds for latencies: 50us .. ~6.5s.
std::vector<double> latency_bounds_seconds();

class registry {
 public:
  // `labels` is the label set in exposition syntax without braces, e.g.
  // `route="lease",status="200"`; values must already be escaped (see
  // label_value). The first call for a name fixes its help text and type.
  counter& get_counter(std::string_view name, std::string_view help, std::string_view labels = {});
  gauge& get_gauge(std::string_view name, std::string_view help, std::string_view labels = {});
  histogram& get_histogram(std::string_view name, std::string_view help,
                           const std::vector<double>& bounds, std::string_view labels = {});

  // A collector writes series computed at scrape time (e.g. queue depths),
  // including their # HELP / # TYPE lines; see write_header.
  using collector = std::function<void(std::string& out)>;
  void add_collector(collector c) { _collectors.push_back(std::move(c)); }

  std::string render() const;

  static void write_header(std::string& out, std::string_view name, std::string_view help,
                           std::string_view type);
  // Escapes a label value (backslash, quote, newline) for exposition.
  static std::string label_value(std::string_view v);

 private:
  enum class kind { counter, gauge, histogram };
  struct family {
    std::string help;
    kind type;
    std::map<std::string, std::unique_ptr<counter>, std::less<>> counters;
    std::map<std::string, std::unique_ptr<gauge>, std::less<>> gauges;
    std::map<std::string, std::unique_ptr<histogram>, std::less<>> histograms;
  };
  family& get_family(std::string_view name, std::string_view help, kind type);

  std::map<std::string, family, std::less<>> _families;
  std::vector<collector> _collectors;
};

}  // namespace relay::ops
