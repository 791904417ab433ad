#include "relay/metrics.h"

#include <cassert>
#include <cmath>
#include <cstdio>

namespace relay::ops {

histogram::histogram(std::vector<double> upper_bounds)
    : _bounds(std::move(upper_bounds)),
      _buckets(new std::atomic<uint64_t>[_bounds.size()]) {
  for (size_t i = 0; i < _bounds.size(); ++i) _buckets[i].store(0);
}

void histogram::observe(double v) {
  // Buckets are few (about 18); a linear scan beats a binary search here.
  for (size_t i = 0; i < _bounds.size(); ++i) {
    if (v <= _bounds[i]) {
      _buckets[i].fetch_add(1, std::memory_order_relaxed);
      break;
    }
  }
  _count.fetch_add(1, std::memory_order_relaxed);
  if (v > 0) _sum_micro.fetch_add(static_cast<uint64_t>(std::llround(v * 1e6)), std::memory_order_relaxed);
}

std::vector<double> latency_bounds_seconds() {
  std::vector<double> b;
  for (double v = 50e-6; v < 7.0; v *= 2) b.push_back(v);
  return b;
}

registry::family& registry::get_family(std::string_view name, std::string_view help, kind type) {
  auto it = _families.find(name);
  if (it == _families.end()) {
    it = _families.emplace(std::string(name), family{std::string(help), type, {}, {}, {}}).first;
  }
  assert(it->second.type == type && "one metric name, one type");
  return it->second;
}

counter& registry::get_counter(std::string_view name, std::string_view help, std::string_view labels) {
  auto& f = get_family(name, help, kind::counter);
  auto it = f.counters.find(labels);
  if (it == f.counters.end()) it = f.counters.emplace(std::string(labels), std::make_unique<counter>()).first;
  return *it->second;
}

gauge& registry::get_gauge(std::string_view name, std::string_view help, std::string_view labels) {
  auto& f = get_family(name, help, kind::gauge);
  auto it = f.gauges.find(labels);
  if (it == f.gauges.end()) it = f.gauges.emplace(std::string(labels), std::make_unique<gauge>()).first;
  return *it->second;
}

histogram& registry::get_histogram(std::string_view name, std::string_view help,
                                   const std::vector<double>& bounds, std::string_view labels) {
  auto& f = get_family(name, help, kind::histogram);
  auto it = f.histograms.find(labels);
  if (it == f.histograms.end())
    it = f.histograms.emplace(std::string(labels), std::make_unique<histogram>(bounds)).first;
  return *it->second;
}

void registry::write_header(std::string& out, std::string_view name, std::string_view help,
                            std::string_view type) {
  out += "# HELP ";
  out += name;
  out += ' ';
  out += help;
  out += "\n# TYPE ";
  out += name;
  out += ' ';
  out += type;
  out += '\n';
}

std::string registry::label_value(std::string_view v) {
  std::string out;
  out.reserve(v.size());
  for (char c : v) {
    if (c == '\\') out += "\\\\";
    else if (c == '"') out += "\\\"";
    else if (c == '\n') out += "\\n";
    else out += c;
  }
  return out;
}

namespace {

void series(std::string& out, std::string_view name, std::string_view suffix, std::string_view labels,
            std::string_view extra_label, std::string_view value) {
  out += name;
  out += suffix;
  if (!labels.empty() || !extra_label.empty()) {
    out += '{';
    out += labels;
    if (!labels.empty() && !extra_label.empty()) out += ',';
    out += extra_label;
    out += '}';
  }
  out += ' ';
  out += value;
  out += '\n';
}

std::string format_double(double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.9g", v);
  return buf;
}

}  // namespace

std::string registry::render() const {
  std::string out;
  out.reserve(8192);
  for (const auto& [name, f] : _families) {
    switch (f.type) {
      case kind::counter:
        write_header(out, name, f.help, "counter");
        for (const auto& [labels, c] : f.counters) series(out, name, "", labels, "", std::to_string(c->value()));
        break;
      case kind::gauge:
        write_header(out, name, f.help, "gauge");
        for (const auto& [labels, g] : f.gauges) series(out, name, "", labels, "", std::to_string(g->value()));
        break;
      case kind::histogram:
        write_header(out, name, f.help, "histogram");
        for (const auto& [labels, h] : f.histograms) {
          uint64_t cumulative = 0;
          for (size_t i = 0; i < h->bounds().size(); ++i) {
            cumulative += h->bucket(i);
            series(out, name, "_bucket", labels, "le=\"" + format_double(h->bounds()[i]) + "\"",
                   std::to_string(cumulative));
          }
          series(out, name, "_bucket", labels, "le=\"+Inf\"", std::to_string(h->count()));
          series(out, name, "_sum", labels, "", format_double(h->sum()));
          series(out, name, "_count", labels, "", std::to_string(h->count()));
        }
        break;
    }
  }
  for (const auto& c : _collectors) c(out);
  return out;
}

}  // namespace relay::ops
