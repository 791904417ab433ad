// relayctl: the command-line client for producers and operators, on the
// same TLS and HTTP client code as bunny.
//
// Exit codes scripts can rely on:
//   0 success
//   1 relay answered with an error (the message is printed)
//   2 usage error
//   3 relay could not be reached (connection or TLS failure)
//   4 a waited-for job finished without succeeding (dead, cancelled)
//   5 timed out waiting
#include <simdjson.h>
#include <uv.h>

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <fstream>
#include <memory>
#include <iostream>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "relay/api_keys.h"
#include "relay/config.h"
#include "relay/http_client.h"
#include "relay/json.h"
#include "relay/tls.h"

namespace {

constexpr const char* usage = R"(usage: relayctl [options] COMMAND [ARGS]

commands:
  submit QUEUE [PAYLOAD | -]     submit one job (PAYLOAD is JSON; "-" or --file reads it)
         --batch                 the input is a JSON array: one job per element
         --priority N --delay-ms N --max-attempts N --lease-ms N --idempotency-key K
  get JOB [--wait MS]            show a job, optionally waiting for it to finish
  wait JOB... [--timeout MS]     wait until every job has finished; print their results
  cancel JOB                     cancel a job that is queued or delayed
  queues [QUEUE]                 queue statistics
  dead QUEUE [--limit N]         list dead jobs
  requeue QUEUE [JOB...] [--max N]  give dead jobs fresh attempts
  api-key new --principal P [--id ID] [--not-after TIME]
                                 make a new random API key: prints the key (once, on the
                                 first line) and the entry for relay's keys file (second
                                 line); TIME is RFC 3339 UTC, e.g. 2027-01-31T00:00:00Z

options (environment variable in brackets):
  --url URL            relay, https://host:port [RELAY_URL]
  --server-name NAME   name relay's certificate must carry (default: the URL's host)
  --cert FILE --key FILE  client certificate and key [RELAYCTL_CERT, RELAYCTL_KEY]
  --api-key-file FILE  send the API key in FILE (one line) as "Authorization: Bearer"
                       with every request [RELAYCTL_API_KEY_FILE]
  --ca FILE            CA bundle relay's certificate chains to [RELAYCTL_CA]
  --file FILE          read the payload (or batch) from FILE
  --timeout MS         per-request timeout, and the overall limit for wait (default 30000)
  --json               print relay's JSON answers instead of text

exit codes: 0 ok, 1 relay answered an error, 2 usage, 3 relay unreachable,
            4 a job finished without succeeding, 5 timed out waiting
)";

enum exit_code { ok = 0, relay_error = 1, usage_error = 2, unreachable = 3, job_failed = 4, timed_out = 5 };

struct options {
  std::string url, server_name, cert, key, ca, file, api_key_file, principal, key_id, not_after;
  bool json = false, batch = false;
  uint32_t timeout_ms = 30000;
  std::optional<uint32_t> wait_ms, limit, max;
  std::optional<std::string> priority, delay_ms, max_attempts, lease_ms, idempotency_key;
  std::vector<std::string> args;
};

std::string env(const char* name, const char* fallback = "") {
  const char* v = std::getenv(name);
  return v ? v : fallback;
}

// The key in `path`: one line, surrounding whitespace and the final newline
// dropped. Never echoed in an error.
bool read_api_key(const std::string& path, std::string& key, std::string& error) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    error = path + ": cannot open the API key file";
    return false;
  }
  std::ostringstream ss;
  ss << in.rdbuf();
  key = ss.str();
  while (!key.empty() && (key.back() == '\n' || key.back() == '\r' || key.back() == ' ' || key.back() == '\t'))
    key.pop_back();
  size_t start = key.find_first_not_of(" \t");
  key.erase(0, start == std::string::npos ? key.size() : start);
  std::string_view token;
  if (key.empty() || !relay::auth::bearer_token("Bearer " + key, token)) {
    error = path + ": the API key file must hold one key on one line (RFC 6750 token characters)";
    key.clear();
    return false;
  }
  return true;
}

