// The fault suite of the postgres journal backend (issue 12): two real relay
// processes on one shard, real bunnies, producer and consumer threads, and a
// checker that records every acknowledgement a client received (what, which
// relay, when) and verifies afterwards that each one survived.
//
// Times are wall-clock milliseconds (system_clock), the clock of relay's
// "ts_ms" log field, so an acknowledgement can be compared with the moment
// a relay logged leadership_acquired. Every loop here is bounded in count
// and in time; every process is stopped by its own PID.
#pragma once

#include <doctest/doctest.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "process.h"
#include "relay/v1_client.h"
#include "relay_fixture.h"
#include "tmpdir.h"

namespace test::ha {

inline int64_t now_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

using steady = std::chrono::steady_clock;
inline steady::time_point after_ms(int ms) { return steady::now() + std::chrono::milliseconds(ms); }

// "ts_ms":N of a relay log line.
inline int64_t ts_of(const std::string& line) {
  auto v = field(line, "ts_ms");
  return v.empty() ? 0 : std::stoll(v);
}

// A loopback port that is free now and stays out of the kernel's way: the
// relays bind fixed ports again after a re-exec or a restart, and the
// suite's own clients open hundreds of connections meanwhile, whose local
// ports come from the ephemeral range. So the port is picked below that
// range (random, checked with a bind), where no outgoing connection takes
// it; the kernel's pick only if none is found.
inline uint16_t free_port() {
  auto try_bind = [](uint16_t port) -> int {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int got = -1;
    if (bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0) {
      socklen_t len = sizeof a;
      getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
      got = ntohs(a.sin_port);
    }
    close(fd);
    return got;
  };
  int low = 32768;
  {
    std::istringstream range(read_file("/proc/sys/net/ipv4/ip_local_port_range"));
    range >> low;
  }
  static thread_local uint64_t seed = static_cast<uint64_t>(getpid()) * 2654435761u ^
                                      static_cast<uint64_t>(steady::now().time_since_epoch().count());
  if (low > 12000) {
    for (int i = 0; i < 200; ++i) {
      seed = seed * 6364136223846793005ull + 1442695040888963407ull;
      auto port = static_cast<uint16_t>(10000 + (seed >> 33) % static_cast<uint64_t>(low - 10000));
      if (try_bind(port) == port) return port;
    }
  }
  return static_cast<uint16_t>(try_bind(0));
}

// Whether something accepts TCP connections on 127.0.0.1:port.
inline bool port_accepts(uint16_t port) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bool ok = connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0;
  close(fd);
  return ok;
}

struct relay_settings {
  std::string shard = "main";
  int lease_ms = 1200;
  int renew_ms = 300;
  // Compact as soon as the journal is 4 KiB and twice what is live: the
  // faults then also strike while segments are rolled and dropped.
  uint64_t compact_min_bytes = 4096;
};

// One relay process of the pair: fixed API and ops ports (clients and
// bunnies know both URLs; a re-exec or a restart binds the same ones), its
// own directory, config and DSN file. start() can be called again after it
// exited (a restart: a new log file per incarnation).
class ha_relay {
 public:
  ha_relay(std::string relay_name, const std::string& dsn, relay_settings s) : name(std::move(relay_name)), settings(s) {
    api_port = free_port();
    ops_port = free_port();
    write_file(dir / "policy.json", default_policy());
    set_dsn(dsn);
    const std::string& p = pki();
    write_file(dir / "relay.json",
               R"({"listen": "127.0.0.1:)" + std::to_string(api_port) + R"(", "ops_listen": "127.0.0.1:)" +
                   std::to_string(ops_port) + R"(",
      "tls": {"cert": ")" + p + R"(/server.crt", "key": ")" + p + R"(/server.key", "client_ca": ")" + p +
                   R"(/ca.crt"},
      "policy": "policy.json",
      "limits": {"drain_timeout_ms": 3000},
      "journal": {"backend": "postgres", "compact_min_bytes": )" + std::to_string(s.compact_min_bytes) + R"(,
                  "postgres": {"dsn_file": ")" + (dir / "dsn") + R"(", "shard": ")" +
                   s.shard + R"(", "lease_ms": )" + std::to_string(s.lease_ms) + R"(, "renew_ms": )" +
                   std::to_string(s.renew_ms) + "}}}");
  }
  void set_dsn(const std::string& dsn) {
    write_file(dir / "dsn", dsn + "\n");
    chmod((dir / "dsn").c_str(), 0600);
  }

