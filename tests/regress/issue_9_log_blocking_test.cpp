// Issue 9: log writes could block the loop. relay wrote every line to stderr
// synchronously, so a log collector that stopped reading its pipe stalled
// relay, and every failed handshake was a line an unauthenticated peer could
// cause. Here relay's stderr is a real pipe that the test stops reading; a
// flood of failed handshakes from many loopback addresses (so that repeats do
// not collapse) fills the pipe and then relay's log buffer. relay must keep
// serving meanwhile, count what it drops, report the drop once the pipe is
// read again, and still write its last lines when it stops.
#include <doctest/doctest.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>

#include <chrono>
#include <string>
#include <vector>

#include "../support/relay_fixture.h"

namespace {

using clock_type = std::chrono::steady_clock;

// relay with stderr on a pipe whose reading end the test holds.
class piped_relay {
 public:
  piped_relay() {
    const std::string& p = test::pki();
    test::write_file(dir / "policy.json", test::default_policy());
    test::write_file(dir / "relay.json", R"({"listen": "127.0.0.1:0", "ops_listen": "127.0.0.1:0",
      "tls": {"cert": ")" + p + R"(/server.crt", "key": ")" + p + R"(/server.key", "client_ca": ")" + p + R"(/ca.crt"},
      "policy": "policy.json", "journal": {"dir": "journal"}, "limits": {"max_connections_per_ip": 1}})");
    int fds[2];
    REQUIRE_EQ(pipe2(fds, O_CLOEXEC), 0);
    _read_fd = fds[0];
    // The smallest pipe the kernel allows, so that it fills quickly.
    fcntl(fds[1], F_SETPIPE_SZ, 4096);
    std::string relay_bin = test::env_or_fail("RELAY_BIN");
    std::string cfg = dir / "relay.json";
    std::string out = dir / "relay.stdout";
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_addopen(&fa, 1, out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    posix_spawn_file_actions_adddup2(&fa, fds[1], 2);
    std::vector<char*> argv{relay_bin.data(), const_cast<char*>("--config"), cfg.data(), nullptr};
    REQUIRE_EQ(posix_spawn(&_pid, argv[0], &fa, nullptr, argv.data(), environ), 0);
    posix_spawn_file_actions_destroy(&fa);
    ::close(fds[1]);
  }
  piped_relay(const piped_relay&) = delete;
  piped_relay& operator=(const piped_relay&) = delete;
  ~piped_relay() {
    if (_pid > 0 && !_exited) {
      ::kill(_pid, SIGKILL);
      test::wait_exit(_pid, 5000);
    }
    ::close(_read_fd);
  }

  // Reads what relay wrote until `needle` is in it (true) or timeout_ms
  // passes or relay closes its end.
  bool read_until(const std::string& needle, int timeout_ms) {
    auto until = clock_type::now() + std::chrono::milliseconds(timeout_ms);
    size_t from = _searched;
    for (;;) {
      size_t at = text.find(needle, from);
      if (at != std::string::npos) {
        _searched = at + needle.size();
        return true;
      }
      // Only the new text needs searching next time (plus an overlap).
      from = text.size() >= needle.size() ? text.size() - needle.size() + 1 : 0;
      if (!read_some(until)) return false;
    }
  }
  // Reads until relay closes its stderr (it exited) or timeout_ms passes.
  void read_to_end(int timeout_ms) {
    auto until = clock_type::now() + std::chrono::milliseconds(timeout_ms);
    while (read_some(until)) {
    }
  }
  void signal_term() const { ::kill(_pid, SIGTERM); }

  pid_t pid() const { return _pid; }
  int wait(int timeout_ms) {
    int rc = test::wait_exit(_pid, timeout_ms);
    if (rc >= 0) _exited = true;
    return rc;
  }

  test::tmpdir dir;
  std::string text;  // everything read from relay's stderr so far

 private:
  pid_t _pid = -1;
  bool _exited = false;
  int _read_fd = -1;
  size_t _searched = 0;  // where the next read_until() starts looking

