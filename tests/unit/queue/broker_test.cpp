#include <doctest/doctest.h>

#include <cstring>
#include <string>
#include <vector>

#include "../../support/counting_random.h"
#include "relay/queue.h"

using namespace relay::queue;

using test::counting_random;

namespace {

// Keeps copies of every record so a second broker can replay them.
struct recording_sink : record_sink {
  struct owned {
    record r;
    std::string queue, owner, key, payload, text;
  };
  std::vector<owned> records;
  void append(const record& r) override {
    owned o{r, std::string(r.queue), std::string(r.owner), std::string(r.idempotency_key),
            std::string(r.payload), std::string(r.text)};
    records.push_back(std::move(o));
  }
  void replay_into(broker& b) {
    for (auto& o : records) {
      record r = o.r;
      r.queue = o.queue;
      r.owner = o.owner;
      r.idempotency_key = o.key;
      r.payload = o.payload;
      r.text = o.text;
      b.apply(r);
    }
  }
};

struct fixture {
  recording_sink sink;
  broker b{broker_limits{}, counting_random(), &sink};
  principal_ref worker = b.intern("spiffe://test/worker");
  principal_ref other = b.intern("spiffe://test/other");
  time_ms now = 1'000'000;

  job_id submit(std::string payload, uint8_t priority = 5, time_ms delay = 0, uint16_t max_attempts = 5,
                std::string_view key = {}) {
    submit_params p;
    p.queue = "q";
    p.payload = payload;
    p.priority = priority;
    p.delay_ms = delay;
    p.max_attempts = max_attempts;
    p.idempotency_key = key;
    auto r = b.submit(p, now);
    REQUIRE(r.error == op_error::none);
    return r.j->id;
  }
  std::vector<job*> lease(size_t max = 1, uint32_t lease_ms = 1000, principal_ref who = nullptr) {
    std::vector<job*> out;
    CHECK(b.lease("q", max, lease_ms, who ? who : worker, now, out) == op_error::none);
    return out;
  }
  job_state state(job_id id) { return b.find(id)->state; }
};

struct test_waiter : lease_waiter {
  std::vector<job_id> got;
  int calls = 0;
  void on_leased(const std::vector<job*>& jobs) override {
    ++calls;
    for (auto* j : jobs) got.push_back(j->id);
  }
};

}  // namespace

TEST_CASE("job ids and lease tokens round-trip through their text forms") {
  CHECK_EQ(format_job_id(0x1a), "000000000000001a");
  CHECK_EQ(parse_job_id("000000000000001a").value(), 0x1au);
  CHECK_FALSE(parse_job_id("1a").has_value());
  CHECK_FALSE(parse_job_id("000000000000001A").has_value());
  CHECK_FALSE(parse_job_id("0000000000000000").has_value());
  lease_token t;
  for (size_t i = 0; i < 16; ++i) t.bytes[i] = static_cast<uint8_t>(i * 17);
  auto parsed = lease_token::parse(t.hex());
  REQUIRE(parsed.has_value());
  CHECK(parsed->equals(t));
  CHECK_FALSE(lease_token::parse("zz").has_value());
}

TEST_CASE_FIXTURE(fixture, "ready jobs are served by priority, then age") {
  job_id low = submit("1", 9);
  job_id mid1 = submit("2", 5);
  job_id high = submit("3", 0);
  job_id mid2 = submit("4", 5);
  auto got = lease(10);
  REQUIRE_EQ(got.size(), 4u);
  CHECK_EQ(got[0]->id, high);
  CHECK_EQ(got[1]->id, mid1);
  CHECK_EQ(got[2]->id, mid2);
  CHECK_EQ(got[3]->id, low);
}

TEST_CASE_FIXTURE(fixture, "a redelivered job goes before younger jobs of its priority") {
  job_id a = submit("\"a\"");
  auto first = lease(1, 100);
  REQUIRE_EQ(first.size(), 1u);
  job_id b2 = submit("\"b\"");
  now += 100;
  b.advance(now);  // a's lease expires
  CHECK_EQ(state(a), job_state::queued);
  auto got = lease(2);
  REQUIRE_EQ(got.size(), 2u);
  CHECK_EQ(got[0]->id, a);
  CHECK_EQ(got[0]->attempts, 2);
  CHECK_EQ(got[1]->id, b2);
}

