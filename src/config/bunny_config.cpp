// bunny's configuration keys and the checks that span keys.
#include <charconv>

#include "config/schema.h"
#include "relay/auth.h"

namespace relay::config {
namespace {

using c = bunny_config;

// 256 MiB is relay's own ceiling for a request body (limits.max_body_bytes);
// a job bunny could accept but relay could never hold is no use. Below
// 64 KiB a lease answer's envelope and one ordinary job would not fit.
constexpr uint64_t max_job_bytes_floor = uint64_t{64} << 10;
constexpr uint64_t max_job_bytes_ceiling = uint64_t{256} << 20;

const schema& bunny_schema() {
  static const schema keys = {
      {"relay.urls", kind::string_list, field<c>([](c& x) { return &x.relay.urls; })},
      {"relay.server_name", kind::optional_string, field<c>([](c& x) { return &x.relay.server_name; })},
      {"tls.cert", kind::optional_path, field<c>([](c& x) { return &x.tls.cert; })},
      {"tls.key", kind::optional_path, field<c>([](c& x) { return &x.tls.key; })},
      {"tls.ca", kind::path, field<c>([](c& x) { return &x.tls.ca; })},
      {"tls.min_version", kind::choice, field<c>([](c& x) { return &x.tls.min_version; }), {"1.2", "1.3"}},
      {"tls.reload_check_ms", kind::number, field<c>([](c& x) { return &x.tls.reload_check_ms; }), {}, 100, 3600000},
      {"api_key_file", kind::optional_path, field<c>([](c& x) { return &x.api_key_file; })},
      {"queues", kind::string_list, field<c>([](c& x) { return &x.queues; })},
      {"concurrency", kind::number, field<c>([](c& x) { return &x.concurrency; }), {}, 1, 1000},
      {"lease_ms", kind::number, field<c>([](c& x) { return &x.lease_ms; }), {}, 1000, 86400000},
      {"handler.exec", kind::string_list, field<c>([](c& x) { return &x.handler.exec; })},
      {"handler.http", kind::optional_string, field<c>([](c& x) { return &x.handler.http; })},
      {"handler.timeout_ms", kind::number, field<c>([](c& x) { return &x.handler.timeout_ms; }), {}, 100, 86400000},
      {"handler.kill_grace_ms", kind::number, field<c>([](c& x) { return &x.handler.kill_grace_ms; }), {}, 0, 600000},
      {"handler.max_output_bytes", kind::number, field<c>([](c& x) { return &x.handler.max_output_bytes; }), {}, 0,
       max_job_bytes_ceiling},
      {"limits.max_job_bytes", kind::number, field<c>([](c& x) { return &x.limits.max_job_bytes; }), {},
       max_job_bytes_floor, max_job_bytes_ceiling},
      {"ops_listen", kind::string, field<c>([](c& x) { return &x.ops_listen; })},
      {"poll.wait_ms", kind::number, field<c>([](c& x) { return &x.poll.wait_ms; }), {}, 0, 60000},
      {"poll.request_timeout_ms", kind::number, field<c>([](c& x) { return &x.poll.request_timeout_ms; }), {}, 1000, 600000},
      {"poll.backoff_base_ms", kind::number, field<c>([](c& x) { return &x.poll.backoff_base_ms; }), {}, 1, 60000},
      {"poll.backoff_max_ms", kind::number, field<c>([](c& x) { return &x.poll.backoff_max_ms; }), {}, 1, 3600000},
      {"drain_timeout_ms", kind::number, field<c>([](c& x) { return &x.drain_timeout_ms; }), {}, 0, 3600000},
      {"log.level", kind::choice, field<c>([](c& x) { return &x.log.level; }), {"debug", "info", "warn", "error"}},
  };
  return keys;
}

}  // namespace

bool parse_url(std::string_view text, url& out, std::string& error) {
  auto fail = [&](const char* why) {
    error = "URL \"" + std::string(text) + "\": " + why;
    return false;
  };
  auto sep = text.find("://");
  if (sep == std::string_view::npos) return fail("no scheme (want https://host:port)");
  out.scheme = std::string(text.substr(0, sep));
  if (out.scheme != "https" && out.scheme != "http") return fail("the scheme must be https or http");
  std::string_view rest = text.substr(sep + 3);
  auto slash = rest.find('/');
  std::string_view authority = rest.substr(0, slash);
  out.path = slash == std::string_view::npos ? "/" : std::string(rest.substr(slash));
  if (authority.find('@') != std::string_view::npos) return fail("credentials in URLs are not allowed");
  std::string_view port_text;
  if (!authority.empty() && authority.front() == '[') {
    auto close = authority.find(']');
    if (close == std::string_view::npos) return fail("unterminated [IPv6] host");
    out.host = std::string(authority.substr(1, close - 1));
    if (close + 1 < authority.size()) {
      if (authority[close + 1] != ':') return fail("junk after the [IPv6] host");
      port_text = authority.substr(close + 2);
    }
  } else {
    auto colon = authority.rfind(':');
    out.host = std::string(authority.substr(0, colon));
    if (colon != std::string_view::npos) port_text = authority.substr(colon + 1);
  }
  if (out.host.empty()) return fail("no host");
  if (port_text.empty()) {
    out.port = out.scheme == "https" ? 443 : 80;
  } else {
    unsigned p = 0;
    auto [ptr, ec] = std::from_chars(port_text.data(), port_text.data() + port_text.size(), p);
    if (ec != std::errc() || ptr != port_text.data() + port_text.size() || p == 0 || p > 65535)
      return fail("invalid port");
    out.port = static_cast<uint16_t>(p);
  }
  return true;
}

bool load(const std::optional<std::string>& file, const override_list& overrides, bunny_config& out,
          std::string& error) {
  bunny_config cfg;
  if (!load(bunny_schema(), file, overrides, &cfg, error)) return false;
  std::string origin = file ? *file : std::string("configuration");
  auto fail = [&](const std::string& msg) {
    error = origin + ": " + msg;
    return false;
  };
  if (cfg.relay.urls.empty()) return fail("\"relay.urls\" must name at least one relay");
  for (const auto& u : cfg.relay.urls) {
    url parsed;
    if (!parse_url(u, parsed, error)) return fail("\"relay.urls\": " + error);
    if (parsed.scheme != "https") return fail("\"relay.urls\": relay is only spoken to over https (mutual TLS)");
  }
  if (cfg.queues.empty()) return fail("\"queues\" must name at least one queue");
  for (const auto& q : cfg.queues)
    if (!auth::valid_queue_name(q)) return fail("\"queues\": \"" + q + "\" is not a valid queue name");
  bool has_exec = !cfg.handler.exec.empty(), has_http = cfg.handler.http.has_value();
  if (has_exec == has_http) return fail("set exactly one of \"handler.exec\" and \"handler.http\"");
  if (has_http) {
    url parsed;
    if (!parse_url(*cfg.handler.http, parsed, error)) return fail("\"handler.http\": " + error);
    if (parsed.scheme != "http") return fail("\"handler.http\" must be a plain http:// URL to a local service");
  }
  if (cfg.tls.cert.has_value() != cfg.tls.key.has_value())
    return fail("\"tls.cert\" and \"tls.key\" go together: set both, or both to null (no client certificate)");
  if (!cfg.tls.cert && !cfg.api_key_file)
    return fail("without a client certificate (\"tls.cert\": null) bunny needs \"api_key_file\"");
  // A handler allowed a larger output than bunny may upload would run to
  // completion and then lose its result at delivery: refuse it here, by
  // name, instead of failing jobs at run time.
  if (cfg.handler.max_output_bytes > cfg.limits.max_job_bytes)
    return fail("\"handler.max_output_bytes\" (" + std::to_string(cfg.handler.max_output_bytes) +
                ") exceeds \"limits.max_job_bytes\" (" + std::to_string(cfg.limits.max_job_bytes) +
                "): a result that large could not be delivered; raise limits.max_job_bytes or lower it");
  // 0 follows the job limit; shown resolved, so --check-config prints what
  // applies.
  if (cfg.handler.max_output_bytes == 0) cfg.handler.max_output_bytes = cfg.limits.max_job_bytes;
  if (cfg.poll.backoff_max_ms < cfg.poll.backoff_base_ms) return fail("\"poll.backoff_max_ms\" is below \"poll.backoff_base_ms\"");
  if (cfg.poll.wait_ms + 1000 > cfg.poll.request_timeout_ms)
    return fail("\"poll.request_timeout_ms\" must exceed \"poll.wait_ms\" by at least 1000");
  out = std::move(cfg);
  return true;
}

std::string to_json(const bunny_config& cfg) {
  bunny_config copy = cfg;
  return to_json(bunny_schema(), &copy);
}

}  // namespace relay::config