  // One read; false at the end of the pipe or at `until`.
  bool read_some(clock_type::time_point until) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(until - clock_type::now()).count();
    if (left <= 0) return false;
    pollfd p{_read_fd, POLLIN, 0};
    if (poll(&p, 1, static_cast<int>(left)) <= 0) return clock_type::now() < until;
    char buf[65536];
    ssize_t n = ::read(_read_fd, buf, sizeof buf);
    if (n <= 0) return false;
    text.append(buf, static_cast<size_t>(n));
    return true;
  }
};

std::string line_with(const std::string& text, const std::string& needle) {
  for (const auto& l : test::lines(text))
    if (l.find(needle) != std::string::npos) return l;
  return {};
}

// One plaintext "handshake" from 127.x.y.z, which relay's TLS refuses.
// Returns the socket, or -1.
// A connection from a source that already has one: refused at once with a
// connection_refused line (limits.max_connections_per_ip is 1). Refused
// handshakes are audit lines, which relay budgets per second; these
// operational lines are not, so they are what fills the pipe.
int bad_handshake(uint32_t n, uint16_t port);
int refused_connection(uint32_t n, uint16_t port) { return bad_handshake(n, port); }

int bad_handshake(uint32_t n, uint16_t port) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  sockaddr_in src{};
  src.sin_family = AF_INET;
  // 127.2.0.1 upwards, skipping .0 and .255: a new source for every attempt.
  src.sin_addr.s_addr = htonl((127u << 24) | ((2u + n / (254 * 254)) << 16) | ((1u + n / 254 % 254) << 8) | (1u + n % 254));
  sockaddr_in dst{};
  dst.sin_family = AF_INET;
  dst.sin_port = htons(port);
  dst.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (bind(fd, reinterpret_cast<sockaddr*>(&src), sizeof src) != 0 ||
      connect(fd, reinterpret_cast<sockaddr*>(&dst), sizeof dst) != 0) {
    ::close(fd);
    return -1;
  }
  static const char junk[] = "GET / HTTP/1.1\r\nHost: x\r\n\r\n";
  if (::send(fd, junk, sizeof junk - 1, MSG_NOSIGNAL) < 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

// Waits until relay has closed every socket in `fds` (it refused the
// handshake); false if one is still open after timeout_ms.
bool wait_closed(std::vector<int>& fds, int timeout_ms) {
  auto until = clock_type::now() + std::chrono::milliseconds(timeout_ms);
  bool all = true;
  for (int fd : fds) {
    bool closed = false;
    while (!closed) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(until - clock_type::now()).count();
      pollfd p{fd, POLLIN, 0};
      if (left <= 0 || poll(&p, 1, static_cast<int>(left)) <= 0) break;
      char buf[4096];
      if (::recv(fd, buf, sizeof buf, 0) <= 0) closed = true;
    }
    all = all && closed;
    ::close(fd);
  }
  fds.clear();
  return all;
}

uint64_t dropped_metric(const std::string& metrics) {
  auto p = metrics.find("\nrelay_log_lines_dropped_total ");
  if (p == std::string::npos) return 0;
  return std::stoull(metrics.substr(p + std::string("\nrelay_log_lines_dropped_total ").size()));
}

}  // namespace