TEST_CASE_FIXTURE(fixture, "delayed jobs become ready when their delay is over") {
  job_id d = submit("1", 5, 500);
  CHECK_EQ(state(d), job_state::delayed);
  CHECK(lease().empty());
  REQUIRE(b.next_deadline().has_value());
  CHECK_EQ(*b.next_deadline(), now + 500);
  now += 499;
  b.advance(now);
  CHECK_EQ(state(d), job_state::delayed);
  now += 1;
  b.advance(now);
  CHECK_EQ(state(d), job_state::queued);
  auto got = lease();
  REQUIRE_EQ(got.size(), 1u);
  CHECK_EQ(got[0]->id, d);
}

TEST_CASE_FIXTURE(fixture, "an expired lease is redelivered with a new token, and the old token is stale") {
  job_id id = submit("1");
  auto first = lease(1, 1000);
  lease_token old = first[0]->lease;
  now += 1000;
  b.advance(now);
  CHECK_EQ(state(id), job_state::queued);
  CHECK_EQ(b.find(id)->queue->counters().expired, 1u);
  auto second = lease(1, 1000, other);
  REQUIRE_EQ(second.size(), 1u);
  CHECK_FALSE(second[0]->lease.equals(old));
  CHECK_EQ(b.complete(id, old, worker, "1", now), op_error::lease_lost);
  CHECK_EQ(state(id), job_state::leased);
  CHECK_EQ(b.complete(id, second[0]->lease, other, "{\"ok\":true}", now), op_error::none);
  CHECK_EQ(state(id), job_state::succeeded);
  CHECK_EQ(b.find(id)->outcome, "{\"ok\":true}");
}

TEST_CASE_FIXTURE(fixture, "a lease presented by another principal is refused and changes nothing") {
  job_id id = submit("1");
  auto got = lease();
  CHECK_EQ(b.complete(id, got[0]->lease, other, "1", now), op_error::wrong_owner);
  CHECK_EQ(b.heartbeat(id, got[0]->lease, other, 0, now).error, op_error::wrong_owner);
  CHECK_EQ(b.fail(id, got[0]->lease, other, "x", 10, now), op_error::wrong_owner);
  CHECK_EQ(state(id), job_state::leased);
}

TEST_CASE_FIXTURE(fixture, "heartbeat extends the lease; a lease past its expiry is lost") {
  job_id id = submit("1");
  auto got = lease(1, 1000);
  now += 900;
  auto hb = b.heartbeat(id, got[0]->lease, worker, 1000, now);
  CHECK_EQ(hb.error, op_error::none);
  CHECK_EQ(hb.expires_ms, now + 1000);
  now += 900;
  b.advance(now);
  CHECK_EQ(state(id), job_state::leased);
  now += 100;  // exactly at expiry, before the timer ran
  CHECK_EQ(b.heartbeat(id, got[0]->lease, worker, 1000, now).error, op_error::lease_lost);
}

TEST_CASE_FIXTURE(fixture, "failures back off exponentially and the last attempt goes dead") {
  job_id id = submit("1", 5, 0, 3);
  auto l1 = lease();
  CHECK_EQ(b.fail(id, l1[0]->lease, worker, "boom 1", 100, now), op_error::none);
  CHECK_EQ(state(id), job_state::failed);
  CHECK_EQ(b.find(id)->due_ms, now + 100);
  now += 100;
  b.advance(now);
  auto l2 = lease();
  REQUIRE_EQ(l2.size(), 1u);
  CHECK_EQ(b.fail(id, l2[0]->lease, worker, "boom 2", 100, now), op_error::none);
  CHECK_EQ(b.find(id)->due_ms, now + 200);  // second attempt: base * 2
  now += 199;
  b.advance(now);
  CHECK(lease().empty());
  now += 1;
  b.advance(now);
  auto l3 = lease();
  REQUIRE_EQ(l3.size(), 1u);
  CHECK_EQ(b.fail(id, l3[0]->lease, worker, "boom 3", 100, now), op_error::none);
  CHECK_EQ(state(id), job_state::dead);
  CHECK_EQ(b.find(id)->outcome, "boom 3");
  auto dead = b.dead_jobs("q", 10);
  REQUIRE_EQ(dead.size(), 1u);
  CHECK_EQ(dead[0]->id, id);

  auto requeued = b.requeue_dead("q", {}, 10, now);
  CHECK_EQ(requeued, std::vector<job_id>{id});
  CHECK_EQ(state(id), job_state::queued);
  CHECK_EQ(b.find(id)->attempts, 0);
  CHECK(b.dead_jobs("q", 10).empty());
}