// A blocking wrapper over client_conn on a private loop.
class client {
 public:
  client(const options& o, std::string& error) {
    uv_loop_init(&_loop);
    if (!o.api_key_file.empty()) {
      std::string key;
      if (!read_api_key(o.api_key_file, key, error)) return;
      _auth_header = "Authorization: Bearer " + key + "\r\n";
    }
    relay::config::url u;
    if (!relay::config::parse_url(o.url, u, error)) return;
    relay::tls::client_options t;
    if (!o.cert.empty()) t.cert_file = o.cert;
    if (!o.key.empty()) t.key_file = o.key;
    t.ca_file = o.ca;
    auto ctx = relay::tls::context::make_client(t, error);
    if (!ctx) return;
    relay::http::client_conn::options co;
    co.host = u.host;
    co.port = u.port;
    co.server_name = o.server_name.empty() ? u.host : o.server_name;
    co.tls = ctx;
    co.connect_timeout_ms = o.timeout_ms;
    _conn = relay::http::client_conn::create(&_loop, co);
  }
  ~client() {
    if (_conn) _conn->close();
    uv_run(&_loop, UV_RUN_DEFAULT);
    uv_loop_close(&_loop);
  }
  bool ready() const { return _conn != nullptr; }

  // Returns the transport error (kind none on success).
  relay::http::client_error call(const std::string& method, const std::string& path, const std::string& body,
                                 uint32_t timeout_ms, relay::http::client_response& out) {
    relay::http::client_error error;
    bool done = false;
    _conn->request(method, path, body,
                   [&](const relay::http::client_error& e, relay::http::client_response& r) {
                     error = e;
                     out = std::move(r);
                     done = true;
                   },
                   timeout_ms, _auth_header);
    while (!done) uv_run(&_loop, UV_RUN_ONCE);
    return error;
  }

 private:
  uv_loop_t _loop;
  relay::http::client_conn* _conn = nullptr;
  std::string _auth_header;  // "Authorization: Bearer …\r\n" or empty; never printed
};

std::string base64url(const uint8_t* data, size_t n) {
  static constexpr char alphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
  std::string out;
  uint32_t acc = 0;
  int bits = 0;
  for (size_t i = 0; i < n; ++i) {
    acc = acc << 8 | data[i];
    bits += 8;
    while (bits >= 6) {
      bits -= 6;
      out += alphabet[(acc >> bits) & 63];
    }
  }
  if (bits > 0) out += alphabet[(acc << (6 - bits)) & 63];
  return out;
}

// relayctl api-key new: needs no relay, only the TLS library's generator.
int new_api_key(const options& o) {
  if (o.args.size() != 1 || o.args[0] != "new") {
    std::fprintf(stderr, "relayctl: usage: relayctl api-key new --principal P [--id ID] [--not-after TIME]\n");
    return usage_error;
  }
  if (o.principal.empty()) {
    std::fprintf(stderr, "relayctl: api-key new needs --principal (a principal name of relay's policy)\n");
    return usage_error;
  }
  // Refuse here what relay's keys file would refuse, so the line printed is
  // always one relay loads.
  std::string entry_for_check = "{\"keys\":[{\"principal\":";
  relay::json::append_string(entry_for_check, o.principal);
  entry_for_check += ",\"sha256\":\"" + std::string(64, '0') + "\"";
  if (!o.key_id.empty()) {
    entry_for_check += ",\"id\":";
    relay::json::append_string(entry_for_check, o.key_id);
  }
  if (!o.not_after.empty()) {
    entry_for_check += ",\"not_after\":";
    relay::json::append_string(entry_for_check, o.not_after);
  }
  entry_for_check += "}]}";
  std::string error;
  if (!relay::auth::api_keys::parse(entry_for_check, "the new key", error)) {
    std::fprintf(stderr, "relayctl: %s\n", error.c_str());
    return usage_error;
  }
  uint8_t secret[32];
  relay::tls::random_bytes(secret, sizeof secret);
  std::string key = base64url(secret, sizeof secret);
  uint8_t digest[32];
  relay::tls::sha256(key, digest);
  std::string hex = relay::tls::to_hex(digest, sizeof digest);
  std::string id = o.key_id;
  if (id.empty()) {
    // The principal's safe characters, the date and a random tag: readable
    // in audit lines, unique enough to rotate by.
    for (char c : o.principal) {
      bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' || c == '_' ||
                c == '-';
      if (id.size() < 40) id += ok ? c : '-';
    }
    std::time_t t = std::time(nullptr);
    std::tm tm{};
    gmtime_r(&t, &tm);
    char date[16];
    std::strftime(date, sizeof date, "%Y%m%d", &tm);
    uint8_t tag[2];
    relay::tls::random_bytes(tag, sizeof tag);
    id += "-" + std::string(date) + "-" + relay::tls::to_hex(tag, sizeof tag);
  }
  std::string entry = "{\"principal\": ";
  relay::json::append_string(entry, o.principal);
  entry += ", \"sha256\": \"" + hex + "\", \"id\": ";
  relay::json::append_string(entry, id);
  if (!o.not_after.empty()) {
    entry += ", \"not_after\": ";
    relay::json::append_string(entry, o.not_after);
  }
  entry += "}";
  std::printf("%s\n%s\n", key.c_str(), entry.c_str());
  std::fflush(stdout);
  std::fprintf(stderr,
               "relayctl: the first line is the key; it is shown only now: store it where the client reads it "
               "(bunny's api_key_file, relayctl --api-key-file). The second line goes into the \"keys\" array of "
               "relay's auth.api_keys file, which holds only its SHA-256.\n");
  return ok;
}

