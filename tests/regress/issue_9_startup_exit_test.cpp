// Issue 9: a start-up failure is an exit, never a signal. relay with a
// journal.dir that could not be created aborted in uv_close (exit 134), bunny
// with a missing tls.cert logged start_failed and then segfaulted in
// agent::begin_drain (exit 139). Every case below must exit 1 with exactly one
// error-level line naming the file, key or address, and nothing else on
// stderr but JSON log lines (so a sanitizer report fails the test too).
#include <doctest/doctest.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <string>
#include <vector>

#include "../support/bunny_fixture.h"

namespace {

// A socket listening on a loopback port, so that the port is in use.
class busy_port {
 public:
  busy_port() {
    uint16_t port = 0;
    _fd = test::loopback_listener(1, port);
    _addr = "127.0.0.1:" + std::to_string(port);
  }
  busy_port(const busy_port&) = delete;
  busy_port& operator=(const busy_port&) = delete;
  ~busy_port() { close(_fd); }
  const std::string& addr() const { return _addr; }

 private:
  int _fd = -1;
  std::string _addr;
};

struct failure_case {
  std::string name;
  std::vector<std::string> args;  // after the binary
  std::vector<std::string> named;  // what the error line must mention
};

// Runs one case and checks exit 1, one error line naming `named`, and
// nothing on stderr but JSON lines.
void expect_clean_failure(const std::string& bin, const failure_case& c, const std::string& scratch) {
  INFO("case: " << c.name);
  std::vector<std::string> argv{bin};
  argv.insert(argv.end(), c.args.begin(), c.args.end());
  auto r = test::run(argv, scratch, 30000);
  INFO("stderr: " << r.err);
  CHECK_EQ(r.exit_code, 1);
  std::vector<std::string> errors;
  for (const auto& line : test::lines(r.err)) {
    CHECK_MESSAGE(line.rfind("{\"event\":", 0) == 0, "not a log line: " << line);
    if (line.find("\"level\":\"error\"") != std::string::npos) errors.push_back(line);
  }
  CHECK_EQ(errors.size(), 1u);
  if (errors.size() != 1) return;  // the other cases still run
  CHECK_EQ(errors[0].rfind("{\"event\":\"start_failed\"", 0), 0u);
  for (const auto& n : c.named) CHECK_MESSAGE(errors[0].find(n) != std::string::npos, "does not name " << n);
}

}  // namespace

TEST_CASE("Every relay start-up failure exits 1 with one error line naming the file, key or address") {
  const std::string& p = test::pki();
  test::tmpdir dir;
  test::write_file(dir / "policy.json", test::default_policy());
  test::write_file(dir / "garbage.crt", "not a certificate\n");
  test::write_file(dir / "relay.json", R"({"listen": "127.0.0.1:0", "ops_listen": "127.0.0.1:0",
    "tls": {"cert": ")" + p + R"(/server.crt", "key": ")" + p + R"(/server.key", "client_ca": ")" + p + R"(/ca.crt"},
    "policy": "policy.json", "journal": {"dir": "journal"}})");
  const std::string cfg = dir / "relay.json";
  busy_port busy;
  // Root reads files whatever their mode, so "unreadable" here is a
  // directory where a file belongs or a path under a non-directory.
  std::vector<failure_case> cases{
      {"tls.cert missing", {"--config", cfg, "--set", "tls.cert=" + (dir / "missing.crt")}, {"tls.cert", dir / "missing.crt"}},
      {"tls.cert not a certificate", {"--config", cfg, "--set", "tls.cert=" + (dir / "garbage.crt")}, {dir / "garbage.crt"}},
      {"tls.key a directory", {"--config", cfg, "--set", "tls.key=" + dir.path()}, {"tls.key", dir.path()}},
      {"tls.client_ca under a non-directory", {"--config", cfg, "--set", "tls.client_ca=/dev/null/ca.crt"},
       {"tls.client_ca", "/dev/null/ca.crt"}},
      {"tls.crl missing", {"--config", cfg, "--set", "tls.crl=" + (dir / "missing.crl")}, {"tls.crl", dir / "missing.crl"}},
      {"policy a directory", {"--config", cfg, "--set", "policy=" + dir.path()}, {"policy", dir.path()}},
      {"policy missing", {"--config", cfg, "--set", "policy=" + (dir / "nopolicy.json")}, {"policy", dir / "nopolicy.json"}},
      {"config file missing", {"--config", dir / "missing.json"}, {dir / "missing.json"}},
      {"config file a directory", {"--config", dir.path()}, {dir.path()}},
      {"journal.dir not creatable", {"--config", cfg, "--journal-dir", "/dev/null/journal"}, {"journal.dir", "/dev/null/journal"}},
      {"journal.dir not writable", {"--config", cfg, "--journal-dir", "/proc"}, {"journal.dir", "/proc"}},
      {"API port in use", {"--config", cfg, "--listen", busy.addr()}, {"api listener", busy.addr()}},
      {"ops port in use", {"--config", cfg, "--ops-listen", busy.addr()}, {"ops listener", busy.addr()}},
  };
  const std::string bin = test::env_or_fail("RELAY_BIN");
  for (const auto& c : cases) expect_clean_failure(bin, c, dir.path());
}

TEST_CASE("Every bunny start-up failure exits 1 with one error line naming the file, key or address") {
  const std::string& p = test::pki();
  test::tmpdir dir;
  test::write_file(dir / "bunny.json", R"({
    "relay": {"urls": ["https://127.0.0.1:)" + std::to_string(test::free_port()) + R"("], "server_name": "localhost"},
    "tls": {"cert": ")" + p + R"(/worker.crt", "key": ")" + p + R"(/worker.key", "ca": ")" + p + R"(/ca.crt"},
    "queues": ["render"], "handler": {"exec": [")" + test::handler_path("square.sh") + R"("]},
    "ops_listen": "127.0.0.1:0"})");
  const std::string cfg = dir / "bunny.json";
  busy_port busy;
  std::vector<failure_case> cases{
      {"tls.cert missing", {"--config", cfg, "--set", "tls.cert=" + (dir / "missing.crt")}, {"tls.cert", dir / "missing.crt"}},
      {"tls.key a directory", {"--config", cfg, "--set", "tls.key=" + dir.path()}, {"tls.key", dir.path()}},
      {"tls.ca under a non-directory", {"--config", cfg, "--set", "tls.ca=/dev/null/ca.crt"}, {"tls.ca", "/dev/null/ca.crt"}},
      {"api_key_file missing", {"--config", cfg, "--set", "api_key_file=" + (dir / "missing.key")}, {dir / "missing.key"}},
      {"config file missing", {"--config", dir / "missing.json"}, {dir / "missing.json"}},
      {"ops port in use", {"--config", cfg, "--set", "ops_listen=" + busy.addr()}, {"ops listener", busy.addr()}},
  };
  const std::string bin = test::env_or_fail("BUNNY_BIN");
  for (const auto& c : cases) expect_clean_failure(bin, c, dir.path());
}
