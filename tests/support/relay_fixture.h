// A real relay process on ephemeral loopback ports, with a PKI made by
// tests/support/pki.sh (the openssl CLI), and three ways to talk to it:
// the real curl, the project's own v1 client (relay/v1_client.h), and a
// raw TLS pipe for sending bytes no well-behaved client would send.
#pragma once

#include <arpa/inet.h>
#include <doctest/doctest.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <uv.h>

#include <memory>
#include <string>
#include <vector>

#include "process.h"
#include "relay/http_client.h"
#include "relay/tls.h"
#include "relay/v1_client.h"
#include "tmpdir.h"

namespace test {

inline std::string env_or_fail(const char* name) {
  const char* v = std::getenv(name);
  REQUIRE_MESSAGE(v != nullptr, name << " must be set (meson test sets it)");
  return v;
}

// One PKI per test process: making it takes a few hundred milliseconds and
// nothing writes to it.
inline const std::string& pki() {
  static tmpdir dir;
  static bool made = false;
  if (!made) {
    auto r = run({"sh", env_or_fail("PKI_SCRIPT"), dir.path()}, dir.path(), 60000);
    REQUIRE_MESSAGE(r.exit_code == 0, "pki.sh failed: " << r.err);
    made = true;
  }
  return dir.path();
}

inline std::string default_policy() {
  return R"({
  "principals": {
    "bunny": {"uri_san": "spiffe://test/ns/jobs/sa/bunny"},
    "bunny2": {"uri_san": "spiffe://test/ns/jobs/sa/bunny2"},
    "revoked": {"uri_san": "spiffe://test/ns/jobs/sa/revoked"},
    "producer": {"dns_san": "producer.test"},
    "ops": {"cn": "ops-admin"},
    "nobody": {"cn": "nobody"}
  },
  "grants": [
    {"principal": "bunny", "allow": ["consume"], "queues": ["render", "encode-*", "work"]},
    {"principal": "bunny2", "allow": ["consume"], "queues": ["render", "encode-*", "work"]},
    {"principal": "revoked", "allow": ["consume"], "queues": ["*"]},
    {"principal": "producer", "allow": ["submit", "read"], "queues": ["*"]},
    {"principal": "ops", "allow": ["admin", "read"], "queues": ["*"]}
  ]
})";
}

// default_policy() with one more grant (a JSON object) at the front.
inline std::string policy_with_grant(const std::string& grant) {
  std::string policy = default_policy();
  const std::string anchor = "\"grants\": [";
  policy.insert(policy.find(anchor) + anchor.size(), grant + ",");
  return policy;
}

// A relay configuration in `dir` for the postgres journal backend with
// `dsn` (its file mode 0600, as a secret's), the test PKI and the default
// policy, listening on free ports; returns the configuration's path.
inline std::string postgres_relay_config(const tmpdir& dir, const std::string& dsn) {
  const std::string& p = pki();
  write_file(dir / "dsn", dsn + "\n");
  ::chmod((dir / "dsn").c_str(), 0600);
  write_file(dir / "policy.json", default_policy());
  write_file(dir / "relay.json", R"({"listen": "127.0.0.1:0", "ops_listen": "127.0.0.1:0",
    "tls": {"cert": ")" + p + R"(/server.crt", "key": ")" + p + R"(/server.key", "client_ca": ")" + p +
                                     R"(/ca.crt"},
    "policy": "policy.json", "journal": {"backend": "postgres", "postgres": {"dsn_file": ")" +
                                     (dir / "dsn") + R"(", "lease_ms": 1500, "renew_ms": 300}}})");
  return dir / "relay.json";
}

struct http_result {
  int status = 0;
  std::string body;
  int curl_exit = 0;
  std::string err;
};