std::string read_input(const options& o, const std::string& arg, std::string& error) {
  if (!o.file.empty() || arg == "-") {
    std::ostringstream ss;
    if (!o.file.empty()) {
      std::ifstream in(o.file, std::ios::binary);
      if (!in) {
        error = o.file + ": cannot open";
        return {};
      }
      ss << in.rdbuf();
    } else {
      ss << std::cin.rdbuf();
    }
    return ss.str();
  }
  return arg;
}

// Top-level JSON values of an array, as raw text.
bool split_array(const std::string& text, std::vector<std::string>& out, std::string& error) {
  simdjson::padded_string p(text);
  simdjson::dom::parser parser;
  simdjson::dom::element root;
  if (auto e = parser.parse(p).get(root)) {
    error = std::string("input is not valid JSON: ") + simdjson::error_message(e);
    return false;
  }
  simdjson::dom::array arr;
  if (root.get_array().get(arr)) {
    error = "--batch wants a JSON array";
    return false;
  }
  for (simdjson::dom::element e : arr) out.push_back(simdjson::minify(e));
  return true;
}

std::string field_str(simdjson::dom::element e, const char* key) {
  std::string_view s;
  if (!e[key].get_string().get(s)) return std::string(s);
  simdjson::dom::element v;
  if (!e[key].get(v)) return simdjson::minify(v);
  return {};
}

class tool {
 public:
  explicit tool(options o) : _o(std::move(o)) {}

  int run(const std::string& command) {
    std::string error;
    _client = std::make_unique<client>(_o, error);
    if (!_client->ready()) return fail(usage_error, error);
    if (command == "submit") return submit();
    if (command == "get") return get();
    if (command == "wait") return wait();
    if (command == "cancel") return simple("DELETE", "/v1/jobs/", 1, "");
    if (command == "queues") return queues();
    if (command == "dead") return dead();
    if (command == "requeue") return requeue();
    return fail(usage_error, "unknown command \"" + command + "\"");
  }

 private:
  int fail(int code, const std::string& msg) {
    std::fprintf(stderr, "relayctl: %s\n", msg.c_str());
    return code;
  }

  // One request; prints relay's error and maps the outcome to an exit code.
  int request(const std::string& method, const std::string& path, const std::string& body,
              relay::http::client_response& r, uint32_t timeout_ms = 0) {
    relay::http::client_error error = _client->call(method, path, body, timeout_ms ? timeout_ms : _o.timeout_ms, r);
    // A job id or queue name that cannot go into a request line is the
    // caller's mistake, not relay's absence.
    if (error.what == relay::http::client_error::kind::refused) return fail(usage_error, error.message);
    if (error) return fail(unreachable, error.message);
    if (r.status >= 200 && r.status < 300) return ok;
    std::string msg = "relay answered " + std::to_string(r.status);
    simdjson::dom::element root;
    std::string_view m;
    if (parse_answer(r.body, root) && !root["error"]["message"].get_string().get(m)) msg += ": " + std::string(m);
    return fail(relay_error, msg);
  }

