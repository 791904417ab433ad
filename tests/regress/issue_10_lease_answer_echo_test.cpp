// Issue 10, "Secrets hygiene": bunny logged the first 300 bytes of a lease
// answer it could not read (bad_lease_answer), and a lease answer carries
// payloads. A relay stand-in answers bunny's lease request with a body
// holding a marker; bunny's log must name the problem without the bytes.
#include <doctest/doctest.h>
#include <sys/socket.h>

#include <atomic>
#include <thread>

#include "../support/bunny_fixture.h"

namespace {

// One TLS connection at a time on loopback: reads a request and answers
// every request on it with `answer` until the peer goes or `stop` is set.
class canned_relay {
 public:
  explicit canned_relay(std::string answer) : _answer(std::move(answer)), _ctx(test::server_tls()) {
    _fd = test::loopback_listener(8, port);
    _thread = std::thread([this] { serve(); });
  }
  canned_relay(const canned_relay&) = delete;
  canned_relay& operator=(const canned_relay&) = delete;
  ~canned_relay() {
    _stop = true;
    ::shutdown(_fd, SHUT_RDWR);
    _thread.join();
    ::close(_fd);
  }
  uint16_t port = 0;
  std::atomic<int> answered{0};

 private:
  void serve() {
    while (!_stop) {
      pollfd p{_fd, POLLIN, 0};
      if (poll(&p, 1, 100) <= 0) continue;
      int c = accept(_fd, nullptr, nullptr);
      if (c < 0) continue;
      relay::tls::session s(_ctx);
      std::string plain, out;
      auto until = std::chrono::steady_clock::now() + std::chrono::seconds(5);
      while (!_stop && std::chrono::steady_clock::now() < until) {
        pollfd q{c, POLLIN, 0};
        if (poll(&q, 1, 100) <= 0) continue;
        char buf[65536];
        ssize_t n = recv(c, buf, sizeof buf, 0);
        if (n <= 0) break;
        s.feed(buf, static_cast<size_t>(n));
        if (s.read(plain) == relay::tls::session::status::error) break;
        // Any complete request head gets the canned answer (lease requests
        // are small; their bodies arrive with the head).
        if (plain.find("\r\n\r\n") != std::string::npos) {
          plain.clear();
          s.write("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: " +
                  std::to_string(_answer.size()) + "\r\n\r\n" + _answer);
          ++answered;
        }
        s.take_output(out);
        if (!out.empty() && ::send(c, out.data(), out.size(), MSG_NOSIGNAL) < 0) break;
        out.clear();
      }
      ::close(c);
    }
  }

  std::string _answer;
  std::shared_ptr<const relay::tls::context> _ctx;
  int _fd = -1;
  std::atomic<bool> _stop{false};
  std::thread _thread;
};

}  // namespace

TEST_CASE("bunny does not log the body of a lease answer it cannot read") {
  for (const char* body : {R"({"not_jobs":"PAYLOAD-MARKER-1"})",
                           R"({"jobs":[{"payload":"PAYLOAD-MARKER-1","attempt":1}]})"}) {
    CAPTURE(body);
    canned_relay fake(body);
    test::bunny_process bunny(fake.port, {});
    auto line = bunny.proc->wait_for_line("\"event\":\"bad_lease_answer\"", 10000);
    REQUIRE_MESSAGE(line.has_value(), bunny.proc->log());
    CHECK(line->find("\"reason\":") != std::string::npos);
    CHECK(bunny.proc->log().find("PAYLOAD-MARKER") == std::string::npos);
  }
}
