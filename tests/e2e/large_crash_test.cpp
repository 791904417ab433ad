// kill -9 with large payloads and results in flight (issue 13): producers
// submit payloads of 1-16 MiB while a worker completes jobs with results
// of 1-16 MiB, and relay is killed at a random moment, six times; then
// every job is completed with a large result and relay is killed once
// more. After every restart each payload and result relay acknowledged is there, byte
// for byte. Payloads are made from seeds and results from job ids
// (tests/support/large.h), so the test keeps seeds, not bytes.
#include <doctest/doctest.h>

#include <chrono>
#include <cmath>
#include <csignal>
#include <map>
#include <memory>
#include <random>
#include <set>

#include "../support/large.h"
#include "../support/relay_fixture.h"

using test::relay_process;
namespace large = test::large;
using large::MiB;

namespace {

// 1-16 MiB, log-uniform: as many jobs near 1 MiB as near 16 MiB.
size_t size_from(uint64_t r) {
  double u = static_cast<double>(r % 1000000) / 1e6;
  return static_cast<size_t>(static_cast<double>(MiB) * std::exp2(4.0 * u));
}

struct payload_spec {
  uint64_t seed = 0;
  size_t size = 0;
  bool structured = false;
  std::string make() const {
    return structured ? large::structured_payload(seed, size) : large::string_payload(seed, size);
  }
};

// The result a worker gives job `id`: a function of the id alone, so it
// can be checked whether or not the worker heard relay's answer.
std::string result_for(const std::string& id) {
  uint64_t h = std::hash<std::string>{}(id) * 0x9e3779b97f4a7c15ull;
  payload_spec s{h, size_from(h >> 20), (h & 1) != 0};
  return s.make();
}

std::vector<std::string> relay_args(const std::string& jdir) {
  return {"--journal-dir", jdir, "--set", "journal.fsync=always", "--set",
          "limits.max_body_bytes=" + std::to_string(32 * MiB), "--set",
          "limits.max_held_bytes=" + std::to_string(uint64_t{4} << 30)};
}

// Two producers and a worker on one loop against one relay, recording
// exactly what relay acknowledged, until relay is killed.
class load {
 public:
  std::map<std::string, payload_spec> acked_submits;  // id -> payload (201)
  std::set<std::string> acked_results;                // ids whose complete got 200
  size_t submitted = 0;

  load(const relay_process& r, std::mt19937_64& rng, size_t max_submits) : _rng(rng), _max_submits(max_submits) {
    uv_loop_init(&_loop);
    auto make = [&](const std::string& who) {
      auto o = test::v1_options(r.api_port, who);
      o.connection.connect_timeout_ms = 5000;
      o.request_timeout_ms = 30000;
      return std::make_unique<relay::v1::client>(&_loop, std::move(o));
    };
    for (int i = 0; i < 2; ++i) _producers.push_back(make("producer"));
    _worker = make("worker");
  }
  ~load() {
    _producers.clear();
    _worker.reset();
    uv_run(&_loop, UV_RUN_DEFAULT);
    uv_loop_close(&_loop);
  }

  // Runs until `kill_after_ms` after relay's first acknowledgement in
  // this cycle (so that a slow build gets as far as a fast one before the
  // kill; at the latest 20 s in), then SIGKILLs `victim` and lets every
  // request still out fail.
  void run_and_kill(pid_t victim, uint64_t kill_after_ms) {
    _victim = victim;
    _kill_after_ms = kill_after_ms;
    uv_timer_init(&_loop, &_kill);
    _kill.data = this;
    uv_timer_start(&_kill, on_kill, 20000, 0);
    for (size_t i = 0; i < _producers.size(); ++i) produce(i);
    work();
    run_until_stopped();
  }

  // The worker alone, without a kill, until a lease finds nothing to do
  // (its wait is longer than a lease, so any job leased before the kill
  // has come back by then) or 60 s have passed.
  void drain() {
    _draining = true;
    auto until = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    work();
    while (std::chrono::steady_clock::now() < until && _empty < 1 && uv_run(&_loop, UV_RUN_ONCE)) {
    }
    _stopping = true;
    while (_outstanding > 0) uv_run(&_loop, UV_RUN_ONCE);
  }

 private:
  static bool answered(const relay::v1::error& e) { return e.what != relay::v1::error::kind::transport; }