TEST_CASE_FIXTURE(fixture, "a lease that expires on the last attempt sends the job to dead") {
  job_id id = submit("1", 5, 0, 1);
  lease(1, 50);
  now += 50;
  b.advance(now);
  CHECK_EQ(state(id), job_state::dead);
  CHECK_EQ(b.find(id)->outcome, "lease expired");
}

TEST_CASE_FIXTURE(fixture, "an idempotency key returns the first job") {
  job_id first = submit("1", 5, 0, 5, "k1");
  submit_params p;
  p.queue = "q";
  p.payload = "2";
  p.idempotency_key = "k1";
  auto again = b.submit(p, now);
  CHECK_FALSE(again.created);
  CHECK_EQ(again.j->id, first);
  CHECK_EQ(again.j->payload, "1");
  p.queue = "other";  // keys are scoped to a queue
  CHECK(b.submit(p, now).created);
  CHECK_EQ(b.job_count(), 2u);
}

TEST_CASE_FIXTURE(fixture, "waiters are served oldest first, one submit each") {
  test_waiter w1, w2, w3;
  for (auto* w : {&w1, &w2, &w3}) {
    w->owner = worker;
    w->max = 5;
    b.park("q", *w);
  }
  // Waiters alone make no queue (issue 10: nobody can fill max_queues by
  // waiting).
  CHECK_EQ(b.find_queue("q"), nullptr);
  CHECK_EQ(b.queue_count(), 0u);
  job_id a = submit("1");
  CHECK_EQ(b.find_queue("q")->waiting_workers(), 2u);
  job_id c = submit("2");
  CHECK_EQ(w1.got, std::vector<job_id>{a});
  CHECK_EQ(w2.got, std::vector<job_id>{c});
  CHECK_EQ(w3.calls, 0);
  b.unpark(w3);
  CHECK_EQ(b.find_queue("q")->waiting_workers(), 0u);
  submit("3");
  CHECK_EQ(w3.calls, 0);
  CHECK_EQ(b.find_queue("q")->ready(), 1u);
}

namespace {

// A measure for the byte bound with round numbers: the answer is 10 bytes
// empty, and each job its payload plus 100 (plus 1 after the first). It
// also records what it was asked, to check the attempt and expiry given.
std::vector<std::pair<uint32_t, time_ms>> measured;
size_t test_entry(const job& j, uint32_t attempt, time_ms expires, bool first) {
  measured.emplace_back(attempt, expires);
  return j.payload.size() + 100 + (first ? 0 : 1);
}
constexpr answer_size test_size{10, test_entry};

}  // namespace

TEST_CASE_FIXTURE(fixture, "a lease bounded in bytes takes the jobs that fit; the rest stay ready, no attempt used") {
  std::string p400(400, '1');
  job_id a = submit(p400), c = submit(p400), d = submit(p400);
  measured.clear();
  std::vector<job*> out;
  // Two jobs: 10 + 500 + 501 = 1011 bytes.
  REQUIRE(b.lease("q", 5, 1011, test_size, 2000, worker, now, out) == op_error::none);
  REQUIRE_EQ(out.size(), 2u);
  CHECK_EQ(out[0]->id, a);
  CHECK_EQ(out[1]->id, c);
  // Measured before the grant, as the grant then left it: attempt 1, expiring at now + lease_ms.
  REQUIRE_GE(measured.size(), 2u);
  CHECK_EQ(measured[0], std::pair<uint32_t, time_ms>{out[0]->attempts, out[0]->due_ms});
  CHECK_EQ(measured[1], std::pair<uint32_t, time_ms>{out[1]->attempts, out[1]->due_ms});
  CHECK_EQ(state(d), job_state::queued);
  CHECK_EQ(b.find(d)->attempts, 0);

  // One byte less: the second job no longer fits.
  submit(p400);
  out.clear();
  REQUIRE(b.lease("q", 5, 1010, test_size, 2000, worker, now, out) == op_error::none);
  REQUIRE_EQ(out.size(), 1u);
  CHECK_EQ(out[0]->id, d);

  // A bound below one job still gets the first job.
  out.clear();
  REQUIRE(b.lease("q", 5, 1, test_size, 2000, worker, now, out) == op_error::none);
  CHECK_EQ(out.size(), 1u);
  CHECK_EQ(b.find_queue("q")->ready(), 0u);
}

