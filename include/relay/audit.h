// The audit stream: what a security team ships to its SIEM.
//
// One JSON object per line, separate from the operational log. Every line
// carries "audit":true and starts with its "event"; it is written to the
// file audit.path names (appended, created 0600), or, when none is set, to
// stderr among the operational lines (where the marker tells them apart).
// A file is reopened when relay gets SIGHUP or when its path stops naming
// the open file (moved or deleted by logrotate), checked every second by the
// writer thread, so rotation needs no copytruncate.
//
// Writing never blocks the caller: lines go through the same bounded buffer
// and writer thread as the operational log (relay/log.h), repeats from one
// source with one reason collapse into a "repeated" count each second, and
// lines that find the buffer full are dropped and counted
// (relay_audit_lines_dropped_total). Lines are never filtered by log level.
// Never put job payloads, results, lease tokens or key material in a line.
//
// The events relay writes (fields beyond "event", "audit", "level",
// "ts_ms" and "source"):
//   started              pid, tls_library, auth_mode, listen, cert_sha256,
//                        client_ca_sha256, crl_sha256, policy_sha256,
//                        policy_principals
//   stopped              pid, connections_cut
//   tls_handshake_failed listener, remote, reason; subject, sha256 and
//                        serial when the peer presented a certificate
//                        (also a verified one whose names are refused)
//   authz_denied         principal, policy_principal, permission, queue,
//                        route, reason, remote (per item in POST /v1/results)
//   admin_action         principal, policy_principal, action (requeue_dead,
//                        cancel), queue, route, remote, job or count; never
//                        collapsed
//   reloaded             cert_sha256, client_ca_sha256, crl_sha256,
//                        policy_sha256, each with *_changed, and
//                        policy_principals; the API keys file has lines of
//                        its own, written only when its content changed:
//                        what ("api_keys"), api_keys_sha256,
//                        previous_sha256, api_keys (count), api_keys_expired
//   reload_failed        reason, kept (what "api_keys" for the keys file,
//                        with api_keys: the count still in force)
//   api_key_refused      remote, reason (missing, malformed, unknown,
//                        expired, principal mismatch), route, auth_mode;
//                        key_id and key_principal for a known key,
//                        key_sha256_prefix (8 hex) for an unknown one;
//                        principal and policy_principal of the certificate
//                        in mtls+api_key
//   api_key_rate_limited remote, reason, route, retry_after_s: a source
//                        past auth.max_failures, answered 429 unchecked
//   connection_revoked   remote, principal, reason (a reload's re-check)
#pragma once

#include <chrono>
#include <string>
#include <string_view>

#include "relay/log.h"

namespace relay::audit {

// Sends the audit stream to `path` from now on. Call once, at start-up; on
// failure `error` names the path and why.
inline bool open(const std::string& path, std::string& error) { return log::open_audit_file(path, error); }
// SIGHUP: reopen the file (on the writer thread, before its next write).
inline void reopen() { log::reopen_audit_file(); }
// An audit line, built like a log line:
//   audit::event("authz_denied").str("principal", p).str("remote", addr);
inline log::line event(std::string_view name, log::level l = log::level::warn) {
  return log::line(l, name, log::channel::audit);
}
inline uint64_t dropped_lines() { return log::audit_dropped_lines(); }
inline uint64_t reopens() { return log::audit_reopens(); }
// Waits until every audit line so far is written (tests, shutdown).
inline bool flush(std::chrono::milliseconds timeout = std::chrono::milliseconds(2000)) {
  return log::flush_audit(timeout);
}

}  // namespace relay::audit