  static void on_kill(uv_timer_t* h) {
    auto* self = static_cast<load*>(h->data);
    ::kill(self->_victim, SIGKILL);
    self->_stopping = true;
    uv_close(reinterpret_cast<uv_handle_t*>(h), nullptr);
  }
  // The first acknowledgement of the cycle sets the moment of the kill.
  void acknowledged() {
    if (_victim == 0 || _kill_armed || _stopping) return;
    _kill_armed = true;
    uv_timer_start(&_kill, on_kill, _kill_after_ms, 0);
  }
  void run_until_stopped() {
    auto until = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    while (uv_run(&_loop, UV_RUN_ONCE) && std::chrono::steady_clock::now() < until) {
      if (_stopping && _outstanding == 0) break;
    }
  }

  void produce(size_t i) {
    if (_stopping || submitted >= _max_submits) return;
    ++submitted;
    payload_spec spec{_rng(), size_from(_rng()), (_rng() & 1) != 0};
    relay::v1::submit_request r;
    r.queue = "work";
    r.payload = spec.make();
    r.lease_ms = 2000;  // a job leased before a kill comes back soon after
    // Every kill and every lease that runs out under a slow (sanitizer)
    // build costs an attempt: the job must not go dead for it.
    r.max_attempts = 1000;
    ++_outstanding;
    _producers[i]->submit(r, [this, i, spec](const relay::v1::error& e, relay::v1::submitted& s) {
      --_outstanding;
      if (!e && s.created && s.ids.size() == 1) {
        acked_submits[s.ids[0]] = spec;
        acknowledged();
      }
      if (answered(e)) produce(i);
    });
  }
  void work() {
    if (_stopping) return;
    relay::v1::lease_request r;
    r.queue = "work";
    r.max = 1;
    r.wait_ms = _draining ? 2500 : 200;
    // Short while killing, so that a job leased before a kill comes back
    // soon; long while draining, so that a slow build's large complete
    // does not lose its lease.
    r.lease_ms = _draining ? 60000 : 2000;
    ++_outstanding;
    _worker->lease(r, [this](const relay::v1::error& e, relay::v1::lease_answer& a) {
      --_outstanding;
      if (!answered(e)) return;
      if (_draining) _empty = !e && a.jobs.empty() ? _empty + 1 : 0;
      if (e || a.jobs.empty()) return work();
      std::string id = a.jobs[0].id;
      ++_outstanding;
      _worker->complete(id, a.jobs[0].lease, result_for(id), [this, id](const relay::v1::error& ce) {
        --_outstanding;
        if (!answered(ce)) return;
        if (!ce) {
          acked_results.insert(id);
          acknowledged();
        }
        work();
      });
    });
  }

  std::mt19937_64& _rng;
  size_t _max_submits;
  uv_loop_t _loop;
  uv_timer_t _kill;
  pid_t _victim = 0;
  uint64_t _kill_after_ms = 0;
  bool _kill_armed = false;
  bool _stopping = false;
  bool _draining = false;
  int _empty = 0;  // empty leases in a row, while draining
  int _outstanding = 0;
  std::vector<std::unique_ptr<relay::v1::client>> _producers;
  std::unique_ptr<relay::v1::client> _worker;
};

struct verdict {
  size_t missing = 0, wrong_payload = 0, wrong_result = 0, results_seen = 0;
  size_t unfinished = 0;  // acknowledged submits not succeeded (yet)
  std::string first_problem;
};

// Reads back every acknowledged job: each payload as submitted; each
// acknowledged result there; any result there (acknowledged or not) the
// worker's.
// What each job's payload and result must be, made once (a sanitizer
// build is slow to make them again after every restart).
struct expected_bytes {
  std::map<std::string, std::string> payloads, results;
  const std::string& payload(const std::string& id, const payload_spec& spec) {
    auto [it, fresh] = payloads.try_emplace(id);
    if (fresh) it->second = spec.make();
    return it->second;
  }
  const std::string& result(const std::string& id) {
    auto [it, fresh] = results.try_emplace(id);
    if (fresh) it->second = result_for(id);
    return it->second;
  }
};

verdict check_all(const relay_process& relay, const std::map<std::string, payload_spec>& submits,
                  const std::set<std::string>& results, expected_bytes& expected) {
  verdict v;
  auto o = test::v1_options(relay.api_port, "producer");
  o.request_timeout_ms = 60000;
  relay::v1::blocking_client c(o);
  std::set<std::string> ids(results);
  for (const auto& [id, spec] : submits) ids.insert(id);
  for (const auto& id : ids) {
    auto j = c.get_job(id);
    if (j.err) {
      ++v.missing;
      if (v.first_problem.empty()) v.first_problem = id + ": " + j.err.message;
      continue;
    }
    if (auto s = submits.find(id); s != submits.end()) {
      const std::string& want = expected.payload(id, s->second);
      if (j.value.payload != want) {
        ++v.wrong_payload;
        if (v.first_problem.empty()) v.first_problem = id + " payload: " + large::first_difference(j.value.payload, want);
      }
    }
    bool must = results.count(id) > 0;
    if (submits.count(id) && j.value.state != "succeeded") {
      ++v.unfinished;
      if (v.first_problem.empty())
        v.first_problem = id + ": state " + j.value.state + " after " + std::to_string(j.value.attempts) + " attempts";
    }
    if (j.value.state == "succeeded") {
      ++v.results_seen;
      const std::string& want = expected.result(id);
      if (j.value.result != want) {
        ++v.wrong_result;
        if (v.first_problem.empty()) v.first_problem = id + " result: " + large::first_difference(j.value.result, want);
      }
    } else if (must) {
      ++v.wrong_result;
      if (v.first_problem.empty()) v.first_problem = id + ": acknowledged result, but state " + j.value.state;
    }
  }
  return v;
}

}  // namespace