TEST_CASE_FIXTURE(fixture, "a waiter woken with a byte bound gets the jobs that fit, at least one") {
  std::string p400(400, '1');
  // Ready before the waiter parks (as after a lease cut short by its bound),
  // so that the wake-up finds several.
  job_id a = submit(p400), c = submit(p400);
  test_waiter w;
  w.owner = worker;
  w.max = 5;
  w.max_bytes = 1011;
  w.size = test_size;
  b.park("q", w);
  job_id d = submit(p400);
  CHECK_EQ(w.calls, 1);
  CHECK_EQ(w.got, (std::vector<job_id>{a, c}));
  CHECK_EQ(state(d), job_state::queued);
  CHECK_EQ(b.find(d)->attempts, 0);

  test_waiter tight;
  tight.owner = worker;
  tight.max = 5;
  tight.max_bytes = 1;
  tight.size = test_size;
  b.park("q", tight);
  submit(p400);
  CHECK_EQ(tight.got, std::vector<job_id>{d});
  CHECK_EQ(b.find_queue("q")->ready(), 1u);
}

TEST_CASE_FIXTURE(fixture, "a queue with neither jobs nor waiters is forgotten") {
  test_waiter w;
  w.owner = worker;
  b.park("only-waited", w);
  b.unpark(w);
  CHECK_EQ(b.find_queue("only-waited"), nullptr);
  // The limit counts queues with jobs only.
  broker_limits l;
  l.max_queues = 1;
  broker small(l, counting_random());
  test_waiter x, y;
  x.owner = y.owner = small.intern("w");
  small.park("a", x);
  small.park("b", y);
  submit_params p;
  p.queue = "c";
  p.payload = "1";
  CHECK(small.submit(p, now).created);
  p.queue = "d";
  CHECK_EQ(small.submit(p, now).error, op_error::too_many_queues);
  small.unpark(x);
  small.unpark(y);
}

TEST_CASE_FIXTURE(fixture, "a waiter is woken when a delayed job becomes ready") {
  job_id d = submit("1", 5, 200);
  test_waiter w;
  w.owner = worker;
  b.park("q", w);
  now += 200;
  b.advance(now);
  CHECK_EQ(w.got, std::vector<job_id>{d});
  CHECK_EQ(state(d), job_state::leased);
}

TEST_CASE_FIXTURE(fixture, "cancellation applies to waiting jobs only") {
  job_id queued = submit("1");
  job_id delayed = submit("2", 5, 1000);
  job_id leased = submit("3", 0);
  auto got = lease(1, 100000);
  REQUIRE_EQ(got[0]->id, leased);
  CHECK_EQ(b.cancel(queued, now), op_error::none);
  CHECK_EQ(b.cancel(delayed, now), op_error::none);
  CHECK_EQ(b.cancel(leased, now), op_error::not_cancellable);
  CHECK_EQ(b.cancel(queued, now), op_error::not_cancellable);
  CHECK_EQ(b.cancel(12345, now), op_error::not_found);
  CHECK_EQ(state(queued), job_state::cancelled);
  CHECK(lease().empty());
  now += 2000;
  b.advance(now);
  CHECK(lease().empty());
}

TEST_CASE_FIXTURE(fixture, "watchers hear about the terminal state once") {
  struct w_t : job_watcher {
    int calls = 0;
    job_state seen{};
    void on_terminal(const job& j) override {
      ++calls;
      seen = j.state;
    }
  } w;
  job_id id = submit("1");
  b.watch(id, w);
  auto got = lease();
  CHECK_EQ(w.calls, 0);
  b.complete(id, got[0]->lease, worker, "2", now);
  CHECK_EQ(w.calls, 1);
  CHECK_EQ(w.seen, job_state::succeeded);
}