  void start() {
    ++incarnation;
    proc = std::make_unique<child>(std::vector<std::string>{env_or_fail("RELAY_BIN"), "--config", dir / "relay.json"},
                                   dir / ("relay." + std::to_string(incarnation) + ".log"));
    REQUIRE_MESSAGE(proc->pid() > 0, "cannot spawn relay");
  }
  pid_t pid() const { return proc ? proc->pid() : -1; }
  std::string log() const { return proc ? proc->log() : std::string(); }

  // The log lines of `event` of this incarnation (a re-exec keeps the
  // file); audit lines of the same name (they go to stderr too) left out.
  std::vector<std::string> events(const std::string& event) const {
    std::vector<std::string> out;
    const std::string needle = "{\"event\":\"" + event + "\"";
    const std::string audit_mark = ",\"audit\":true";
    for (auto& l : lines(log()))
      if (l.rfind(needle, 0) == 0 && l.compare(needle.size(), audit_mark.size(), audit_mark) != 0) out.push_back(l);
    return out;
  }
  // Waits until the log holds at least `n` lines of `event`; returns the
  // n-th, or empty on timeout (or when the process ended).
  std::string wait_event(const std::string& event, size_t n = 1, int timeout_ms = 20000) const {
    auto until = after_ms(timeout_ms);
    for (;;) {
      auto e = events(event);
      if (e.size() >= n) return e[n - 1];
      if (steady::now() >= until) return {};
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  }

  http_result ops_get(const std::string& path) const {
    auto r = run({"curl", "-sS", "--max-time", "5", "-o", dir / "ops.body", "-w", "%{http_code}",
                  "http://127.0.0.1:" + std::to_string(ops_port) + path},
                 dir.path(), 10000);
    http_result h;
    h.curl_exit = r.exit_code;
    h.status = std::atoi(r.out.c_str());
    h.body = read_file(dir / "ops.body");
    return h;
  }
  bool ready() const { return ops_get("/readyz").status == 200; }

  // SIGTERM and wait (bounded) for the exit code; -1 if it did not end.
  int terminate(int timeout_ms = 15000) {
    proc->signal(SIGTERM);
    return proc->wait(timeout_ms);
  }
  int kill9() {
    proc->signal(SIGKILL);
    return proc->wait(10000);
  }

  std::string name;
  relay_settings settings;
  tmpdir dir;
  uint16_t api_port = 0;
  uint16_t ops_port = 0;
  int incarnation = 0;
  std::unique_ptr<child> proc;
};

// A DSN for libpq from the pieces of a test::postgres_cluster.
inline std::string dsn(const std::string& hosts, const std::string& ports, const std::string& user,
                       const std::string& passfile, const std::string& db, const std::string& extra = {}) {
  return "host=" + hosts + " port=" + ports + " user=" + user + " passfile=" + passfile + " dbname=" + db +
         " connect_timeout=2" + (extra.empty() ? "" : " " + extra);
}

// ---- What clients were told ----

struct ack {
  enum class kind { submit, complete } what = kind::submit;
  std::string key;     // submit: the idempotency key
  std::string id;      // job id
  int relay = -1;      // index of the relay that answered
  int64_t at_ms = 0;   // wall clock when the answer was read
  bool created = true; // submit: 201 (false: 200, the key matched)
  std::string result;  // complete: the result sent
  int attempt = 0;     // complete: the attempt
};

class checker {
 public:
  void record(ack a) {
    std::lock_guard<std::mutex> g(_m);
    _acks.push_back(std::move(a));
  }
  // A non-2xx answer or a transport error, by relay and kind (for figures).
  void refusal(int relay, const std::string& what) {
    std::lock_guard<std::mutex> g(_m);
    ++_refusals[std::to_string(relay) + ":" + what];
  }
  // The last few error messages per relay, for failure reports.
  void note(int relay, const std::string& message) {
    std::lock_guard<std::mutex> g(_m);
    auto& v = _notes[relay];
    v.push_back(std::to_string(now_ms()) + " " + message);
    if (v.size() > 8) v.erase(v.begin());
  }
  std::string notes() const {
    std::lock_guard<std::mutex> g(_m);
    std::string s;
    for (auto& [r, v] : _notes)
      for (auto& m : v) s += "relay " + std::to_string(r) + ": " + m + "\n";
    return s;
  }
  void unexpected(const std::string& what) {
    std::lock_guard<std::mutex> g(_m);
    _unexpected.push_back(what);
  }
  size_t refusal_count(int relay, const std::string& what) const {
    std::lock_guard<std::mutex> g(_m);
    auto it = _refusals.find(std::to_string(relay) + ":" + what);
    return it == _refusals.end() ? 0 : it->second;
  }
  std::vector<ack> acks() const {
    std::lock_guard<std::mutex> g(_m);
    return _acks;
  }
  std::vector<std::string> unexpected_answers() const {
    std::lock_guard<std::mutex> g(_m);
    return _unexpected;
  }
  std::string refusals() const {
    std::lock_guard<std::mutex> g(_m);
    std::string s;
    for (auto& [k, n] : _refusals) s += k + "=" + std::to_string(n) + " ";
    return s;
  }
  size_t submits_from(int relay, int64_t since_ms = 0) const {
    size_t n = 0;
    for (auto& a : acks())
      if (a.what == ack::kind::submit && (relay < 0 || a.relay == relay) && a.at_ms >= since_ms) ++n;
    return n;
  }
  // The first submit acknowledged by `relay` at or after since_ms, or 0.
  int64_t first_submit_from(int relay, int64_t since_ms) const {
    int64_t best = 0;
    for (auto& a : acks())
      if (a.what == ack::kind::submit && a.relay == relay && a.at_ms >= since_ms && (!best || a.at_ms < best))
        best = a.at_ms;
    return best;
  }
  // Acknowledgements (of any kind) from `relay` read after `after_ms`.
  std::vector<ack> from_after(int relay, int64_t after_ms) const {
    std::vector<ack> out;
    for (auto& a : acks())
      if (a.relay == relay && a.at_ms > after_ms) out.push_back(a);
    return out;
  }
  // The longest time between two consecutive submit acknowledgements
  // (whoever gave them) within [from_ms, to_ms].
  int64_t longest_gap(int64_t from_ms, int64_t to_ms) const {
    std::vector<int64_t> t{from_ms, to_ms};
    for (auto& a : acks())
      if (a.what == ack::kind::submit && a.at_ms >= from_ms && a.at_ms <= to_ms) t.push_back(a.at_ms);
    std::sort(t.begin(), t.end());
    int64_t gap = 0;
    for (size_t i = 1; i < t.size(); ++i) gap = std::max(gap, t[i] - t[i - 1]);
    return gap;
  }