TEST_CASE("crash loop with large payloads and results: kill -9 six times; every acknowledged byte is intact") {
  const auto t0 = std::chrono::steady_clock::now();
  test::tmpdir jdir;
  std::map<std::string, payload_spec> submits;
  std::set<std::string> results;
  size_t attempts = 0;
  std::mt19937_64 rng(20261207);
  const int cycles = 6;
  expected_bytes expected;
  double checking_s = 0, drain_s = 0;
  auto since = [](std::chrono::steady_clock::time_point t) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
  };
  auto check = [&](const relay_process& relay, const std::string& when) {
    auto tc = std::chrono::steady_clock::now();
    verdict v = check_all(relay, submits, results, expected);
    checking_s += since(tc);
    INFO(when << ": " << v.first_problem);
    REQUIRE_EQ(v.missing, 0u);
    REQUIRE_EQ(v.wrong_payload, 0u);
    REQUIRE_EQ(v.wrong_result, 0u);
    return v;
  };
  for (int cycle = 0; cycle < cycles; ++cycle) {
    relay_process relay(relay_args(jdir.path()));
    check(relay, "after kill " + std::to_string(cycle));
    // At most three submits a cycle: what is checked after each restart
    // (every byte acknowledged so far) stays bounded.
    load l(relay, rng, 3);
    l.run_and_kill(relay.proc->pid(), std::uniform_int_distribution<uint64_t>(0, 1500)(rng));
    CHECK_EQ(relay.proc->wait(5000), 128 + SIGKILL);
    submits.insert(l.acked_submits.begin(), l.acked_submits.end());
    results.insert(l.acked_results.begin(), l.acked_results.end());
    attempts += l.submitted;
  }
  // Then every job gets its large result, and those survive a last kill.
  {
    relay_process relay(relay_args(jdir.path()));
    check(relay, "after kill " + std::to_string(cycles));
    load l(relay, rng, 0);
    auto td = std::chrono::steady_clock::now();
    l.drain();
    drain_s = since(td);
    results.insert(l.acked_results.begin(), l.acked_results.end());
    relay.proc->signal(SIGKILL);
    CHECK_EQ(relay.proc->wait(5000), 128 + SIGKILL);
  }
  relay_process relay(relay_args(jdir.path()));
  verdict v = check(relay, "after the last kill");
  CHECK_EQ(v.unfinished, 0u);
  CHECK_GT(submits.size(), static_cast<size_t>(cycles));
  MESSAGE((cycles + 1) << " kills: " << submits.size() << " acknowledged 1-16 MiB payloads, " << results.size()
                     << " acknowledged 1-16 MiB results (" << v.results_seen << " held), " << attempts << " submits tried; all intact, in "
                     << since(t0) << " s (" << checking_s << " s reading back, " << drain_s << " s draining)");
}
