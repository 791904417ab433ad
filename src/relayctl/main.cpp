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
#include <fcntl.h>
#include <simdjson.h>
#include <sys/stat.h>
#include <unistd.h>
#include <uv.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
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
#include <thread>
#include <vector>

#include "relay/api_keys.h"
#include "relay/auth.h"
#include "relay/config.h"
#include "relay/http_client.h"
#include "relay/v1_client.h"
#include "relay/json.h"
#include "relay/tls.h"

namespace {

constexpr const char* usage = R"(usage: relayctl [options] COMMAND [ARGS]

commands:
  submit QUEUE [PAYLOAD | -]     submit one job (PAYLOAD is JSON; "-" or --file reads it)
         --batch                 the input is a JSON array: one job per element
         --priority N --delay-ms N --max-attempts N --lease-ms N --idempotency-key K
  get JOB [--wait MS] [--result-file FILE]
                                 show a job, optionally waiting for it to finish; with
                                 --result-file, write its result's JSON to FILE byte for
                                 byte ("-": stdout) instead of printing it
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
  --url URL[,URL...]   relay, https://host:port [RELAY_URL]; with several (an active/standby
                       pair), a relay that does not answer or answers 503 is passed over for
                       the next, until --timeout (a change is repeated only if that is safe:
                       reads, cancel, requeue by ids, submit with --idempotency-key)
  --server-name NAME   name relay's certificate must carry (default: the URL's host)
  --cert FILE --key FILE  client certificate and key [RELAYCTL_CERT, RELAYCTL_KEY]
  --api-key-file FILE  send the API key in FILE (one line) as "Authorization: Bearer"
                       with every request [RELAYCTL_API_KEY_FILE]
  --ca FILE            CA bundle relay's certificate chains to [RELAYCTL_CA]
  --file FILE          read the payload (or batch) from FILE (up to 256 MiB)
  --timeout MS         per-request timeout, and the overall limit for wait (default 30000)
  --json               print relay's JSON answers instead of text

exit codes: 0 ok, 1 relay answered an error, 2 usage, 3 relay unreachable,
            4 a job finished without succeeding, 5 timed out waiting
)";

// The largest payload (or batch) relayctl sends: relay's own ceiling for
// limits.max_body_bytes. Larger input is refused before anything is sent.
constexpr size_t max_input_bytes = size_t{256} << 20;

enum exit_code { ok = 0, relay_error = 1, usage_error = 2, unreachable = 3, job_failed = 4, timed_out = 5 };

struct options {
  std::string url, server_name, cert, key, ca, file, result_file, api_key_file, principal, key_id, not_after;
  bool json = false, batch = false;
  uint32_t timeout_ms = 30000;
  std::optional<uint32_t> wait_ms, limit, max, priority, delay_ms, max_attempts, lease_ms;
  std::optional<std::string> idempotency_key;
  std::vector<std::string> args;
};

std::string env(const char* name, const char* fallback = "") {
  const char* v = std::getenv(name);
  return v ? v : fallback;
}

// The relays of --url: one, or several separated by commas (an
// active/standby pair behind no load balancer).
std::vector<std::string> split_urls(const std::string& list) {
  std::vector<std::string> out;
  for (size_t at = 0;;) {
    size_t comma = list.find(',', at);
    out.push_back(list.substr(at, comma == std::string::npos ? std::string::npos : comma - at));
    if (comma == std::string::npos) return out;
    at = comma + 1;
  }
}

// The typed client on a private loop, from the command line's options, to
// relay `url`.
std::unique_ptr<relay::v1::blocking_client> connect(const options& o, const std::string& url, std::string& error) {
  relay::v1::client::options co;
  if (!o.api_key_file.empty() && !relay::v1::read_api_key_file(o.api_key_file, co.extra_headers, error)) return nullptr;
  relay::config::url u;
  if (!relay::config::parse_url(url, u, error)) return nullptr;
  relay::tls::client_options t;
  if (!o.cert.empty()) t.cert_file = o.cert;
  if (!o.key.empty()) t.key_file = o.key;
  t.ca_file = o.ca;
  auto ctx = relay::tls::context::make_client(t, error);
  if (!ctx) return nullptr;
  co.connection.host = u.host;
  co.connection.port = u.port;
  co.connection.server_name = o.server_name.empty() ? u.host : o.server_name;
  co.connection.tls = ctx;
  co.connection.connect_timeout_ms = o.timeout_ms;
  co.request_timeout_ms = o.timeout_ms;
  // A job's answer shows its payload and its result, each up to relay's
  // 256 MiB ceiling.
  co.connection.max_response_bytes = 2 * max_input_bytes + (size_t{1} << 20);
  return std::make_unique<relay::v1::blocking_client>(std::move(co));
}

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

