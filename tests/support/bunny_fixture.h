// bunny and relayctl as real processes, next to a relay_process.
#pragma once

#include <netinet/in.h>
#include <sys/socket.h>

#include "relay_fixture.h"

namespace test {

// A loopback port that was free a moment ago (for restarting relay on the
// same address).
inline uint16_t free_port() {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a);
  socklen_t len = sizeof a;
  getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  close(fd);
  return ntohs(a.sin_port);
}

inline std::string handler_path(const std::string& name) {
  return env_or_fail("HANDLERS_DIR") + "/" + name;
}

struct bunny_options {
  std::string who = "worker";            // client certificate; empty: none (then give api_key)
  std::string queues = R"(["render"])";  // JSON array
  int concurrency = 2;
  int lease_ms = 3000;
  std::string handler;                    // JSON for "handler"
  std::string server_name = "localhost";
  std::vector<std::string> extra_args;
  std::string api_key;  // non-empty: written to api.key, which api_key_file names
};

class bunny_process {
 public:
  bunny_process(const relay_process& relay, bunny_options o, const std::string& name = "bunny")
      : bunny_process(relay.api_port, std::move(o), name) {}

  bunny_process(uint16_t relay_port, bunny_options o, const std::string& name = "bunny") {
    const std::string& p = pki();
    // The bunny's own copy of its certificate, so a test can rotate it.
    std::string client_cert = R"("cert": null, "key": null)";
    if (!o.who.empty()) {
      write_file(dir / "tls.crt", read_file(p + "/" + o.who + ".crt"));
      write_file(dir / "tls.key", read_file(p + "/" + o.who + ".key"));
      client_cert = R"("cert": "tls.crt", "key": "tls.key")";
    }
    std::string api_key_file = "null";
    if (!o.api_key.empty()) {
      write_file(dir / "api.key", o.api_key + "\n");
      api_key_file = "\"api.key\"";
    }
    if (o.handler.empty()) o.handler = R"({"exec": [")" + handler_path("square.sh") + R"("], "timeout_ms": 10000})";
    write_file(dir / "bunny.json", R"({
      "relay": {"urls": ["https://127.0.0.1:)" + std::to_string(relay_port) + R"("], "server_name": ")" +
                                          o.server_name + R"("},
      "tls": {)" + client_cert + R"(, "ca": ")" + p + R"(/ca.crt", "reload_check_ms": 200},
      "api_key_file": )" + api_key_file + R"(,
      "queues": )" + o.queues + R"(, "concurrency": )" + std::to_string(o.concurrency) + R"(,
      "lease_ms": )" + std::to_string(o.lease_ms) + R"(, "handler": )" + o.handler + R"(,
      "ops_listen": "127.0.0.1:0",
      "poll": {"wait_ms": 5000, "request_timeout_ms": 10000, "backoff_base_ms": 50, "backoff_max_ms": 500},
      "drain_timeout_ms": 10000})");
    std::vector<std::string> argv{env_or_fail("BUNNY_BIN"), "--config", dir / "bunny.json"};
    argv.insert(argv.end(), o.extra_args.begin(), o.extra_args.end());
    proc = std::make_unique<child>(argv, dir / (name + ".log"));
    auto ops_line = proc->wait_for_line("\"listener\":\"ops\"");
    REQUIRE_MESSAGE(ops_line.has_value(), "bunny did not start: " << proc->log());
    ops = json_field(*ops_line, "addr");
  }

  std::string metrics() const {
    auto r = run({"curl", "-sS", "--max-time", "5", "http://" + ops + "/metrics"}, dir.path());
    return r.out;
  }

  tmpdir dir;
  std::unique_ptr<child> proc;
  std::string ops;
};

// relayctl with `who`'s certificate against `relay`.
inline run_result relayctl(const relay_process& relay, const std::string& who, std::vector<std::string> args,
                           int timeout_ms = 60000, const std::string& stdin_file = "/dev/null") {
  const std::string& p = pki();
  std::vector<std::string> argv{env_or_fail("RELAYCTL_BIN"), "--url", "https://127.0.0.1:" + std::to_string(relay.api_port),
                                "--server-name", "localhost", "--ca", p + "/ca.crt", "--cert", p + "/" + who + ".crt",
                                "--key", p + "/" + who + ".key"};
  argv.insert(argv.end(), args.begin(), args.end());
  return run(argv, relay.dir.path(), timeout_ms, stdin_file);
}

// Waits until `job` reaches a terminal state; returns relay's JSON for it.
inline std::string wait_job(const relay_process& relay, const std::string& job, int seconds = 30) {
  auto r = relay.curl("producer", "GET", "/v1/jobs/" + job + "?wait_ms=" + std::to_string(seconds * 1000), {},
                      {"--max-time", std::to_string(seconds + 10)});
  return r.body;
}

}  // namespace test
