// relay::auth::api_keys::parse, the keys file relay loads and reloads, then
// the checks the parsed keys make on an Authorization value.
//
// Input: [keys JSON] NUL [Authorization value]. Without a NUL the whole
// input is the file and the value is a fixed one.
//
// Invariants: a refused file comes with an error naming its origin; an
// accepted one holds at most max_keys keys with distinct digests and ids,
// each owned as "apikey:<principal>"; any value is answered without
// crashing; a key is found exactly when the value's token hashes to one of
// the digests, and a found key is one of the file's own.
#include <set>
#include <string>

#include "fuzz_input.h"
#include "relay/api_keys.h"
#include "relay/tls.h"

using namespace relay;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view all(reinterpret_cast<const char*>(data), size);
  auto nul = all.find('\0');
  std::string_view json = all.substr(0, nul);
  std::string_view value = nul == std::string_view::npos ? std::string_view("Bearer k3y") : all.substr(nul + 1);

  std::string error;
  auto keys = auth::api_keys::parse(json, "keys.json", error);
  if (!keys) {
    FUZZ_CHECK(error.rfind("keys.json: ", 0) == 0);
    return 0;
  }
  FUZZ_CHECK(keys->keys().size() <= auth::api_keys::max_keys);
  FUZZ_CHECK(keys->file_sha256().size() == 64);
  std::set<std::string> digests, ids;
  for (const auth::api_key& k : keys->keys()) {
    FUZZ_CHECK(!k.principal.empty());
    FUZZ_CHECK(k.owner == std::string(auth::key_owner_prefix) + k.principal);
    FUZZ_CHECK(digests.insert(tls::to_hex(k.sha256.data(), k.sha256.size())).second);
    FUZZ_CHECK(!k.id.empty() && ids.insert(k.id).second);
  }
  for (int64_t now : {int64_t{0}, int64_t{1796558400000}, INT64_MAX}) {
    auth::key_check c = keys->check(value, now);
    std::string_view token;
    bool well_formed = auth::bearer_token(value, token);
    if (value.empty()) FUZZ_CHECK(c.failure == auth::key_failure::missing);
    else if (!well_formed) FUZZ_CHECK(c.failure == auth::key_failure::malformed);
    if (!well_formed) {
      FUZZ_CHECK(c.key == nullptr);
      continue;
    }
    uint8_t d[32];
    tls::sha256(token, d);
    bool stored = digests.count(tls::to_hex(d, sizeof d)) > 0;
    FUZZ_CHECK(stored == (c.key != nullptr));
    FUZZ_CHECK(stored || c.failure == auth::key_failure::unknown);
    if (c.key) {
      FUZZ_CHECK(c.key >= keys->keys().data() && c.key < keys->keys().data() + keys->keys().size());
      bool expired = c.key->not_after_ms && now > *c.key->not_after_ms;
      FUZZ_CHECK(c.failure == (expired ? auth::key_failure::expired : auth::key_failure::none));
    }
  }
  return 0;
}
