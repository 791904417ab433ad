// Durability with the real binary: kill -9 under load, torn and corrupt
// journals, a full disk, compaction.
#include <doctest/doctest.h>
#include <sys/mount.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <set>

#include "../support/relay_fixture.h"

using test::field;
using test::relay_process;

namespace {

std::vector<std::string> with_journal(const std::string& dir, std::vector<std::string> more = {}) {
  std::vector<std::string> a{"--journal-dir", dir, "--set", "journal.fsync=always"};
  a.insert(a.end(), more.begin(), more.end());
  return a;
}

std::string newest_segment(const std::string& dir) {
  std::string best;
  for (auto& e : std::filesystem::directory_iterator(dir))
    if (e.path().filename().string().rfind("segment-", 0) == 0 && e.path().string() > best) best = e.path().string();
  return best;
}

// Producers and workers on one loop, against one relay, recording exactly
// what relay acknowledged.
class load {
 public:
  std::map<std::string, std::string> acked_submits;   // id → payload
  std::map<std::string, std::string> acked_results;   // id → result
  size_t submitted = 0;                               // attempts, acked or not
  static constexpr size_t max_submits = 800;          // per cycle: the load is bounded

  load(const relay_process& r, int cycle, int producers, int workers) : _cycle(cycle) {
    uv_loop_init(&_loop);
    auto make = [&](const std::string& who) {
      auto o = test::v1_options(r.api_port, who);
      o.connection.connect_timeout_ms = 5000;
      o.request_timeout_ms = 5000;  // a long poll's: its wait plus this
      return std::make_unique<relay::v1::client>(&_loop, std::move(o));
    };
    for (int i = 0; i < producers; ++i) _producers.push_back(make("producer"));
    for (int i = 0; i < workers; ++i) _workers.push_back(make("worker"));
  }
  ~load() {
    // Callbacks of requests still out never run once their client is gone.
    _producers.clear();
    _workers.clear();
    uv_run(&_loop, UV_RUN_DEFAULT);
    uv_loop_close(&_loop);
  }

  // Runs until `kill_after_ms`, then SIGKILLs `victim` mid-flight and lets
  // every outstanding request fail.
  void run_and_kill(pid_t victim, uint64_t kill_after_ms) {
    for (size_t i = 0; i < _producers.size(); ++i) produce(i);
    for (size_t i = 0; i < _workers.size(); ++i) work(i);
    uv_timer_t t;
    uv_timer_init(&_loop, &t);
    t.data = this;
    _victim = victim;
    uv_timer_start(&t, [](uv_timer_t* h) {
      auto* self = static_cast<load*>(h->data);
      ::kill(self->_victim, SIGKILL);
      self->_stopping = true;
      uv_close(reinterpret_cast<uv_handle_t*>(h), nullptr);
    }, kill_after_ms, 0);
    // Bounded: the clients time out within seconds once relay is gone.
    auto until = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    while (uv_run(&_loop, UV_RUN_ONCE) && std::chrono::steady_clock::now() < until) {
      if (_stopping && _outstanding == 0) break;
    }
  }

  // Workers only, until each has seen three empty leases in a row, each
  // waiting longer than a lease lasts (so expired leases come back first),
  // or time runs out.
  void drain(int seconds) {
    _draining = true;
    _empty.assign(_workers.size(), 0);
    for (size_t i = 0; i < _workers.size(); ++i) work(i);
    auto until = std::chrono::steady_clock::now() + std::chrono::seconds(seconds);
    while (std::chrono::steady_clock::now() < until && uv_run(&_loop, UV_RUN_ONCE)) {
      if (std::all_of(_empty.begin(), _empty.end(), [](int n) { return n >= 3; })) break;
    }
    _stopping = true;
    while (_outstanding > 0) uv_run(&_loop, UV_RUN_ONCE);
  }

 private:
  // No answer at all (relay killed, connection lost, timed out): the
  // client stops. An answer, even a refusal, lets it go on.
  static bool answered(const relay::v1::error& e) { return e.what != relay::v1::error::kind::transport; }

