// relay's configuration keys. The engine is config/schema.cpp.
#include "config/schema.h"

namespace relay::config {
namespace {

using c = relay_config;

const schema& relay_schema() {
  static const schema keys = {
      {"listen", kind::string, field<c>([](c& x) { return &x.listen; })},
      {"ops_listen", kind::string, field<c>([](c& x) { return &x.ops_listen; })},
      {"tls.cert", kind::path, field<c>([](c& x) { return &x.tls.cert; })},
      {"tls.key", kind::path, field<c>([](c& x) { return &x.tls.key; })},
      {"tls.client_ca", kind::path, field<c>([](c& x) { return &x.tls.client_ca; })},
      {"tls.crl", kind::optional_path, field<c>([](c& x) { return &x.tls.crl; })},
      {"tls.min_version", kind::choice, field<c>([](c& x) { return &x.tls.min_version; }), {"1.2", "1.3"}},
      {"tls.reload_check_ms", kind::number, field<c>([](c& x) { return &x.tls.reload_check_ms; }), {}, 0, 3600000},
      {"tls.session_lifetime_ms", kind::number, field<c>([](c& x) { return &x.tls.session_lifetime_ms; }), {}, 0, 86400000},
      {"auth.mode", kind::choice, field<c>([](c& x) { return &x.auth.mode; }), {"mtls", "api_key", "mtls+api_key"}},
      {"auth.api_keys", kind::optional_path, field<c>([](c& x) { return &x.auth.api_keys; })},
      {"auth.max_failures", kind::number, field<c>([](c& x) { return &x.auth.max_failures; }), {}, 0, 1000000},
      {"auth.failure_window_ms", kind::number, field<c>([](c& x) { return &x.auth.failure_window_ms; }), {}, 1000, 86400000},
      {"policy", kind::path, field<c>([](c& x) { return &x.policy; })},
      {"audit.path", kind::optional_path, field<c>([](c& x) { return &x.audit.path; })},
      {"journal.backend", kind::choice, field<c>([](c& x) { return &x.journal.backend; }), {"file", "postgres"}},
      {"journal.dir", kind::path, field<c>([](c& x) { return &x.journal.dir; })},
      {"journal.fsync", kind::choice, field<c>([](c& x) { return &x.journal.fsync; }), {"always", "batch", "off"}},
      {"journal.batch_interval_ms", kind::number, field<c>([](c& x) { return &x.journal.batch_interval_ms; }), {}, 1, 60000},
      {"journal.segment_bytes", kind::number, field<c>([](c& x) { return &x.journal.segment_bytes; }), {}, 4096, 1ull << 34},
      {"journal.compact_min_bytes", kind::number, field<c>([](c& x) { return &x.journal.compact_min_bytes; }), {}, 4096, 1ull << 40},
      {"journal.postgres.dsn_file", kind::optional_path, field<c>([](c& x) { return &x.journal.postgres.dsn_file; })},
      {"journal.postgres.shard", kind::string, field<c>([](c& x) { return &x.journal.postgres.shard; })},
      {"journal.postgres.lease_ms", kind::number, field<c>([](c& x) { return &x.journal.postgres.lease_ms; }), {}, 500, 600000},
      {"journal.postgres.renew_ms", kind::number, field<c>([](c& x) { return &x.journal.postgres.renew_ms; }), {}, 50, 200000},
      {"journal.postgres.max_batch_records", kind::number, field<c>([](c& x) { return &x.journal.postgres.max_batch_records; }), {}, 1, 1000000},
      {"limits.max_body_bytes", kind::number, field<c>([](c& x) { return &x.limits.max_body_bytes; }), {}, 1, 256ull << 20},
      {"limits.spill_threshold_bytes", kind::number, field<c>([](c& x) { return &x.limits.spill_threshold_bytes; }), {}, 0, 64ull << 20},
      {"limits.max_connections", kind::number, field<c>([](c& x) { return &x.limits.max_connections; }), {}, 1, 1000000},
      {"limits.header_timeout_ms", kind::number, field<c>([](c& x) { return &x.limits.header_timeout_ms; }), {}, 100, 600000},
      {"limits.idle_timeout_ms", kind::number, field<c>([](c& x) { return &x.limits.idle_timeout_ms; }), {}, 100, 3600000},
      {"limits.max_header_bytes", kind::number, field<c>([](c& x) { return &x.limits.max_header_bytes; }), {}, 1024, 1 << 20},
      {"limits.max_uri_bytes", kind::number, field<c>([](c& x) { return &x.limits.max_uri_bytes; }), {}, 256, 1 << 20},
      {"limits.max_jobs", kind::number, field<c>([](c& x) { return &x.limits.max_jobs; }), {}, 1, 1ull << 32},
      {"limits.max_held_bytes", kind::number, field<c>([](c& x) { return &x.limits.max_held_bytes; }), {}, 1 << 20, 1ull << 40},
      {"limits.max_queues", kind::number, field<c>([](c& x) { return &x.limits.max_queues; }), {}, 1, 1000000},
      {"limits.max_queue_depth", kind::number, field<c>([](c& x) { return &x.limits.max_queue_depth; }), {}, 0, 1000000000000},
      {"limits.result_ttl_ms", kind::number, field<c>([](c& x) { return &x.limits.result_ttl_ms; }), {}, 1000, 365ull * 86400000},
      {"limits.drain_timeout_ms", kind::number, field<c>([](c& x) { return &x.limits.drain_timeout_ms; }), {}, 0, 3600000},
      {"limits.max_connections_per_ip", kind::number, field<c>([](c& x) { return &x.limits.max_connections_per_ip; }), {}, 1, 1000000},
      {"limits.handshake_timeout_ms", kind::number, field<c>([](c& x) { return &x.limits.handshake_timeout_ms; }), {}, 100, 600000},
      {"limits.max_pending_output_bytes", kind::number, field<c>([](c& x) { return &x.limits.max_pending_output_bytes; }), {}, 4096, 1ull << 30},
      {"limits.max_pending_body_bytes", kind::number, field<c>([](c& x) { return &x.limits.max_pending_body_bytes; }), {}, 1 << 16, 1ull << 40},
      {"limits.min_body_rate_bytes_per_s", kind::number, field<c>([](c& x) { return &x.limits.min_body_rate_bytes_per_s; }), {}, 0, 1ull << 30},
      {"limits.lingering_time_ms", kind::number, field<c>([](c& x) { return &x.limits.lingering_time_ms; }), {}, 0, 600000},
      {"limits.lingering_timeout_ms", kind::number, field<c>([](c& x) { return &x.limits.lingering_timeout_ms; }), {}, 0, 600000},
      {"limits.max_connection_age_ms", kind::number, field<c>([](c& x) { return &x.limits.max_connection_age_ms; }), {}, 0, 30ull * 86400000},
      {"log.level", kind::choice, field<c>([](c& x) { return &x.log.level; }), {"debug", "info", "warn", "error"}},
  };
  return keys;
}

}  // namespace

bool load(const std::optional<std::string>& file, const override_list& overrides, relay_config& out,
          std::string& error) {
  relay_config cfg;
  if (!load(relay_schema(), file, overrides, &cfg, error)) return false;
  if (cfg.auth.mode != "mtls" && !cfg.auth.api_keys) {
    error = (file ? *file : std::string("the configuration")) + ": \"auth.api_keys\" (the keys file) is required when " +
            "\"auth.mode\" is \"" + cfg.auth.mode + "\"";
    return false;
  }
  std::string where = file ? *file : std::string("the configuration");
  if (const auto& pg = cfg.journal.postgres; cfg.journal.backend == "postgres") {
    if (!pg.dsn_file) {
      error = where + ": \"journal.postgres.dsn_file\" (the file holding the connection string) is required when " +
              "\"journal.backend\" is \"postgres\"";
      return false;
    }
    // The shard names tables: lowercase letters, digits and _ only.
    bool good = !pg.shard.empty() && pg.shard.size() <= 32 &&
                pg.shard.find_first_not_of("abcdefghijklmnopqrstuvwxyz0123456789_") == std::string::npos;
    if (!good) {
      error = where + ": \"journal.postgres.shard\" must be 1 to 32 characters of a-z, 0-9 and _ (it names tables), not \"" +
              pg.shard + "\"";
      return false;
    }
    if (pg.renew_ms * 3 > pg.lease_ms) {
      error = where + ": \"journal.postgres.renew_ms\" (" + std::to_string(pg.renew_ms) +
              ") must be at most a third of \"journal.postgres.lease_ms\" (" + std::to_string(pg.lease_ms) +
              "), so that a renewal can fail twice before the lease runs out";
      return false;
    }
    // Rows of a PostgreSQL journal carry whole values (no blob store beside
    // them), and a record is bounded at 64 MiB.
    if (cfg.limits.max_body_bytes > (64ull << 20)) {
      error = where + ": \"limits.max_body_bytes\" (" + std::to_string(cfg.limits.max_body_bytes) +
              ") must be at most 67108864 (64 MiB) when \"journal.backend\" is \"postgres\" (large values are "
              "spooled to files beside a file journal only)";
      return false;
    }
    // Nothing spills: a spooled value would live in a file on one
    // machine, which a standby taking over could not read.
    cfg.limits.spill_threshold_bytes = 0;
  }
  out = std::move(cfg);
  return true;
}

std::string to_json(const relay_config& cfg) {
  relay_config copy = cfg;
  return to_json(relay_schema(), &copy);
}

}  // namespace relay::config
