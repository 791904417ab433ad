// Load generator for relay on the project's own client code: the typed v1
// client (relay/v1_client.h) over keep-alive mutual-TLS connections
// presenting the PKI's client certificates. Each run prints one key=value
// line. Raw http::client_conn is used only where the bench measures raw HTTP
// on purpose: `handshake` (a connection per request, any answer, from relay
// or nginx) and `submit --expect-status` other than 201 (bench/compare's
// nginx `return 200` baseline, which is not relay's API).
//
//   relay_bench SCENARIO --port P --pki DIR [options]
//
// scenarios:
//   submit     single submits, or arrays of --batch, for --seconds
//   fill       --count jobs in arrays of --batch (preloading)
//   drain      preload --count jobs, then lease --batch at a time and
//              complete them (single completes, or one /v1/results per lease)
//   e2e        --producers submitting and --workers long-polling and
//              completing; jobs/s and submit→complete latency
//   idle       --connections workers parked in a long-poll lease; relay's RSS
//              per parked connection; then a burst of submits and the
//              wake-up latency (submit sent → lease answer received)
//   handshake  a new connection (full mTLS handshake) per request
//   scale      submit cost as the queue grows (0, 100k, 1M queued), as the
//              payload grows (100 B to ~1 MiB) and as connections grow (1 to
//              1,024): one line per point
//   failover   --connections producers on each of --port and --port2 (an
//              active/standby pair) submitting one job at a time, retrying
//              every --retry-ms after an error; after --kill-after-ms it
//              SIGKILLs --kill-pid (the leader) and reports the time from
//              the kill to the first 2xx answer to a submit sent after it
//              (necessarily from the new leader); gives up --seconds after
//              the kill (failover_ms=-1)
//
// options: --host H --queue Q --connections N --batch B --seconds S
//          --payload-bytes N --count N --producers N --workers N
//          --server-pid PID (adds server CPU per job, from /proc)
//          --random-payload 1 (submit, fill: every job a different payload of
//          random letters and digits, which compresses poorly, instead of
//          one repeated byte; for journals that compress, like PostgreSQL's
//          TOAST)
//          --host-header NAME (the TLS name to verify; default localhost)
//          failover: --port2 P --kill-pid PID --kill-after-ms MS --retry-ms MS
//          --request-timeout-ms MS
//   large      one keep-alive mTLS connection (a producer's, then a
//              worker's, one request at a time) moving --count jobs of
//              --payload-bytes each, in four steps: submit them all, lease
//              them one by one, complete each with a result of the same
//              size, GET each (the answer carries payload and result). One
//              line per step: jobs/s, server CPU per KB of the step's value
//              (from /proc, with --server-pid) and the server's RSS after it.
//              With --expect-status other than 201 the server is not relay
//              (bench/compare's nginx): steps `post` (a body to any location
//              that reads it), then with --put-prefix P `put` (PUT P<i>, a
//              WebDAV location that stores it) and `get` (GET P<i> back).
#include <uv.h>

#include <chrono>
#include <cerrno>
#include <csignal>
#include <cstring>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <algorithm>
#include <iterator>
#include <functional>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <unistd.h>
#include <utility>
#include <vector>

#include "relay/http_client.h"
#include "relay/tls.h"
#include "relay/v1_client.h"
#include "proc.h"
#include "stats.h"

namespace {

using bench::server_cpu_seconds;
using bench::server_rss_kb;

using clock_type = std::chrono::steady_clock;

struct args {
  std::string mode, pki, host = "127.0.0.1", queue = "bench", server_name = "localhost";
  uint16_t port = 0;
  int connections = 64, batch = 1, payload_bytes = 200, producers = 4, workers = 4;
  double seconds = 5;
  long count = 100000, server_pid = 0;
  int expect_status = 201;  // what a submit answers (nginx's `return 200` in bench/compare)
  bool resume = false;      // handshake: offer the last session ticket
  bool random_payload = false;
  std::string put_prefix;   // large, not relay: where PUT stores bodies
  // failover
  uint16_t port2 = 0;
  long kill_pid = 0;
  int kill_after_ms = 2000, retry_ms = 10, request_timeout_ms = 2000;
};



uint64_t now_ns() {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(clock_type::now().time_since_epoch()).count());
}

class bench_run {
 public:
  explicit bench_run(const args& a) : _a(a) {
    uv_loop_init(&_loop);
    _producer_tls = tls_for("producer");
    _worker_tls = tls_for("worker");
    _payload = std::string(static_cast<size_t>(std::max(a.payload_bytes - 2, 0)), 'p');
  }
  ~bench_run() {
    // A v1 client's callbacks never run once it is destroyed; a raw
    // connection's fail inside close().
    _clients.clear();
    _quiet = true;
    for (auto* c : _conns) c->close();
    uv_run(&_loop, UV_RUN_DEFAULT);
    uv_loop_close(&_loop);
  }

  int run() {
    _cpu0 = server_cpu_seconds(_a.server_pid);
    _t0 = clock_type::now();
    if (_a.mode == "submit" || _a.mode == "fill") submit_load();
    else if (_a.mode == "drain") drain();
    else if (_a.mode == "e2e") e2e();
    else if (_a.mode == "idle") idle();
    else if (_a.mode == "handshake") handshake();
    else if (_a.mode == "scale") return scale(_a);
    else if (_a.mode == "failover") return failover();
    else if (_a.mode == "large") large();
    else return usage();
    return _errors ? 1 : 0;
  }