  void produce(size_t i) {
    if (_stopping || submitted >= max_submits) return;
    std::string payload = "\"p-" + std::to_string(_cycle) + "-" + std::to_string(submitted++) + "\"";
    relay::v1::submit_request r;
    r.queue = "work";
    r.payload = payload;
    r.lease_ms = 1000;
    ++_outstanding;
    _producers[i]->submit(r, [this, i, payload](const relay::v1::error& e, relay::v1::submitted& s) {
      --_outstanding;
      if (!e && s.created && s.ids.size() == 1) acked_submits[s.ids[0]] = payload;  // 201
      if (answered(e)) produce(i);
    });
  }
  void work(size_t i) {
    if (_stopping) return;
    if (_draining && _empty[i] >= 3) return;
    relay::v1::lease_request r;
    r.queue = "work";
    r.max = _draining ? 16 : 4;
    r.wait_ms = _draining ? 1500 : 100;
    r.lease_ms = 1000;  // as every job's own (the drain waits longer than a lease lasts)
    ++_outstanding;
    _workers[i]->lease(r, [this, i](const relay::v1::error& e, relay::v1::lease_answer& a) {
      --_outstanding;
      if (!answered(e)) return;
      if (e) a.jobs.clear();  // refused: nothing leased
      // {"jobs":[]}: an empty lease.
      if (_draining) _empty[i] = !e && a.jobs.empty() && a.rejected.empty() ? _empty[i] + 1 : 0;
      complete_all(i, std::make_shared<std::vector<relay::v1::leased_job>>(std::move(a.jobs)), 0);
    });
  }
  // Completes the leased jobs one after another, then leases again.
  void complete_all(size_t i, std::shared_ptr<std::vector<relay::v1::leased_job>> jobs, size_t from) {
    if (from >= jobs->size() || _stopping) {
      work(i);
      return;
    }
    const auto& job = (*jobs)[from];
    std::string id = job.id;
    std::string result = "{\"done\":\"" + id + "\",\"cycle\":" + std::to_string(_cycle) + "}";
    ++_outstanding;
    _workers[i]->complete(id, job.lease, result, [this, i, id, result, jobs, from](const relay::v1::error& e) {
      --_outstanding;
      if (!answered(e)) return;
      if (!e) acked_results[id] = result;  // 200
      complete_all(i, jobs, from + 1);
    });
  }

  uv_loop_t _loop;
  int _cycle;
  pid_t _victim = 0;
  bool _stopping = false;
  bool _draining = false;
  std::vector<int> _empty;
  int _outstanding = 0;
  std::vector<std::unique_ptr<relay::v1::client>> _producers, _workers;
};

// GET every job in `ids` over one pipelined connection: id → body (or "" if
// the job could not be read: not 200, or not a job).
std::map<std::string, std::string> fetch_all(const relay_process& relay, const std::vector<std::string>& ids) {
  std::map<std::string, std::string> out;
  test::test_loop loop;
  relay::v1::client c(&loop.loop, test::v1_options(relay.api_port, "admin"));
  size_t next = 0, done = 0;
  std::function<void()> issue = [&] {
    if (next >= ids.size()) return;
    std::string id = ids[next++];
    c.get_job(id, 0, [&, id](const relay::v1::error& e, relay::v1::job_view& v) {
      out[id] = !e ? v.raw : std::string();
      ++done;
      issue();
    });
  };
  for (int i = 0; i < 64; ++i) issue();
  while (done < ids.size()) uv_run(&loop.loop, UV_RUN_ONCE);
  return out;
}

template <class Map>
std::vector<std::string> keys(const Map& m) {
  std::vector<std::string> k;
  for (const auto& [id, v] : m) k.push_back(id);
  return k;
}

}  // namespace