 private:
  mutable std::mutex _m;
  std::vector<ack> _acks;
  std::map<std::string, size_t> _refusals;
  std::vector<std::string> _unexpected;
  std::map<int, std::vector<std::string>> _notes;
};

inline relay::v1::client::options client_options(uint16_t port, const std::string& who, uint32_t timeout_ms) {
  auto o = v1_options(port, who);
  o.request_timeout_ms = timeout_ms;
  o.connection.connect_timeout_ms = std::min<uint32_t>(timeout_ms, 2000);
  return o;
}

// A transport error or 503/429: try the other relay.
inline bool retryable(const relay::v1::error& e) {
  using k = relay::v1::error::kind;
  return e.what == k::transport || (e.what == k::refused && (e.status == 503 || e.status == 429));
}

// Producer threads (submits with idempotency keys, alternating relays on
// failure) and consumer threads (lease + complete, with a result the checker
// remembers), all recording into one checker.
class load {
 public:
  struct options {
    std::vector<uint16_t> ports;  // relay index = position
    std::string prefix = "k";
    std::string queue = "work";
    int producers = 2;
    int pace_ms = 40;         // between one producer's submits
    int consumers = 1;
    int max_per_producer = 5000;
    uint32_t request_timeout_ms = 5000;
    int heartbeats = 4;  // per job the consumer threads lease
  };
  load(checker& c, options o) : _c(c), _o(std::move(o)) {}
  load(const load&) = delete;
  load& operator=(const load&) = delete;
  ~load() { stop(); }

