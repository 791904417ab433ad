// Load generator for relay on the project's own client code (libuv, the
// TLS session, llhttp): keep-alive mutual-TLS connections, one request in
// flight per connection. Prints one key=value line per run.
//
//   relay_bench submit --port P --pki DIR [--connections 64] [--batch 1]
//                      [--seconds 5] [--payload-bytes 200] [--server-pid PID]
//   relay_bench fill   --port P --pki DIR --count N [--batch 1000] [--connections 4]
//
// server_cpu_us_per_job comes from the server's utime+stime in /proc, the
// figure that stays stable on a shared machine.
#include <uv.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <unistd.h>
#include <vector>

#include "relay/http_client.h"
#include "relay/tls.h"
#include "stats.h"

namespace {

struct args {
  std::string mode, pki, host = "127.0.0.1", queue = "bench";
  uint16_t port = 0;
  int connections = 64, batch = 1, payload_bytes = 200;
  double seconds = 5;
  long count = 0, server_pid = 0;
};

double server_cpu_seconds(long pid) {
  if (pid <= 0) return 0;
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string s((std::istreambuf_iterator<char>(in)), {});
  auto close = s.rfind(')');
  if (close == std::string::npos) return 0;
  std::istringstream rest(s.substr(close + 2));
  std::string f;
  unsigned long long utime = 0, stime = 0;
  for (int i = 3; i <= 15 && rest >> f; ++i) {
    if (i == 14) utime = std::stoull(f);
    if (i == 15) stime = std::stoull(f);
  }
  return static_cast<double>(utime + stime) / static_cast<double>(sysconf(_SC_CLK_TCK));
}

class runner {
 public:
  explicit runner(const args& a) : _a(a) {
    uv_loop_init(&_loop);
    relay::tls::client_options o;
    o.cert_file = a.pki + "/producer.crt";
    o.key_file = a.pki + "/producer.key";
    o.ca_file = a.pki + "/ca.crt";
    std::string error;
    auto ctx = relay::tls::context::make_client(o, error);
    if (!ctx) {
      std::fprintf(stderr, "relay_bench: %s\n", error.c_str());
      std::exit(2);
    }
    for (int i = 0; i < a.connections; ++i) {
      relay::http::client_conn::options co;
      co.host = a.host;
      co.port = a.port;
      co.server_name = "localhost";
      co.tls = ctx;
      _conns.push_back(relay::http::client_conn::create(&_loop, co));
    }
    std::string payload = "\"" + std::string(static_cast<size_t>(std::max(a.payload_bytes - 2, 0)), 'p') + "\"";
    if (a.batch <= 1) {
      _body = "{\"payload\":" + payload + "}";
    } else {
      _body = "[";
      for (int i = 0; i < a.batch; ++i) _body += std::string(i ? "," : "") + "{\"payload\":" + payload + "}";
      _body += "]";
    }
  }
  ~runner() {
    for (auto* c : _conns) c->close();
    uv_run(&_loop, UV_RUN_DEFAULT);
    uv_loop_close(&_loop);
  }

  int run() {
    auto t0 = std::chrono::steady_clock::now();
    _deadline = t0 + std::chrono::duration_cast<std::chrono::steady_clock::duration>(std::chrono::duration<double>(_a.seconds));
    double cpu0 = server_cpu_seconds(_a.server_pid);
    for (size_t i = 0; i < _conns.size(); ++i) next(i);
    while (_in_flight > 0) uv_run(&_loop, UV_RUN_ONCE);
    double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    double cpu = server_cpu_seconds(_a.server_pid) - cpu0;
    double jobs = static_cast<double>(_jobs);
    std::printf("scenario=%s connections=%d batch=%d payload_bytes=%d requests=%llu jobs=%llu errors=%llu seconds=%.3f "
                "jobs_per_sec=%.0f p50_us=%.1f p99_us=%.1f p999_us=%.1f",
                _a.mode.c_str(), _a.connections, _a.batch, _a.payload_bytes, static_cast<unsigned long long>(_requests),
                static_cast<unsigned long long>(_jobs), static_cast<unsigned long long>(_errors), elapsed, jobs / elapsed,
                static_cast<double>(_latency.quantile(0.5)) / 1000, static_cast<double>(_latency.quantile(0.99)) / 1000,
                static_cast<double>(_latency.quantile(0.999)) / 1000);
    if (_a.server_pid > 0) std::printf(" server_cpu_s=%.3f server_cpu_us_per_job=%.2f", cpu, jobs > 0 ? cpu * 1e6 / jobs : 0);
    std::printf("\n");
    return _errors ? 1 : 0;
  }

 private:
  bool more() const {
    if (_a.mode == "fill") return _issued_jobs < static_cast<uint64_t>(_a.count);
    return std::chrono::steady_clock::now() < _deadline;
  }
  void next(size_t i) {
    if (!more()) return;
    ++_in_flight;
    _issued_jobs += static_cast<uint64_t>(std::max(_a.batch, 1));
    auto sent = std::chrono::steady_clock::now();
    _conns[i]->request("POST", "/v1/queues/" + _a.queue + "/jobs", _body,
                       [this, i, sent](const std::string& e, relay::http::client_response& r) {
                         --_in_flight;
                         ++_requests;
                         if (!e.empty() || r.status != 201) {
                           if (++_errors <= 3) std::fprintf(stderr, "relay_bench: %s %d %s\n", e.c_str(), r.status, r.body.substr(0, 200).c_str());
                           return;
                         }
                         _jobs += static_cast<uint64_t>(std::max(_a.batch, 1));
                         _latency.add(static_cast<uint64_t>(
                             std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - sent).count()));
                         next(i);
                       },
                       60000);
  }

  args _a;
  uv_loop_t _loop;
  std::vector<relay::http::client_conn*> _conns;
  std::string _body;
  std::chrono::steady_clock::time_point _deadline;
  uint64_t _requests = 0, _jobs = 0, _errors = 0, _issued_jobs = 0;
  int _in_flight = 0;
  bench::log_histogram _latency;
};

}  // namespace

int main(int argc, char** argv) {
  args a;
  if (argc < 2) {
    std::fprintf(stderr, "usage: relay_bench submit|fill --port P --pki DIR [options]\n");
    return 2;
  }
  a.mode = argv[1];
  for (int i = 2; i + 1 < argc; i += 2) {
    std::string k = argv[i], v = argv[i + 1];
    if (k == "--port") a.port = static_cast<uint16_t>(std::stoi(v));
    else if (k == "--host") a.host = v;
    else if (k == "--pki") a.pki = v;
    else if (k == "--queue") a.queue = v;
    else if (k == "--connections") a.connections = std::stoi(v);
    else if (k == "--batch") a.batch = std::stoi(v);
    else if (k == "--seconds") a.seconds = std::stod(v);
    else if (k == "--payload-bytes") a.payload_bytes = std::stoi(v);
    else if (k == "--count") a.count = std::stol(v);
    else if (k == "--server-pid") a.server_pid = std::stol(v);
    else {
      std::fprintf(stderr, "relay_bench: unknown option %s\n", k.c_str());
      return 2;
    }
  }
  if ((a.mode != "submit" && a.mode != "fill") || !a.port || a.pki.empty()) {
    std::fprintf(stderr, "relay_bench: need a mode (submit|fill), --port and --pki\n");
    return 2;
  }
  return runner(a).run();
}