class relay_process {
 public:
  explicit relay_process(std::vector<std::string> extra_args = {}, const std::string& policy = default_policy()) {
    const std::string& p = pki();
    write_file(dir / "policy.json", policy);
    write_file(dir / "relay.json", R"({"listen": "127.0.0.1:0", "ops_listen": "127.0.0.1:0",
      "tls": {"cert": ")" + p + R"(/server.crt", "key": ")" + p + R"(/server.key",
              "client_ca": ")" + p + R"(/ca.crt"},
      "policy": "policy.json", "journal": {"dir": "journal"}})");
    std::vector<std::string> argv{env_or_fail("RELAY_BIN"), "--config", dir / "relay.json"};
    argv.insert(argv.end(), extra_args.begin(), extra_args.end());
    proc = std::make_unique<child>(argv, dir / "relay.log");
    auto api_line = proc->wait_for_line("\"listener\":\"api\"");
    auto ops_line = proc->wait_for_line("\"listener\":\"ops\"");
    REQUIRE_MESSAGE(api_line.has_value(), "relay did not start: " << proc->log());
    REQUIRE(ops_line.has_value());
    api = json_field(*api_line, "addr");
    ops = json_field(*ops_line, "addr");
    api_port = static_cast<uint16_t>(std::stoi(api.substr(api.rfind(':') + 1)));
  }

  // A request with the real curl, presenting `who`.crt/.key from the PKI
  // (none when `who` is empty).
  http_result curl(const std::string& who, const std::string& method, const std::string& path,
                   const std::string& body = {}, std::vector<std::string> extra = {}) const {
    const std::string& p = pki();
    std::vector<std::string> argv{"curl", "-sS", "--max-time", "30", "--cacert", p + "/ca.crt", "-X", method,
                                  "-o", dir / "curl.body", "-w", "%{http_code}"};
    if (!who.empty()) {
      argv.insert(argv.end(), {"--cert", p + "/" + who + ".crt", "--key", p + "/" + who + ".key"});
    }
    if (!body.empty() || method == "POST") {
      write_file(dir / "curl.req", body);
      argv.insert(argv.end(), {"-H", "Content-Type: application/json", "--data-binary", "@" + (dir / "curl.req")});
    }
    argv.insert(argv.end(), extra.begin(), extra.end());
    argv.push_back("https://" + api + path);
    auto r = run(argv, dir.path());
    http_result h;
    h.curl_exit = r.exit_code;
    h.err = r.err;
    h.status = r.exit_code == 0 ? std::atoi(r.out.c_str()) : 0;
    h.body = r.exit_code == 0 ? read_file(dir / "curl.body") : std::string();
    std::remove((dir / "curl.body").c_str());
    return h;
  }

  // Plain HTTP to the ops listener.
  http_result ops_get(const std::string& path) const {
    auto r = run({"curl", "-sS", "--max-time", "10", "-o", dir / "ops.body", "-w", "%{http_code}",
                  "http://" + ops + path},
                 dir.path());
    http_result h;
    h.curl_exit = r.exit_code;
    h.status = std::atoi(r.out.c_str());
    h.body = read_file(dir / "ops.body");
    return h;
  }

  tmpdir dir;
  std::unique_ptr<child> proc;
  std::string api, ops;
  uint16_t api_port = 0;
};

inline std::shared_ptr<const relay::tls::context> client_tls(const std::string& who) {
  const std::string& p = pki();
  relay::tls::client_options o;
  if (!who.empty()) {
    o.cert_file = p + "/" + who + ".crt";
    o.key_file = p + "/" + who + ".key";
  }
  o.ca_file = p + "/ca.crt";
  std::string error;
  auto ctx = relay::tls::context::make_client(o, error);
  REQUIRE_MESSAGE(ctx != nullptr, error);
  return ctx;
}

// The PKI's server certificate, verifying clients against its CA: for the
// tests' own TLS servers (fake relays, one-shot servers).
inline std::shared_ptr<const relay::tls::context> server_tls() {
  const std::string& p = pki();
  relay::tls::server_options o;
  o.cert_file = p + "/server.crt";
  o.key_file = p + "/server.key";
  o.client_ca_file = p + "/ca.crt";
  std::string error;
  auto ctx = relay::tls::context::make_server(o, error);
  REQUIRE_MESSAGE(ctx != nullptr, error);
  return ctx;
}