  void start() {
    for (int i = 0; i < _o.producers; ++i) _threads.emplace_back([this, i] { produce(i); });
    for (int i = 0; i < _o.consumers; ++i) _threads.emplace_back([this, i] { consume(i); });
  }
  void stop() {
    _stop = true;
    for (auto& t : _threads)
      if (t.joinable()) t.join();
    _threads.clear();
  }
  size_t keys_given_up() const { return _given_up; }

 private:
  void sleep_unless_stopped(int ms) {
    for (int i = 0; i < ms / 10 && !_stop; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }

  void produce(int tid) {
    std::vector<std::unique_ptr<relay::v1::blocking_client>> clients;
    for (auto port : _o.ports)
      clients.push_back(std::make_unique<relay::v1::blocking_client>(client_options(port, "producer", _o.request_timeout_ms)));
    size_t cur = static_cast<size_t>(tid) % clients.size();
    for (int n = 0; n < _o.max_per_producer && !_stop; ++n) {
      relay::v1::submit_request r;
      r.queue = _o.queue;
      // record.sh's payload: seconds to run. One job in ten runs long
      // enough to be in flight when a fault strikes.
      r.payload = n % 10 == 9 ? "[0.4]" : "0";
      r.max_attempts = 20;
      r.idempotency_key = _o.prefix + "-p" + std::to_string(tid) + "-" + std::to_string(n);
      bool done = false;
      // Resubmits the same key until acknowledged, for 60 s at most.
      auto until = after_ms(60000);
      for (int attempt = 0; attempt < 20000 && !done && !_stop && steady::now() < until; ++attempt) {
        auto a = clients[cur]->submit(r);
        int64_t at = now_ms();
        if (!a.err) {
          if (a.value.ids.size() != 1) {
            _c.unexpected("submit answer without one id: " + a.value.raw);
          } else {
            ack k;
            k.what = ack::kind::submit;
            k.key = *r.idempotency_key;
            k.id = a.value.ids[0];
            k.relay = static_cast<int>(cur);
            k.at_ms = at;
            k.created = a.value.created;
            _c.record(std::move(k));
          }
          done = true;
        } else if (retryable(a.err)) {
          _c.refusal(static_cast<int>(cur), a.err.what == relay::v1::error::kind::transport
                                                ? "transport"
                                                : std::to_string(a.err.status));
          _c.note(static_cast<int>(cur), a.err.message);
          cur = (cur + 1) % clients.size();
          sleep_unless_stopped(20);
        } else {
          _c.unexpected("submit to relay " + std::to_string(cur) + ": " + std::string(a.err.kind_name()) + " " +
                        std::to_string(a.err.status) + " " + a.err.code + " " + a.err.message);
          done = true;
        }
      }
      if (!done) ++_given_up;
      sleep_unless_stopped(_o.pace_ms);
    }
  }

  void consume(int tid) {
    std::vector<std::unique_ptr<relay::v1::blocking_client>> clients;
    for (auto port : _o.ports)
      clients.push_back(std::make_unique<relay::v1::blocking_client>(client_options(port, "worker2", _o.request_timeout_ms)));
    size_t cur = static_cast<size_t>(tid + 1) % clients.size();
    for (int round = 0; round < 100000 && !_stop; ++round) {
      relay::v1::lease_request lr;
      lr.queue = _o.queue;
      lr.max = 4;
      lr.wait_ms = 300;
      lr.lease_ms = 3000;
      auto l = clients[cur]->lease(lr);
      if (l.err) {
        if (!retryable(l.err))
          _c.unexpected("lease: " + std::string(l.err.kind_name()) + " " + std::to_string(l.err.status) + " " +
                        l.err.code);
        cur = (cur + 1) % clients.size();
        sleep_unless_stopped(20);
        continue;
      }
      for (auto& j : l.value.jobs) {
        // A few heartbeats first: records that make the journal outgrow
        // what is live, so the leader compacts (rolls and drops segments)
        // while the faults strike.
        for (int h = 0; h < _o.heartbeats && !_stop; ++h) {
          auto hb = clients[cur]->heartbeat(j.id, j.lease, 3000);
          if (hb.err) break;
        }
        std::string result = R"({"by":"checker","job":")" + j.id + R"(","attempt":)" + std::to_string(j.attempt) + "}";
        // Delivered to whichever relay answers, until the lease is over.
        auto until = after_ms(3000);
        for (int attempt = 0; attempt < 200 && steady::now() < until; ++attempt) {
          auto e = clients[cur]->complete(j.id, j.lease, result);
          int64_t at = now_ms();
          if (!e) {
            ack k;
            k.what = ack::kind::complete;
            k.id = j.id;
            k.relay = static_cast<int>(cur);
            k.at_ms = at;
            k.result = result;
            k.attempt = static_cast<int>(j.attempt);
            _c.record(std::move(k));
            break;
          }
          if (e.what == relay::v1::error::kind::refused && (e.status == 409 || e.status == 404)) {
            _c.refusal(static_cast<int>(cur), "complete_" + std::to_string(e.status));
            break;
          }
          if (!retryable(e)) {
            _c.unexpected("complete: " + std::string(e.kind_name()) + " " + std::to_string(e.status) + " " + e.code);
            break;
          }
          cur = (cur + 1) % clients.size();
          std::this_thread::sleep_for(std::chrono::milliseconds(20));
        }
      }
    }
  }

  checker& _c;
  options _o;
  std::atomic<bool> _stop{false};
  std::atomic<size_t> _given_up{0};
  std::vector<std::thread> _threads;
};

// A real bunny pointed at every relay URL (it rotates on transport errors),
// running tests/support/handlers/record.sh, which appends one "start" line
// per execution to exec.log.
class bunny {
 public:
  bunny(const std::vector<uint16_t>& ports, const std::string& name, int concurrency = 2) {
    const std::string& p = pki();
    std::string urls;
    for (auto port : ports) urls += std::string(urls.empty() ? "" : ",") + "\"https://127.0.0.1:" + std::to_string(port) + "\"";
    exec_log = dir / "exec.log";
    write_file(exec_log, "");
    write_file(dir / "bunny.json", R"({
      "relay": {"urls": [)" + urls + R"(], "server_name": "localhost"},
      "tls": {"cert": ")" + p + R"(/worker.crt", "key": ")" + p + R"(/worker.key", "ca": ")" + p + R"(/ca.crt"},
      "queues": ["work"], "concurrency": )" + std::to_string(concurrency) + R"(,
      "lease_ms": 3000, "handler": {"exec": [")" + env_or_fail("HANDLERS_DIR") + R"(/record.sh", ")" + exec_log +
                                     R"("], "timeout_ms": 10000},
      "ops_listen": "127.0.0.1:0",
      "poll": {"wait_ms": 1000, "request_timeout_ms": 2500, "backoff_base_ms": 50, "backoff_max_ms": 300},
      "drain_timeout_ms": 3000})");
    proc = std::make_unique<child>(std::vector<std::string>{env_or_fail("BUNNY_BIN"), "--config", dir / "bunny.json"},
                                   dir / (name + ".log"));
    REQUIRE_MESSAGE(proc->wait_for_line("\"listener\":\"ops\"").has_value(), "bunny did not start: " << proc->log());
  }
  // (job, attempt) of each result relay acknowledged to this bunny.
  std::vector<std::pair<std::string, int>> delivered() const {
    std::vector<std::pair<std::string, int>> out;
    for (auto& l : lines(proc->log()))
      if (l.rfind("{\"event\":\"result_delivered\"", 0) == 0)
        out.emplace_back(field(l, "job"), std::atoi(field(l, "attempt").c_str()));
    return out;
  }
  // Executions per job id.
  std::map<std::string, int> executions() const {
    std::map<std::string, int> out;
    for (auto& l : lines(read_file(exec_log)))
      if (l.rfind("start ", 0) == 0) {
        auto id = l.substr(6, l.find(' ', 6) - 6);
        ++out[id];
      }
    return out;
  }
  void stop() {
    if (!proc) return;
    proc->signal(SIGTERM);
    if (proc->wait(8000) < 0) {
      proc->signal(SIGKILL);
      proc->wait(5000);
    }
  }