 private:
  static int usage() {
    std::fprintf(stderr, "relay_bench: unknown scenario\n");
    return 2;
  }

  std::shared_ptr<const relay::tls::context> tls_for(const std::string& who) {
    relay::tls::client_options o;
    o.cert_file = _a.pki + "/" + who + ".crt";
    o.key_file = _a.pki + "/" + who + ".key";
    o.ca_file = _a.pki + "/ca.crt";
    std::string error;
    auto ctx = relay::tls::context::make_client(o, error);
    if (!ctx) {
      std::fprintf(stderr, "relay_bench: %s\n", error.c_str());
      std::exit(2);
    }
    return ctx;
  }

  relay::http::client_conn::options conn_options(const std::shared_ptr<const relay::tls::context>& tls,
                                                 uint16_t port = 0) const {
    relay::http::client_conn::options co;
    co.host = _a.host;
    co.port = port ? port : _a.port;
    co.server_name = _a.server_name;
    co.tls = tls;
    co.connect_timeout_ms = 60000;
    return co;
  }

  // One keep-alive connection speaking relay's v1 API (connected on its
  // first request).
  relay::v1::client* connect(const std::shared_ptr<const relay::tls::context>& tls, uint16_t port = 0,
                             uint32_t request_timeout_ms = 60000) {
    relay::v1::client::options o;
    o.connection = conn_options(tls, port);
    o.connection.connect_timeout_ms = std::min<uint32_t>(o.connection.connect_timeout_ms, request_timeout_ms);
    o.request_timeout_ms = request_timeout_ms;  // a long poll's: its wait plus this
    _clients.push_back(std::make_unique<relay::v1::client>(&_loop, std::move(o)));
    return _clients.back().get();
  }

  // Raw HTTP, for what the bench measures below the API (see the top).
  relay::http::client_conn* connect_raw(const std::shared_ptr<const relay::tls::context>& tls) {
    auto* c = relay::http::client_conn::create(&_loop, conn_options(tls));
    _conns.push_back(c);
    return c;
  }

  // The request body of n jobs, for raw HTTP.
  std::string job_body(int n, const std::string& marker = {}) const {
    std::string one = "{\"payload\":" + payload_json(marker) + "}";
    if (n <= 1) return one;
    std::string b = "[";
    for (int i = 0; i < n; ++i) b += (i ? "," : "") + one;
    return b + "]";
  }

  // One job's payload: a JSON string of --payload-bytes bytes, quotes
  // included, starting with `marker`.
  std::string payload_json(const std::string& marker = {}) const {
    if (_a.random_payload) {
      static const char alphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
      std::string p = marker;
      while (p.size() < _payload.size()) {
        uint64_t r = _rng();
        for (int i = 0; i < 10 && p.size() < _payload.size(); ++i, r >>= 6) p += alphabet[(r & 63) % 62];
      }
      return "\"" + p + "\"";
    }
    return "\"" + marker + _payload.substr(std::min(marker.size(), _payload.size())) + "\"";
  }

  // n jobs: one, or with n > 1 a batch of n.
  relay::v1::submit_request jobs(int n, const std::string& marker = {}) const {
    relay::v1::submit_request r;
    r.queue = _a.queue;
    std::string one = payload_json(marker);
    if (n <= 1) {
      r.payload = std::move(one);
      return r;
    }
    r.batch = true;
    r.payload = "[";
    for (int i = 0; i < n; ++i) r.payload += (i ? "," : "") + (_a.random_payload && i ? payload_json(marker) : one);
    r.payload += "]";
    return r;
  }

  relay::v1::lease_request lease_of(int max, uint32_t wait_ms) const {
    relay::v1::lease_request r;
    r.queue = _a.queue;
    r.max = static_cast<uint32_t>(max);
    r.wait_ms = wait_ms;
    return r;
  }

  void error(const std::string& what, const relay::http::client_error& e, const relay::http::client_response& r) {
    if (_quiet) return;
    if (++_errors <= 3) std::fprintf(stderr, "relay_bench: %s: %s %d %s\n", what.c_str(), e.message.c_str(), r.status, r.body.substr(0, 200).c_str());
  }
  void error(const std::string& what, const relay::v1::error& e) {
    if (_quiet) return;
    if (++_errors <= 3)
      std::fprintf(stderr, "relay_bench: %s: %s: %s %d %s\n", what.c_str(), std::string(e.kind_name()).c_str(),
                   e.message.c_str(), e.status, e.code.c_str());
  }
  // A submit answered 200 (an idempotency key matched), not 201 (created).
  static relay::v1::error not_created() {
    relay::v1::error e;
    e.what = relay::v1::error::kind::bad_answer;
    e.status = 200;
    e.message = "200, not 201";
    return e;
  }
  // A lease answer with a job relay's contract does not allow.
  void error(const std::string& what, const relay::v1::lease_answer& a) {
    relay::v1::error e;
    e.what = relay::v1::error::kind::bad_answer;
    e.message = std::to_string(a.rejected.size()) + " job(s) rejected: " + a.rejected.front().reason;
    error(what, e);
  }

