#include <doctest/doctest.h>

#include <algorithm>
#include <random>
#include <vector>

#include "../../../bench/stats.h"

TEST_CASE("the log histogram's quantiles are within 1/32 of the exact ones") {
  std::mt19937_64 rng(7);
  std::lognormal_distribution<double> dist(10, 1.5);
  std::vector<uint64_t> values;
  bench::log_histogram h;
  for (int i = 0; i < 100000; ++i) {
    auto v = static_cast<uint64_t>(dist(rng)) + 1;
    values.push_back(v);
    h.add(v);
  }
  std::sort(values.begin(), values.end());
  for (double q : {0.5, 0.9, 0.99, 0.999}) {
    uint64_t exact = values[static_cast<size_t>(q * static_cast<double>(values.size())) - 1];
    uint64_t got = h.quantile(q);
    CHECK_GE(got, exact);
    CHECK_LE(static_cast<double>(got), static_cast<double>(exact) * (1.0 + 1.0 / 32) + 1);
  }
  CHECK_EQ(h.count(), 100000u);
  CHECK_EQ(h.quantile(1.0), values.back());
}

TEST_CASE("small values are exact, and every value lands in a bucket that holds it") {
  bench::log_histogram h;
  for (uint64_t v = 0; v < 32; ++v) CHECK_EQ(bench::log_histogram::upper(bench::log_histogram::index(v)), v);
  for (uint64_t v : {32ull, 33ull, 1000ull, 123456789ull, 1ull << 40}) {
    size_t i = bench::log_histogram::index(v);
    CHECK_GE(bench::log_histogram::upper(i), v);
    if (i > 0) CHECK_LT(bench::log_histogram::upper(i - 1), v);
  }
  CHECK_EQ(h.quantile(0.5), 0u);
}

TEST_CASE("key=value lines parse") {
  auto kv = bench::parse_kv("scenario=submit jobs_per_sec=1234 p99_us=80.5 junk");
  CHECK_EQ(kv["scenario"], "submit");
  CHECK_EQ(kv["jobs_per_sec"], "1234");
  CHECK_EQ(kv["p99_us"], "80.5");
  CHECK_EQ(kv.count("junk"), 0u);
}
