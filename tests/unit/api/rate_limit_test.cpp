// Token buckets and the per-principal limiter, on an injected clock: time is
// a number the test moves, never a sleep.
#include <doctest/doctest.h>

#include <string>

#include "api/rate_limit.h"

using namespace relay;
using api::rate_limiter;
using api::token_bucket;
using kind = rate_limiter::kind;

namespace {

std::shared_ptr<const auth::policy> policy_with(const std::string& limits) {
  std::string json = R"({"principals": {"p1": {"cn": "p1"}, "p2": {"cn": "p2"}, "p3": {"cn": "p3"}},
                         "grants": [{"principal": "p1", "allow": ["submit"], "queues": ["*"]}])";
  if (!limits.empty()) json += R"(, "limits": )" + limits;
  json += "}";
  std::string error;
  auto p = auth::policy::parse(json, "policy.json", error);
  REQUIRE_MESSAGE(p, error);
  return p;
}

// The policy's own pointer for a principal, as policy::match() gives it.
struct names {
  std::string p1 = "p1", p2 = "p2", p3 = "p3";
};

// How many of `n` requests pass at one instant.
int passes(rate_limiter& l, const std::shared_ptr<const auth::policy>& p, const std::string* who, int n,
           uint64_t now) {
  int ok = 0;
  for (int i = 0; i < n; ++i) ok += l.ask(p, who, kind::requests, 1, now, true).allowed ? 1 : 0;
  return ok;
}

}  // namespace

TEST_CASE("token bucket: starts full, refills at its rate, never beyond its burst") {
  token_bucket b;
  b.fill(3, 1000);
  CHECK(b.take(1));
  CHECK(b.take(2));
  CHECK_FALSE(b.take(1));
  CHECK_EQ(b.tokens(), 0.0);
  // 2 tokens/s: one token every 500 ms.
  b.refill(2, 3, 1499);
  CHECK_FALSE(b.holds(1));
  b.refill(2, 3, 1500);
  CHECK(b.take(1));
  // A long pause fills it to the burst and no further.
  b.refill(2, 3, 1'000'000);
  CHECK_EQ(b.tokens(), 3.0);
  // A lowered burst cuts what is above it at once.
  b.refill(2, 1, 1'000'000);
  CHECK_EQ(b.tokens(), 1.0);
}

TEST_CASE("token bucket: many small refills add up to whole tokens") {
  // 1 token/s refilled every millisecond: 1000 additions of 0.001, which as
  // doubles may fall a hair short of 1.
  token_bucket b;
  b.fill(1, 0);
  REQUIRE(b.take(1));
  for (uint64_t t = 1; t <= 999; ++t) b.refill(1, 1, t);
  CHECK_FALSE(b.holds(1));
  b.refill(1, 1, 1000);
  CHECK(b.take(1));
}