  void report(const std::string& extra = {}) {
    double elapsed = std::chrono::duration<double>(clock_type::now() - _t0).count();
    double cpu = server_cpu_seconds(_a.server_pid) - _cpu0;
    double jobs = static_cast<double>(_jobs);
    std::printf("scenario=%s connections=%zu batch=%d payload_bytes=%d requests=%llu jobs=%llu errors=%llu seconds=%.3f "
                "jobs_per_sec=%.0f p50_us=%.1f p99_us=%.1f p999_us=%.1f",
                _a.mode.c_str(), _clients.size() + _conns.size(), _a.batch, _a.payload_bytes, static_cast<unsigned long long>(_requests),
                static_cast<unsigned long long>(_jobs), static_cast<unsigned long long>(_errors), elapsed, jobs / elapsed,
                static_cast<double>(_latency.quantile(0.5)) / 1000, static_cast<double>(_latency.quantile(0.99)) / 1000,
                static_cast<double>(_latency.quantile(0.999)) / 1000);
    if (_a.server_pid > 0) std::printf(" server_cpu_s=%.3f server_cpu_us_per_job=%.2f", cpu, jobs > 0 ? cpu * 1e6 / jobs : 0);
    // Points of the latency CDF, for plotting.
    std::printf(" cdf_us=");
    const double qs[] = {0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999};
    for (size_t i = 0; i < std::size(qs); ++i)
      std::printf("%s%g:%.1f", i ? "," : "", qs[i], static_cast<double>(_latency.quantile(qs[i])) / 1000);
    std::printf("%s\n", extra.c_str());
    std::fflush(stdout);
  }

  bool time_left() const { return clock_type::now() - _t0 < std::chrono::duration<double>(_a.seconds); }
  void run_until(const std::function<bool()>& done) {
    while (!done() && uv_run(&_loop, UV_RUN_ONCE)) {
    }
  }

  // ---- submit / fill ----
  void submit_load() {
    bool fill = _a.mode == "fill";
    long rss0 = fill ? server_rss_kb(_a.server_pid) : 0;
    uint64_t issued = 0;
    auto more = [&] {
      if (fill ? issued >= static_cast<uint64_t>(_a.count) : !time_left()) return false;
      issued += static_cast<uint64_t>(_a.batch);
      ++_in_flight;
      return true;
    };
    if (_a.expect_status != 201) {
      // Not relay (bench/compare's nginx `return 200`): raw HTTP, the status
      // alone checked.
      std::string body = job_body(_a.batch);
      std::function<void(relay::http::client_conn*)> next = [&](relay::http::client_conn* c) {
        if (!more()) return;
        uint64_t sent = now_ns();
        c->request("POST", "/v1/queues/" + _a.queue + "/jobs", body, [&, c, sent](const relay::http::client_error& e, relay::http::client_response& r) {
          --_in_flight;
          ++_requests;
          if (e || r.status != _a.expect_status) return error("submit", e, r);
          _jobs += static_cast<uint64_t>(_a.batch);
          _latency.add(now_ns() - sent);
          next(c);
        }, 60000);
      };
      for (int i = 0; i < _a.connections; ++i) next(connect_raw(_producer_tls));
      run_until([&] { return _in_flight == 0; });
    } else {
      const relay::v1::submit_request req = jobs(_a.batch);
      std::function<void(relay::v1::client*)> next = [&](relay::v1::client* c) {
        if (!more()) return;
        uint64_t sent = now_ns();
        c->submit(_a.random_payload ? jobs(_a.batch) : req, [&, c, sent](const relay::v1::error& e, relay::v1::submitted& s) {
          --_in_flight;
          ++_requests;
          if (e) return error("submit", e);
          if (!s.created) return error("submit", not_created());
          _jobs += static_cast<uint64_t>(_a.batch);
          _latency.add(now_ns() - sent);
          next(c);
        });
      };
      for (int i = 0; i < _a.connections; ++i) next(connect(_producer_tls));
      run_until([&] { return _in_flight == 0; });
    }
    if (fill && _a.server_pid > 0 && _jobs > 0) {
      long rss1 = server_rss_kb(_a.server_pid);
      char extra[160];
      std::snprintf(extra, sizeof extra, " rss_before_kb=%ld rss_after_kb=%ld rss_per_job_bytes=%.0f", rss0, rss1,
                    static_cast<double>(rss1 - rss0) * 1024 / static_cast<double>(_jobs));
      report(extra);
      return;
    }
    report();
  }

  // ---- drain ----
  void preload() {
    uint64_t loaded = 0;
    auto* p = connect(_producer_tls);
    const relay::v1::submit_request req = jobs(500);
    std::function<void()> next = [&] {
      if (loaded >= static_cast<uint64_t>(_a.count)) return;
      ++_in_flight;
      p->submit(req, [&](const relay::v1::error& e, relay::v1::submitted& s) {
        --_in_flight;
        if (e) return error("preload", e);
        if (!s.created) return error("preload", not_created());
        loaded += 500;
        next();
      });
    };
    next();
    run_until([&] { return _in_flight == 0; });
  }

