#include "api/rate_limit.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace relay::api {
namespace {

// Refills add fractions of a token; summed over many small steps, doubles
// can land a hair below a whole token that has in fact been earned. This
// much is forgiven, far less than any rate a policy can set (1e9/s at most
// means 1e-9 s per token; a second of that rate is 1e9 tokens).
constexpr double slack = 1e-6;

}  // namespace

void token_bucket::fill(double burst, uint64_t now_ms) {
  _tokens = burst;
  _last_ms = now_ms;
}

void token_bucket::refill(double rate, double burst, uint64_t now_ms) {
  if (now_ms > _last_ms) {
    _tokens += static_cast<double>(now_ms - _last_ms) * rate / 1000.0;
    _last_ms = now_ms;
  }
  _tokens = std::min(_tokens, burst);
}

bool token_bucket::holds(double n) const { return _tokens + slack >= n; }

bool token_bucket::take(double n) {
  if (!holds(n)) return false;
  _tokens = std::max(0.0, _tokens - n);
  return true;
}

uint32_t token_bucket::seconds_until(double n, double rate) const {
  double missing = n - _tokens;
  if (missing <= 0 || rate <= 0) return 1;
  double s = std::ceil(missing / rate);
  if (s >= static_cast<double>(std::numeric_limits<uint32_t>::max())) return std::numeric_limits<uint32_t>::max();
  return std::max<uint32_t>(1, static_cast<uint32_t>(s));
}

std::string_view rate_limiter::to_string(kind k) {
  switch (k) {
    case kind::requests: return "requests";
    case kind::jobs: return "jobs";
    case kind::queue_full: return "queue_full";
  }
  return "?";
}

rate_limiter::rate_limiter(ops::registry& metrics) : _metrics(metrics) {}

bool rate_limiter::rebase(buckets& b, const auth::rate_limits* limits, uint64_t now_ms) {
  // What was earned under the old rates is kept; from here on the new ones
  // apply. A bucket that was not limited before starts full, as a new
  // principal's does.
  const auth::rate_limits* old = b.limits;
  if (old && old->requests_per_s > 0) b.requests.refill(old->requests_per_s, old->burst, now_ms);
  if (old && old->jobs_per_s > 0) b.jobs.refill(old->jobs_per_s, old->jobs_burst, now_ms);
  b.limits = limits;
  if (!limits) return false;
  if (limits->requests_per_s > 0) {
    if (old && old->requests_per_s > 0) b.requests.refill(limits->requests_per_s, limits->burst, now_ms);
    else b.requests.fill(limits->burst, now_ms);
  }
  if (limits->jobs_per_s > 0) {
    if (old && old->jobs_per_s > 0) b.jobs.refill(limits->jobs_per_s, limits->jobs_burst, now_ms);
    else b.jobs.fill(limits->jobs_burst, now_ms);
  }
  return true;
}

void rate_limiter::adopt(const std::shared_ptr<const auth::policy>& policy, uint64_t now_ms) {
  // The buckets' `limits` point into the old policy: it must outlive the
  // rebase.
  std::shared_ptr<const auth::policy> old = std::move(_policy);
  _policy = policy;
  if (!policy->has_rate_limits()) {
    _by_name.clear();
    _unmatched.reset();
    return;
  }
  for (auto it = _by_name.begin(); it != _by_name.end();) {
    if (rebase(it->second, policy->limits_for(it->first), now_ms)) ++it;
    else it = _by_name.erase(it);
  }
  if (_unmatched && !rebase(*_unmatched, policy->limits_for_unmatched(), now_ms)) _unmatched.reset();
}

rate_limiter::verdict rate_limiter::ask_buckets(const std::shared_ptr<const auth::policy>& policy,
                                                const std::string* principal, kind k, double n, uint64_t now_ms,
                                                bool take) {
  if (policy.get() != _policy.get()) adopt(policy, now_ms);
  if (!policy->has_rate_limits()) return {};
  buckets* b;
  if (principal) {
    auto it = _by_name.find(*principal);
    if (it == _by_name.end()) {
      // Unlimited principals get an entry too (with no limits), so that
      // their requests also cost one lookup; entries are bounded by the
      // policy's principals and rebuilt on a reload.
      it = _by_name.emplace(*principal, buckets{}).first;
      rebase(it->second, policy->limits_for(*principal), now_ms);
    }
    b = &it->second;
  } else {
    if (!_unmatched) {
      const auth::rate_limits* l = policy->limits_for_unmatched();
      if (!l) return {};
      _unmatched.emplace();
      rebase(*_unmatched, l, now_ms);
    }
    b = &*_unmatched;
  }
  const auth::rate_limits* l = b->limits;
  if (!l) return {};
  bool jobs = k == kind::jobs;
  double rate = jobs ? l->jobs_per_s : l->requests_per_s;
  double burst = jobs ? l->jobs_burst : l->burst;
  if (rate <= 0) return {};
  token_bucket& t = jobs ? b->jobs : b->requests;
  t.refill(rate, burst, now_ms);
  verdict v;
  v.rate = rate;
  v.burst = burst;
  if (n > burst) {
    v.allowed = false;
    v.never = true;
    return v;
  }
  if (take ? t.take(n) : t.holds(n)) return v;
  v.allowed = false;
  v.retry_after_s = t.seconds_until(n, rate);
  return v;
}

void rate_limiter::count(const std::string* principal, kind k) {
  std::string_view name = principal ? std::string_view(*principal) : unmatched_label;
  auto it = _refusals.find(name);
  if (it == _refusals.end()) it = _refusals.emplace(std::string(name), std::array<ops::counter*, kind_count>{}).first;
  ops::counter*& c = it->second[static_cast<size_t>(k)];
  if (!c) {
    std::string labels =
        "principal=\"" + ops::registry::label_value(name) + "\",kind=\"" + std::string(to_string(k)) + "\"";
    c = &_metrics.get_counter("relay_rate_limited_total",
                              "Requests refused for a principal's rate limits (policy \"limits\": kind requests "
                              "or jobs) or a queue's depth cap (kind queue_full), by principal.",
                              labels);
  }
  c->inc();
}

}  // namespace relay::api
