// Rate limits per policy principal: a token bucket for requests and one for
// submitted jobs, with the rates the policy's "limits" give (see
// relay/auth.h for the format).
//
// The buckets belong to the API service, not to the policy: a reload swaps
// the immutable policy, and the buckets, kept by principal name, carry
// their tokens over and go on at the new rates (a lowered burst takes
// effect at once). A principal whose limits are gone loses its buckets.
//
// Time is passed in (milliseconds of a monotonic clock: the loop's
// uv_now()), so the arithmetic is tested without a loop or sleeps.
// Single-threaded, like the rest of the API.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>

#include "relay/auth.h"
#include "relay/metrics.h"

namespace relay::api {

// The arithmetic of one token bucket.
class token_bucket {
 public:
  // Full: `burst` tokens, as of `now_ms`.
  void fill(double burst, uint64_t now_ms);
  // Adds what `rate` tokens a second earned since the last refill, up to
  // `burst` (and cuts what is above a burst that was lowered). A clock
  // that steps back earns nothing.
  void refill(double rate, double burst, uint64_t now_ms);
  double tokens() const { return _tokens; }
  // Whether `n` tokens are there (after a refill).
  bool holds(double n) const;
  // Takes `n` tokens if they are there, else none.
  bool take(double n);
  // Whole seconds until the bucket holds `n` tokens at `rate`, at least 1:
  // the Retry-After of a refusal. `n` must not exceed the burst.
  uint32_t seconds_until(double n, double rate) const;

 private:
  double _tokens = 0;
  uint64_t _last_ms = 0;
};

class rate_limiter {
 public:
  // What a refusal is counted as in relay_rate_limited_total{kind}.
  enum class kind : uint8_t { requests, jobs, queue_full };
  static constexpr size_t kind_count = 3;
  static std::string_view to_string(kind k);

  struct verdict {
    bool allowed = true;
    // Refused: `n` exceeds the burst, so no wait would let it through (a
    // batch larger than jobs_burst).
    bool never = false;
    uint32_t retry_after_s = 0;  // refused, not never: seconds until it could pass (>= 1)
    double rate = 0, burst = 0;  // the limit applied (0: none)
  };

  explicit rate_limiter(ops::registry& metrics);
  rate_limiter(const rate_limiter&) = delete;
  rate_limiter& operator=(const rate_limiter&) = delete;

  // Asks for `n` tokens of `k` (requests or jobs) for `principal`, the
  // policy's name for the peer (null: a peer the policy does not name),
  // under `policy` (not null); takes them when `take` and they are all there. A
  // refusal is not counted here (see count()): a caller may ask before it
  // knows whether it will refuse for this reason.
  //
  // Costs nothing beyond a pointer comparison when the policy limits
  // nobody, and one hash lookup by name when it limits someone.
  verdict ask(const std::shared_ptr<const auth::policy>& policy, const std::string* principal, kind k, double n,
              uint64_t now_ms, bool take) {
    // Inline, for the common case: a policy that limits nobody.
    if (policy.get() == _policy.get() && !policy->has_rate_limits()) return {};
    return ask_buckets(policy, principal, k, n, now_ms, take);
  }

  // Counts one refusal of `principal`'s request in
  // relay_rate_limited_total{principal,kind}.
  void count(const std::string* principal, kind k);

  // Entries held: principals seen under the current policy (limited or
  // known not to be) and the shared bucket of peers it does not name.
  size_t tracked() const { return _by_name.size() + (_unmatched ? 1 : 0); }

  // The label peers the policy does not name are counted under.
  static constexpr std::string_view unmatched_label = "(unmatched)";

 private:
  struct buckets {
    // A constructor rather than a member initializer: clang cannot use
    // those of a nested class for std::optional inside the enclosing one.
    buckets() : limits(nullptr) {}
    const auth::rate_limits* limits;  // under _policy
    token_bucket requests, jobs;
  };
  struct string_hash {
    using is_transparent = void;
    size_t operator()(std::string_view s) const noexcept { return std::hash<std::string_view>{}(s); }
  };

  verdict ask_buckets(const std::shared_ptr<const auth::policy>& policy, const std::string* principal, kind k,
                      double n, uint64_t now_ms, bool take);
  // Moves every bucket to `policy`'s rates (refilled at the old rates up to
  // `now_ms` first), and drops those of principals it no longer limits.
  void adopt(const std::shared_ptr<const auth::policy>& policy, uint64_t now_ms);
  // Brings `b` from the limits it had to `limits`; false when it has none.
  static bool rebase(buckets& b, const auth::rate_limits* limits, uint64_t now_ms);

  ops::registry& _metrics;
  std::shared_ptr<const auth::policy> _policy;  // keeps the buckets' `limits` alive
  std::unordered_map<std::string, buckets, string_hash, std::equal_to<>> _by_name;
  std::optional<buckets> _unmatched;  // every peer the policy does not name, together
  // Looked up once per principal and kind, on its first refusal; kept across
  // reloads (series are never removed from a registry).
  std::unordered_map<std::string, std::array<ops::counter*, kind_count>, string_hash, std::equal_to<>> _refusals;
};

}  // namespace relay::api
