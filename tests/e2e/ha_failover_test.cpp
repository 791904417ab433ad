// The fault suite of issue 12 ("prove it on one machine"): a PostgreSQL
// primary and synchronous standby on loopback (tests/support/postgres.h),
// two real relay processes on one shard (backend postgres), real bunnies
// pointed at both relay URLs, producer and consumer threads, and a checker
// that records every acknowledgement (tests/support/ha_checker.h). Each
// fault is bounded in time; afterwards every acknowledged submit and result
// must be on the relay that leads, every job must reach a terminal state,
// and no idempotency key may have two jobs (executions may repeat: they are
// counted). The figures (failover time, replay time, gaps) are printed with
// MESSAGE, never asserted beyond generous bounds that keep the suite from
// hanging. Skips (exit 77) where PostgreSQL cannot be started.
//
// Cases: standby (no API port, /readyz 503 "standby", metrics; the checker
// tested on a made-up loss); two relays racing on a new shard; the DSN's
// password kept out of logs, argv, environment; SIGTERM releases the lease;
// fault 1 SIGKILL of the leader; fault 2 SIGSTOP past the lease, SIGCONT
// (fenced, re-exec as standby, same PID); fault 2b the paused leader wakes
// after its successor died (leads again from the database, new epoch);
// fault 3 the leader cut from PostgreSQL by tests/wan_proxy (503s, takeover,
// back as standby; then it leads again and replays what the held commits
// left); fault 3c SIGTERM on a cut leader; fault
// 3b the leader's database connections reset twelve times (commits of
// unknown outcome); fault 4 the primary killed, its data directory deleted,
// the standby promoted (within the lease, and after two); fault 5 rolling
// restart of both relays; --check-config on good and bad postgres settings.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>
#include <signal.h>

#include <csignal>
#include <cstdio>
#include <filesystem>

#include "../support/ha_checker.h"
#include "../support/postgres.h"

using namespace test::ha;

namespace {

std::string primary_only_dsn(const test::postgres_cluster& pg) {
  return dsn("127.0.0.1", std::to_string(pg.primary_port()), pg.user_name(), pg.passfile_path(), pg.dbname());
}
// A wan_proxy in front of the primary (SIGUSR1 cuts, SIGUSR2 restores,
// SIGHUP resets), and the DSN that reaches the primary through it.
struct db_proxy {
  test::tmpdir dir;
  std::unique_ptr<test::child> proc;
  std::string dsn_via;

  explicit db_proxy(const test::postgres_cluster& pg) {
    proc = std::make_unique<test::child>(
        std::vector<std::string>{test::env_or_fail("WAN_PROXY_BIN"), "127.0.0.1:0",
                                 "127.0.0.1:" + std::to_string(pg.primary_port()), "0"},
        dir / "proxy.log");
    auto listening = proc->wait_for_line("proxy_listening");
    REQUIRE(listening.has_value());
    std::string addr = test::json_field(*listening, "addr");
    dsn_via = dsn("127.0.0.1", addr.substr(addr.rfind(':') + 1), pg.user_name(), pg.passfile_path(), pg.dbname());
  }
  void signal(int sig) const { proc->signal(sig); }
  int wait(int timeout_ms) { return proc->wait(timeout_ms); }
};

// Both servers; libpq picks the one that takes writes.
std::string both_hosts_dsn(const test::postgres_cluster& pg) {
  return dsn("127.0.0.1,127.0.0.1", std::to_string(pg.primary_port()) + "," + std::to_string(pg.standby_port()),
             pg.user_name(), pg.passfile_path(), pg.dbname(), "target_session_attrs=read-write");
}

// The value of the first sample of metric `name` (labels or not), or "".
std::string metric(const std::string& body, const std::string& name) {
  for (auto& l : test::lines(body))
    if (l.rfind(name, 0) == 0 && (l.size() > name.size() && (l[name.size()] == ' ' || l[name.size()] == '{')))
      return l.substr(l.rfind(' ') + 1);
  return {};
}

std::string first_line(const std::vector<ack>& acks) {
  if (acks.empty()) return {};
  const ack& a = acks.front();
  return std::string(a.what == ack::kind::submit ? "submit " : "complete ") + a.id + " at " + std::to_string(a.at_ms);
}

void check_no_problems(const verdict& v) {
  for (size_t i = 0; i < v.problems.size() && i < 20; ++i) CHECK_MESSAGE(false, v.problems[i]);
  CHECK_MESSAGE(v.problems.empty(), v.problems.size() << " problems");
}

// Two relays, bunnies and load on a fresh cluster. Relay a is started
// first and leads; b waits as standby.
// One cluster for the cases that leave it whole (each on its own shard);
// the case that destroys the primary has its own.
test::postgres_cluster& shared_cluster() {
  static std::unique_ptr<test::postgres_cluster> pg;
  if (!pg) {
    pg = std::make_unique<test::postgres_cluster>();
    pg->start();
  }
  return *pg;
}

struct pair_setup {
  std::unique_ptr<test::postgres_cluster> own;
  test::postgres_cluster& pg;
  checker chk;
  std::unique_ptr<ha_relay> a, b;
  std::vector<std::unique_ptr<bunny>> bunnies;
  std::unique_ptr<load> ld;
  relay_settings settings;