  int need_args(size_t n, const char* what) {
    if (_o.args.size() < n) return fail(usage_error, std::string("missing ") + what);
    return ok;
  }

  int submit() {
    if (int rc = need_args(1, "QUEUE")) return rc;
    std::string error;
    std::string input = read_input(_o, _o.args.size() > 1 ? _o.args[1] : std::string(_o.file.empty() ? "" : "-"), error);
    if (!error.empty()) return fail(usage_error, error);
    if (input.empty()) return fail(usage_error, "no payload (give PAYLOAD, - for stdin, or --file)");
    std::string options;
    auto add = [&](const char* key, const std::optional<std::string>& v, bool quoted) {
      if (!v) return;
      options += ",\"" + std::string(key) + "\":";
      if (quoted) relay::json::append_string(options, *v);
      else options += *v;
    };
    add("priority", _o.priority, false);
    add("delay_ms", _o.delay_ms, false);
    add("max_attempts", _o.max_attempts, false);
    add("lease_ms", _o.lease_ms, false);
    std::string body;
    if (_o.batch) {
      if (_o.idempotency_key) return fail(usage_error, "--idempotency-key applies to single jobs");
      std::vector<std::string> payloads;
      if (!split_array(input, payloads, error)) return fail(usage_error, error);
      body = "[";
      for (size_t i = 0; i < payloads.size(); ++i) body += (i ? "," : "") + ("{\"payload\":" + payloads[i] + options + "}");
      body += "]";
    } else {
      add("idempotency_key", _o.idempotency_key, true);
      body = "{\"payload\":" + input + options + "}";
    }
    relay::http::client_response r;
    if (int rc = request("POST", "/v1/queues/" + _o.args[0] + "/jobs", body, r)) return rc;
    if (_o.json) {
      std::printf("%s\n", r.body.c_str());
      return ok;
    }
    simdjson::dom::element root;
    if (!parse_answer(r.body, root)) return fail(relay_error, "unexpected answer: " + r.body);
    simdjson::dom::array ids;
    if (!root["ids"].get_array().get(ids)) {
      for (simdjson::dom::element id : ids) std::printf("%s\n", std::string(id.get_string().value_unsafe()).c_str());
    } else {
      std::printf("%s%s\n", field_str(root, "id").c_str(), r.status == 200 ? " (already submitted)" : "");
    }
    return ok;
  }

  // Prints a job; returns whether it is finished and succeeded/other.
  void print_job(const std::string& body) {
    if (_o.json) {
      std::printf("%s\n", body.c_str());
      return;
    }
    simdjson::dom::element j;
    if (!parse_answer(body, j)) {
      std::printf("%s\n", body.c_str());
      return;
    }
    std::printf("job %s in %s: %s (attempt %s of %s)\n", field_str(j, "id").c_str(), field_str(j, "queue").c_str(),
                field_str(j, "state").c_str(), field_str(j, "attempts").c_str(), field_str(j, "max_attempts").c_str());
    std::string result = field_str(j, "result"), err = field_str(j, "error");
    if (result != "null") std::printf("  result: %s\n", result.c_str());
    if (err != "null") std::printf("  error: %s\n", err.c_str());
  }

  std::string state_of(const std::string& body) {
    simdjson::dom::element j;
    if (!parse_answer(body, j)) return {};
    return field_str(j, "state");
  }
  static bool terminal(const std::string& s) { return s == "succeeded" || s == "dead" || s == "cancelled"; }

  int get() {
    if (int rc = need_args(1, "JOB")) return rc;
    std::string path = "/v1/jobs/" + _o.args[0];
    uint32_t timeout = _o.timeout_ms;
    if (_o.wait_ms) {
      path += "?wait_ms=" + std::to_string(*_o.wait_ms);
      timeout = *_o.wait_ms + _o.timeout_ms;
    }
    relay::http::client_response r;
    if (int rc = request("GET", path, {}, r, timeout)) return rc;
    print_job(r.body);
    if (!_o.wait_ms) return ok;
    std::string s = state_of(r.body);
    if (!terminal(s)) return timed_out;
    return s == "succeeded" ? ok : job_failed;
  }

