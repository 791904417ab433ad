// beanstalkd's side of bench/compare: put, reserve and delete over its
// plain-text protocol (beanstalkd has no TLS), --connections connections
// each --depth requests deep. Prints one key=value line like relay_bench.
//
//   beanstalk_bench --port P [--connections 16] [--count 200000] [--depth 1]
//                   [--payload-bytes 200] [--server-pid PID]
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "proc.h"

namespace {

using bench::server_cpu_seconds;


// One connection: a state machine over a non-blocking socket.
struct conn {
  int fd = -1;
  std::string in, out;
  long puts_left = 0;
  int outstanding = 0;
  enum { putting, reserving } phase = putting;
  long done = 0;
};

bool send_all(conn& c) {
  while (!c.out.empty()) {
    ssize_t n = ::send(c.fd, c.out.data(), c.out.size(), MSG_NOSIGNAL);
    if (n <= 0) return errno == EAGAIN;
    c.out.erase(0, static_cast<size_t>(n));
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  std::signal(SIGPIPE, SIG_IGN);
  int port = 0, connections = 16, depth = 1, payload_bytes = 200;
  long count = 200000, pid = 0;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string k = argv[i], v = argv[i + 1];
    if (k == "--port") port = std::atoi(v.c_str());
    else if (k == "--connections") connections = std::atoi(v.c_str());
    else if (k == "--count") count = std::atol(v.c_str());
    else if (k == "--depth") depth = std::atoi(v.c_str());
    else if (k == "--payload-bytes") payload_bytes = std::atoi(v.c_str());
    else if (k == "--server-pid") pid = std::atol(v.c_str());
  }
  std::string payload(static_cast<size_t>(payload_bytes), 'p');
  std::string put = "put 0 0 60 " + std::to_string(payload.size()) + "\r\n" + payload + "\r\n";
  std::vector<conn> conns(static_cast<size_t>(connections));
  for (auto& c : conns) {
    c.fd = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(static_cast<uint16_t>(port));
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(c.fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
      std::perror("beanstalk_bench: connect");
      return 2;
    }
    int one = 1;
    setsockopt(c.fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c.puts_left = count / connections;
  }
  double cpu0 = server_cpu_seconds(pid);
  auto t0 = std::chrono::steady_clock::now();
  long jobs = 0;
  bool running = true;
  while (running) {
    running = false;
    std::vector<pollfd> fds;
    for (auto& c : conns) {
      // Keep `depth` requests in flight.
      while (c.outstanding < depth) {
        if (c.phase == conn::putting && c.puts_left > 0) {
          c.out += put;
          --c.puts_left;
        } else if (c.phase == conn::putting) {
          if (c.outstanding) break;
          c.phase = conn::reserving;
          continue;
        } else if (c.done < count / connections) {
          c.out += "reserve-with-timeout 0\r\n";
        } else {
          break;
        }
        ++c.outstanding;
      }
      if (!send_all(c)) return 3;
      if (c.outstanding) running = true;
      fds.push_back({c.fd, POLLIN, 0});
    }
    if (!running) break;
    poll(fds.data(), fds.size(), 5000);
    for (size_t i = 0; i < conns.size(); ++i) {
      conn& c = conns[i];
      if (!(fds[i].revents & POLLIN)) continue;
      char buf[65536];
      ssize_t n = ::recv(c.fd, buf, sizeof buf, 0);
      if (n <= 0) return 4;
      c.in.append(buf, static_cast<size_t>(n));
      for (;;) {
        auto eol = c.in.find("\r\n");
        if (eol == std::string::npos) break;
        std::string line = c.in.substr(0, eol);
        if (line.rfind("RESERVED ", 0) == 0) {
          unsigned long long id = 0, bytes = 0;
          std::sscanf(line.c_str(), "RESERVED %llu %llu", &id, &bytes);
          if (c.in.size() < eol + 2 + bytes + 2) break;  // body not here yet
          c.in.erase(0, eol + 2 + bytes + 2);
          c.out += "delete " + std::to_string(id) + "\r\n";  // its answer takes this slot
          continue;
        }
        c.in.erase(0, eol + 2);
        if (line.rfind("INSERTED", 0) == 0) {
          --c.outstanding;
        } else if (line == "DELETED") {
          --c.outstanding;
          ++c.done;
          ++jobs;
        } else if (line == "TIMED_OUT") {
          --c.outstanding;
        } else {
          std::fprintf(stderr, "beanstalk_bench: unexpected answer %s\n", line.c_str());
          return 5;
        }
      }
      if (!send_all(c)) return 3;
    }
  }
  double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  double cpu = server_cpu_seconds(pid) - cpu0;
  std::printf("scenario=beanstalk_job connections=%d depth=%d payload_bytes=%d jobs=%ld seconds=%.3f jobs_per_sec=%.0f",
              connections, depth, payload_bytes, jobs, elapsed, static_cast<double>(jobs) / elapsed);
  if (pid > 0) std::printf(" server_cpu_s=%.3f server_cpu_us_per_job=%.2f", cpu, jobs ? cpu * 1e6 / static_cast<double>(jobs) : 0);
  std::printf("\n");
  return 0;
}