  explicit pair_setup(relay_settings s, bool own_cluster = false)
      : own(own_cluster ? std::make_unique<test::postgres_cluster>() : nullptr),
        pg(own ? *own : shared_cluster()),
        settings(s) {
    if (own) own->start();
  }

  ha_relay& relay_at(int i) { return i == 0 ? *a : *b; }
  std::vector<uint16_t> ports() const { return {a->api_port, b->api_port}; }

  void make_relays(const std::string& dsn_a, const std::string& dsn_b) {
    a = std::make_unique<ha_relay>("a", dsn_a, settings);
    b = std::make_unique<ha_relay>("b", dsn_b, settings);
  }

  void start_pair() {
    a->start();
    auto acquired = a->wait_event("leadership_acquired", 1, 30000);
    REQUIRE_MESSAGE(!acquired.empty(), "relay a never led: " << a->log());
    REQUIRE_MESSAGE(!a->wait_event("relay_started", 1, 20000).empty(), "relay a never started: " << a->log());
    b->start();
    REQUIRE_MESSAGE(!b->wait_event("leadership_waiting", 1, 20000).empty(), "relay b never waited: " << b->log());
    REQUIRE_MESSAGE(a->ready(), a->log());
  }

  void start_load(const std::string& prefix, int producers = 2, int pace_ms = 40) {
    bunnies.push_back(std::make_unique<bunny>(std::vector<uint16_t>{a->api_port, b->api_port}, "bunny1"));
    bunnies.push_back(std::make_unique<bunny>(std::vector<uint16_t>{b->api_port, a->api_port}, "bunny2"));
    load::options o;
    o.ports = ports();
    o.prefix = prefix;
    o.producers = producers;
    o.pace_ms = pace_ms;
    ld = std::make_unique<load>(chk, o);
    ld->start();
    auto until = after_ms(20000);
    while (chk.submits_from(-1) < 40 && steady::now() < until) std::this_thread::sleep_for(std::chrono::milliseconds(50));
    REQUIRE_MESSAGE(chk.submits_from(-1) >= 40, "no load: " << chk.refusals() << a->log());
  }

  void run_for(int ms) { std::this_thread::sleep_for(std::chrono::milliseconds(ms)); }