TEST_CASE("crash loop: kill -9 under load, 20 times; nothing acknowledged is ever lost") {
  test::tmpdir jdir;
  std::map<std::string, std::string> submits, results;
  size_t attempts = 0;
  std::mt19937 rng(20261122);
  int cycles = std::getenv("RELAY_CRASH_CYCLES") ? std::atoi(std::getenv("RELAY_CRASH_CYCLES")) : 20;
  for (int cycle = 0; cycle < cycles; ++cycle) {
    relay_process relay(with_journal(jdir.path()));
    // Everything acknowledged before any earlier kill is there, exactly.
    auto jobs = fetch_all(relay, keys(submits));
    size_t missing = 0, wrong = 0;
    for (const auto& [id, payload] : submits) {
      const std::string& body = jobs[id];
      if (body.empty()) {
        ++missing;
        continue;
      }
      if (body.find("\"payload\":" + payload + ",") == std::string::npos) ++wrong;
      auto r = results.find(id);
      if (r != results.end() && (field(body, "state") != "succeeded" ||
                                 body.find("\"result\":" + r->second + ",") == std::string::npos))
        ++wrong;
    }
    REQUIRE_MESSAGE(missing == 0, "cycle " << cycle << ": " << missing << " acknowledged jobs are missing");
    REQUIRE_MESSAGE(wrong == 0, "cycle " << cycle << ": " << wrong << " jobs differ from what was acknowledged");
    load l(relay, cycle, 6, 4);
    l.run_and_kill(relay.proc->pid(), std::uniform_int_distribution<uint64_t>(30, 250)(rng));
    CHECK_EQ(relay.proc->wait(5000), 128 + SIGKILL);
    submits.insert(l.acked_submits.begin(), l.acked_submits.end());
    for (auto& [id, r] : l.acked_results) results[id] = r;
    attempts += l.submitted;
  }
  // Finally: every job finishes — no lease is stuck forever — and no job
  // appeared twice (the queue holds no more jobs than were ever submitted).
  relay_process relay(with_journal(jdir.path()));
  {
    load l(relay, 999, 0, 4);
    l.drain(60);
    for (auto& [id, r] : l.acked_results) results[id] = r;
  }
  auto stats = relay.curl("admin", "GET", "/v1/queues/work");
  CHECK_MESSAGE(stats.body.find("\"queued\":0,\"delayed\":0,\"leased\":0") != std::string::npos, stats.body);
  size_t held = std::stoul(field(stats.body, "succeeded"));
  CHECK_GE(held, submits.size());
  CHECK_LE(held, attempts);
  auto jobs = fetch_all(relay, keys(submits));
  size_t unfinished = 0, wrong = 0;
  for (const auto& [id, payload] : submits) {
    if (field(jobs[id], "state") != "succeeded") ++unfinished;
    auto r = results.find(id);
    if (r != results.end() && jobs[id].find("\"result\":" + r->second + ",") == std::string::npos) ++wrong;
  }
  CHECK_EQ(unfinished, 0u);
  CHECK_EQ(wrong, 0u);
  MESSAGE(cycles << " kill -9 cycles: " << submits.size() << " acknowledged submits, " << results.size()
                 << " acknowledged results, " << attempts << " submit attempts; all intact");
  CHECK_GT(submits.size(), static_cast<size_t>(cycles));
}

TEST_CASE("a restarted relay honours leases that were outstanding, until they expire") {
  test::tmpdir jdir;
  std::string id, lease;
  {
    relay_process relay(with_journal(jdir.path()));
    auto s = relay.curl("producer", "POST", "/v1/queues/render/jobs", R"({"payload":"kept"})");
    id = field(s.body, "id");
    auto l = relay.curl("worker", "POST", "/v1/queues/render/lease", R"({"lease_ms":60000})");
    lease = field(l.body, "lease");
    relay.proc->signal(SIGKILL);
    relay.proc->wait(5000);
  }
  relay_process relay(with_journal(jdir.path()));
  CHECK_EQ(field(relay.curl("producer", "GET", "/v1/jobs/" + id).body, "state"), "leased");
  // Bound to its principal still: another worker cannot use it.
  CHECK_EQ(relay.curl("worker2", "POST", "/v1/jobs/" + id + "/complete", R"({"lease":")" + lease + R"(","result":1})").status, 403);
  CHECK_EQ(relay.curl("worker", "POST", "/v1/jobs/" + id + "/complete", R"({"lease":")" + lease + R"(","result":"after restart"})").status, 200);
  CHECK(relay.proc->wait_for_line("\"event\":\"journal_replayed\"").has_value());
}