  void drain() {
    preload();
    _cpu0 = server_cpu_seconds(_a.server_pid);
    _t0 = clock_type::now();
    int empty_workers = 0;
    const relay::v1::lease_request req = lease_of(_a.batch, 0);
    std::function<void(relay::v1::client*)> lease = [&](relay::v1::client* c) {
      ++_in_flight;
      uint64_t sent = now_ns();
      c->lease(req, [&, c, sent](const relay::v1::error& e, relay::v1::lease_answer& a) {
        --_in_flight;
        ++_requests;
        if (e) return error("lease", e);
        if (!a.rejected.empty()) return error("lease", a);
        if (a.jobs.empty()) {
          ++empty_workers;
          return;
        }
        auto done = [&, c, sent, n = a.jobs.size()](const relay::v1::error& e2) {
          --_in_flight;
          ++_requests;
          if (e2) return error("complete", e2);
          _jobs += n;
          _latency.add(now_ns() - sent);
          lease(c);
        };
        ++_in_flight;
        if (a.jobs.size() == 1) {
          c->complete(a.jobs[0].id, a.jobs[0].lease, "true", done);
        } else {
          // Many completes in one request: no typed call for /v1/results.
          std::string body = "[";
          for (size_t i = 0; i < a.jobs.size(); ++i)
            body += (i ? "," : "") + ("{\"id\":\"" + a.jobs[i].id + "\",\"lease\":\"" + a.jobs[i].lease + "\",\"result\":true}");
          c->call("POST", "/v1/results", body + "]", [done](const relay::v1::error& e2, std::string&) { done(e2); });
        }
      });
    };
    for (int i = 0; i < _a.workers; ++i) lease(connect(_worker_tls));
    run_until([&] { return _in_flight == 0; });
    report();
  }

  // ---- large ----
  // One step of `large`: what it cost the server, per KB of the job's value.
  struct step_meter {
    const bench_run& run;
    std::string name;
    double cpu0;
    clock_type::time_point t0;
    step_meter(const bench_run& r, std::string n)
        : run(r), name(std::move(n)), cpu0(server_cpu_seconds(r._a.server_pid)), t0(clock_type::now()) {}
    void report(uint64_t jobs, uint64_t errors) const {
      double elapsed = std::chrono::duration<double>(clock_type::now() - t0).count();
      double cpu = server_cpu_seconds(run._a.server_pid) - cpu0;
      double kb = static_cast<double>(jobs) * run._a.payload_bytes / 1024.0;
      std::printf("scenario=large step=%s payload_bytes=%d jobs=%llu errors=%llu seconds=%.3f jobs_per_sec=%.1f "
                  "mb_per_sec=%.1f",
                  name.c_str(), run._a.payload_bytes, static_cast<unsigned long long>(jobs),
                  static_cast<unsigned long long>(errors), elapsed, static_cast<double>(jobs) / elapsed,
                  kb / 1024 / elapsed);
      if (run._a.server_pid > 0)
        std::printf(" server_cpu_s=%.3f server_cpu_us_per_job=%.1f server_cpu_us_per_kb=%.3f rss_kb=%ld", cpu,
                    jobs ? cpu * 1e6 / static_cast<double>(jobs) : 0, kb > 0 ? cpu * 1e6 / kb : 0,
                    server_rss_kb(run._a.server_pid));
      std::printf("\n");
      std::fflush(stdout);
    }
  };

  // Runs `one(i, done)` for i in [0, count), one at a time.
  void sequential(long count, const std::function<void(long, std::function<void()>)>& one) {
    long i = 0;
    std::function<void()> next = [&] {
      if (i >= count) return;
      ++_in_flight;
      long me = i++;
      one(me, [&] {
        --_in_flight;
        next();
      });
    };
    next();
    run_until([&] { return _in_flight == 0 || _errors > 0; });
  }

  void large() {
    if (_a.expect_status != 201) return large_not_relay();
    const long n = _a.count;
    uint64_t before = _errors;
    std::vector<std::string> ids, leases;
    auto* producer = connect(_producer_tls, 0, 600000);
    auto* worker = connect(_worker_tls, 0, 600000);
    // Connected (and the payload made) before anything is measured.
    relay::v1::submit_request req = jobs(1);
    std::string result = payload_json("r");
    bool ready = false;
    producer->call("GET", "/v1/jobs/0000000000000000", "", [&](const relay::v1::error&, std::string&) {
      worker->call("GET", "/v1/jobs/0000000000000000", "", [&](const relay::v1::error&, std::string&) { ready = true; });
    });
    run_until([&] { return ready; });

    step_meter submit(*this, "submit");
    sequential(n, [&](long, std::function<void()> done) {
      producer->submit(req, [&, done](const relay::v1::error& e, relay::v1::submitted& s) {
        if (e) return error("submit", e);
        ids.push_back(s.ids.at(0));
        done();
      });
    });
    submit.report(ids.size(), _errors - before);

    step_meter lease(*this, "lease");
    std::vector<std::string> leased_ids;
    sequential(n, [&](long, std::function<void()> done) {
      relay::v1::lease_request r = lease_of(1, 0);
      r.lease_ms = 3600000;  // held through every lease of the step (and a slow profiler)
      worker->lease(r, [&, done](const relay::v1::error& e, relay::v1::lease_answer& a) {
        if (e) return error("lease", e);
        if (!a.rejected.empty()) return error("lease", a);
        if (a.jobs.size() != 1 || a.jobs[0].payload.size() != req.payload.size()) {
          relay::v1::error bad;
          bad.what = relay::v1::error::kind::bad_answer;
          bad.message = "lease answer without the job or with a payload of another size";
          return error("lease", bad);
        }
        leased_ids.push_back(a.jobs[0].id);
        leases.push_back(a.jobs[0].lease);
        done();
      });
    });
    lease.report(leases.size(), _errors - before);

    step_meter complete(*this, "complete");
    uint64_t completed = 0;
    sequential(static_cast<long>(leases.size()), [&](long i, std::function<void()> done) {
      worker->complete(leased_ids[static_cast<size_t>(i)], leases[static_cast<size_t>(i)], result,
                       [&, done](const relay::v1::error& e) {
                         if (e) return error("complete", e);
                         ++completed;
                         done();
                       });
    });
    complete.report(completed, _errors - before);

    step_meter get(*this, "get");
    uint64_t got = 0;
    sequential(static_cast<long>(leased_ids.size()), [&](long i, std::function<void()> done) {
      producer->get_job(leased_ids[static_cast<size_t>(i)], 0, [&, done](const relay::v1::error& e, relay::v1::job_view& v) {
        if (e) return error("get", e);
        if (v.result.size() != result.size() || v.payload.size() != req.payload.size()) {
          relay::v1::error bad;
          bad.what = relay::v1::error::kind::bad_answer;
          bad.message = "GET answer with a payload or result of another size";
          return error("get", bad);
        }
        ++got;
        done();
      });
    });
    get.report(got, _errors - before);
  }