  // Waits until some relay reports ready; its index, or -1.
  int leader(int timeout_ms = 30000) {
    auto until = after_ms(timeout_ms);
    for (;;) {
      for (int i = 0; i < 2; ++i)
        if (relay_at(i).proc && test::process_running(relay_at(i).pid()) && relay_at(i).ready()) return i;
      if (steady::now() >= until) return -1;
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  }

  // Load off, the queue settled on the leader, everything acknowledged
  // checked there.
  verdict finish(int leader_index) {
    ld->stop();
    for (auto& u : chk.unexpected_answers()) CHECK_MESSAGE(false, "unexpected answer: " << u);
    bool settled = false;
    auto counts = wait_queue_settled(relay_at(leader_index).api_port, "work", 60000, settled);
    CHECK_MESSAGE(settled, "jobs still open on the leader: " << counts);
    std::vector<const bunny*> bs;
    for (auto& x : bunnies) bs.push_back(x.get());
    auto v = verify(chk, bs, relay_at(leader_index).api_port);
    check_no_problems(v);
    for (auto& x : bunnies) x->stop();
    MESSAGE("compactions started: a " << a->events("journal_compaction_started").size() << ", b "
                                      << b->events("journal_compaction_started").size() << " (this incarnation)");
    MESSAGE("checker: " << describe(v) << "; refusals (relay:what=count) " << chk.refusals() << "; queue " << counts);
    return v;
  }

  int64_t replay_ms(const ha_relay& r) {
    auto e = r.events("journal_replayed");
    return e.empty() ? -1 : std::atoll(test::field(e.back(), "milliseconds").c_str());
  }
};

void check_none_after(const checker& c, int relay, int64_t after_ms, const std::string& what) {
  auto late = c.from_after(relay, after_ms);
  CHECK_MESSAGE(late.empty(), late.size() << " acknowledgements from relay " << relay << " after " << what << " ("
                                          << after_ms << "); first: " << first_line(late));
}

// Waits for `event` in r's log after the line of `after_event` number n.
bool wait_restarted_as_standby(const ha_relay& r, int timeout_ms) {
  auto until = after_ms(timeout_ms);
  for (;;) {
    auto log = r.log();
    auto p = log.find("{\"event\":\"restarting_as_standby\"");
    if (p != std::string::npos && log.find("{\"event\":\"leadership_waiting\"", p) != std::string::npos) return true;
    if (steady::now() >= until) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

}  // namespace

TEST_CASE("a standby does not bind the API port and is not ready; the leader is") {
  pair_setup s({"standbys", 1500, 300});
  s.make_relays(primary_only_dsn(s.pg), primary_only_dsn(s.pg));
  s.start_pair();
  CHECK(port_accepts(s.a->api_port));
  CHECK_FALSE(port_accepts(s.b->api_port));
  auto ready = s.b->ops_get("/readyz");
  CHECK_EQ(ready.status, 503);
  CHECK_MESSAGE(ready.body.find("standby") != std::string::npos, ready.body);
  CHECK_EQ(s.b->ops_get("/healthz").status, 200);
  CHECK_EQ(s.a->ops_get("/readyz").status, 200);
  auto ma = s.a->ops_get("/metrics").body;
  auto mb = s.b->ops_get("/metrics").body;
  CHECK_EQ(metric(ma, "relay_leader"), "1");
  CHECK_EQ(metric(mb, "relay_leader"), "0");
  auto waiting = s.b->events("leadership_waiting");
  REQUIRE_FALSE(waiting.empty());
  CHECK_EQ(test::field(waiting.front(), "shard"), "standbys");
  // The checker itself: an acknowledgement the relay does not have, and an
  // idempotency key acknowledged with two ids, are reported.
  {
    relay::v1::blocking_client producer(client_options(s.a->api_port, "producer", 5000));
    relay::v1::submit_request r;
    r.queue = "work";
    r.payload = "0";
    r.idempotency_key = "real";
    auto sub = producer.submit(r);
    REQUIRE_FALSE(sub.err);
    checker c;
    c.record({ack::kind::submit, "real", sub.value.ids.at(0), 0, now_ms(), true, {}, 0});
    c.record({ack::kind::submit, "two", "00000000000000fe", 0, now_ms(), true, {}, 0});
    c.record({ack::kind::submit, "two", "00000000000000ff", 0, now_ms(), true, {}, 0});
    auto v = verify(c, {}, s.a->api_port, 3000);
    std::string all;
    for (auto& p : v.problems) all += p + "\n";
    CHECK_MESSAGE(all.find("idempotency key two has 2 jobs") != std::string::npos, all);
    CHECK_MESSAGE(all.find("00000000000000ff is not on the leader") != std::string::npos, all);
    CHECK_MESSAGE(all.find("not terminal") != std::string::npos, all);  // "real" is queued: nobody consumes here
  }
  auto started = s.a->events("relay_started");
  REQUIRE_FALSE(started.empty());
  CHECK_MESSAGE(test::field(started.front(), "journal_backends").find("postgres") != std::string::npos, started.front());
}

TEST_CASE("two relays started at the same moment on a new shard: exactly one leads, the other waits") {
  for (int round = 0; round < 3; ++round) {
    pair_setup s({"race" + std::to_string(round), 1200, 300});
    s.make_relays(primary_only_dsn(s.pg), primary_only_dsn(s.pg));
    s.a->start();
    s.b->start();
    int lead = s.leader(30000);
    REQUIRE_MESSAGE(lead >= 0, "--- a:\n" << s.a->log() << "--- b:\n" << s.b->log());
    ha_relay& other = s.relay_at(1 - lead);
    CHECK_MESSAGE(!other.wait_event("leadership_waiting", 1, 10000).empty(), other.log());
    s.run_for(1000);
    CHECK(s.relay_at(lead).ready());
    CHECK_FALSE(other.ready());
    CHECK_FALSE(port_accepts(other.api_port));
    CHECK(test::process_running(other.pid()));
    for (int i = 0; i < 2; ++i) {
      CHECK_MESSAGE(s.relay_at(i).events("start_failed").empty(), s.relay_at(i).log());
      CHECK_MESSAGE(s.relay_at(i).events("leadership_lost").empty(), s.relay_at(i).log());
    }
    CHECK_EQ(s.relay_at(lead).events("leadership_acquired").size(), 1u);
    CHECK(other.events("leadership_acquired").empty());
  }
}

TEST_CASE("the DSN's password appears in no log line, argument or environment of relay") {
  const std::string secret = "pw-" + test::pg_detail::random_hex(8);
  // Nothing listens on the port: relay keeps trying and says why.
  uint16_t closed = free_port();
  ha_relay r("r", "host=127.0.0.1 port=" + std::to_string(closed) + " user=relay password=" + secret +
                      " dbname=relay connect_timeout=1",
             {"secret", 1200, 300});
  r.start();
  auto why = r.wait_event("postgres_unavailable", 1, 20000);
  CHECK_MESSAGE(!why.empty(), r.log());
  CHECK(test::process_running(r.pid()));
  CHECK_EQ(r.ops_get("/readyz").status, 503);
  CHECK_MESSAGE(r.log().find(secret) == std::string::npos, r.log());
  CHECK(test::read_file("/proc/" + std::to_string(r.pid()) + "/cmdline").find(secret) == std::string::npos);
  CHECK(test::read_file("/proc/" + std::to_string(r.pid()) + "/environ").find(secret) == std::string::npos);
  CHECK(r.ops_get("/metrics").body.find(secret) == std::string::npos);
  CHECK(r.ops_get("/readyz").body.find(secret) == std::string::npos);
  CHECK_EQ(r.terminate(5000), 0);
}

TEST_CASE("SIGTERM on the leader releases the lease: the standby takes over well before lease_ms") {
  const int lease_ms = 5000;
  pair_setup s({"release", lease_ms, 300});
  s.make_relays(primary_only_dsn(s.pg), primary_only_dsn(s.pg));
  s.start_pair();
  int64_t t_term = now_ms();
  CHECK_EQ(s.a->terminate(15000), 0);
  CHECK_FALSE(s.a->events("leadership_released").empty());
  auto acquired = s.b->wait_event("leadership_acquired", 1, lease_ms + 10000);
  REQUIRE_MESSAGE(!acquired.empty(), s.b->log());
  int64_t took = ts_of(acquired) - t_term;
  MESSAGE("takeover after SIGTERM of the leader: " << took << " ms (lease_ms " << lease_ms << ")");
  CHECK_MESSAGE(took < lease_ms - 1000, "the standby waited out the lease: the leader did not release it");
  CHECK_FALSE(s.b->wait_event("relay_started", 1, 10000).empty());
  // SIGTERM on a standby: exit 0 at once. (a is gone; start it again as one.)
  s.a->start();
  REQUIRE_FALSE(s.a->wait_event("leadership_waiting", 1, 20000).empty());
  auto t0 = steady::now();
  CHECK_EQ(s.a->terminate(5000), 0);
  MESSAGE("standby exit after SIGTERM: "
          << std::chrono::duration_cast<std::chrono::milliseconds>(steady::now() - t0).count() << " ms");
}

TEST_CASE("fault 1: SIGKILL the leader; the standby takes over; nothing acknowledged is lost") {
  pair_setup s({"kill", 1200, 300});
  s.make_relays(primary_only_dsn(s.pg), primary_only_dsn(s.pg));
  s.start_pair();
  s.start_load("kill");
  s.run_for(2000);
  int64_t t_kill = now_ms();
  CHECK_EQ(s.a->kill9(), 128 + SIGKILL);
  auto acquired = s.b->wait_event("leadership_acquired", 1, 30000);
  REQUIRE_MESSAGE(!acquired.empty(), s.b->log());
  auto until = after_ms(30000);
  int64_t first = 0;
  while (!(first = s.chk.first_submit_from(1, t_kill)) && steady::now() < until)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  REQUIRE_MESSAGE(first != 0, "no submit acknowledged by the new leader: " << s.chk.refusals() << s.b->log());
  auto old_epoch = test::field(s.a->events("leadership_acquired").front(), "epoch");
  auto new_epoch = test::field(acquired, "epoch");
  CHECK_MESSAGE(std::atoll(new_epoch.c_str()) > std::atoll(old_epoch.c_str()), old_epoch << " -> " << new_epoch);
  auto m = s.b->ops_get("/metrics").body;
  CHECK_EQ(metric(m, "relay_leader"), "1");
  CHECK_EQ(metric(m, "relay_leadership_epoch"), new_epoch);
  MESSAGE("fault 1: failover (SIGKILL -> first acknowledged submit on the new leader) " << first - t_kill
                                                                                         << " ms; takeover logged after "
                                                                                         << ts_of(acquired) - t_kill
                                                                                         << " ms; replay " << s.replay_ms(*s.b)
                                                                                         << " ms (lease_ms 1200)");
  s.run_for(2000);
  s.finish(1);
}

TEST_CASE("fault 2: SIGSTOP the leader past its lease, SIGCONT: it is fenced and comes back as standby") {
  pair_setup s({"pause", 1200, 300});
  s.make_relays(primary_only_dsn(s.pg), primary_only_dsn(s.pg));
  s.start_pair();
  s.start_load("pause", 3);
  s.run_for(2000);
  pid_t pid = s.a->pid();
  int64_t t_stop = now_ms();
  s.a->proc->signal(SIGSTOP);
  auto acquired = s.b->wait_event("leadership_acquired", 1, 30000);
  if (acquired.empty()) s.a->proc->signal(SIGCONT);
  REQUIRE_MESSAGE(!acquired.empty(), s.b->log());
  int64_t t_acquired = ts_of(acquired);
  s.run_for(500);  // the new leader acknowledges; the old one is still stopped
  int64_t t_cont = now_ms();
  s.a->proc->signal(SIGCONT);
  CHECK_FALSE(s.a->wait_event("leadership_lost", 1, 20000).empty());
  CHECK_MESSAGE(wait_restarted_as_standby(*s.a, 30000), s.a->log());
  CHECK_EQ(s.a->pid(), pid);
  CHECK(test::process_running(pid));
  auto r = s.a->ops_get("/readyz");
  CHECK_EQ(r.status, 503);
  CHECK_MESSAGE(r.body.find("standby") != std::string::npos, r.body);
  MESSAGE("fault 2: SIGSTOP -> takeover " << t_acquired - t_stop << " ms; SIGCONT at +" << t_cont - t_stop
                                          << " ms; leadership_lost reason: "
                                          << test::field(s.a->wait_event("leadership_lost", 1, 1), "reason"));
  s.run_for(1500);
  check_none_after(s.chk, 0, t_acquired, "the new leader's leadership_acquired");
  check_none_after(s.chk, 0, t_cont, "SIGCONT");
  s.finish(1);
}

TEST_CASE("fault 2b: the paused leader wakes up after the relay that replaced it died: it must not serve its stale state") {
  pair_setup s({"stale", 1200, 300});
  s.make_relays(primary_only_dsn(s.pg), primary_only_dsn(s.pg));
  s.start_pair();
  s.start_load("stale", 3);
  s.run_for(1500);
  auto first_epoch = std::atoll(test::field(s.a->events("leadership_acquired").front(), "epoch").c_str());
  s.a->proc->signal(SIGSTOP);
  auto acquired = s.b->wait_event("leadership_acquired", 1, 30000);
  if (acquired.empty()) s.a->proc->signal(SIGCONT);
  REQUIRE_MESSAGE(!acquired.empty(), s.b->log());
  int64_t t_acquired = ts_of(acquired);
  // Work that only b knows of: acknowledged by b, then b dies.
  auto until = after_ms(20000);
  while (s.chk.submits_from(1, t_acquired) < 30 && steady::now() < until)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  if (s.chk.submits_from(1, t_acquired) < 30) {
    auto act = s.pg.psql(s.pg.primary_dsn(),
                         "SELECT pid, application_name, state, wait_event_type, wait_event, "
                         "now() - xact_start, left(query, 120) FROM pg_stat_activity WHERE datname = current_database()");
    auto locks = s.pg.psql(s.pg.primary_dsn(),
                           "SELECT l.pid, l.locktype, l.relation::regclass, l.mode, l.granted FROM pg_locks l "
                           "JOIN pg_stat_activity a USING (pid) WHERE a.datname = current_database() AND l.locktype <> 'virtualxid'");
    auto ready = s.b->ops_get("/readyz");
    const std::string& p = test::pki();
    auto t0 = steady::now();
    auto curl = test::run({"curl", "-sS", "-v", "--max-time", "8", "--cacert", p + "/ca.crt", "--cert", p + "/producer.crt", "--key",
                           p + "/producer.key", "https://localhost:" + std::to_string(s.b->api_port) + "/v1/jobs/0000000000000001"},
                          s.b->dir.path(), 15000);
    auto curl_ms = std::chrono::duration_cast<std::chrono::milliseconds>(steady::now() - t0).count();
    std::string threads;
    for (auto& e : std::filesystem::directory_iterator("/proc/" + std::to_string(s.b->pid()) + "/task"))
      threads += test::read_file(e.path().string() + "/stat").substr(0, 60) + " wchan=" + test::read_file(e.path().string() + "/wchan") + "\n";
    MESSAGE("b /readyz: " << ready.status << " " << ready.body << "\ncurl to b's API (" << curl_ms << " ms): " << curl.exit_code
                          << " " << curl.out << curl.err.substr(0, 3000) << "\nb's threads:\n" << threads);
    CHECK_MESSAGE(false, "the new leader acknowledged nothing while the old one was paused:\n--- pg_stat_activity:\n"
                             << act.out << act.err << "--- pg_locks:\n" << locks.out << locks.err << "--- client errors:\n"
                             << s.chk.notes() << "--- b:\n"
                             << s.b->log().substr(0, 6000));
  }
  CHECK_EQ(s.b->kill9(), 128 + SIGKILL);
  int64_t t_cont = now_ms();
  s.a->proc->signal(SIGCONT);
  // a steps down (its epoch is stale) and leads again with a new one,
  // from what the database holds: b's acknowledgements included.
  CHECK_FALSE(s.a->wait_event("leadership_lost", 1, 20000).empty());
  auto again = s.a->wait_event("leadership_acquired", 2, 30000);
  REQUIRE_MESSAGE(!again.empty(), s.a->log());
  auto b_epoch = std::atoll(test::field(acquired, "epoch").c_str());
  auto new_epoch = std::atoll(test::field(again, "epoch").c_str());
  CHECK_MESSAGE((first_epoch < b_epoch && b_epoch < new_epoch), first_epoch << " " << b_epoch << " " << new_epoch);
  REQUIRE_FALSE(s.a->wait_event("relay_started", 2, 20000).empty());
  // (a's acknowledgements after it led again are legitimate; none before.)
  for (auto& k : s.chk.from_after(0, t_acquired))
    CHECK_MESSAGE(k.at_ms >= ts_of(again), "relay a acknowledged " << k.id << " at " << k.at_ms << " before leading again at " << ts_of(again));
  MESSAGE("fault 2b: SIGCONT -> a leads again (epoch " << new_epoch << ") after " << ts_of(again) - t_cont << " ms; replay "
                                                        << s.replay_ms(*s.a) << " ms");
  s.run_for(1500);
  s.finish(0);
}

TEST_CASE("fault 3: cut the leader from PostgreSQL; 503s, takeover, the cut relay comes back as standby") {
  pair_setup s({"cut", 1200, 300});
  db_proxy proxy(s.pg);
  s.make_relays(proxy.dsn_via, primary_only_dsn(s.pg));
  s.start_pair();
  s.start_load("cut", 3);
  s.run_for(2000);
  int64_t t_cut = now_ms();
  proxy.signal(SIGUSR1);
  auto lost = s.a->wait_event("leadership_lost", 1, 30000);
  auto acquired = s.b->wait_event("leadership_acquired", 1, 30000);
  REQUIRE_MESSAGE(!acquired.empty(), s.b->log());
  CHECK_MESSAGE(!lost.empty(), s.a->log());
  int64_t t_acquired = ts_of(acquired);
  auto until = after_ms(30000);
  int64_t first = 0;
  while (!(first = s.chk.first_submit_from(1, t_cut)) && steady::now() < until)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  CHECK(first != 0);
  MESSAGE("fault 3: cut -> leadership_lost " << ts_of(lost) - t_cut << " ms (reason " << test::field(lost, "reason")
                                              << "), takeover " << t_acquired - t_cut << " ms, first submit on the new leader "
                                              << first - t_cut << " ms; replay " << s.replay_ms(*s.b) << " ms");
  // Cut from the database, the leader cannot commit: nothing it says after
  // the cut (plus what was already on its way to the producers) is an
  // acknowledgement.
  check_none_after(s.chk, 0, t_cut + 200, "the cut (+200 ms)");
  // The producers waiting on the cut relay were answered 503 when it stepped
  // down (their submits may or may not be committed: they resubmit).
  CHECK_MESSAGE(s.chk.refusal_count(0, "503") > 0, s.chk.refusals());
  s.run_for(1000);
  int64_t t_restore = now_ms();
  proxy.signal(SIGUSR2);
  CHECK_MESSAGE(wait_restarted_as_standby(*s.a, 30000), s.a->log());
  CHECK(test::process_running(s.a->pid()));
  auto r = s.a->ops_get("/readyz");
  CHECK_EQ(r.status, 503);
  CHECK_MESSAGE(r.body.find("standby") != std::string::npos, r.body);
  s.run_for(1500);
  check_none_after(s.chk, 0, t_acquired, "the new leader's leadership_acquired");
  MESSAGE("fault 3: restore -> standby again after " << now_ms() - t_restore << " ms (upper bound)");
  s.finish(1);

  // What the cut relay had in flight reached the server after the link came
  // back (the proxy held it): the journal must still be whole. The cut
  // relay now takes over from the released lease and replays it.
  CHECK_EQ(s.b->terminate(15000), 0);
  auto again = s.a->wait_event("leadership_acquired", 2, 30000);
  REQUIRE_MESSAGE(!again.empty(), s.a->log());
  REQUIRE_FALSE(s.a->wait_event("relay_started", 2, 20000).empty());
  std::vector<const bunny*> bs;
  for (auto& x : s.bunnies) bs.push_back(x.get());
  auto v = verify(s.chk, bs, s.a->api_port, 60000);
  check_no_problems(v);
  MESSAGE("fault 3: after the cut relay took over again: " << describe(v));
  proxy.signal(SIGTERM);
  proxy.wait(5000);
}

// A leader that loses its lease while draining after SIGTERM used to re-exec
// itself as a standby and run on: the SIGTERM was forgotten.
TEST_CASE("fault 3c: SIGTERM on a leader that is cut from PostgreSQL: it still ends, acknowledges nothing uncommitted") {
  pair_setup s({"cutterm", 1200, 300});
  db_proxy proxy(s.pg);
  s.make_relays(proxy.dsn_via, primary_only_dsn(s.pg));
  s.start_pair();
  s.start_load("cutterm", 3);
  s.run_for(1500);
  int64_t t_cut = now_ms();
  proxy.signal(SIGUSR1);
  s.run_for(200);
  auto t0 = steady::now();
  s.a->proc->signal(SIGTERM);
  int rc = s.a->proc->wait(15000);
  auto exit_ms = std::chrono::duration_cast<std::chrono::milliseconds>(steady::now() - t0).count();
  CHECK_MESSAGE(rc >= 0, "relay a is still running 15 s after SIGTERM (cut from the database):\n" << s.a->log());
  if (rc < 0) s.a->kill9();
  MESSAGE("fault 3c: SIGTERM while cut -> exit " << rc << " after " << exit_ms << " ms");
  auto acquired = s.b->wait_event("leadership_acquired", 1, 30000);
  REQUIRE_MESSAGE(!acquired.empty(), s.b->log());
  check_none_after(s.chk, 0, t_cut + 200, "the cut (+200 ms)");
  proxy.signal(SIGUSR2);
  s.run_for(1500);
  s.finish(1);
  proxy.signal(SIGTERM);
  proxy.wait(5000);
}

TEST_CASE("fault 3b: the leader's connections to PostgreSQL are reset again and again: commits of unknown outcome retried") {
  pair_setup s({"reset", 1200, 300});
  db_proxy proxy(s.pg);
  s.make_relays(proxy.dsn_via, primary_only_dsn(s.pg));
  s.start_pair();
  s.start_load("reset", 3);
  s.run_for(1500);
  int64_t t0 = now_ms();
  for (int i = 0; i < 12; ++i) {
    proxy.signal(SIGHUP);  // RST both ways: whatever was in flight has an unknown outcome
    s.run_for(250);
  }
  int64_t t1 = now_ms();
  s.run_for(1500);
  int lead = s.leader();
  REQUIRE(lead >= 0);
  MESSAGE("fault 3b: 12 resets in " << t1 - t0 << " ms; leadership lost " << s.a->events("leadership_lost").size()
                                    << " lines; leader now relay " << lead << "; longest gap " << s.chk.longest_gap(t0, t1)
                                    << " ms; unknown-outcome lines: " << s.a->events("journal_write_failed").size()
                                    << " journal_write_failed, " << s.a->events("postgres_unavailable").size()
                                    << " postgres_unavailable");
  s.finish(lead);
  // The other relay replays what the reset commits left: the same jobs,
  // no record applied twice in a way the checker can see.
  ha_relay& leader = s.relay_at(lead);
  ha_relay& other = s.relay_at(1 - lead);
  size_t acquired_before = other.events("leadership_acquired").size();
  size_t started_before = other.events("relay_started").size();
  CHECK_EQ(leader.terminate(15000), 0);
  REQUIRE_MESSAGE(!other.wait_event("leadership_acquired", acquired_before + 1, 30000).empty(), other.log());
  REQUIRE_MESSAGE(!other.wait_event("relay_started", started_before + 1, 20000).empty(), other.log());
  std::vector<const bunny*> bs;
  for (auto& x : s.bunnies) bs.push_back(x.get());
  auto v = verify(s.chk, bs, other.api_port, 60000);
  check_no_problems(v);
  MESSAGE("fault 3b: after a takeover and replay: " << describe(v));
  proxy.signal(SIGTERM);
  proxy.wait(5000);
}

TEST_CASE("fault 4: the PostgreSQL primary dies, its data directory is deleted, the standby is promoted") {
  pair_setup s({"pgfail", 1200, 300}, true);
  s.make_relays(both_hosts_dsn(s.pg), both_hosts_dsn(s.pg));
  s.start_pair();
  s.start_load("pgfail");
  s.run_for(2000);
  int64_t t_crash = now_ms();
  s.pg.stop_primary_immediate();
  std::error_code ec;
  std::filesystem::remove_all(s.pg.primary_data_dir(), ec);
  CHECK_MESSAGE(!ec, ec.message());
  // Promoted at once (the leader rides it out on its lease), or only after
  // two leases (the leader steps down; a relay takes over on the promoted
  // server, by its clock).
  int outage_ms = 300;
  SUBCASE("promoted within the lease") { outage_ms = 300; }
  SUBCASE("promoted after two leases") { outage_ms = 2400; }
  s.run_for(outage_ms);
  s.pg.promote_standby();
  int64_t t_promoted = now_ms();
  auto until = after_ms(45000);
  int64_t first = 0;
  while (steady::now() < until) {
    auto f0 = s.chk.first_submit_from(0, t_promoted), f1 = s.chk.first_submit_from(1, t_promoted);
    first = f0 && f1 ? std::min(f0, f1) : (f0 ? f0 : f1);
    if (first) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  REQUIRE_MESSAGE(first != 0, "nothing acknowledged after the promotion: " << s.chk.refusals() << "\n--- a:\n"
                                                                           << s.a->log() << "\n--- b:\n" << s.b->log());
  s.run_for(2000);
  int lead = s.leader();
  REQUIRE(lead >= 0);
  MESSAGE("fault 4: leadership lost " << s.a->events("leadership_lost").size() << "+" << s.b->events("leadership_lost").size()
                                      << " times (a+b)");
  MESSAGE("fault 4: primary crash -> promotion " << t_promoted - t_crash << " ms; first acknowledged submit "
                                                 << first - t_crash << " ms after the crash; leader now relay "
                                                 << lead << "; longest gap "
                                                 << s.chk.longest_gap(t_crash - 1000, now_ms()) << " ms");
  s.finish(lead);
}

TEST_CASE("fault 5: rolling restart of both relays under load: no loss, bounded unavailability") {
  pair_setup s({"rolling", 1200, 300});
  s.make_relays(primary_only_dsn(s.pg), primary_only_dsn(s.pg));
  s.start_pair();
  s.start_load("rolling");
  s.run_for(1500);
  int64_t t0 = now_ms();
  CHECK_EQ(s.a->terminate(15000), 0);
  REQUIRE_MESSAGE(!s.b->wait_event("relay_started", 1, 20000).empty(), s.b->log());
  s.a->start();
  REQUIRE_MESSAGE(!s.a->wait_event("leadership_waiting", 1, 20000).empty(), s.a->log());
  int64_t replay_b = s.replay_ms(*s.b);
  s.run_for(1500);
  CHECK_EQ(s.b->terminate(15000), 0);
  REQUIRE_MESSAGE(!s.a->wait_event("relay_started", 1, 20000).empty(), s.a->log());
  s.b->start();
  REQUIRE_MESSAGE(!s.b->wait_event("leadership_waiting", 1, 20000).empty(), s.b->log());
  s.run_for(1500);
  int64_t t1 = now_ms();
  int64_t gap = s.chk.longest_gap(t0, t1);
  MESSAGE("fault 5: longest time without an acknowledged submit during the rolling restart: " << gap
                                                                                              << " ms; replays " << replay_b
                                                                                              << " / " << s.replay_ms(*s.a) << " ms");
  CHECK_MESSAGE(gap < 15000, "unavailability not bounded");
  s.finish(0);
}

TEST_CASE("--check-config accepts a good postgres configuration and names the key of a bad one") {
  test::tmpdir d;
  test::write_file(d / "dsn", "host=127.0.0.1 port=1 dbname=x\n");
  chmod((d / "dsn").c_str(), 0600);
  test::write_file(d / "policy.json", test::default_policy());
  const std::string& p = test::pki();
  auto config = [&](const std::string& postgres) {
    test::write_file(d / "relay.json", R"({"listen": "127.0.0.1:0", "ops_listen": "127.0.0.1:0",
      "tls": {"cert": ")" + p + R"(/server.crt", "key": ")" + p + R"(/server.key", "client_ca": ")" + p + R"(/ca.crt"},
      "policy": "policy.json", "journal": {"backend": "postgres", "postgres": {)" + postgres + "}}}");
    return test::run({test::env_or_fail("RELAY_BIN"), "--config", d / "relay.json", "--check-config"}, d.path(), 20000);
  };
  const std::string dsn_file = R"("dsn_file": ")" + (d / "dsn") + R"(")";
  auto good = config(dsn_file + R"(, "shard": "main_2", "lease_ms": 1500, "renew_ms": 500)");
  CHECK_MESSAGE(good.exit_code == 0, good.err);
  CHECK_MESSAGE(good.out.find("postgres") != std::string::npos, good.out);

  struct bad_case {
    std::string postgres, key;
  };
  for (const auto& c : std::vector<bad_case>{
           {dsn_file + R"(, "shard": "Main")", "journal.postgres.shard"},
           {dsn_file + R"(, "shard": "a-b")", "journal.postgres.shard"},
           {dsn_file + R"(, "shard": "")", "journal.postgres.shard"},
           {dsn_file + R"(, "lease_ms": 1500, "renew_ms": 501)", "journal.postgres.renew_ms"},
           {dsn_file + R"(, "lease_ms": 100)", "journal.postgres.lease_ms"},
           {R"("shard": "main")", "journal.postgres.dsn_file"},
           {R"("dsn_file": ")" + (d / "no-such-file") + R"(")", "journal.postgres.dsn_file"},
       }) {
    auto r = config(c.postgres);
    CHECK_MESSAGE(r.exit_code != 0, "accepted: " << c.postgres);
    CHECK_MESSAGE(r.err.find(c.key) != std::string::npos, c.postgres << " -> " << r.err);
  }
}

int main(int argc, char** argv) {
  std::signal(SIGPIPE, SIG_IGN);
  if (auto why = test::postgres_cluster::unavailable_reason()) {
    std::fprintf(stderr, "SKIP: cannot start PostgreSQL here (%s): the HA fault suite did not run\n", why->c_str());
    return 77;
  }
  doctest::Context context(argc, argv);
  return context.run();
}
