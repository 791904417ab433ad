// relay's configuration: one JSON file (--config FILE) plus flag overrides.
//
// One schema table drives everything: reading the file, --set overrides,
// rejecting unknown keys by name, and printing the effective configuration
// (--check-config). Relative paths in the file are taken relative to the
// file's directory, so a config and its certificates can move together.
// Secrets are never configuration values: keys and API keys are read from
// the files the configuration names.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace relay::config {

struct relay_config {
  std::string listen = "0.0.0.0:8443";
  std::string ops_listen = "127.0.0.1:9090";
  struct {
    std::string cert = "tls.crt";
    std::string key = "tls.key";
    std::string client_ca = "ca.crt";
    std::optional<std::string> crl;
    std::string min_version = "1.3";
    // How often the TLS files and the policy are checked for changes, which
    // reload them as SIGHUP does (a Kubernetes Secret or ConfigMap update,
    // a renewed certificate). 0: only SIGHUP reloads.
    uint64_t reload_check_ms = 2000;
    // How long a TLS session may be resumed (without a certificate
    // exchange) after the full handshake that made it; the session ticket
    // keys are replaced this often too. 0: no resumption.
    uint64_t session_lifetime_ms = 300000;
  } tls;
  struct {
    // "mtls": the client certificate names the principal. "api_key": an
    // "Authorization: Bearer" key does (TLS still runs; a client certificate
    // is optional and, if presented, verified). "mtls+api_key": both, and
    // they must name the same policy principal.
    std::string mode = "mtls";
    std::optional<std::string> api_keys;  // the keys file (relay/api_keys.h); required by the key modes
    // Failed key checks from one source address (IPv4, or IPv6 /64) within
    // one window past which it is answered 429 without its keys being
    // checked, until the window ends. 0: no limit.
    uint64_t max_failures = 10;
    uint64_t failure_window_ms = 60000;
  } auth;
  std::string policy = "policy.json";
  struct {
    // The audit stream's file (see relay/audit.h); null: stderr, among the
    // operational lines, each marked "audit":true.
    std::optional<std::string> path;
  } audit;
  struct {
    // "file": segment files in dir. "postgres": a PostgreSQL database shared
    // by an active/standby pair of relays (relay/journal_postgres.h).
    std::string backend = "file";
    std::string dir = "/var/lib/relay";
    std::string fsync = "always";
    uint64_t batch_interval_ms = 100;        // fsync period in "batch" mode (the window a crash may lose)
    uint64_t segment_bytes = 64ull << 20;    // roll to a new segment past this size
    uint64_t compact_min_bytes = 64ull << 20;  // compact once the journal exceeds this and twice the live data
    struct {
      std::optional<std::string> dsn_file;  // a secret: the libpq connection string, read from this file
      std::string shard = "main";           // relays that name the same shard form one active/standby group
      uint64_t lease_ms = 5000;             // leadership lease: a standby takes over this long after the leader stops renewing
      uint64_t renew_ms = 1000;             // renewal period; at most lease_ms / 3
      uint64_t max_batch_records = 4096;    // records per commit transaction at most
    } postgres;
  } journal;
  struct {
    uint64_t max_body_bytes = 1048576;  // up to 256 MiB (64 MiB with journal.backend postgres)
    // A body above this is not held in RAM: its payload/result values of at
    // least this size go to files in <journal.dir>/blobs as they arrive. 0:
    // never; forced to 0 with journal.backend postgres.
    uint64_t spill_threshold_bytes = 65536;
    uint64_t max_connections = 10000;
    uint64_t header_timeout_ms = 10000;
    uint64_t idle_timeout_ms = 120000;
    uint64_t max_header_bytes = 16384;
    uint64_t max_uri_bytes = 8192;
    uint64_t max_jobs = 2000000;
    uint64_t max_held_bytes = 1073741824;
    uint64_t max_queues = 10000;
    // Unfinished jobs (queued, delayed, leased, failed) one queue may hold
    // before submits to it get 429 queue_full; 0: no cap. A policy's
    // "queue_limits" sets caps per queue that take precedence.
    uint64_t max_queue_depth = 0;
    uint64_t result_ttl_ms = 86400000;
    uint64_t drain_timeout_ms = 30000;
    // Hostile-peer bounds (see server.h conn_options for what each counts).
    uint64_t max_connections_per_ip = 256;       // open connections from one source address
    uint64_t handshake_timeout_ms = 3000;        // TCP accept to TLS handshake done
    uint64_t max_pending_output_bytes = 1048576;  // per connection: unsent responses before it stops taking requests
    uint64_t max_pending_body_bytes = 268435456;  // all connections: bytes held in partly received bodies
    uint64_t min_body_rate_bytes_per_s = 1024;   // a body slower than this (after header_timeout_ms) is cut: 408
    uint64_t lingering_time_ms = 30000;          // after a final answer: at most this long discarding input
    uint64_t lingering_timeout_ms = 5000;        // ... and at most this long between two reads of it
    // A connection older than this is closed between requests (0: never):
    // defence in depth behind the re-verification of live connections on
    // every reload. An hour, as nginx's keepalive_time: 10,000 long-polling
    // workers then cost about 3 extra handshakes a second.
    uint64_t max_connection_age_ms = 3600000;
  } limits;
  struct {
    std::string level = "info";
  } log;
};