  int wait() {
    if (int rc = need_args(1, "JOB")) return rc;
    auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(_o.timeout_ms);
    int worst = ok;
    for (const auto& id : _o.args) {
      std::string body;
      for (;;) {
        auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now()).count();
        uint32_t wait_ms = static_cast<uint32_t>(std::clamp<long long>(left, 0, 60000));
        relay::http::client_response r;
        if (int rc = request("GET", "/v1/jobs/" + id + "?wait_ms=" + std::to_string(wait_ms), {}, r, wait_ms + 30000))
          return rc;
        body = r.body;
        if (terminal(state_of(body)) || wait_ms == 0) break;
      }
      std::string s = state_of(body);
      if (!terminal(s)) {
        print_job(body);
        return fail(timed_out, "timed out waiting for job " + id);
      }
      print_job(body);
      if (s != "succeeded") worst = job_failed;
    }
    return worst;
  }

  int simple(const char* method, const std::string& prefix, size_t nargs, const std::string& body) {
    if (int rc = need_args(nargs, "JOB")) return rc;
    relay::http::client_response r;
    if (int rc = request(method, prefix + _o.args[0], body, r)) return rc;
    if (_o.json) std::printf("%s\n", r.body.c_str());
    else std::printf("%s %s\n", _o.args[0].c_str(), state_of(r.body).c_str());
    return ok;
  }

  int queues() {
    relay::http::client_response r;
    std::string path = _o.args.empty() ? "/v1/queues" : "/v1/queues/" + _o.args[0];
    if (int rc = request("GET", path, {}, r)) return rc;
    if (_o.json) {
      std::printf("%s\n", r.body.c_str());
      return ok;
    }
    simdjson::dom::element root;
    if (!parse_answer(r.body, root)) return fail(relay_error, "unexpected answer");
    std::vector<simdjson::dom::element> list;
    simdjson::dom::array arr;
    if (!root["queues"].get_array().get(arr)) {
      for (simdjson::dom::element q : arr) list.push_back(q);
    } else {
      list.push_back(root);
    }
    std::printf("%-24s %8s %8s %8s %10s %8s %8s %10s %8s %14s\n", "QUEUE", "QUEUED", "DELAYED", "LEASED", "SUCCEEDED",
                "FAILED", "DEAD", "CANCELLED", "WAITING", "OLDEST_READY");
    for (auto q : list) {
      auto c = q["counts"];
      auto n = [&](const char* k) { return field_str(c.value_unsafe(), k); };
      std::printf("%-24s %8s %8s %8s %10s %8s %8s %10s %8s %12sms\n", field_str(q, "name").c_str(), n("queued").c_str(),
                  n("delayed").c_str(), n("leased").c_str(), n("succeeded").c_str(), n("failed").c_str(),
                  n("dead").c_str(), n("cancelled").c_str(), field_str(q, "waiting_workers").c_str(),
                  field_str(q, "oldest_ready_age_ms").c_str());
    }
    return ok;
  }

  int dead() {
    if (int rc = need_args(1, "QUEUE")) return rc;
    relay::http::client_response r;
    std::string path = "/v1/queues/" + _o.args[0] + "/dead";
    if (_o.limit) path += "?limit=" + std::to_string(*_o.limit);
    if (int rc = request("GET", path, {}, r)) return rc;
    if (_o.json) {
      std::printf("%s\n", r.body.c_str());
      return ok;
    }
    simdjson::dom::element root;
    simdjson::dom::array jobs;
    if (!parse_answer(r.body, root) || root["jobs"].get_array().get(jobs)) return fail(relay_error, "unexpected answer");
    for (simdjson::dom::element j : jobs)
      std::printf("%s  attempts=%s  error=%s\n", field_str(j, "id").c_str(), field_str(j, "attempts").c_str(),
                  field_str(j, "error").c_str());
    return ok;
  }

  int requeue() {
    if (int rc = need_args(1, "QUEUE")) return rc;
    std::string body = "{";
    if (_o.args.size() > 1) {
      body += "\"ids\":[";
      for (size_t i = 1; i < _o.args.size(); ++i) body += (i > 1 ? ",\"" : "\"") + _o.args[i] + "\"";
      body += "]";
    } else if (_o.max) {
      body += "\"max\":" + std::to_string(*_o.max);
    }
    body += "}";
    relay::http::client_response r;
    if (int rc = request("POST", "/v1/queues/" + _o.args[0] + "/dead/requeue", body, r)) return rc;
    std::printf("%s\n", r.body.c_str());
    return ok;
  }

  // Parses one of relay's answers; `root` is valid until the next call.
  bool parse_answer(const std::string& body, simdjson::dom::element& root) {
    return !_parser.parse(body.data(), body.size()).get(root);
  }

  options _o;
  std::unique_ptr<client> _client;
  simdjson::dom::parser _parser;
};