  // The same bodies to a server that is not relay (nginx): raw HTTP.
  void large_not_relay() {
    const long n = _a.count;
    uint64_t before = _errors;
    auto* c = connect_raw(_producer_tls);
    std::string body = job_body(1);
    auto step = [&](const std::string& name, const std::string& method, const std::function<std::string(long)>& target,
                    const std::string& payload, const std::function<bool(int)>& ok) {
      step_meter m(*this, name);
      uint64_t done_jobs = 0;
      sequential(n, [&](long i, std::function<void()> done) {
        c->request(method, target(i), payload, [&, done](const relay::http::client_error& e, relay::http::client_response& r) {
          if (e || !ok(r.status)) return error(name, e, r);
          if (method == "GET" && r.body.size() != body.size()) return error(name + " (size)", e, r);
          ++done_jobs;
          done();
        }, 600000);
      });
      m.report(done_jobs, _errors - before);
    };
    // Connected before anything is measured.
    bool ready = false;
    c->request("GET", "/", "", [&](const relay::http::client_error&, relay::http::client_response&) { ready = true; }, 60000);
    run_until([&] { return ready; });
    step("post", "POST", [&](long) { return "/v1/queues/" + _a.queue + "/jobs"; }, body,
         [&](int s) { return s == _a.expect_status; });
    if (_a.put_prefix.empty()) return;
    step("put", "PUT", [&](long i) { return _a.put_prefix + std::to_string(i); }, body,
         [](int s) { return s == 201 || s == 204; });
    step("get", "GET", [&](long i) { return _a.put_prefix + std::to_string(i); }, "", [](int s) { return s == 200; });
  }

  // ---- e2e ----
  void e2e() {
    // Workers stop once every producer has stopped and a lease comes back empty.
    int producing = _a.producers;
    bool stopping = false;
    std::vector<relay::v1::client*> producers;
    std::function<void(relay::v1::client*)> produce = [&](relay::v1::client* c) {
      if (!time_left()) {
        stopping = --producing == 0;
        return;
      }
      ++_in_flight;
      c->submit(jobs(_a.batch, "t" + std::to_string(now_ns()) + "_"), [&, c](const relay::v1::error& e, relay::v1::submitted& s) {
        --_in_flight;
        ++_requests;
        if (e) return error("submit", e);
        if (!s.created) return error("submit", not_created());
        produce(c);
      });
    };
    std::function<void(relay::v1::client*)> work = [&](relay::v1::client* c) {
      ++_in_flight;
      c->lease(lease_of(_a.batch, stopping ? 0 : 1000), [&, c](const relay::v1::error& e, relay::v1::lease_answer& a) {
        --_in_flight;
        ++_requests;
        if (e) return error("lease", e);
        if (!a.rejected.empty()) return error("lease", a);
        std::string body = "[";
        size_t n = 0;
        std::vector<uint64_t> stamps;
        for (const auto& j : a.jobs) {
          body += (n++ ? "," : "") + ("{\"id\":\"" + j.id + "\",\"lease\":\"" + j.lease + "\",\"result\":1}");
          // The payload is the JSON string "t<ns>_ppp...".
          stamps.push_back(j.payload.size() > 2 ? std::strtoull(j.payload.data() + 2, nullptr, 10) : 0);
        }
        if (n == 0) {
          if (!stopping) work(c);
          return;
        }
        ++_in_flight;
        // Many completes in one request: no typed call for /v1/results.
        c->call("POST", "/v1/results", body + "]", [&, c, n, stamps](const relay::v1::error& e2, std::string&) {
          --_in_flight;
          ++_requests;
          if (e2) return error("results", e2);
          _jobs += n;
          uint64_t t = now_ns();
          for (uint64_t s : stamps) _latency.add(t - s);
          work(c);
        });
      });
    };
    for (int i = 0; i < _a.producers; ++i) producers.push_back(connect(_producer_tls));
    for (auto* c : producers) produce(c);
    for (int i = 0; i < _a.workers; ++i) work(connect(_worker_tls));
    run_until([&] { return _in_flight == 0; });
    report(" producers=" + std::to_string(_a.producers) + " workers=" + std::to_string(_a.workers) + " latency=submit_to_complete");
  }