// A TCP socket listening on 127.0.0.1 at a port the kernel picks; `port`
// is set to it.
inline int loopback_listener(int backlog, uint16_t& port) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  REQUIRE(fd >= 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE_EQ(bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  REQUIRE_EQ(listen(fd, backlog), 0);
  socklen_t len = sizeof a;
  getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  port = ntohs(a.sin_port);
  return fd;
}

// Options for the project's v1 client (relay/v1_client.h) to the relay
// under test, presenting `who`.crt/.key from the PKI (none when `who` is
// empty). For relay::v1::blocking_client, or relay::v1::client on a
// test_loop.
inline relay::v1::client::options v1_options(uint16_t port, const std::string& who,
                                             const std::string& server_name = "localhost") {
  relay::v1::client::options o;
  o.connection.host = "127.0.0.1";
  o.connection.port = port;
  o.connection.server_name = server_name;
  o.connection.tls = client_tls(who);
  return o;
}

// A libuv loop the test runs itself, for asynchronous v1 clients whose
// calls are raced against something else (a long poll woken by a submit, a
// drain). Declare it before the clients on it: they go first, then the loop
// runs until their connections have closed.
class test_loop {
 public:
  test_loop() { uv_loop_init(&loop); }
  test_loop(const test_loop&) = delete;
  test_loop& operator=(const test_loop&) = delete;
  ~test_loop() {
    uv_run(&loop, UV_RUN_DEFAULT);
    CHECK_EQ(uv_loop_close(&loop), 0);
  }
  uv_loop_t loop;
};

// A blocking TLS connection for sending exactly the bytes a test wants.
class tls_pipe {
 public:
  tls_pipe(uint16_t port, const std::string& who) : _session(client_tls(who), "localhost") {
    _fd = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    REQUIRE_EQ(connect(_fd, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
    _session.start();
    flush();
    while (!_session.handshake_complete()) {
      bool closed = false;
      REQUIRE_MESSAGE(pump(5000, closed), "handshake timed out");
      REQUIRE_FALSE_MESSAGE(closed, "closed during handshake: " << _session.error());
    }
  }
  tls_pipe(const tls_pipe&) = delete;
  tls_pipe& operator=(const tls_pipe&) = delete;
  ~tls_pipe() { ::close(_fd); }

  void send(const std::string& plain) {
    _session.write(plain);
    flush();
  }
  // Reads until the server closes or timeout_ms passes; returns plaintext.
  std::string read_until_closed(int timeout_ms, bool& closed) {
    closed = false;
    auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
    while (!closed) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(until - std::chrono::steady_clock::now()).count();
      if (left <= 0 || !pump(static_cast<int>(left), closed)) break;
    }
    std::string out;
    out.swap(_plain);
    return out;
  }
  // Reads until `n` complete responses ("HTTP/1.1 " count) or timeout.
  std::string read_responses(size_t n, int timeout_ms) {
    auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
    bool closed = false;
    while (!closed && count(_plain, "HTTP/1.1 ") < n) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(until - std::chrono::steady_clock::now()).count();
      if (left <= 0 || !pump(static_cast<int>(left), closed)) break;
    }
    std::string out;
    out.swap(_plain);
    return out;
  }
  static size_t count(const std::string& s, const std::string& needle) {
    size_t n = 0;
    for (size_t p = s.find(needle); p != std::string::npos; p = s.find(needle, p + 1)) ++n;
    return n;
  }

 private:
  void flush() {
    std::string out;
    _session.take_output(out);
    size_t off = 0;
    while (off < out.size()) {
      ssize_t n = ::send(_fd, out.data() + off, out.size() - off, MSG_NOSIGNAL);
      if (n <= 0) return;
      off += static_cast<size_t>(n);
    }
  }
  // One read; false on timeout.
  bool pump(int timeout_ms, bool& closed) {
    pollfd p{_fd, POLLIN, 0};
    if (poll(&p, 1, timeout_ms) <= 0) return false;
    char buf[65536];
    ssize_t n = ::recv(_fd, buf, sizeof buf, 0);
    if (n <= 0) {
      closed = true;
      return true;
    }
    _session.feed(buf, static_cast<size_t>(n));
    auto st = _session.read(_plain);
    flush();
    if (st != relay::tls::session::status::ok) closed = true;
    return true;
  }

  int _fd = -1;
  relay::tls::session _session;
  std::string _plain;
};

// Pulls "key":"value" or "key":number out of a small JSON answer.
inline std::string field(const std::string& json, const std::string& key) {
  std::string pat = "\"" + key + "\":";
  auto p = json.find(pat);
  if (p == std::string::npos) return {};
  p += pat.size();
  if (json[p] == '"') return json.substr(p + 1, json.find('"', p + 1) - p - 1);
  auto end = json.find_first_of(",}]", p);
  return json.substr(p, end - p);
}

}  // namespace test
