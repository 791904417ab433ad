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
  } tls;
  struct {
    std::string mode = "mtls";
    std::optional<std::string> api_keys;
  } auth;
  std::string policy = "policy.json";
  struct {
    std::string dir = "/var/lib/relay";
    std::string fsync = "always";
  } journal;
  struct {
    uint64_t max_body_bytes = 1048576;
    uint64_t max_connections = 10000;
    uint64_t header_timeout_ms = 10000;
    uint64_t idle_timeout_ms = 120000;
    uint64_t max_header_bytes = 16384;
    uint64_t max_uri_bytes = 8192;
    uint64_t max_jobs = 2000000;
    uint64_t max_held_bytes = 1073741824;
    uint64_t max_queues = 10000;
    uint64_t result_ttl_ms = 86400000;
    uint64_t drain_timeout_ms = 30000;
  } limits;
  struct {
    std::string level = "info";
  } log;
};

// A --set dotted.key=value override, or one of the named flags mapped to its key.
using override_list = std::vector<std::pair<std::string, std::string>>;

// Reads `file` (if any), then applies `overrides` in order. On failure
// returns false and `error` names the file (or flag) and the key.
bool load(const std::optional<std::string>& file, const override_list& overrides, relay_config& out,
          std::string& error);

// The effective configuration as indented JSON.
std::string to_json(const relay_config& c);

}  // namespace relay::config