// The whole of `fd` into `out`, one read per chunk straight into the
// string: a regular file is sized first and read in one allocation; a
// pipe grows geometrically. Refuses more than max_input_bytes.
bool read_all(int fd, const std::string& name, std::string& out, std::string& error) {
  struct stat st {};
  size_t expect = 0;
  if (::fstat(fd, &st) == 0 && S_ISREG(st.st_mode)) {
    if (static_cast<uint64_t>(st.st_size) > max_input_bytes) {
      error = name + ": " + std::to_string(st.st_size) + " bytes; relay takes at most " +
              std::to_string(max_input_bytes) + " bytes in one request";
      return false;
    }
    expect = static_cast<size_t>(st.st_size);
  }
  // One byte more than expected, to see the end (or a file that grew).
  out.resize(std::max<size_t>(expect + 1, 64 << 10));
  size_t used = 0;
  for (;;) {
    if (used == out.size()) {
      if (out.size() > max_input_bytes) {
        error = name + ": more than " + std::to_string(max_input_bytes) + " bytes; relay takes no more in one request";
        return false;
      }
      out.resize(std::min(out.size() * 2, max_input_bytes + 1));
    }
    ssize_t n = ::read(fd, out.data() + used, out.size() - used);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      error = name + ": " + std::strerror(errno);
      return false;
    }
    if (n == 0) break;
    used += static_cast<size_t>(n);
  }
  if (used > max_input_bytes) {
    error = name + ": more than " + std::to_string(max_input_bytes) + " bytes; relay takes no more in one request";
    return false;
  }
  out.resize(used);
  return true;
}

std::string read_input(const options& o, const std::string& arg, std::string& error) {
  if (!o.file.empty() || arg == "-") {
    std::string out;
    if (!o.file.empty()) {
      int fd = ::open(o.file.c_str(), O_RDONLY | O_CLOEXEC);
      if (fd < 0) {
        error = o.file + ": cannot open: " + std::strerror(errno);
        return {};
      }
      bool ok = read_all(fd, o.file, out, error);
      ::close(fd);
      if (!ok) return {};
    } else if (!read_all(STDIN_FILENO, "stdin", out, error)) {
      return {};
    }
    return out;
  }
  return arg;
}

// Writes `bytes` to `path` whole or not at all: into a new file beside it,
// flushed to disk, then renamed over `path`, so that a reader never sees a
// partial result and a failure leaves whatever was there. "-": stdout.
bool write_file_atomically(const std::string& path, std::string_view bytes, std::string& error) {
  auto write_all = [&](int fd) {
    while (!bytes.empty()) {
      ssize_t n = ::write(fd, bytes.data(), bytes.size());
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) return false;
      bytes.remove_prefix(static_cast<size_t>(n));
    }
    return true;
  };
  if (path == "-") {
    if (!write_all(STDOUT_FILENO)) {
      error = std::string("stdout: ") + std::strerror(errno);
      return false;
    }
    return true;
  }
  std::string tmp = path + ".relayctl-XXXXXX";
  int fd = ::mkstemp(tmp.data());
  if (fd < 0) {
    error = path + ": cannot create a file beside it: " + std::strerror(errno);
    return false;
  }
  // mkstemp makes it 0600; a result file gets the usual mode, less umask.
  mode_t mask = ::umask(0);
  ::umask(mask);
  (void)::fchmod(fd, 0666 & ~mask);
  bool ok = write_all(fd) && ::fsync(fd) == 0;
  int saved = errno;
  ok = (::close(fd) == 0) && ok;
  if (!ok || ::rename(tmp.c_str(), path.c_str()) != 0) {
    if (ok) saved = errno;
    ::unlink(tmp.c_str());
    error = path + ": " + std::strerror(saved);
    return false;
  }
  return true;
}

// What relay sends reaches the terminal without control characters: a
// terminal is not the place for its escape sequences. C0, DEL and the C1
// controls (U+0080-U+009F, which some terminals act on) become '?'; other
// UTF-8 is kept, so results in any language still read.
std::string printable(std::string s) {
  for (size_t i = 0; i < s.size(); ++i) {
    auto c = static_cast<unsigned char>(s[i]);
    if (c < 0x20 || c == 0x7f) {
      s[i] = '?';
    } else if (c == 0xc2 && i + 1 < s.size() && static_cast<unsigned char>(s[i + 1]) >= 0x80 &&
               static_cast<unsigned char>(s[i + 1]) <= 0x9f) {
      s[i] = s[i + 1] = '?';
      ++i;
    }
  }
  return s;
}

