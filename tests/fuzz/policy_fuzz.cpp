// relay::auth::policy::parse, the policy file relay loads and reloads, then
// the decisions the parsed policy makes.
//
// Input: [policy JSON] NUL [uri SAN] LF [DNS SAN] LF [CN] LF [queue]. Without
// a NUL the whole input is the policy and the names are fixed ones.
//
// Invariants: a refused policy comes with an error naming its origin; an
// accepted one answers for any identity and queue without crashing, a
// principal it matches is one of its own, nothing is allowed to no
// principal, and allowing on a queue implies allowing somewhere. Its rate
// limits ("limits") are within the documented bounds, with a burst of at
// least one token for every rate set, and none at all when it says it has
// none; a limiter under it lets exactly the burst through at one instant.
// A queue's depth cap ("queue_limits") is 0 or within its bounds.
#include <string>
#include <utility>
#include <vector>

#include "api/rate_limit.h"
#include "fuzz_input.h"
#include "relay/auth.h"

using namespace relay;

namespace {

std::vector<std::string_view> lines(std::string_view s) {
  std::vector<std::string_view> out;
  while (true) {
    auto nl = s.find('\n');
    out.push_back(s.substr(0, nl));
    if (nl == std::string_view::npos) break;
    s.remove_prefix(nl + 1);
  }
  return out;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view all(reinterpret_cast<const char*>(data), size);
  auto nul = all.find('\0');
  std::string_view json = all.substr(0, nul);
  std::vector<std::string_view> names = nul == std::string_view::npos
                                            ? std::vector<std::string_view>{"spiffe://azure.example/ns/jobs/sa/bunny",
                                                                            "producer.aws.internal", "ops-admin", "render"}
                                            : lines(all.substr(nul + 1));
  names.resize(4);

  std::string error;
  auto p = auth::policy::parse(json, "policy.json", error);
  if (!p) {
    FUZZ_CHECK(error.rfind("policy.json: ", 0) == 0);
    return 0;
  }
  tls::identity id;
  id.uri_san = names[0];
  id.dns_san = names[1];
  id.cn = names[2];
  std::string_view queue = names[3];
  // Each kind of name alone, then all together (the URI SAN decides).
  std::vector<tls::identity> ids(4);
  ids[0].uri_san = id.uri_san;
  ids[1].dns_san = id.dns_san;
  ids[2].cn = id.cn;
  ids[3] = id;
  for (const auto& who : ids) {
    const std::string* principal = p->match(who);
    // A name the policy file gave (so no longer than it).
    if (principal) FUZZ_CHECK(principal->size() <= json.size());
    for (auto perm : {auth::permission::submit, auth::permission::read, auth::permission::consume,
                      auth::permission::admin}) {
      FUZZ_CHECK(!p->allows(nullptr, perm, queue));
      bool here = p->allows(principal, perm, queue);
      if (here) FUZZ_CHECK(p->allows_somewhere(principal, perm));
    }
  }
  FUZZ_CHECK(p->principal_count() > 0 || p->match(id) == nullptr);
  // Exactly one name decides: the identity with every name matches as its
  // first non-empty name alone would.
  const std::string* by_all = p->match(id);
  if (!id.uri_san.empty()) FUZZ_CHECK(by_all == p->match(ids[0]));
  else if (!id.dns_san.empty()) FUZZ_CHECK(by_all == p->match(ids[1]));
  else FUZZ_CHECK(by_all == p->match(ids[2]));
  (void)auth::valid_queue_name(queue);

  // Rate limits and depth caps.
  auto check_limits = [&](const auth::rate_limits* l) {
    if (!l) return;
    FUZZ_CHECK(p->has_rate_limits());
    FUZZ_CHECK(l->requests_per_s > 0 || l->jobs_per_s > 0);
    for (auto [rate, burst] : {std::pair{l->requests_per_s, l->burst}, std::pair{l->jobs_per_s, l->jobs_burst}}) {
      FUZZ_CHECK(rate >= 0 && rate <= 1e9);
      if (rate > 0) FUZZ_CHECK(burst >= 1 && burst <= 1e9 && burst == static_cast<double>(static_cast<uint64_t>(burst)));
      else FUZZ_CHECK(burst == 0);
    }
  };
  const auth::rate_limits* unmatched = p->limits_for_unmatched();
  check_limits(unmatched);
  if (!p->has_rate_limits()) FUZZ_CHECK(unmatched == nullptr);
  std::string by_name(names[0]);
  check_limits(p->limits_for(by_name));
  ops::registry metrics;
  for (const auto& who : ids) {
    // A limiter of its own: two identities may share a principal's buckets.
    api::rate_limiter limiter(metrics);
    const std::string* principal = p->match(who);
    const auth::rate_limits* l = principal ? p->limits_for(*principal) : unmatched;
    check_limits(l);
    if (!p->has_rate_limits()) FUZZ_CHECK(l == nullptr);
    // At one instant, exactly the burst passes (bounded, to keep runs short).
    if (l && l->requests_per_s > 0 && l->burst <= 64) {
      size_t passed = 0;
      for (int i = 0; i < 70; ++i)
        passed += limiter.ask(p, principal, api::rate_limiter::kind::requests, 1, 1000, true).allowed ? 1 : 0;
      FUZZ_CHECK(passed == static_cast<size_t>(l->burst));
      auto v = limiter.ask(p, principal, api::rate_limiter::kind::requests, 1, 1000, true);
      FUZZ_CHECK(!v.allowed && v.retry_after_s >= 1);
    }
    if (l && l->jobs_per_s > 0) {
      auto v = limiter.ask(p, principal, api::rate_limiter::kind::jobs, l->jobs_burst + 1, 1000, false);
      FUZZ_CHECK(!v.allowed && v.never);
    }
    if (!l) FUZZ_CHECK(limiter.ask(p, principal, api::rate_limiter::kind::requests, 1, 1000, true).allowed);
  }
  uint64_t depth = p->max_depth(queue);
  FUZZ_CHECK(depth <= 1'000'000'000'000);
  return 0;
}