TEST_CASE("finished jobs are forgotten after their retention, with their idempotency key") {
  broker_limits limits;
  limits.result_ttl_ms = 1000;
  broker b(limits, counting_random());
  principal_ref w = b.intern("w");
  submit_params p;
  p.queue = "q";
  p.payload = "1";
  p.idempotency_key = "k";
  job_id id = b.submit(p, 0).j->id;
  std::vector<job*> got;
  b.lease("q", 1, 1000, w, 0, got);
  b.complete(id, got[0]->lease, w, "1", 10);
  b.advance(1009);
  CHECK(b.find(id) != nullptr);
  b.advance(1010);
  CHECK(b.find(id) == nullptr);
  CHECK_EQ(b.find_queue("q"), nullptr);  // its last job gone, the queue is forgotten
  CHECK(b.submit(p, 1010).created);  // the key is free again
}

TEST_CASE("retention is kept by due time, whatever order jobs arrive in (snapshots come in id order)") {
  broker_limits limits;
  limits.result_ttl_ms = 1000;
  broker src(limits, counting_random());
  principal_ref w = src.intern("w");
  submit_params p;
  p.queue = "q";
  p.payload = "1";
  std::vector<job_id> ids;
  for (int i = 0; i < 4; ++i) ids.push_back(src.submit(p, 0).j->id);
  std::vector<job*> got;
  src.lease("q", 4, 100000, w, 0, got);
  // Finished in the reverse of id order: due at 1400, 1300, 1200, 1100.
  for (int i = 3; i >= 0; --i) src.complete(ids[static_cast<size_t>(i)], got[static_cast<size_t>(i)]->lease, w, "1", 400 - 100 * i);
  // A replica built from snapshots in id order (as after compaction).
  broker b(limits, counting_random());
  for (job_id id : src.job_ids()) REQUIRE(b.apply(src.snapshot_of(*src.find(id))));
  for (int i = 0; i < 4; ++i) {
    time_ms due = 1100 + 100 * i;
    REQUIRE(b.next_deadline().has_value());
    CHECK_EQ(*b.next_deadline(), due);
    b.advance(due);
    CHECK(b.find(ids[static_cast<size_t>(3 - i)]) == nullptr);
    CHECK_EQ(b.job_count(), static_cast<size_t>(3 - i));
  }
  CHECK_FALSE(b.next_deadline().has_value());
}

TEST_CASE("ids are never handed out twice: has_room counts the ids left, submits stop at the maximum") {
  broker b(broker_limits{}, counting_random());
  record meta;
  meta.type = record_type::meta;
  meta.id = max_job_id - 1;
  REQUIRE(b.apply(meta));
  CHECK(b.has_room(2, 0));
  CHECK_FALSE(b.has_room(3, 0));
  submit_params p;
  p.queue = "q";
  p.payload = "1";
  CHECK_EQ(b.submit(p, 0).j->id, max_job_id - 1);
  CHECK_EQ(b.submit(p, 0).j->id, max_job_id);
  auto r = b.submit(p, 0);
  CHECK(r.error == op_error::ids_exhausted);
  CHECK(r.j == nullptr);
  // An idempotent repeat still finds its job.
  p.idempotency_key = "k";
  broker c(broker_limits{}, counting_random());
  meta.id = max_job_id;
  REQUIRE(c.apply(meta));
  job_id keyed = c.submit(p, 0).j->id;
  auto again = c.submit(p, 0);
  CHECK(again.error == op_error::none);
  CHECK_EQ(again.j->id, keyed);
  CHECK_FALSE(again.created);
  // The counter's own record: max_job_id + 1 (exhausted) is valid, beyond is not.
  CHECK_EQ(c.meta_record(0).id, max_job_id + 1);
  meta.id = max_job_id + 1;
  CHECK(c.apply(meta));
  meta.id = max_job_id + 2;
  CHECK_FALSE(c.apply(meta));
}

TEST_CASE("limits: jobs held and queues") {
  broker_limits limits;
  limits.max_jobs = 2;
  limits.max_queues = 1;
  broker b(limits, counting_random());
  submit_params p;
  p.queue = "a";
  p.payload = "1";
  CHECK_EQ(b.submit(p, 0).error, op_error::none);
  p.queue = "b";
  CHECK_EQ(b.submit(p, 0).error, op_error::too_many_queues);
  p.queue = "a";
  CHECK_EQ(b.submit(p, 0).error, op_error::none);
  CHECK_EQ(b.submit(p, 0).error, op_error::queue_full);
}