  tmpdir dir;
  std::string exec_log;
  std::unique_ptr<child> proc;
};

// What verify() found, for MESSAGE lines.
struct verdict {
  size_t submits = 0, keys = 0, completes = 0, bunny_results = 0;
  size_t succeeded = 0, other_terminal = 0;
  size_t executions = 0, duplicate_executions = 0;
  int64_t verify_ms = 0;
  std::vector<std::string> problems;  // empty: every acknowledgement held
};

// Every acknowledged submit is a job on the relay at `port` (one id per
// idempotency key, one key per id) that reaches a terminal state; every
// acknowledged result is that job's result, byte for byte for the consumer
// threads' results, and the bunny's attempt for bunny's. Bounded by
// timeout_ms overall. What does not hold is listed in `problems` (the caller
// asserts; a test of the checker itself expects some).
inline verdict verify(const checker& c, const std::vector<const bunny*>& bunnies, uint16_t port, int timeout_ms = 90000) {
  verdict v;
#define HA_PROBLEM(cond, msg)      \
  do {                             \
    if (!(cond)) {                 \
      std::ostringstream os_;      \
      os_ << msg;                  \
      v.problems.push_back(os_.str()); \
    }                              \
  } while (0)
  auto started = steady::now();
  auto until = after_ms(timeout_ms);
  auto acks = c.acks();
  std::map<std::string, std::set<std::string>> ids_of_key;
  std::map<std::string, std::set<std::string>> keys_of_id;
  std::map<std::string, std::string> result_of;  // consumer threads' acknowledged results
  for (auto& a : acks) {
    if (a.what == ack::kind::submit) {
      ++v.submits;
      ids_of_key[a.key].insert(a.id);
      keys_of_id[a.id].insert(a.key);
    } else {
      ++v.completes;
      auto [it, fresh] = result_of.emplace(a.id, a.result);
      HA_PROBLEM((fresh || it->second == a.result), "two different results acknowledged for job " << a.id);
    }
  }
  v.keys = ids_of_key.size();
  for (auto& [key, ids] : ids_of_key) HA_PROBLEM(ids.size() == 1, "idempotency key " << key << " has " << ids.size() << " jobs");
  for (auto& [id, keys] : keys_of_id) HA_PROBLEM(keys.size() == 1, "job " << id << " acknowledged for " << keys.size() << " keys");

  std::map<std::string, int> bunny_attempt;  // job -> attempt bunny was told was stored
  std::map<std::string, int> execs;
  for (auto* b : bunnies) {
    for (auto& [id, attempt] : b->delivered()) {
      ++v.bunny_results;
      auto [it, fresh] = bunny_attempt.emplace(id, attempt);
      HA_PROBLEM(fresh, "two results of job " << id << " acknowledged to bunnies (attempts " << it->second << ", " << attempt << ")");
    }
    for (auto& [id, n] : b->executions()) execs[id] += n;
  }
  for (auto& [id, a] : bunny_attempt)
    HA_PROBLEM(result_of.count(id) == 0, "job " << id << ": results acknowledged both to a bunny and to a consumer thread");
  for (auto& [id, n] : execs) {
    v.executions += static_cast<size_t>(n);
    if (n > 1) v.duplicate_executions += static_cast<size_t>(n - 1);
  }

  relay::v1::blocking_client reader(client_options(port, "producer", 15000));
  std::set<std::string> all_ids;
  for (auto& [id, keys] : keys_of_id) all_ids.insert(id);
  for (auto& [id, r] : result_of) all_ids.insert(id);
  for (auto& [id, a] : bunny_attempt) all_ids.insert(id);
  size_t missing = 0, not_terminal = 0, wrong_result = 0;
  for (const auto& id : all_ids) {
    relay::v1::blocking_client::answer<relay::v1::job_view> g;
    for (int tries = 0; tries < 100; ++tries) {
      // Each job is asked at least once, without waiting once the time is up.
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(until - steady::now()).count();
      if (tries > 0 && left <= 0) break;
      g = reader.get_job(id, static_cast<uint32_t>(std::clamp<int64_t>(left, 0, 10000)));
      if (g.err && retryable(g.err)) {
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
        continue;
      }
      if (!g.err && !g.value.terminal()) continue;  // the wait ran out; again, within the bound
      break;
    }
    if (g.err) {
      ++missing;
      if (missing <= 5)
        HA_PROBLEM(false, "acknowledged job " << id << " is not on the leader: " << g.err.kind_name() << " "
                                                 << g.err.status << " " << g.err.code);
      continue;
    }
    if (!g.value.terminal()) {
      ++not_terminal;
      if (not_terminal <= 5) HA_PROBLEM(false, "job " << id << " is not terminal: " << g.value.raw);
      continue;
    }
    if (g.value.state == "succeeded") ++v.succeeded;
    else ++v.other_terminal;
    if (auto it = result_of.find(id); it != result_of.end() && g.value.result != it->second) {
      ++wrong_result;
      if (wrong_result <= 5) HA_PROBLEM(false, "job " << id << ": acknowledged result " << it->second << ", stored " << g.value.raw);
    }
    if (auto it = bunny_attempt.find(id); it != bunny_attempt.end()) {
      std::string want = R"({"job":")" + id + R"(","attempt":)" + std::to_string(it->second) + "}";
      if (g.value.state != "succeeded" || g.value.result != want) {
        ++wrong_result;
        if (wrong_result <= 5) HA_PROBLEM(false, "job " << id << ": bunny was told " << want << " is stored; relay has " << g.value.raw);
      }
    }
  }
  HA_PROBLEM(missing == 0, missing << " acknowledged jobs missing");
  HA_PROBLEM(not_terminal == 0, not_terminal << " jobs not terminal");
  HA_PROBLEM(wrong_result == 0, wrong_result << " acknowledged results not as acknowledged");
#undef HA_PROBLEM
  v.verify_ms = std::chrono::duration_cast<std::chrono::milliseconds>(steady::now() - started).count();
  return v;
}

// Waits (bounded) until queue `queue` on the relay at `port` holds no job
// that is not terminal; returns the last counts seen.
inline std::string wait_queue_settled(uint16_t port, const std::string& queue, int timeout_ms, bool& settled) {
  relay::v1::blocking_client admin(client_options(port, "admin", 5000));
  auto until = after_ms(timeout_ms);
  std::string last;
  settled = false;
  for (int i = 0; i < 10000 && steady::now() < until; ++i) {
    auto r = admin.call("GET", "/v1/queues/" + queue);
    if (!r.err) {
      last = r.value;
      int open = 0;
      for (const char* s : {"queued", "delayed", "leased", "failed"}) open += std::atoi(field(last, s).c_str());
      if (open == 0) {
        settled = true;
        return last;
      }
    } else {
      last = std::string(r.err.kind_name()) + " " + std::to_string(r.err.status);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  return last;
}

inline std::string describe(const verdict& v) {
  return "acknowledged submits " + std::to_string(v.submits) + " (keys " + std::to_string(v.keys) +
         "), acknowledged completes " + std::to_string(v.completes) + " + bunny results " +
         std::to_string(v.bunny_results) + "; terminal: succeeded " + std::to_string(v.succeeded) + ", other " +
         std::to_string(v.other_terminal) + "; bunny executions " + std::to_string(v.executions) +
         " (duplicate executions " + std::to_string(v.duplicate_executions) + "); verified in " +
         std::to_string(v.verify_ms) + " ms";
}

}  // namespace test::ha