TEST_CASE("a torn journal tail is truncated; corruption before it stops start-up unless repaired") {
  test::tmpdir jdir;
  std::vector<std::string> ids;
  {
    relay_process relay(with_journal(jdir.path()));
    for (int i = 0; i < 10; ++i)
      ids.push_back(field(relay.curl("producer", "POST", "/v1/queues/render/jobs",
                                     R"({"payload":")" + std::string(60, static_cast<char>('a' + i)) + R"("})").body, "id"));
    relay.proc->signal(SIGKILL);
    relay.proc->wait(5000);
  }
  std::string seg = newest_segment(jdir.path());
  std::string data = test::read_file(seg);
  // Torn: the last record loses its last bytes.
  test::write_file(seg, data.substr(0, data.size() - 7));
  {
    relay_process relay(with_journal(jdir.path()));
    auto line = relay.proc->wait_for_line("\"event\":\"journal_tail_truncated\"");
    REQUIRE(line.has_value());
    CHECK(line->find(seg) != std::string::npos);
    CHECK_EQ(relay.curl("producer", "GET", "/v1/jobs/" + ids[8]).status, 200);
    CHECK_EQ(relay.curl("producer", "GET", "/v1/jobs/" + ids[9]).status, 404);
    relay.proc->signal(SIGTERM);
    relay.proc->wait(10000);
  }
  // Corrupt: one flipped bit inside an early record of the first segment.
  std::string first;
  for (auto& e : std::filesystem::directory_iterator(jdir.path())) {
    if (e.path().filename().string().rfind("segment-", 0) != 0) continue;  // LOCK
    if (first.empty() || e.path().string() < first) first = e.path().string();
  }
  data = test::read_file(first);
  size_t victim = data.find(std::string(60, 'c'));
  REQUIRE(victim != std::string::npos);
  data[victim + 30] ^= 0x04;
  test::write_file(first, data);
  test::tmpdir cfg;
  test::write_file(cfg / "policy.json", test::default_policy());
  auto refused = test::run({test::env_or_fail("RELAY_BIN"), "--journal-dir", jdir.path(), "--set",
                            "tls.cert=" + test::pki() + "/server.crt", "--set", "tls.key=" + test::pki() + "/server.key",
                            "--set", "tls.client_ca=" + test::pki() + "/ca.crt", "--set", "policy=" + (cfg / "policy.json"),
                            "--listen", "127.0.0.1:0", "--ops-listen", "127.0.0.1:0"},
                           cfg.path(), 10000);
  CHECK_EQ(refused.exit_code, 1);
  bool named = refused.err.find(first + " is corrupt at offset ") != std::string::npos;
  CHECK_MESSAGE(named, refused.err);
  CHECK(refused.err.find("--repair-journal") != std::string::npos);

  relay_process repaired(with_journal(jdir.path(), {"--repair-journal"}));
  CHECK(repaired.proc->wait_for_line("\"event\":\"journal_repaired\"").has_value());
  CHECK_EQ(repaired.curl("producer", "GET", "/v1/jobs/" + ids[1]).status, 200);
  CHECK_EQ(repaired.curl("producer", "GET", "/v1/jobs/" + ids[2]).status, 404);
  CHECK_EQ(repaired.curl("producer", "POST", "/v1/queues/render/jobs", R"({"payload":1})").status, 201);
}

TEST_CASE("a full disk: writes get 503 and are never falsely acknowledged; relay recovers by itself") {
  test::tmpdir mnt;
  if (mount("tmpfs", mnt.path().c_str(), "tmpfs", 0, "size=256k") != 0) {
    MESSAGE("SKIPPED: cannot mount a small tmpfs here (" << std::strerror(errno) << "); needs root");
    return;
  }
  struct unmount {
    std::string path;
    ~unmount() { umount2(path.c_str(), MNT_DETACH); }
  } guard{mnt.path()};
  std::string jdir = mnt.path() + "/journal";
  std::map<std::string, std::string> acked;
  std::string payload(8000, 'z');
  {
    relay_process relay(with_journal(jdir, {"--set", "journal.compact_min_bytes=1073741824"}));
    int refused = 0;
    for (int i = 0; i < 200 && refused < 3; ++i) {
      auto r = relay.curl("producer", "POST", "/v1/queues/render/jobs", R"({"payload":")" + payload + std::to_string(i) + R"("})");
      if (r.status == 201) acked[field(r.body, "id")] = std::to_string(i);
      else {
        CHECK_EQ(r.status, 503);
        CHECK_EQ(field(r.body, "code"), "unavailable");
        ++refused;
      }
    }
    REQUIRE_EQ(refused, 3);
    CHECK_GT(acked.size(), 5u);
    CHECK_EQ(relay.ops_get("/readyz").status, 503);
    CHECK(relay.ops_get("/metrics").body.find("relay_journal_failing 1") != std::string::npos);
    // Reads still work.
    CHECK_EQ(relay.curl("producer", "GET", "/v1/jobs/" + acked.begin()->first).status, 200);
    // Space comes back: relay resumes by itself.
    REQUIRE_EQ(mount("tmpfs", mnt.path().c_str(), "tmpfs", MS_REMOUNT, "size=8m"), 0);
    int ok_after = 0;
    for (int i = 0; i < 100 && ok_after == 0; ++i) {
      auto r = relay.curl("producer", "POST", "/v1/queues/render/jobs", R"({"payload":"after"})");
      if (r.status == 201) {
        acked[field(r.body, "id")] = "after";
        ++ok_after;
      } else {
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
      }
    }
    CHECK_EQ(ok_after, 1);
    CHECK_EQ(relay.ops_get("/readyz").status, 200);
    CHECK(relay.proc->wait_for_line("\"event\":\"journal_recovered\"").has_value());
    relay.proc->signal(SIGKILL);
    relay.proc->wait(5000);
  }
  relay_process relay(with_journal(jdir));
  for (const auto& [id, n] : acked) CHECK_MESSAGE(relay.curl("producer", "GET", "/v1/jobs/" + id).status == 200, id);
}