  // ---- idle ----
  void idle() {
    long rss0 = server_rss_kb(_a.server_pid);
    int parked = 0, woken = 0, answered = 0;
    std::vector<relay::v1::client*> waiters;
    for (int i = 0; i < _a.connections; ++i) waiters.push_back(connect(_worker_tls));
    const relay::v1::lease_request park = lease_of(1, 60000);  // timeout 120 s: wait + request_timeout_ms
    // Connect and park in waves so that handshakes do not time out.
    for (size_t i = 0; i < waiters.size(); ++i) {
      auto* c = waiters[i];
      ++_in_flight;
      c->lease(park, [&](const relay::v1::error& e, relay::v1::lease_answer& a) {
        --_in_flight;
        ++answered;
        if (e) return error("lease", e);
        if (!a.rejected.empty()) return error("lease", a);
        // A burst job's payload is the JSON string "t<ns>_ppp...".
        if (a.jobs.empty() || a.jobs[0].payload.rfind("\"t", 0) != 0) return;
        ++woken;
        _latency.add(now_ns() - std::strtoull(a.jobs[0].payload.data() + 2, nullptr, 10));
      });
      if (i % 200 == 199) {
        auto until = clock_type::now() + std::chrono::milliseconds(150);
        while (clock_type::now() < until) uv_run(&_loop, UV_RUN_NOWAIT);
      }
    }
    // Wait until relay has parked them all (its RSS stops growing).
    auto until = clock_type::now() + std::chrono::seconds(30);
    long last = 0;
    int stable = 0;
    while (clock_type::now() < until && stable < 10) {
      auto t = clock_type::now() + std::chrono::milliseconds(100);
      while (clock_type::now() < t) uv_run(&_loop, UV_RUN_NOWAIT);
      long rss = server_rss_kb(_a.server_pid);
      stable = rss == last ? stable + 1 : 0;
      last = rss;
    }
    parked = _a.connections - answered;
    long rss1 = server_rss_kb(_a.server_pid);
    // Then one job per parked worker (at most 2,000), submitted one after
    // another, each stamped when sent: the latency is submit sent → lease
    // answer received by the worker it woke, not the queueing of a burst.
    int burst = std::min(parked, 2000);
    auto* p = connect(_producer_tls);
    _t0 = clock_type::now();
    int sent = 0;
    std::function<void()> submit_next = [&] {
      if (sent >= burst) return;
      ++sent;
      ++_in_flight;
      p->submit(jobs(1, "t" + std::to_string(now_ns()) + "_"), [&](const relay::v1::error& e, relay::v1::submitted& s) {
        --_in_flight;
        if (e) error("submit", e);
        else if (!s.created) error("submit", not_created());
        submit_next();
      });
    };
    submit_next();
    auto wake_until = clock_type::now() + std::chrono::seconds(30);
    while (woken < burst && clock_type::now() < wake_until) uv_run(&_loop, UV_RUN_ONCE);
    _jobs = static_cast<uint64_t>(woken);
    char extra[256];
    std::snprintf(extra, sizeof extra, " parked=%d rss_before_kb=%ld rss_parked_kb=%ld rss_per_idle_conn_bytes=%.0f burst=%d woken=%d latency=wake",
                  parked, rss0, rss1, parked ? static_cast<double>(rss1 - rss0) * 1024 / parked : 0.0, burst, woken);
    report(extra);
    // The parked leases still open end when the bench closes its connections.
    _quiet = true;
    _in_flight = 0;
  }

  // ---- handshake ----
  // Raw HTTP on purpose: a new connection per request, whose cost is the
  // full mTLS handshake (resumed or not: client_conn::resumed()); any answer
  // counts, relay's 404 for an unknown job or nginx's 200.
  void handshake() {
    auto tls = _producer_tls;
    if (_a.resume) {
      relay::tls::client_options o;
      o.cert_file = _a.pki + "/producer.crt";
      o.key_file = _a.pki + "/producer.key";
      o.ca_file = _a.pki + "/ca.crt";
      o.resume_sessions = true;
      std::string error;
      tls = relay::tls::context::make_client(o, error);
    }
    uint64_t resumed = 0;
    std::function<void()> next = [&] {
      if (!time_left()) return;
      auto* c = connect_raw(tls);
      ++_in_flight;
      uint64_t sent = now_ns();
      c->request("GET", "/v1/jobs/0000000000000001", {}, [&, c, sent](const relay::http::client_error& e, relay::http::client_response& r) {
        --_in_flight;
        ++_requests;
        if (e) return error("handshake", e, r);
        _jobs += 1;  // one handshake (and one request)
        if (c->resumed()) ++resumed;
        _latency.add(now_ns() - sent);
        _conns.erase(std::find(_conns.begin(), _conns.end(), c));
        c->close();
        next();
      }, 60000);
    };
    for (int i = 0; i < _a.connections; ++i) next();
    run_until([&] { return _in_flight == 0; });
    report(" unit=handshake resumed=" + std::to_string(resumed));
  }