// A field of one of relay's answers, as text for the terminal: a string's
// value, or any other value as minified JSON.
std::string field_str(simdjson::dom::element e, const char* key) {
  std::string_view s;
  if (!e[key].get_string().get(s)) return printable(std::string(s));
  simdjson::dom::element v;
  if (!e[key].get(v)) return printable(simdjson::minify(v));
  return {};
}

// One of relay's answers for --json: re-serialised (minified, strings
// escaped), so that nothing but JSON text reaches the terminal.
bool print_json(std::string_view text) {
  simdjson::dom::parser parser;
  simdjson::dom::element root;
  if (parser.parse(text.data(), text.size()).get(root)) return false;
  std::printf("%s\n", simdjson::minify(root).c_str());
  return true;
}

class tool {
 public:
  explicit tool(options o) : _o(std::move(o)) {}

  int run(const std::string& command) {
    std::string error;
    _urls = split_urls(_o.url);
    // Every URL is checked up front: a typo must not wait for a failover.
    for (const auto& url : _urls) {
      relay::config::url u;
      if (!relay::config::parse_url(url, u, error)) return fail(usage_error, "--url " + url + ": " + error);
    }
    _client = connect(_o, _urls[0], error);
    if (!_client) return fail(usage_error, error);
    if (command == "submit") return submit();
    if (command == "get") return get();
    if (command == "wait") return wait();
    if (command == "cancel") return cancel();
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

  // Prints what went wrong and maps it to an exit code.
  int failed(const relay::v1::error& e) {
    using kind = relay::v1::error::kind;
    switch (e.what) {
      case kind::none: return ok;
      case kind::transport: return fail(unreachable, e.message);
      case kind::refused: {
        std::string msg = "relay answered " + std::to_string(e.status);
        if (!e.message.empty() && e.message != msg) msg += ": " + e.message;
        return fail(relay_error, msg);
      }
      case kind::bad_answer: return fail(relay_error, "unexpected answer: " + e.message);
      case kind::bad_call: return fail(usage_error, e.message);
    }
    return fail(relay_error, e.message);
  }

  static const relay::v1::error& error_of(const relay::v1::error& e) { return e; }
  template <class T>
  static const relay::v1::error& error_of(const relay::v1::blocking_client::answer<T>& a) {
    return a.err;
  }

  // Runs `call` on the current relay; with several URLs, on an answer that
  // says "not here"
  // (nothing listens: a standby; 503: a leader stepping down or a journal
  // failing) tries the next URL, round and round with a growing pause,
  // until --timeout. A call that changes something is tried again after it
  // may have reached relay only if `repeatable` (a read, a cancel, a submit
  // with an idempotency key): a 503 means its outcome is unknown.
  template <class Call>
  auto with_failover(bool repeatable, Call call) {
    using kind = relay::http::client_error::kind;
    auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(_o.timeout_ms);
    auto pause = std::chrono::milliseconds(100);
    for (;;) {
      auto result = call(*_client);
      const relay::v1::error& e = error_of(result);
      bool unsent = e.what == relay::v1::error::kind::transport && (e.transport == kind::connect || e.transport == kind::tls);
      bool unavailable = (e.what == relay::v1::error::kind::refused && e.status == 503) ||
                         (e.what == relay::v1::error::kind::transport && !unsent);
      // One relay: its answer, as it is (a load balancer in front does the rest).
      if (_urls.size() == 1 || (!unsent && !(unavailable && repeatable))) return result;
      if (std::chrono::steady_clock::now() + pause >= deadline) return result;
      if (++_current == _urls.size()) {
        // Round every relay once: wait before the next round.
        _current = 0;
        std::this_thread::sleep_for(pause);
        pause = std::min(pause * 2, std::chrono::milliseconds(2000));
      }
      std::string error;
      auto next = connect(_o, _urls[_current], error);
      if (!next) return result;
      _client = std::move(next);
    }
  }

  int need_args(size_t n, const char* what) {
    if (_o.args.size() < n) return fail(usage_error, std::string("missing ") + what);
    return ok;
  }

  int submit() {
    if (int rc = need_args(1, "QUEUE")) return rc;
    std::string error;
    relay::v1::submit_request r;
    r.queue = _o.args[0];
    r.payload = read_input(_o, _o.args.size() > 1 ? _o.args[1] : std::string(_o.file.empty() ? "" : "-"), error);
    if (!error.empty()) return fail(usage_error, error);
    if (r.payload.empty()) return fail(usage_error, "no payload (give PAYLOAD, - for stdin, or --file)");
    r.batch = _o.batch;
    r.priority = _o.priority;
    r.delay_ms = _o.delay_ms;
    r.max_attempts = _o.max_attempts;
    r.lease_ms = _o.lease_ms;
    r.idempotency_key = _o.idempotency_key;
    auto a = with_failover(r.idempotency_key.has_value(), [&](auto& c) { return c.submit(r); });
    if (a.err) return failed(a.err);
    if (_o.json) {
      print_json(a.value.raw);
    } else if (_o.batch) {
      for (const auto& id : a.value.ids) std::printf("%s\n", id.c_str());
    } else {
      std::printf("%s%s\n", a.value.ids.front().c_str(), a.value.created ? "" : " (already submitted)");
    }
    return ok;
  }

  void print_job(const relay::v1::job_view& j) {
    if (_o.json) {
      print_json(j.raw);
      return;
    }
    simdjson::dom::element root;
    std::string max_attempts = "?";
    if (parse_answer(j.raw, root)) max_attempts = field_str(root, "max_attempts");
    std::printf("job %s in %s: %s (attempt %u of %s)\n", j.id.c_str(), printable(j.queue).c_str(),
                printable(j.state).c_str(), j.attempts, max_attempts.c_str());
    if (!j.result.empty() && j.result != "null") std::printf("  result: %s\n", printable(std::string(j.result)).c_str());
    if (!j.error.empty() && j.error != "null") std::printf("  error: %s\n", printable(std::string(j.error)).c_str());
  }

  int get() {
    if (int rc = need_args(1, "JOB")) return rc;
    auto a = with_failover(true, [&](auto& c) { return c.get_job(_o.args[0], _o.wait_ms.value_or(0)); });
    if (a.err) return failed(a.err);
    if (!_o.result_file.empty()) return write_result(a.value);
    print_job(a.value);
    if (!_o.wait_ms) return ok;
    if (!a.value.terminal()) return timed_out;
    return a.value.state == "succeeded" ? ok : job_failed;
  }

  // get --result-file: the result's exact bytes, only of a job that
  // succeeded; the exit code says why there is none otherwise.
  int write_result(const relay::v1::job_view& j) {
    if (j.state != "succeeded") {
      std::string msg = "job " + j.id + " is " + j.state + ": no result written";
      if (!j.terminal()) return fail(timed_out, msg + " (it has not finished; --wait MS waits for it)");
      return fail(job_failed, msg);
    }
    std::string error;
    if (!write_file_atomically(_o.result_file, j.result, error)) return fail(relay_error, "--result-file " + error);
    if (_o.result_file != "-")
      std::fprintf(stderr, "relayctl: job %s: %zu result bytes written to %s\n", j.id.c_str(), j.result.size(),
                   _o.result_file.c_str());
    return ok;
  }

  int wait() {
    if (int rc = need_args(1, "JOB")) return rc;
    auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(_o.timeout_ms);
    int worst = ok;
    for (const auto& id : _o.args) {
      relay::v1::job_view job;
      for (;;) {
        auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now()).count();
        uint32_t wait_ms = static_cast<uint32_t>(std::clamp<long long>(left, 0, 60000));
        auto a = with_failover(true, [&](auto& c) { return c.get_job(id, wait_ms); });
        if (a.err) return failed(a.err);
        job = std::move(a.value);
        if (job.terminal() || wait_ms == 0) break;
      }
      print_job(job);
      if (!job.terminal()) return fail(timed_out, "timed out waiting for job " + id);
      if (job.state != "succeeded") worst = job_failed;
    }
    return worst;
  }