bool parse_number(const std::string& s, uint32_t& out) {
  char* end = nullptr;
  unsigned long v = std::strtoul(s.c_str(), &end, 10);
  if (s.empty() || *end || v > 0xffffffffUL) return false;
  out = static_cast<uint32_t>(v);
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  std::signal(SIGPIPE, SIG_IGN);
  options o;
  o.url = env("RELAY_URL", "https://localhost:8443");
  o.cert = env("RELAYCTL_CERT");
  o.key = env("RELAYCTL_KEY");
  o.ca = env("RELAYCTL_CA");
  o.api_key_file = env("RELAYCTL_API_KEY_FILE");
  std::string command;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&](std::string& out) {
      if (i + 1 >= argc) return false;
      out = argv[++i];
      return true;
    };
    auto number = [&](std::optional<uint32_t>& out) {
      std::string v;
      uint32_t n = 0;
      if (!value(v) || !parse_number(v, n)) return false;
      out = n;
      return true;
    };
    auto text = [&](std::optional<std::string>& out) {
      std::string v;
      if (!value(v)) return false;
      out = v;
      return true;
    };
    bool good = true;
    if (a == "-h" || a == "--help") {
      std::fputs(usage, stdout);
      return ok;
    } else if (a == "--url") good = value(o.url);
    else if (a == "--server-name") good = value(o.server_name);
    else if (a == "--cert") good = value(o.cert);
    else if (a == "--key") good = value(o.key);
    else if (a == "--ca") good = value(o.ca);
    else if (a == "--api-key-file") good = value(o.api_key_file);
    else if (a == "--principal") good = value(o.principal);
    else if (a == "--id") good = value(o.key_id);
    else if (a == "--not-after") good = value(o.not_after);
    else if (a == "--file") good = value(o.file);
    else if (a == "--json") o.json = true;
    else if (a == "--batch") o.batch = true;
    else if (a == "--timeout") {
      std::optional<uint32_t> t;
      good = number(t);
      if (good) o.timeout_ms = *t;
    } else if (a == "--wait") good = number(o.wait_ms);
    else if (a == "--limit") good = number(o.limit);
    else if (a == "--max") good = number(o.max);
    else if (a == "--priority") good = text(o.priority);
    else if (a == "--delay-ms") good = text(o.delay_ms);
    else if (a == "--max-attempts") good = text(o.max_attempts);
    else if (a == "--lease-ms") good = text(o.lease_ms);
    else if (a == "--idempotency-key") good = text(o.idempotency_key);
    else if (a.size() > 1 && a[0] == '-' && a != "-") {
      std::fprintf(stderr, "relayctl: unknown option %s\n%s", a.c_str(), usage);
      return usage_error;
    } else if (command.empty()) command = a;
    else o.args.push_back(a);
    if (!good) {
      std::fprintf(stderr, "relayctl: %s needs a valid value\n", a.c_str());
      return usage_error;
    }
  }
  if (command.empty()) {
    std::fputs(usage, stderr);
    return usage_error;
  }
  if (command == "api-key") return new_api_key(o);
  if (o.ca.empty()) {
    std::fprintf(stderr, "relayctl: --ca (or RELAYCTL_CA) is required: relay's certificate is always verified\n");
    return usage_error;
  }
  for (const auto* numeric : {&o.priority, &o.delay_ms, &o.max_attempts, &o.lease_ms}) {
    uint32_t n;
    if (*numeric && !parse_number(**numeric, n)) {
      std::fprintf(stderr, "relayctl: job options take whole numbers\n");
      return usage_error;
    }
  }
  return tool(std::move(o)).run(command);
}
