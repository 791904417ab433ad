// API keys: the second way, beside a client certificate, for a client to say
// who it is (auth.mode "api_key", or "mtls+api_key" where both must agree).
//
// The keys file (auth.api_keys) holds only SHA-256 digests of the keys:
//   {"keys": [{"principal": "bunny-azure",
//              "sha256": "<64 hex digits: SHA-256 of the key as sent>",
//              "id": "bunny-2026-11",                 (optional)
//              "not_after": "2027-01-31T00:00:00Z"}]} (optional)
// - principal (required): a principal name of the policy ("principals" key).
//   A key grants exactly what the policy grants that principal.
// - sha256 (required): lower- or upper-case hex. Two entries with the same
//   digest are refused: one key cannot name two principals or expiries.
// - id (optional, 1-64 of A-Z a-z 0-9 . _ : @ -, unique in the file): the
//   name audit lines give the key; without it, "sha256:" and the first 12
//   hex digits of its digest.
// - not_after (optional): RFC 3339 in UTC ("Z"), fractions of a second
//   allowed; the key is refused after that instant. Without it the key does
//   not expire (rotate it by removing its entry).
// Any other field, or a malformed one, refuses the whole file with an error
// naming the file and the key's index. Several keys may name one principal,
// which is how keys are rotated: add the new key, move clients over, remove
// the old one; the file is reloaded when it changes and on SIGHUP.
//
// A client sends "Authorization: Bearer <key>". The key is hashed; the stored
// digests that share the first 8 bytes of its digest (in practice one or
// none) are found in a hash index and compared over all 32 bytes in constant
// time (CRYPTO_memcmp). Whatever the lookup's timing could reveal concerns
// digests, never keys: from a SHA-256 digest to a key of 256 random bits is
// a preimage attack. A check costs one SHA-256 whatever the number of keys
// (a scan of every digest cost 40 us per request at 1000 keys).
// Key material is never logged; audit lines carry the key's id, or for an
// unknown key the first 8 hex digits of the presented key's digest.
#pragma once

#include <array>
#include <cstdint>
#include <list>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace relay::auth {

// The principal name that leases and other ownership are bound to for a
// request authenticated by an API key: this prefix and the key's policy
// principal. Every key of one principal yields the same name, so a worker
// that rotates its key mid-lease still owns its leases. A certificate-derived
// name that starts with the prefix would be indistinguishable from it, so
// relay never takes such a certificate name as an owner (see api::service).
inline constexpr std::string_view key_owner_prefix = "apikey:";

struct api_key {
  std::array<uint8_t, 32> sha256{};
  std::string principal;  // the policy principal it authenticates as
  std::string owner;      // key_owner_prefix + principal
  std::string id;         // as in the file, or "sha256:" + 12 hex digits
  std::optional<int64_t> not_after_ms;  // ms since the epoch; none: no expiry
};

// Why a request's key was not accepted.
enum class key_failure : uint8_t {
  none,
  missing,    // no Authorization header
  malformed,  // not "Bearer <token>" with a token of RFC 6750 characters
  unknown,    // no stored digest matches
  expired,    // matches a key whose not_after has passed
};
std::string_view to_string(key_failure f);

struct key_check {
  key_failure failure = key_failure::none;
  const api_key* key = nullptr;  // the matching entry (when none or expired)
  // For an unknown key, the first 8 hex digits of its SHA-256: lets an
  // audit reader tell one guessed key from many without revealing the key.
  std::string digest_prefix;
};

class api_keys {
 public:
  // Limits that keep a check cheap and a file's mistakes visible.
  static constexpr size_t max_keys = 10000;
  static constexpr size_t max_token_bytes = 512;

  // On failure returns null and `error` names the file and the key's index.
  static std::shared_ptr<const api_keys> load(const std::string& path, std::string& error);
  static std::shared_ptr<const api_keys> parse(std::string_view json, const std::string& origin, std::string& error);

  // Checks the raw value of a request's Authorization header ("" when the
  // request had none) at `now_ms` (ms since the epoch).
  key_check check(std::string_view authorization, int64_t now_ms) const;

  // The key with this digest, or null (compared in constant time, as check()).
  const api_key* find(const std::array<uint8_t, 32>& digest) const;

  const std::vector<api_key>& keys() const { return _keys; }
  // Hex SHA-256 of the file as loaded: what a reload audit line reports.
  const std::string& file_sha256() const { return _file_sha256; }
  // Keys whose not_after is at or before `now_ms`.
  size_t expired_at(int64_t now_ms) const;

 private:
  std::vector<api_key> _keys;
  // First 8 digest bytes → index in _keys.
  std::unordered_multimap<uint64_t, uint32_t> _index;
  std::string _file_sha256;
};

// The token of an Authorization value "Bearer <token>" (scheme in any case,
// one or more spaces); false when the value is not of that form or the token
// holds anything but RFC 6750 b64token characters or is too long.
bool bearer_token(std::string_view authorization, std::string_view& token);

// "2027-01-31T00:00:00Z" or "2027-01-31T00:00:00.250Z" (RFC 3339, UTC
// only) → ms since the epoch. False for anything else, or an impossible date.
bool parse_utc_timestamp(std::string_view text, int64_t& ms);


// Counts failed authentications per source (net::source_key of the peer's
// address) so that a source that keeps presenting bad keys is answered 429
// without its keys being checked. A source is blocked once it has
// `max_failures` failures inside one window of `window_ms` (the window
// starts at its first failure), until that window ends. At most
// `max_sources` sources are tracked; past that the one that failed least
// recently is forgotten, so memory is bounded whatever the number of
// attacking addresses (forgetting only ever lets a source try again sooner).
class failure_limiter {
 public:
  failure_limiter(uint32_t max_failures, uint64_t window_ms, size_t max_sources);

  // Milliseconds until `source` may be checked again; 0 when it may now.
  uint64_t blocked_for(const std::string& source, uint64_t now_ms);
  // Records a failure of `source`.
  void failed(const std::string& source, uint64_t now_ms);
  size_t tracked() const { return _by_source.size(); }

 private:
  struct entry {
    uint64_t window_start = 0;
    uint32_t failures = 0;
    std::list<std::string>::iterator order;
  };
  uint32_t _max_failures;
  uint64_t _window_ms;
  size_t _max_sources;
  std::unordered_map<std::string, entry> _by_source;
  std::list<std::string> _order;  // least recently failed first
};

}  // namespace relay::auth