TEST_CASE_FIXTURE(fixture, "replaying the records rebuilds the same state") {
  job_id a = submit("{\"n\":1}", 1);
  job_id c = submit("[2]", 5, 5000);
  job_id d = submit("3", 5, 0, 1, "key");
  job_id e = submit("4");
  auto got = lease(2, 10000);  // a, d
  b.complete(a, got[0]->lease, worker, "\"done\"", now);
  b.fail(d, got[1]->lease, worker, "bad", 10, now);  // dead: one attempt
  auto got2 = lease(1, 10000);                      // e
  b.cancel(c, now);

  broker replica(broker_limits{}, counting_random());
  sink.replay_into(replica);
  for (job_id id : {a, c, d, e}) {
    const job* x = b.find(id);
    const job* y = replica.find(id);
    REQUIRE(y != nullptr);
    CHECK_EQ(x->state, y->state);
    CHECK_EQ(x->attempts, y->attempts);
    CHECK_EQ(x->payload, y->payload);
    CHECK_EQ(x->outcome, y->outcome);
    CHECK_EQ(x->due_ms, y->due_ms);
    CHECK(x->lease.equals(y->lease));
  }
  CHECK_EQ(*replica.find(e)->lease_owner, "spiffe://test/worker");
  for (size_t s = 0; s < job_state_count; ++s)
    CHECK_EQ(b.find_queue("q")->count(job_state(s)), replica.find_queue("q")->count(job_state(s)));
  // The replica carries on where the original stopped.
  submit_params p;
  p.queue = "q";
  p.payload = "5";
  CHECK_GT(replica.submit(p, now).j->id, e);
  p.idempotency_key = "key";
  CHECK_EQ(replica.submit(p, now).j->id, d);
}

TEST_CASE("limits: bytes held, counting payloads and results until forgotten") {
  broker_limits limits;
  limits.max_held_bytes = 10;
  limits.result_ttl_ms = 100;
  broker b(limits, counting_random());
  principal_ref w = b.intern("w");
  submit_params p;
  p.queue = "q";
  p.payload = "123456";
  job_id id = b.submit(p, 0).j->id;
  CHECK_EQ(b.held_bytes(), 6u);
  CHECK_EQ(b.submit(p, 0).error, op_error::queue_full);
  std::vector<job*> got;
  b.lease("q", 1, 1000, w, 0, got);
  b.complete(id, got[0]->lease, w, "\"ok\"", 1);
  CHECK_EQ(b.held_bytes(), 10u);
  b.advance(101);
  CHECK_EQ(b.held_bytes(), 0u);
  CHECK_EQ(b.submit(p, 101).error, op_error::none);
}

TEST_CASE_FIXTURE(fixture, "snapshots recreate every job's state, and upsert over older records") {
  job_id a = submit("{\"a\":1}", 1, 0, 5, "key-a");
  job_id d = submit("2", 5, 60000);
  job_id l = submit("3");
  job_id x = submit("4", 5, 0, 1);
  auto got = lease(2, 10000);  // a, l
  b.complete(a, got[0]->lease, worker, "\"ok\"", now);
  auto gx = lease(1, 10000);  // x
  b.fail(x, gx[0]->lease, worker, "broken", 10, now);  // dead

  broker replica(broker_limits{}, counting_random());
  // Old records first (as after a crash mid-compaction), then the snapshot.
  sink.replay_into(replica);
  for (job_id id : b.job_ids()) CHECK(replica.apply(b.snapshot_of(*b.find(id))));
  CHECK(replica.apply(b.meta_record(now)));
  broker fresh(broker_limits{}, counting_random());
  for (job_id id : b.job_ids()) CHECK(fresh.apply(b.snapshot_of(*b.find(id))));
  CHECK(fresh.apply(b.meta_record(now)));
  for (broker* r : {&replica, &fresh}) {
    CHECK_EQ(r->job_count(), b.job_count());
    CHECK_EQ(r->held_bytes(), b.held_bytes());
    for (job_id id : {a, d, l, x}) {
      const job* p = b.find(id);
      const job* q = r->find(id);
      REQUIRE(q);
      CHECK_EQ(p->state, q->state);
      CHECK_EQ(p->attempts, q->attempts);
      CHECK_EQ(p->due_ms, q->due_ms);
      CHECK_EQ(p->outcome, q->outcome);
      CHECK(p->lease.equals(q->lease));
    }
    for (size_t s = 0; s < job_state_count; ++s)
      CHECK_EQ(b.find_queue("q")->count(job_state(s)), r->find_queue("q")->count(job_state(s)));
    CHECK_EQ(r->dead_jobs("q", 10).size(), 1u);
    // The leased job's lease still works on the copy, for its owner only.
    CHECK_EQ(r->complete(l, b.find(l)->lease, r->intern("spiffe://test/other"), "1", now), op_error::wrong_owner);
    CHECK_EQ(r->complete(l, b.find(l)->lease, r->intern("spiffe://test/worker"), "1", now), op_error::none);
    // Ids continue after the highest, and keys still resolve.
    submit_params p;
    p.queue = "q";
    p.payload = "9";
    p.idempotency_key = "key-a";
    CHECK_EQ(r->submit(p, now).j->id, a);
    p.idempotency_key = {};
    CHECK_GT(r->submit(p, now).j->id, x);
  }
}

