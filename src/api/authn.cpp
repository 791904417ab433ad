// API-key authentication for the v1 API (auth.mode "api_key" and
// "mtls+api_key"). It runs from admit(), so at headers-complete for a
// request with a body: a peer without a valid key never makes relay hold a
// body byte.
#include "api/service.h"
#include "relay/audit.h"
#include "relay/log.h"

namespace relay::api {
namespace {

// RFC 6750 3.1: no error code when no credentials were sent, invalid_token
// for every refused key (missing vs. refused is no secret to the client who
// sent it; why a key was refused is one, and goes only to the audit line).
constexpr std::string_view challenge_missing = "WWW-Authenticate: Bearer realm=\"relay\"\r\n";
constexpr std::string_view challenge_invalid = "WWW-Authenticate: Bearer realm=\"relay\", error=\"invalid_token\"\r\n";

}  // namespace

bool service::authenticate(context& c) {
  using mode = authn_options::auth_mode;
  if (_authn.mode == mode::mtls) return true;
  const std::string& remote = c.conn.remote_address();
  std::string source = net::source_key(log::host_of(remote));
  uint64_t mono = uv_now(_loop);

  std::shared_ptr<const auth::api_keys> keys = _authn.keys ? _authn.keys() : nullptr;
  if (!keys) {
    // start() refuses to run without keys; this is an invariant kept safe.
    respond_error(c, api_error::internal, "no API keys loaded");
    return false;
  }
  auth::key_check k = keys->check(c.req.authorization, now());
  std::string_view reason;
  const std::string* key_principal = nullptr;
  const std::string* cert_principal = nullptr;
  if (k.failure != auth::key_failure::none) {
    reason = auth::to_string(k.failure);
  } else {
    key_principal = c.policy ? c.policy->principal_named(k.key->principal) : nullptr;
    if (_authn.mode == mode::mtls_and_api_key) {
      // Two proofs of one identity, or none: a stolen key does not work
      // with another client's certificate, nor a certificate with another
      // principal's key.
      cert_principal = c.policy ? c.policy->match(c.conn.peer()) : nullptr;
      if (!key_principal || key_principal != cert_principal) reason = "principal mismatch";
    }
  }
  if (!reason.empty()) {
    if (uint64_t wait = _auth_failures.blocked_for(source, mono)) {
      // A source over its failure budget learns nothing more from its bad
      // keys until the window ends. A good key from the same address still
      // passes: others behind one NAT or load balancer must not be locked
      // out by a guesser (or a stale client) beside them.
      _auth_limited.inc();
      uint64_t seconds = (wait + 999) / 1000;
      audit::event("api_key_rate_limited")
          .str("remote", remote)
          .str("reason", "too many failures")
          .str("route", route_name(c.match.which))
          .num("retry_after_s", static_cast<int64_t>(seconds));
      respond(c, describe(api_error::too_many_auth_failures).status, api_error_body(api_error::too_many_auth_failures),
              "Retry-After: " + std::to_string(seconds) + "\r\n");
      return false;
    }
    _auth_failures.failed(source, mono);
    _metrics
        .get_counter("relay_api_key_failures_total", "Requests refused 401 in an API-key mode, by reason.",
                     "reason=\"" + std::string(reason) + "\"")
        .inc();
    // The key's id (or a short prefix of an unknown key's digest), never
    // the key.
    auto line = audit::event("api_key_refused");
    line.str("remote", remote)
        .str("reason", reason)
        .str("route", route_name(c.match.which))
        .str("auth_mode", _authn.mode == mode::api_key ? "api_key" : "mtls+api_key");
    if (k.key) line.str("key_id", k.key->id).str("key_principal", k.key->principal);
    if (!k.digest_prefix.empty()) line.str("key_sha256_prefix", k.digest_prefix);
    if (_authn.mode == mode::mtls_and_api_key)
      line.str("principal", c.conn.peer().principal()).str("policy_principal", cert_principal ? *cert_principal : "");
    bool missing = k.failure == auth::key_failure::missing;
    respond(c, describe(api_error::unauthenticated).status,
            api_error_body(api_error::unauthenticated,
                           missing ? "an API key is required: Authorization: Bearer <key>" : "the API key is not valid"),
            missing ? challenge_missing : challenge_invalid);
    return false;
  }
  c.policy_principal = key_principal;
  c.key = k.key;
  // Leases are bound to the key's principal, whichever of its keys is used
  // (a worker that rotates its key keeps its leases); with mtls+api_key the
  // certificate's name stays the owner, as in mtls mode.
  if (_authn.mode == mode::api_key) c.conn.principal = _broker.intern(k.key->owner);
  return true;
}

}  // namespace relay::api