// bunny's configuration. Exactly one of handler.exec and handler.http.
struct bunny_config {
  struct {
    std::vector<std::string> urls{"https://relay.aws.internal:8443"};  // tried in turn on failures
    std::optional<std::string> server_name;  // name relay's certificate must carry; default: the URL's host
  } relay;
  struct {
    // Both null: no client certificate, for a relay in auth.mode "api_key"
    // (api_key_file is then required).
    std::optional<std::string> cert = "tls.crt";
    std::optional<std::string> key = "tls.key";
    std::string ca = "ca.crt";
    std::string min_version = "1.3";
    uint64_t reload_check_ms = 2000;  // how often cert/key files are checked for changes
  } tls;
  std::optional<std::string> api_key_file;
  std::vector<std::string> queues{"render"};
  uint64_t concurrency = 8;
  uint64_t lease_ms = 30000;
  struct {
    std::vector<std::string> exec;    // argv, no shell
    std::optional<std::string> http;  // http://host:port/path
    uint64_t timeout_ms = 600000;
    uint64_t kill_grace_ms = 5000;         // SIGTERM → SIGKILL
    // stdout / response body kept as the result; 0 (the default): the
    // largest result limits.max_job_bytes allows.
    uint64_t max_output_bytes = 0;
  } handler;
  struct {
    // The largest payload bunny accepts and the largest result it uploads.
    // Its lease requests ask relay for answers no larger than this plus an
    // envelope allowance, and it reads no larger answer; relay's
    // limits.max_body_bytes should be at least this much.
    uint64_t max_job_bytes = uint64_t{16} << 20;
  } limits;
  std::string ops_listen = "127.0.0.1:9091";
  struct {
    uint64_t wait_ms = 25000;          // long-poll wait; keep below every idle timeout on the path
    uint64_t request_timeout_ms = 30000;
    uint64_t backoff_base_ms = 250;
    uint64_t backoff_max_ms = 30000;
  } poll;
  uint64_t drain_timeout_ms = 30000;  // SIGTERM: how long running jobs may finish
  struct {
    std::string level = "info";
  } log;
};

// A --set dotted.key=value override, or one of the named flags mapped to its key.
using override_list = std::vector<std::pair<std::string, std::string>>;

// Adds the value of a --set flag, "dotted.key=value", to `out`; false, with
// `error` quoting it, when it has no '=' or no key.
bool add_set_override(const std::string& arg, override_list& out, std::string& error);

// Reads `file` (if any), then applies `overrides` in order. On failure
// returns false and `error` names the file (or flag) and the key.
bool load(const std::optional<std::string>& file, const override_list& overrides, relay_config& out,
          std::string& error);

// The effective configuration as indented JSON.
std::string to_json(const relay_config& c);

// Start-up check of a file a key names (a certificate, a key, the policy):
// false, with `error` = "<key> <path>: <why>", if it cannot be opened for
// reading or is a directory.
bool readable_file(std::string_view key, const std::string& path, std::string& error);

// The whole of `path` into `out`; false, with `error` = "<path>: <why>",
// if it cannot be opened or read. For small files (policy, keys, CA).
bool read_file(const std::string& path, std::string& out, std::string& error);

// Whether a secret file (a private key, an API key file) is open to any
// user (an "other" permission bit) or writable by its group. Group read is
// allowed: it is how a pod's fsGroup reaches a Secret mounted 0440.
// Exposure is warned about, not refused: a Kubernetes Secret volume is 0644
// unless its defaultMode says otherwise. `warning` names key, path and mode.
bool exposed_secret(std::string_view key, const std::string& path, std::string& warning);

// Loads and validates bunny's configuration (URLs, handler choice).
bool load(const std::optional<std::string>& file, const override_list& overrides, bunny_config& out,
          std::string& error);
std::string to_json(const bunny_config& c);

// "https://host:port/path" → parts; IPv6 hosts in brackets. The port
// defaults to 443 for https and 80 for http.
struct url {
  std::string scheme;
  std::string host;
  uint16_t port = 0;
  std::string path;  // "/" when absent
};
bool parse_url(std::string_view text, url& out, std::string& error);

}  // namespace relay::config
