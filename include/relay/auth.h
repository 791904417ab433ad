// Authorisation: who may do what on which queue. Default deny.
//
// A policy names principals and says how each is recognised on a verified
// client certificate (by its one name: the first URI SAN if it has one, else
// the first DNS SAN, else the subject CN; see tls::identity), then
// grants permissions on queue names or "prefix-*" patterns ("*": all).
// A policy is immutable once loaded; reloading builds a new one and swaps a
// shared_ptr, so requests in flight finish under the policy they started with.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "relay/tls.h"

namespace relay::auth {

enum class permission : uint8_t { submit = 1, read = 2, consume = 4, admin = 8 };
std::string_view to_string(permission p);

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

 private:
  struct grant {
    uint8_t permissions = 0;
    std::vector<std::string> exact;
    std::vector<std::string> prefixes;  // "" for "*"
  };
  std::vector<std::unique_ptr<std::string>> _names;
  std::unordered_map<std::string, const std::string*> _by_uri, _by_dns, _by_cn;
  std::unordered_map<const std::string*, std::vector<grant>> _grants;
};

// Queue names: 1-128 of [A-Za-z0-9._-], not starting with '.'.
bool valid_queue_name(std::string_view name);

}  // namespace relay::auth