TEST_CASE("compaction keeps the journal near the size of the live data") {
  test::tmpdir jdir;
  std::vector<std::string> keep;
  {
    relay_process relay(with_journal(jdir.path(), {"--set", "journal.compact_min_bytes=65536", "--set",
                                                   "journal.segment_bytes=32768", "--set", "limits.result_ttl_ms=1000"}));
    for (int i = 0; i < 3; ++i)
      keep.push_back(field(relay.curl("producer", "POST", "/v1/queues/keep/jobs", R"({"payload":"keep me"})").body, "id"));
    std::string big(400, 'x');
    relay::v1::blocking_client producer(test::v1_options(relay.api_port, "producer"));
    relay::v1::blocking_client worker(test::v1_options(relay.api_port, "worker"));
    relay::v1::submit_request batch;
    batch.queue = "render";
    batch.batch = true;
    batch.payload = "[";
    for (int i = 0; i < 50; ++i) batch.payload += std::string(i ? "," : "") + "\"" + big + "\"";
    batch.payload += "]";
    relay::v1::lease_request fifty;
    fifty.queue = "render";
    fifty.max = 50;
    for (int round = 0; round < 40; ++round) {
      auto s = producer.submit(batch);
      REQUIRE_MESSAGE(!s.err, s.err.message);
      REQUIRE(s.value.created);  // 201
      auto l = worker.lease(fifty);
      REQUIRE_MESSAGE(!l.err, l.err.message);
      // Many completes in one request: /v1/results has no typed call.
      std::string results = "[";
      for (const auto& j : l.value.jobs) {
        results += std::string(results.size() > 1 ? "," : "") + R"({"id":")" + j.id + R"(","lease":")" + j.lease +
                   R"(","result":")" + big + R"("})";
      }
      results += "]";
      auto r = worker.call("POST", "/v1/results", results);
      REQUIRE_MESSAGE(!r.err, r.err.message);  // 200
    }
    // 2,000 jobs of ~1 KB went through (~2 MB of records); once their
    // results expire, compaction brings the journal down to the live data.
    bool small = false;
    std::string m;
    for (int i = 0; i < 100 && !small; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
      m = relay.ops_get("/metrics").body;
      auto p = m.find("\nrelay_journal_bytes ");
      small = p != std::string::npos && std::stoull(m.substr(p + 21)) < 65536 && m.find("relay_journal_compactions_total 0") == std::string::npos;
    }
    CHECK_MESSAGE(small, m.substr(m.find("relay_journal_")));
    relay.proc->signal(SIGKILL);
    relay.proc->wait(5000);
  }
  uintmax_t bytes = 0;
  // The journal's own files (blobs/, spooled values, is a directory).
  for (auto& e : std::filesystem::directory_iterator(jdir.path()))
    if (e.is_regular_file()) bytes += e.file_size();
  CHECK_LT(bytes, 200000u);
  relay_process relay(with_journal(jdir.path()));
  for (const auto& id : keep) CHECK_EQ(field(relay.curl("producer", "GET", "/v1/jobs/" + id).body, "state"), "queued");
  auto next = relay.curl("producer", "POST", "/v1/queues/keep/jobs", R"({"payload":1})");
  CHECK_GT(std::stoull(field(next.body, "id"), nullptr, 16), 2000u);  // ids are never reused
}