TEST_CASE("token bucket: a clock that steps back earns nothing and costs nothing") {
  token_bucket b;
  b.fill(2, 10'000);
  REQUIRE(b.take(2));
  b.refill(1, 2, 5'000);
  CHECK_EQ(b.tokens(), 0.0);
  // Time is counted from the latest instant seen, not from the step back.
  b.refill(1, 2, 10'999);
  CHECK_FALSE(b.holds(1));
  b.refill(1, 2, 11'000);
  CHECK(b.holds(1));
}

TEST_CASE("token bucket: Retry-After is the whole seconds until enough tokens, at least one") {
  token_bucket b;
  b.fill(10, 0);
  REQUIRE(b.take(10));
  CHECK_EQ(b.seconds_until(1, 100), 1u);    // 10 ms away: still 1
  CHECK_EQ(b.seconds_until(10, 2), 5u);     // exactly 5 s
  CHECK_EQ(b.seconds_until(10, 3), 4u);     // 3.33 s, rounded up
  CHECK_EQ(b.seconds_until(1, 0.1), 10u);   // a slow rate
  b.refill(2, 10, 250);                     // half a token
  CHECK_EQ(b.seconds_until(1, 2), 1u);
  CHECK_EQ(b.seconds_until(6, 2), 3u);      // 5.5 missing at 2/s: 2.75 s
  b.fill(10, 0);
  CHECK_EQ(b.seconds_until(1, 1), 1u);      // there already: never 0
  // A second is the floor, not a measure: the answer must never say "now"
  // when the tokens are not there.
  b.fill(1e9, 0);
  REQUIRE(b.take(1e9));
  CHECK_EQ(b.seconds_until(1e9, 1e9), 1u);
}

TEST_CASE("limiter: a burst, then one request per token earned; Retry-After says when") {
  auto p = policy_with(R"([{"principal": "p1", "requests_per_s": 2, "burst": 4}])");
  ops::registry m;
  rate_limiter l(m);
  names n;
  CHECK_EQ(passes(l, p, &n.p1, 10, 0), 4);
  auto v = l.ask(p, &n.p1, kind::requests, 1, 0, true);
  CHECK_FALSE(v.allowed);
  CHECK_FALSE(v.never);
  CHECK_EQ(v.retry_after_s, 1u);
  CHECK_EQ(v.rate, 2.0);
  CHECK_EQ(v.burst, 4.0);
  // 2/s: one more at 500 ms, another at 1000 ms; nothing between.
  CHECK_EQ(passes(l, p, &n.p1, 5, 499), 0);
  CHECK_EQ(passes(l, p, &n.p1, 5, 500), 1);
  CHECK_EQ(passes(l, p, &n.p1, 5, 999), 0);
  CHECK_EQ(passes(l, p, &n.p1, 5, 1000), 1);
  // Over ten seconds at most the burst plus what was earned gets through.
  int total = 0;
  for (uint64_t t = 1001; t <= 11'000; ++t) total += passes(l, p, &n.p1, 3, t);
  CHECK_EQ(total, 20);
}

TEST_CASE("limiter: principals have buckets of their own, unlimited ones cost nothing") {
  auto p = policy_with(R"([{"principal": "p1", "requests_per_s": 1, "burst": 1},
                           {"principal": "p2", "requests_per_s": 1, "burst": 1}])");
  ops::registry m;
  rate_limiter l(m);
  names n;
  CHECK_EQ(passes(l, p, &n.p1, 5, 0), 1);
  // p1 being empty does not touch p2 (the noisy-neighbour guarantee).
  CHECK_EQ(passes(l, p, &n.p2, 5, 0), 1);
  // p3 has no entry and there is no "*": not limited.
  CHECK_EQ(passes(l, p, &n.p3, 1000, 0), 1000);
  // Peers the policy does not name: not limited without "*".
  CHECK_EQ(passes(l, p, nullptr, 1000, 0), 1000);
}

TEST_CASE("limiter: \"*\" limits each other principal apart, and unnamed peers together") {
  auto p = policy_with(R"([{"principal": "p1", "requests_per_s": 100},
                           {"principal": "*", "requests_per_s": 1, "burst": 2}])");
  ops::registry m;
  rate_limiter l(m);
  names n;
  CHECK_EQ(passes(l, p, &n.p1, 200, 0), 100);
  CHECK_EQ(passes(l, p, &n.p2, 5, 0), 2);
  CHECK_EQ(passes(l, p, &n.p3, 5, 0), 2);
  // Every unnamed peer shares one bucket.
  CHECK_EQ(passes(l, p, nullptr, 5, 0), 2);
  CHECK_EQ(passes(l, p, nullptr, 5, 0), 0);
  CHECK_EQ(l.tracked(), 4u);
}

TEST_CASE("limiter: jobs are counted per job; a batch beyond the burst can never pass") {
  auto p = policy_with(R"([{"principal": "p1", "jobs_per_s": 10, "jobs_burst": 64}])");
  ops::registry m;
  rate_limiter l(m);
  names n;
  // Only jobs are limited: requests pass.
  CHECK_EQ(passes(l, p, &n.p1, 500, 0), 500);
  // Asking without taking leaves the tokens there.
  CHECK(l.ask(p, &n.p1, kind::jobs, 64, 0, false).allowed);
  CHECK(l.ask(p, &n.p1, kind::jobs, 64, 0, false).allowed);
  auto big = l.ask(p, &n.p1, kind::jobs, 65, 0, true);
  CHECK_FALSE(big.allowed);
  CHECK(big.never);
  CHECK_EQ(big.burst, 64.0);
  // A batch of 64 costs 64: the next job waits for a token.
  CHECK(l.ask(p, &n.p1, kind::jobs, 64, 0, true).allowed);
  auto one = l.ask(p, &n.p1, kind::jobs, 1, 0, true);
  CHECK_FALSE(one.allowed);
  CHECK_FALSE(one.never);
  CHECK_EQ(one.retry_after_s, 1u);
  // Another full batch needs 6.4 s at 10/s: Retry-After 7.
  auto again = l.ask(p, &n.p1, kind::jobs, 64, 0, true);
  CHECK_FALSE(again.allowed);
  CHECK_EQ(again.retry_after_s, 7u);
  CHECK_FALSE(l.ask(p, &n.p1, kind::jobs, 64, 6399, true).allowed);
  CHECK(l.ask(p, &n.p1, kind::jobs, 64, 6400, true).allowed);
}

TEST_CASE("limiter: a reload keeps the tokens and applies the new rates") {
  auto slow = policy_with(R"([{"principal": "p1", "requests_per_s": 1, "burst": 10},
                              {"principal": "p2", "requests_per_s": 1, "burst": 10}])");
  ops::registry m;
  rate_limiter l(m);
  names n;
  CHECK_EQ(passes(l, slow, &n.p1, 10, 0), 10);
  CHECK_EQ(passes(l, slow, &n.p2, 4, 0), 4);  // p2 keeps 6
  // The same limits in a new policy object (a reload that changed something
  // else): the empty bucket stays empty.
  auto same = policy_with(R"([{"principal": "p1", "requests_per_s": 1, "burst": 10},
                              {"principal": "p2", "requests_per_s": 1, "burst": 10}])");
  CHECK_EQ(passes(l, same, &n.p1, 5, 0), 0);
  // New rates apply from the first request decided under the new policy;
  // what was earned until then at the old rate is kept. Half a second at
  // 1/s, then half a second at 10/s.
  auto fast = policy_with(R"([{"principal": "p1", "requests_per_s": 10, "burst": 10},
                              {"principal": "p2", "requests_per_s": 10, "burst": 3}])");
  CHECK_EQ(passes(l, same, &n.p1, 1, 500), 0);    // 0.5 tokens
  CHECK_EQ(passes(l, fast, &n.p1, 1, 500), 0);    // still 0.5
  CHECK_EQ(passes(l, fast, &n.p1, 10, 1000), 5);  // 0.5 + 5 tokens
  // A lowered burst takes effect at once: p2's 6.5 tokens became 3.
  CHECK_EQ(passes(l, fast, &n.p2, 10, 1000), 3);
  CHECK_EQ(l.tracked(), 2u);
  // Limits removed: that principal's buckets go, and it is not limited.
  auto only_p2 = policy_with(R"([{"principal": "p2", "requests_per_s": 1, "burst": 1}])");
  CHECK_EQ(passes(l, only_p2, &n.p1, 100, 1000), 100);
  CHECK_EQ(passes(l, only_p2, &n.p2, 5, 1000), 0);  // still empty, now at 1/s
  CHECK_EQ(passes(l, only_p2, &n.p2, 5, 2000), 1);
  // A job limit added later starts full.
  auto jobs = policy_with(R"([{"principal": "p2", "requests_per_s": 1, "burst": 1, "jobs_per_s": 1, "jobs_burst": 50}])");
  CHECK(l.ask(jobs, &n.p2, kind::jobs, 50, 2000, true).allowed);
  // No limits at all: every bucket is dropped.
  auto none = policy_with("");
  CHECK_EQ(passes(l, none, &n.p2, 100, 2000), 100);
  CHECK_EQ(l.tracked(), 0u);
}

TEST_CASE("limiter: refusals are counted per principal and kind") {
  ops::registry m;
  rate_limiter l(m);
  names n;
  l.count(&n.p1, kind::requests);
  l.count(&n.p1, kind::requests);
  l.count(&n.p1, kind::jobs);
  l.count(nullptr, kind::requests);
  l.count(&n.p2, kind::queue_full);
  std::string text = m.render();
  CHECK(text.find("# TYPE relay_rate_limited_total counter") != std::string::npos);
  CHECK(text.find("relay_rate_limited_total{principal=\"p1\",kind=\"requests\"} 2\n") != std::string::npos);
  CHECK(text.find("relay_rate_limited_total{principal=\"p1\",kind=\"jobs\"} 1\n") != std::string::npos);
  CHECK(text.find("relay_rate_limited_total{principal=\"(unmatched)\",kind=\"requests\"} 1\n") != std::string::npos);
  CHECK(text.find("relay_rate_limited_total{principal=\"p2\",kind=\"queue_full\"} 1\n") != std::string::npos);
}