TEST_CASE_FIXTURE(fixture, "records that do not fit the state are refused, not applied") {
  job_id id = submit("1");
  record r;
  r.type = record_type::complete;
  r.id = id;
  CHECK_FALSE(b.apply(r));  // not leased
  r.id = 999;
  CHECK_FALSE(b.apply(r));  // unknown job
  record dup;
  dup.type = record_type::submit;
  dup.id = id;
  dup.queue = "q";
  dup.payload = "1";
  dup.max_attempts = 1;
  CHECK_FALSE(b.apply(dup));  // repeated submit
  dup.id = 500;
  dup.priority = 12;
  CHECK_FALSE(b.apply(dup));  // out of range
  CHECK_EQ(state(id), job_state::queued);
  CHECK_EQ(b.job_count(), 1u);
}

TEST_CASE("limits: a queue's depth counts its unfinished jobs only") {
  broker_limits limits;
  limits.max_queue_depth = 3;
  limits.result_ttl_ms = 1'000'000;
  broker b(limits, counting_random());
  principal_ref w = b.intern("w");
  submit_params p;
  p.queue = "q";
  p.payload = "1";
  job_id first = b.submit(p, 0).j->id;
  p.delay_ms = 5000;
  job_id delayed = b.submit(p, 0).j->id;
  p.delay_ms = 0;
  b.submit(p, 0);
  CHECK_EQ(b.depth("q"), 3u);
  CHECK_EQ(b.submit(p, 0).error, op_error::queue_depth);
  // Another queue has a depth of its own.
  p.queue = "other";
  CHECK_EQ(b.submit(p, 0).error, op_error::none);
  p.queue = "q";
  // Leased and failed (awaiting a retry) jobs still count...
  std::vector<job*> got;
  b.lease("q", 2, 1000, w, 0, got);
  REQUIRE_EQ(got.size(), 2u);
  CHECK_EQ(b.depth("q"), 3u);
  CHECK_EQ(b.fail(got[1]->id, got[1]->lease, w, "again", 1000, 0), op_error::none);
  CHECK_EQ(b.find(got[1]->id)->state, job_state::failed);
  CHECK_EQ(b.depth("q"), 3u);
  CHECK_FALSE(b.has_depth_room("q", 1));
  // ...finished ones do not, though they are still held.
  CHECK_EQ(b.complete(first, got[0]->lease, w, "true", 0), op_error::none);
  CHECK_EQ(b.cancel(delayed, 0), op_error::none);
  CHECK_EQ(b.depth("q"), 1u);
  CHECK(b.has_depth_room("q", 2));
  CHECK_FALSE(b.has_depth_room("q", 3));
  CHECK_EQ(b.submit(p, 0).error, op_error::none);
  // A cap given with the submit (a policy's max_depth) overrides the default.
  p.max_depth = 2;
  CHECK_EQ(b.submit(p, 0).error, op_error::queue_depth);
  p.max_depth = 10;
  CHECK_EQ(b.submit(p, 0).error, op_error::none);
  CHECK(b.has_depth_room("q", 7, 10));
  CHECK_FALSE(b.has_depth_room("q", 8, 10));
  CHECK_FALSE(b.has_depth_room("q", 11, 10));
  CHECK_EQ(b.depth("missing"), 0u);
}

TEST_CASE("limits: no depth cap by default") {
  broker b(broker_limits{}, counting_random());
  submit_params p;
  p.queue = "q";
  p.payload = "1";
  for (int i = 0; i < 100; ++i) REQUIRE_EQ(b.submit(p, 0).error, op_error::none);
  CHECK(b.has_depth_room("q", 1'000'000));
}
