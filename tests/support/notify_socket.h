// The service manager's side of systemd's readiness protocol, for tests: a
// datagram socket whose path goes into NOTIFY_SOCKET of the processes the
// test starts while the object is in scope.
#pragma once

#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>

#include "tmpdir.h"

namespace test {

class notify_socket {
 public:
  notify_socket() {
    std::string path = _dir / "notify";
    _fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, path.c_str(), sizeof addr.sun_path - 1);
    if (_fd < 0 || bind(_fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) _fd = -1;
    setenv("NOTIFY_SOCKET", path.c_str(), 1);
  }
  notify_socket(const notify_socket&) = delete;
  notify_socket& operator=(const notify_socket&) = delete;
  ~notify_socket() {
    unsetenv("NOTIFY_SOCKET");
    if (_fd >= 0) close(_fd);
  }
  bool ok() const { return _fd >= 0; }

  // The next notification, or nothing after timeout_ms.
  std::optional<std::string> next(int timeout_ms = 10000) const {
    pollfd p{_fd, POLLIN, 0};
    if (_fd < 0 || poll(&p, 1, timeout_ms) != 1) return std::nullopt;
    char buf[4096];
    ssize_t n = recv(_fd, buf, sizeof buf, 0);
    if (n < 0) return std::nullopt;
    return std::string(buf, static_cast<size_t>(n));
  }

 private:
  tmpdir _dir;
  int _fd = -1;
};

}  // namespace test