  // ---- failover ----
  // Producers on both addresses of an active/standby pair. Only the leader
  // listens on its API port, so before the kill the submits to the
  // standby's port fail to connect and are retried every --retry-ms; after
  // it, those to the dead leader's port do. A 2xx answer to a submit sent
  // after the kill can only come from the new leader.
  int failover() {
    struct producer {
      relay::v1::client* client;
      uint16_t port;
    };
    std::vector<producer> producers;
    for (uint16_t port : {_a.port, _a.port2}) {
      if (!port) continue;
      for (int i = 0; i < _a.connections; ++i) {
        auto* c = connect(_producer_tls, port, static_cast<uint32_t>(_a.request_timeout_ms));
        producers.push_back({c, port});
      }
    }
    const relay::v1::submit_request req = jobs(1);
    uint64_t start = now_ns(), kill_ns = 0, first_ack_ns = 0, last_ack_before_kill_ns = 0;
    uint64_t acks_before = 0, acks_after = 0, refused_503 = 0, refused_other = 0, transport = 0;
    uint16_t first_ack_port = 0, leader_port = 0;
    int64_t kill_unix_ms = 0;  // to match the relays' logs
    bool done = false, gave_up = false;
    std::vector<size_t> waiting;  // producers to retry at the next tick
    std::function<void(size_t)> next = [&](size_t i) {
      if (done) return;
      uint64_t sent = now_ns();
      ++_in_flight;
      producers[i].client->submit(req, [&, i, sent](const relay::v1::error& e, relay::v1::submitted&) {
        --_in_flight;
        ++_requests;
        uint64_t t = now_ns();
        if (e) {
          if (e.what == relay::v1::error::kind::refused) ++(e.status == 503 ? refused_503 : refused_other);
          else ++transport;
          if (e.what == relay::v1::error::kind::transport) producers[i].client->reset();
          waiting.push_back(i);
          return;
        }
        ++_jobs;
        _latency.add(t - sent);
        if (!kill_ns) {
          ++acks_before;
          last_ack_before_kill_ns = t;
          leader_port = producers[i].port;
        } else if (sent >= kill_ns) {
          ++acks_after;
          if (!first_ack_ns) {
            first_ack_ns = t;
            first_ack_port = producers[i].port;
          }
        }
        next(i);
      });
    };
    uv_timer_t tick{};
    uv_timer_init(&_loop, &tick);
    std::function<void()> on_tick = [&] {
      uint64_t t = now_ns();
      if (!kill_ns && acks_before > 0 && t - start >= static_cast<uint64_t>(_a.kill_after_ms) * 1000000) {
        if (::kill(static_cast<pid_t>(_a.kill_pid), SIGKILL) != 0) {
          std::fprintf(stderr, "relay_bench: kill %ld: %s\n", _a.kill_pid, std::strerror(errno));
          gave_up = done = true;
          return;
        }
        kill_ns = now_ns();
        kill_unix_ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                           std::chrono::system_clock::now().time_since_epoch()).count();
        return;  // (t is older than kill_ns)
      }
      if (!kill_ns && t - start >= static_cast<uint64_t>(_a.kill_after_ms + 30000) * 1000000) {
        std::fprintf(stderr, "relay_bench: no submit was acknowledged in %d ms; not killing\n", _a.kill_after_ms + 30000);
        gave_up = done = true;
        return;
      }
      // Keep submitting for a moment after the first acknowledgement, so
      // that every producer of the new leader has reconnected.
      if (first_ack_ns && t - first_ack_ns >= 500000000) done = true;
      if (kill_ns && !first_ack_ns && t - kill_ns >= static_cast<uint64_t>(_a.seconds * 1e9)) gave_up = done = true;
      if (done) return;
      auto retry = std::exchange(waiting, {});
      for (size_t i : retry) next(i);
    };
    tick.data = &on_tick;
    uv_timer_start(&tick, [](uv_timer_t* h) { (*static_cast<std::function<void()>*>(h->data))(); },
                   static_cast<uint64_t>(_a.retry_ms), static_cast<uint64_t>(_a.retry_ms));
    for (size_t i = 0; i < producers.size(); ++i) next(i);
    run_until([&] { return done; });
    uv_timer_stop(&tick);
    uv_close(reinterpret_cast<uv_handle_t*>(&tick), nullptr);
    _quiet = true;
    _clients.clear();  // outstanding callbacks never run
    _in_flight = 0;
    uv_run(&_loop, UV_RUN_NOWAIT);
    double failover_ms = first_ack_ns ? static_cast<double>(first_ack_ns - kill_ns) / 1e6 : -1;
    std::printf("scenario=failover connections=%d retry_ms=%d request_timeout_ms=%d leader_port=%u kill_pid=%ld "
                "failover_ms=%.1f first_ack_port=%u last_ack_before_kill_ms=%.1f acks_before_kill=%llu "
                "acks_after_kill=%llu refused_503=%llu refused_other=%llu transport_errors=%llu p50_us=%.1f p99_us=%.1f "
                "kill_unix_ms=%lld\n",
                _a.connections, _a.retry_ms, _a.request_timeout_ms, leader_port, _a.kill_pid, failover_ms,
                first_ack_port, kill_ns && last_ack_before_kill_ns ? static_cast<double>(kill_ns - last_ack_before_kill_ns) / 1e6 : -1,
                static_cast<unsigned long long>(acks_before), static_cast<unsigned long long>(acks_after),
                static_cast<unsigned long long>(refused_503), static_cast<unsigned long long>(refused_other),
                static_cast<unsigned long long>(transport), static_cast<double>(_latency.quantile(0.5)) / 1000,
                static_cast<double>(_latency.quantile(0.99)) / 1000, static_cast<long long>(kill_unix_ms));
    std::fflush(stdout);
    return gave_up || !first_ack_ns ? 1 : 0;
  }

  // Each point is its own run (fresh connections), printed as it completes.
  static int scale(const args& base) {
    int failures = 0;
    auto point = [&](args a, const std::string& label) {
      a.mode = "submit";
      a.seconds = std::min(base.seconds, 2.0);
      std::printf("point=%s ", label.c_str());
      failures += bench_run(a).run();
    };
    // Queue depth: preload to 100k and 1M, then measure submits.
    args depth = base;
    depth.queue = "scale-depth";
    depth.connections = 16;
    long loaded = 0;
    for (long target : {0L, 100000L, 1000000L}) {
      if (target > loaded) {
        args fill = depth;
        fill.mode = "fill";
        fill.count = target - loaded;
        fill.batch = 1000;
        fill.connections = 4;
        std::printf("point=preload_%ld ", target);
        failures += bench_run(fill).run();
        loaded = target;
      }
      point(depth, "depth_" + std::to_string(target));
    }
    for (int bytes : {100, 10000, 100000, 1000000}) {
      args a = base;
      a.queue = "scale-size";
      a.connections = bytes >= 100000 ? 4 : 16;
      a.payload_bytes = bytes;
      point(a, "payload_" + std::to_string(bytes));
    }
    for (int c : {1, 16, 256, 1024}) {
      args a = base;
      a.queue = "scale-conns";
      a.connections = c;
      point(a, "connections_" + std::to_string(c));
    }
    return failures ? 1 : 0;
  }

  args _a;
  uv_loop_t _loop;
  std::shared_ptr<const relay::tls::context> _producer_tls, _worker_tls;
  std::string _payload;
  std::vector<std::unique_ptr<relay::v1::client>> _clients;
  std::vector<relay::http::client_conn*> _conns;  // raw HTTP (handshake, not-relay submits)
  clock_type::time_point _t0;
  double _cpu0 = 0;
  uint64_t _requests = 0, _jobs = 0, _errors = 0;
  int _in_flight = 0;
  bool _quiet = false;
  bench::log_histogram _latency;
  mutable std::mt19937_64 _rng{std::random_device{}()};
};

}  // namespace