  int cancel() {
    if (int rc = need_args(1, "JOB")) return rc;
    if (auto e = with_failover(true, [&](auto& c) { return c.cancel(_o.args[0]); })) return failed(e);
    // relay's answer to a cancel says only this.
    if (_o.json) std::printf("{\"id\":\"%s\",\"state\":\"cancelled\"}\n", _o.args[0].c_str());
    else std::printf("%s cancelled\n", _o.args[0].c_str());
    return ok;
  }

  int queues() {
    if (!_o.args.empty() && !relay::auth::valid_queue_name(_o.args[0])) return fail(usage_error, "not a valid queue name");
    auto a = with_failover(
        true, [&](auto& c) { return c.call("GET", _o.args.empty() ? "/v1/queues" : "/v1/queues/" + _o.args[0]); });
    if (a.err) return failed(a.err);
    if (_o.json) {
      if (!print_json(a.value)) return fail(relay_error, "unexpected answer: not JSON");
      return ok;
    }
    simdjson::dom::element root;
    if (!parse_answer(a.value, root)) return fail(relay_error, "unexpected answer");
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
      std::printf("%-24s %8s %8s %8s %10s %8s %8s %10s %8s %12sms\n", field_str(q, "name").c_str(),
                  n("queued").c_str(), n("delayed").c_str(), n("leased").c_str(), n("succeeded").c_str(),
                  n("failed").c_str(), n("dead").c_str(), n("cancelled").c_str(), field_str(q, "waiting_workers").c_str(),
                  field_str(q, "oldest_ready_age_ms").c_str());
    }
    return ok;
  }

  int dead() {
    if (int rc = need_args(1, "QUEUE")) return rc;
    if (!relay::auth::valid_queue_name(_o.args[0])) return fail(usage_error, "not a valid queue name");
    std::string path = "/v1/queues/" + _o.args[0] + "/dead";
    if (_o.limit) path += "?limit=" + std::to_string(*_o.limit);
    auto a = with_failover(true, [&](auto& c) { return c.call("GET", path); });
    if (a.err) return failed(a.err);
    if (_o.json) {
      if (!print_json(a.value)) return fail(relay_error, "unexpected answer: not JSON");
      return ok;
    }
    simdjson::dom::element root;
    simdjson::dom::array jobs;
    if (!parse_answer(a.value, root) || root["jobs"].get_array().get(jobs)) return fail(relay_error, "unexpected answer");
    for (simdjson::dom::element j : jobs)
      std::printf("%s  attempts=%s  error=%s\n", field_str(j, "id").c_str(), field_str(j, "attempts").c_str(),
                  field_str(j, "error").c_str());
    return ok;
  }

  int requeue() {
    if (int rc = need_args(1, "QUEUE")) return rc;
    if (!relay::auth::valid_queue_name(_o.args[0])) return fail(usage_error, "not a valid queue name");
    std::string body = "{";
    if (_o.args.size() > 1) {
      body += "\"ids\":[";
      for (size_t i = 1; i < _o.args.size(); ++i) {
        if (!relay::v1::valid_job_id(_o.args[i])) return fail(usage_error, "a job id is 16 lowercase hex digits");
        body += (i > 1 ? ",\"" : "\"") + _o.args[i] + "\"";
      }
      body += "]";
    } else if (_o.max) {
      body += "\"max\":" + std::to_string(*_o.max);
    }
    body += "}";
    // By ids it can be repeated; "the first N" cannot.
    bool by_ids = _o.args.size() > 1;
    auto a = with_failover(by_ids, [&](auto& c) { return c.call("POST", "/v1/queues/" + _o.args[0] + "/dead/requeue", body); });
    if (a.err) return failed(a.err);
    if (!print_json(a.value)) return fail(relay_error, "unexpected answer: not JSON");
    return ok;
  }


  // Parses one of relay's answers; `root` is valid until the next call.
  bool parse_answer(std::string_view body, simdjson::dom::element& root) {
    return !_parser.parse(body.data(), body.size()).get(root);
  }

  options _o;
  std::vector<std::string> _urls;
  size_t _current = 0;
  std::unique_ptr<relay::v1::blocking_client> _client;
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
    else if (a == "--result-file") good = value(o.result_file);
    else if (a == "--json") o.json = true;
    else if (a == "--batch") o.batch = true;
    else if (a == "--timeout") {
      std::optional<uint32_t> t;
      good = number(t);
      if (good) o.timeout_ms = *t;
    } else if (a == "--wait") good = number(o.wait_ms);
    else if (a == "--limit") good = number(o.limit);
    else if (a == "--max") good = number(o.max);
    else if (a == "--priority") good = number(o.priority);
    else if (a == "--delay-ms") good = number(o.delay_ms);
    else if (a == "--max-attempts") good = number(o.max_attempts);
    else if (a == "--lease-ms") good = number(o.lease_ms);
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
  return tool(std::move(o)).run(command);
}