TEST_CASE("relay keeps serving while its stderr pipe is full, and counts and reports the log lines it drops") {
  piped_relay relay;
  REQUIRE_MESSAGE(relay.read_until("\"event\":\"relay_started\"", 20000), "relay did not start: " << relay.text);
  // Order and completeness under normal load: both listeners, then started.
  std::string api = test::json_field(line_with(relay.text, "\"listener\":\"api\""), "addr");
  std::string ops = test::json_field(line_with(relay.text, "\"listener\":\"ops\""), "addr");
  REQUIRE_FALSE(api.empty());
  REQUIRE_FALSE(ops.empty());
  CHECK_LT(relay.text.find("\"listener\":\"ops\""), relay.text.find("\"event\":\"relay_started\""));
  uint16_t api_port = static_cast<uint16_t>(std::stoi(api.substr(api.rfind(':') + 1)));

  const std::string& p = test::pki();
  auto healthz = [&] {
    return test::run({"curl", "-sS", "--max-time", "10", "-o", "/dev/null", "-w", "%{http_code}", "http://" + ops + "/healthz"},
                     relay.dir.path(), 20000);
  };
  auto metrics = [&] {
    return test::run({"curl", "-sS", "--max-time", "10", "http://" + ops + "/metrics"}, relay.dir.path(), 20000).out;
  };
  auto submit = [&] {
    test::write_file(relay.dir / "job.json", R"({"payload": {"n": 1}})");
    return test::run({"curl", "-sS", "--max-time", "10", "--cacert", p + "/ca.crt", "--cert", p + "/producer.crt", "--key",
                      p + "/producer.key", "-o", "/dev/null", "-w", "%{http_code}", "-H", "Content-Type: application/json",
                      "--data-binary", "@" + (relay.dir / "job.json"), "https://" + api + "/v1/queues/render/jobs"},
                     relay.dir.path(), 20000);
  };
  CHECK_EQ(dropped_metric(metrics()), 0u);

  // From here on nobody reads relay's stderr. The flood is bounded in count
  // and time; it stops as soon as relay reports a drop.
  constexpr uint32_t max_attempts = 60000;
  const auto deadline = clock_type::now() + std::chrono::seconds(120);
  uint32_t attempts = 0;
  uint64_t dropped = 0;
  bool relay_kept_up = true;
  std::vector<int> open;
  while (attempts < max_attempts && clock_type::now() < deadline) {
    for (int i = 0; i < 64 && attempts < max_attempts; ++i, ++attempts) {
      int fd = bad_handshake(attempts, api_port);
      if (fd >= 0) open.push_back(fd);
      int second = refused_connection(attempts, api_port);
      if (second >= 0) open.push_back(second);
    }
    // With a blocking log write, relay stalls on the full pipe and these
    // sockets are never closed.
    if (!wait_closed(open, 10000)) {
      relay_kept_up = false;
      break;
    }
    if (attempts % 2048 == 0) {
      auto h = healthz();
      REQUIRE_MESSAGE(h.out == "200", "/healthz while the pipe was full: curl exit " << h.exit_code << " " << h.err);
      dropped = dropped_metric(metrics());
      if (dropped > 0) break;
    }
  }
  MESSAGE("failed handshakes sent: " << attempts << ", log lines dropped: " << dropped);
  CHECK_MESSAGE(relay_kept_up, "relay stopped closing refused handshakes after " << attempts);
  REQUIRE_GT(dropped, 0u);

  // Still serving, on both listeners, with the pipe still full.
  auto h = healthz();
  CHECK_EQ(h.out, "200");
  auto s = submit();
  CHECK_MESSAGE(s.out == "201", "submit while the pipe was full: " << s.out << " " << s.err);
  CHECK_GE(dropped_metric(metrics()), dropped);

  // Reading again: the buffered lines come out, then the report of the drop.
  REQUIRE_MESSAGE(relay.read_until("\"event\":\"log_lines_dropped\"", 60000), "no drop report");
  std::string report = line_with(relay.text, "\"event\":\"log_lines_dropped\"");
  CHECK_GT(std::stoull(test::field(report, "lines")), 0u);

  // The last lines are written at exit.
  relay.signal_term();
  CHECK_EQ(relay.wait(30000), 0);
  relay.read_to_end(10000);
  size_t drained = relay.text.find("\"event\":\"draining\"");
  size_t stopped = relay.text.find("\"event\":\"stopped\"");
  REQUIRE_NE(drained, std::string::npos);
  REQUIRE_NE(stopped, std::string::npos);
  CHECK_LT(relay.text.find("\"event\":\"log_lines_dropped\""), drained);
  CHECK_LT(drained, stopped);
}