int main(int argc, char** argv) {
  std::signal(SIGPIPE, SIG_IGN);  // a write to a closed connection fails, not kills
  args a;
  if (argc < 2) {
    std::fprintf(stderr, "usage: relay_bench submit|fill|drain|e2e|idle|handshake|scale|failover|large --port P --pki DIR [options]\n");
    return 2;
  }
  a.mode = argv[1];
  for (int i = 2; i + 1 < argc; i += 2) {
    std::string k = argv[i], v = argv[i + 1];
    if (k == "--port") a.port = static_cast<uint16_t>(std::stoi(v));
    else if (k == "--host") a.host = v;
    else if (k == "--server-name") a.server_name = v;
    else if (k == "--pki") a.pki = v;
    else if (k == "--queue") a.queue = v;
    else if (k == "--connections") a.connections = std::stoi(v);
    else if (k == "--batch") a.batch = std::max(1, std::stoi(v));
    else if (k == "--seconds") a.seconds = std::stod(v);
    else if (k == "--payload-bytes") a.payload_bytes = std::stoi(v);
    else if (k == "--count") a.count = std::stol(v);
    else if (k == "--producers") a.producers = std::stoi(v);
    else if (k == "--workers") a.workers = std::stoi(v);
    else if (k == "--server-pid") a.server_pid = std::stol(v);
    else if (k == "--expect-status") a.expect_status = std::stoi(v);
    else if (k == "--resume") a.resume = v == "1" || v == "yes";
    else if (k == "--random-payload") a.random_payload = v == "1" || v == "yes";
    else if (k == "--put-prefix") a.put_prefix = v;
    else if (k == "--port2") a.port2 = static_cast<uint16_t>(std::stoi(v));
    else if (k == "--kill-pid") a.kill_pid = std::stol(v);
    else if (k == "--kill-after-ms") a.kill_after_ms = std::stoi(v);
    else if (k == "--retry-ms") a.retry_ms = std::max(1, std::stoi(v));
    else if (k == "--request-timeout-ms") a.request_timeout_ms = std::max(100, std::stoi(v));
    else {
      std::fprintf(stderr, "relay_bench: unknown option %s\n", k.c_str());
      return 2;
    }
  }
  if (!a.port || a.pki.empty()) {
    std::fprintf(stderr, "relay_bench: need --port and --pki\n");
    return 2;
  }
  return bench_run(a).run();
}
