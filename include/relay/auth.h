// Authorisation: who may do what on which queue. Default deny.
//
// A policy names principals and says how each is recognised on a verified
// client certificate (by its one name: the first URI SAN if it has one, else
// the first DNS SAN, else the subject CN; see tls::identity), then
// grants permissions on queue names or "prefix-*" patterns ("*": all).
// A policy is immutable once loaded; reloading builds a new one and swaps a
// shared_ptr, so requests in flight finish under the policy they started with.
//
// Beside the grants, a policy may set rate limits per principal and depth
// caps per queue:
//
//   "limits": [
//     {"principal": "producer", "requests_per_s": 200, "burst": 400,
//      "jobs_per_s": 5000, "jobs_burst": 10000},
//     {"principal": "*", "requests_per_s": 50}
//   ],
//   "queue_limits": [
//     {"queues": ["render", "encode-*"], "max_depth": 100000}
//   ]
//
// "limits" (optional): one entry per principal. "principal" names one of
// "principals", or is "*": the limits of every principal without an entry
// of its own (each still has buckets of its own), and of every peer the
// policy does not name, which share one set of buckets between them (they
// are denied every request anyway; the bucket bounds how fast they make
// relay write denials). An entry sets requests_per_s, jobs_per_s or both:
// rates are numbers above 0 (fractions allowed: 0.5 is one every two
// seconds) up to 1e9. "burst" and "jobs_burst" are whole numbers from 1 to
// 1e9, each allowed only with its rate, defaulting to the rate rounded up.
// Every request costs one request token; a submit costs one job token per
// job (a batch of 64 costs 64). A principal with no entry and no "*" entry
// is not limited.
//
// "queue_limits" (optional): "queues" lists names or "prefix-*" patterns as
// in grants, "max_depth" (1 to 1e12) caps the jobs a queue holds that are
// not finished (queued, delayed, leased, failed). A queue takes the cap of
// its exact name, else of its longest matching pattern; a name or pattern
// may appear once. Queues with no cap here take limits.max_queue_depth from
// relay's configuration (0: none).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "relay/tls.h"

namespace relay::auth {

enum class permission : uint8_t { submit = 1, read = 2, consume = 4, admin = 8 };
std::string_view to_string(permission p);

// One principal's rate limits: token buckets that start full and refill at
// `*_per_s` up to their burst. A rate of 0 leaves that bucket unlimited.
struct rate_limits {
  double requests_per_s = 0;
  double burst = 0;
  double jobs_per_s = 0;
  double jobs_burst = 0;
};

class policy {
 public:
  // On failure returns null; `error` names the file and the offending key.
  static std::shared_ptr<const policy> load(const std::string& path, std::string& error);
  static std::shared_ptr<const policy> parse(std::string_view json, const std::string& origin, std::string& error);

  // The name of the policy principal that `id` matches, or null. Only the
  // identity's one name is looked up, among the matchers of its own kind
  // (see tls::identity); a refused identity matches nothing.
  const std::string* match(const tls::identity& id) const;
  bool allows(const std::string* principal, permission p, std::string_view queue) const;
  // Whether `principal` holds `p` on at least one queue pattern.
  bool allows_somewhere(const std::string* principal, permission p) const;
  // The policy's principal called `name` (the "principals" key), or null:
  // how an API key's principal (relay/api_keys.h) is resolved.
  const std::string* principal_named(std::string_view name) const;
  size_t principal_count() const { return _names.size(); }

  // Whether "limits" limits anyone: when it does not, nothing needs to be
  // looked up per request.
  bool has_rate_limits() const { return !_limits.empty() || _default_limits; }
  // The limits of the policy principal named `name`: its own entry, else
  // the "*" entry; null when it is not limited. Buckets outlive a reload, so
  // they are kept by name, not by this policy's pointers.
  const rate_limits* limits_for(const std::string& name) const;
  // The limits shared by every peer the policy does not name (the "*"
  // entry), or null.
  const rate_limits* limits_for_unmatched() const { return _default_limits ? &*_default_limits : nullptr; }
  // The "queue_limits" cap of `queue` (exact name first, else the longest
  // matching pattern), or 0 when none applies.
  uint64_t max_depth(std::string_view queue) const;

 private:
  struct string_hash {
    using is_transparent = void;
    size_t operator()(std::string_view s) const noexcept { return std::hash<std::string_view>{}(s); }
  };
  struct grant {
    uint8_t permissions = 0;
    std::vector<std::string> exact;
    std::vector<std::string> prefixes;  // "" for "*"
  };
  std::vector<std::unique_ptr<std::string>> _names;
  std::unordered_map<std::string, const std::string*> _by_uri, _by_dns, _by_cn;
  std::unordered_map<const std::string*, std::vector<grant>> _grants;
  std::unordered_map<std::string, rate_limits, string_hash, std::equal_to<>> _limits;
  std::optional<rate_limits> _default_limits;
  std::unordered_map<std::string, uint64_t, string_hash, std::equal_to<>> _depth_exact;
  std::vector<std::pair<std::string, uint64_t>> _depth_prefixes;  // longest first; "" for "*"
};

// Queue names: 1-128 of [A-Za-z0-9._-], not starting with '.'.
bool valid_queue_name(std::string_view name);

}  // namespace relay::auth
