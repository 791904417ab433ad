// A plain-TCP HTTP service on a loopback ephemeral port, run on its own
// thread, that answers exactly the bytes a test scripts: interim 1xx
// answers, HTTP/1.0 bodies ended by closing the connection, keep-alive.
// It counts what it saw (connections accepted, bytes and requests
// received), so a test can assert what a client did on the wire -- the
// project's own server would normalise precisely what these tests look at.
//
// Requests are read as a head up to CRLFCRLF plus a Content-Length body
// (the client under test sends nothing else). Every wait is bounded: the
// thread polls in 50 ms steps and stops when the object is destroyed.
#pragma once

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>
#include <uv.h>

#include <atomic>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "relay/http_client.h"

namespace test {

class raw_http_server {
 public:
  struct answer {
    // Written one after another, with `pause_ms` between them, so that a
    // client sees them in separate reads.
    std::vector<std::string> pieces;
    uint32_t pause_ms = 0;
    bool close_after = false;  // close the connection after the last piece
  };
  // Given one whole request (head and body); runs on the server's thread.
  using responder = std::function<answer(const std::string& request)>;

  explicit raw_http_server(responder r) : _respond(std::move(r)) {
    _listen = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (_listen < 0 || bind(_listen, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 || listen(_listen, 16) != 0)
      std::abort();
    socklen_t len = sizeof a;
    getsockname(_listen, reinterpret_cast<sockaddr*>(&a), &len);
    _port = ntohs(a.sin_port);
    _thread = std::thread([this] { run(); });
  }
  raw_http_server(const raw_http_server&) = delete;
  raw_http_server& operator=(const raw_http_server&) = delete;
  ~raw_http_server() {
    _stop = true;
    _thread.join();
    for (auto& c : _conns) ::close(c.fd);
    ::close(_listen);
  }

  uint16_t port() const { return _port; }
  std::string address() const { return "127.0.0.1:" + std::to_string(_port); }
  size_t connections() const { return _accepted; }
  size_t bytes_received() const { return _bytes; }
  size_t requests() const { return _requests; }
  // The requests seen so far, each as received.
  std::vector<std::string> seen() const {
    std::lock_guard<std::mutex> g(_mutex);
    return _seen;
  }

 private:
  struct conn {
    int fd;
    std::string in;
  };

  // The length of the first whole request in `in`, or 0.
  static size_t whole_request(const std::string& in) {
    size_t end = in.find("\r\n\r\n");
    if (end == std::string::npos) return 0;
    size_t length = 0;
    std::string head = in.substr(0, end);
    for (char& c : head) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    size_t at = head.find("\r\ncontent-length:");
    if (at != std::string::npos) length = std::strtoul(head.c_str() + at + 17, nullptr, 10);
    return in.size() >= end + 4 + length ? end + 4 + length : 0;
  }

  static void write_all(int fd, const std::string& s) {
    size_t off = 0;
    while (off < s.size()) {
      ssize_t n = ::send(fd, s.data() + off, s.size() - off, MSG_NOSIGNAL);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) return;  // the client went away; the test sees that on its side
      off += static_cast<size_t>(n);
    }
  }

  void run() {
    while (!_stop) {
      std::vector<pollfd> fds{{_listen, POLLIN, 0}};
      for (auto& c : _conns) fds.push_back({c.fd, POLLIN, 0});
      if (::poll(fds.data(), fds.size(), 50) <= 0) continue;
      if (fds[0].revents & POLLIN) {
        int fd = accept4(_listen, nullptr, nullptr, SOCK_CLOEXEC);
        if (fd >= 0) {
          _conns.push_back({fd, {}});
          ++_accepted;
        }
      }
      std::vector<int> closed;
      for (size_t i = 1; i < fds.size(); ++i) {
        if (!(fds[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
        conn& c = _conns[i - 1];
        char buf[16384];
        ssize_t n = ::recv(c.fd, buf, sizeof buf, 0);
        if (n <= 0) {
          closed.push_back(c.fd);
          continue;
        }
        _bytes += static_cast<size_t>(n);
        c.in.append(buf, static_cast<size_t>(n));
        bool close_now = false;
        while (size_t len = whole_request(c.in)) {
          std::string req = c.in.substr(0, len);
          c.in.erase(0, len);
          ++_requests;
          {
            std::lock_guard<std::mutex> g(_mutex);
            _seen.push_back(req);
          }
          answer a = _respond(req);
          for (size_t p = 0; p < a.pieces.size(); ++p) {
            if (p && a.pause_ms) std::this_thread::sleep_for(std::chrono::milliseconds(a.pause_ms));
            write_all(c.fd, a.pieces[p]);
          }
          if (a.close_after) {
            close_now = true;
            break;
          }
        }
        if (close_now) closed.push_back(c.fd);
      }
      for (int fd : closed) {
        for (size_t i = 0; i < _conns.size(); ++i) {
          if (_conns[i].fd != fd) continue;
          ::close(fd);
          _conns.erase(_conns.begin() + static_cast<std::ptrdiff_t>(i));
          break;
        }
      }
    }
  }

  responder _respond;
  int _listen = -1;
  uint16_t _port = 0;
  std::thread _thread;
  std::atomic<bool> _stop{false};
  std::atomic<size_t> _accepted{0}, _bytes{0}, _requests{0};
  mutable std::mutex _mutex;
  std::vector<std::string> _seen;
  std::vector<conn> _conns;  // the server thread's only
};

// What one request of the project's client got: recorded by the callback
// record() makes.
struct client_outcome {
  bool done = false;
  relay::http::client_error error;
  relay::http::client_response response;
};

inline relay::http::client_conn::callback record(client_outcome& o) {
  return [&o](const relay::http::client_error& e, relay::http::client_response& r) {
    o.done = true;
    o.error = e;
    o.response = std::move(r);
  };
}

// Runs `loop` until `done` or `timeout_ms` passes; whether `done`.
template <typename Done>
bool run_until(uv_loop_t* loop, Done done, int timeout_ms = 10000) {
  auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  while (!done() && std::chrono::steady_clock::now() < until) {
    uv_run(loop, UV_RUN_NOWAIT);
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return done();
}

}  // namespace test
