// The v1 API end to end over mTLS: the exact answers relay gives.
#include <doctest/doctest.h>

#include <chrono>
#include <thread>

#include "../support/relay_fixture.h"

using test::field;
using test::relay_process;

namespace {

std::string submit(const relay_process& relay, const std::string& queue, const std::string& body) {
  auto r = relay.curl("producer", "POST", "/v1/queues/" + queue + "/jobs", body);
  REQUIRE_MESSAGE(r.status == 201, r.body);
  return field(r.body, "id");
}

struct leased {
  std::string id, lease, body;
};

leased lease_one(const relay_process& relay, const std::string& queue, const std::string& who = "worker",
                 const std::string& args = "{}") {
  auto r = relay.curl(who, "POST", "/v1/queues/" + queue + "/lease", args);
  REQUIRE_EQ(r.status, 200);
  return {field(r.body, "id"), field(r.body, "lease"), r.body};
}

}  // namespace

TEST_CASE("submit, lease, complete and read back, byte for byte") {
  relay_process relay;
  // Unicode (raw and escaped), nesting, odd spacing and number forms must
  // survive exactly: relay never re-serialises.
  const std::string payload = R"({"name":"Zoë ☃ 𝄞","esc":"\u00e9\n\"q\"","deep":{"a":[1,2.50,-0.0,1e3,{"b":[[]]}]},  "t":true ,"n":null})";
  std::string id = submit(relay, "render", R"({"payload":)" + payload + R"(,"priority":1})");
  CHECK_EQ(id.size(), 16u);

  auto l = lease_one(relay, "render");
  CHECK_EQ(l.id, id);
  CHECK(l.body.find(R"("payload":)" + payload + "}") != std::string::npos);
  CHECK_EQ(field(l.body, "attempt"), "1");

  const std::string result = R"([ "ok", {"pixels": 1920e0, "ü": "✓"} ])";
  auto done = relay.curl("worker", "POST", "/v1/jobs/" + id + "/complete",
                         R"({"lease":")" + l.lease + R"(","result":)" + result + "}");
  CHECK_EQ(done.status, 200);
  CHECK_EQ(field(done.body, "state"), "succeeded");

  auto job = relay.curl("producer", "GET", "/v1/jobs/" + id);
  CHECK_EQ(job.status, 200);
  CHECK(job.body.find(R"("payload":)" + payload + ",") != std::string::npos);
  CHECK(job.body.find(R"("result":)" + result + ",") != std::string::npos);
  CHECK_EQ(field(job.body, "state"), "succeeded");
  CHECK_EQ(field(job.body, "queue"), "render");
  CHECK_EQ(field(job.body, "attempts"), "1");
}

TEST_CASE("a 1 MiB body is accepted and returned intact; one byte more is 413") {
  relay_process relay;
  const std::string prefix = R"({"payload":")", suffix = R"("})";
  std::string filler(1048576 - prefix.size() - suffix.size(), 'x');
  for (size_t i = 0; i < filler.size(); i += 4093) filler[i] = static_cast<char>('a' + i % 26);
  std::string body = prefix + filler + suffix;
  REQUIRE_EQ(body.size(), 1048576u);
  std::string id = submit(relay, "render", body);

  // The project's own client reads the lease answer: the payload comes back whole.
  relay::v1::blocking_client worker(test::v1_options(relay.api_port, "worker"));
  relay::v1::lease_request one;
  one.queue = "render";
  auto l = worker.lease(one);
  REQUIRE_MESSAGE(!l.err, l.err.message);
  REQUIRE_EQ(l.value.jobs.size(), 1u);
  CHECK_EQ(l.value.jobs[0].id, id);
  CHECK(l.value.jobs[0].payload == "\"" + filler + "\"");
  auto c = worker.complete(id, l.value.jobs[0].lease, "\"" + filler.substr(0, 1048000) + "\"");
  CHECK_MESSAGE(!c, c.message);

  auto too_big = relay.curl("producer", "POST", "/v1/queues/render/jobs", body + " ");
  CHECK_EQ(too_big.status, 413);
  CHECK_EQ(field(too_big.body, "code"), "payload_too_large");
}

TEST_CASE("malformed requests get the right 4xx") {
  relay_process relay;
  auto bad_json = relay.curl("producer", "POST", "/v1/queues/render/jobs", R"({"payload": [1, 2,})");
  CHECK_EQ(bad_json.status, 400);
  CHECK_EQ(field(bad_json.body, "code"), "invalid_json");

  auto bad_utf8 = relay.curl("producer", "POST", "/v1/queues/render/jobs", "{\"payload\":\"\xff\xfe\"}");
  CHECK_EQ(bad_utf8.status, 400);

  auto no_payload = relay.curl("producer", "POST", "/v1/queues/render/jobs", R"({"priority":1})");
  CHECK_EQ(no_payload.status, 400);
  CHECK(no_payload.body.find("payload") != std::string::npos);

  auto bad_priority = relay.curl("producer", "POST", "/v1/queues/render/jobs", R"({"payload":1,"priority":10})");
  CHECK_EQ(bad_priority.status, 400);
  CHECK(bad_priority.body.find("priority") != std::string::npos);

  auto unknown = relay.curl("producer", "POST", "/v1/queues/render/jobs", R"({"payload":1,"prio":1})");
  CHECK_EQ(unknown.status, 400);
  CHECK(unknown.body.find("unknown field \\\"prio\\\"") != std::string::npos);

  CHECK_EQ(relay.curl("producer", "POST", "/v1/queues/bad%20name/jobs", R"({"payload":1})").status, 400);
  CHECK_EQ(relay.curl("producer", "GET", "/v1/nothing").status, 404);
  CHECK_EQ(relay.curl("producer", "GET", "/v1/jobs/zzzz").status, 404);
  auto wrong_method = relay.curl("producer", "PUT", "/v1/queues/render/jobs", "{}");
  CHECK_EQ(wrong_method.status, 405);
  auto long_uri = relay.curl("producer", "GET", "/v1/jobs/" + std::string(9000, 'a'));
  CHECK_EQ(long_uri.status, 414);
  auto huge_header = relay.curl("producer", "GET", "/v1/queues", {}, {"-H", "X-Big: " + std::string(17000, 'h')});
  CHECK_EQ(huge_header.status, 431);
  auto no_length = relay.curl("producer", "POST", "/v1/queues/render/jobs", {}, {"-H", "Content-Length:"});
  CHECK((no_length.status == 411 || no_length.status == 400));
  // After all that, relay is still serving.
  CHECK_EQ(relay.curl("producer", "POST", "/v1/queues/render/jobs", R"({"payload":1})").status, 201);
}

TEST_CASE("a stale lease gets 409 and its result is not stored") {
  relay_process relay;
  std::string id = submit(relay, "render", R"({"payload":"p","lease_ms":300})");
  auto first = lease_one(relay, "render");
  std::this_thread::sleep_for(std::chrono::milliseconds(400));
  auto second = lease_one(relay, "render", "worker2");
  REQUIRE_EQ(second.id, id);
  CHECK_EQ(field(second.body, "attempt"), "2");
  auto late = relay.curl("worker", "POST", "/v1/jobs/" + id + "/complete",
                         R"({"lease":")" + first.lease + R"(","result":"late"})");
  CHECK_EQ(late.status, 409);
  CHECK_EQ(field(late.body, "code"), "lease_lost");
  auto hb = relay.curl("worker", "POST", "/v1/jobs/" + id + "/heartbeat", R"({"lease":")" + first.lease + R"("})");
  CHECK_EQ(hb.status, 409);
  auto job = relay.curl("producer", "GET", "/v1/jobs/" + id);
  CHECK_EQ(field(job.body, "state"), "leased");
  CHECK_EQ(field(job.body, "result"), "null");
}

TEST_CASE("heartbeat, fail with backoff, dead letters and requeue") {
  relay_process relay;
  std::string id = submit(relay, "render", R"({"payload":1,"max_attempts":2})");
  auto l1 = lease_one(relay, "render", "worker", R"({"lease_ms":5000})");
  auto hb = relay.curl("worker", "POST", "/v1/jobs/" + id + "/heartbeat",
                       R"({"lease":")" + l1.lease + R"(","extend_ms":60000})");
  CHECK_EQ(hb.status, 200);
  CHECK_GT(std::stoll(field(hb.body, "lease_expires_ms")), std::stoll(field(l1.body, "lease_expires_ms")));

  auto f1 = relay.curl("worker", "POST", "/v1/jobs/" + id + "/fail",
                       R"({"lease":")" + l1.lease + R"(","error":"disk full","retry_delay_ms":200})");
  CHECK_EQ(f1.status, 200);
  CHECK_EQ(field(f1.body, "state"), "failed");
  CHECK_EQ(field(relay.curl("producer", "GET", "/v1/jobs/" + id).body, "error"), "disk full");
  // Not before the backoff is over.
  CHECK_EQ(relay.curl("worker", "POST", "/v1/queues/render/lease", "{}").body, R"({"jobs":[]})");
  auto l2 = lease_one(relay, "render", "worker", R"({"wait_ms":5000})");
  REQUIRE_EQ(l2.id, id);
  auto f2 = relay.curl("worker", "POST", "/v1/jobs/" + id + "/fail", R"({"lease":")" + l2.lease + R"(","error":"again"})");
  CHECK_EQ(field(f2.body, "state"), "dead");

  auto dead = relay.curl("admin", "GET", "/v1/queues/render/dead");
  CHECK_EQ(dead.status, 200);
  CHECK_EQ(field(dead.body, "id"), id);
  CHECK_EQ(field(dead.body, "error"), "again");
  auto stats = relay.curl("admin", "GET", "/v1/queues/render");
  CHECK(stats.body.find(R"("dead":1)") != std::string::npos);

  auto requeued = relay.curl("admin", "POST", "/v1/queues/render/dead/requeue", R"({"ids":[")" + id + R"("]})");
  CHECK_EQ(requeued.status, 200);
  CHECK(requeued.body.find(id) != std::string::npos);
  auto l3 = lease_one(relay, "render");
  CHECK_EQ(l3.id, id);
  CHECK_EQ(field(l3.body, "attempt"), "1");
}

TEST_CASE("batches, priorities, delays, idempotency and cancellation") {
  relay_process relay;
  auto batch = relay.curl("producer", "POST", "/v1/queues/render/jobs",
                          R"([{"payload":"low","priority":9},{"payload":"high","priority":0},{"payload":"mid"}])");
  CHECK_EQ(batch.status, 201);
  CHECK_EQ(test::tls_pipe::count(batch.body, "\","), 2u);
  auto l = relay.curl("worker", "POST", "/v1/queues/render/lease", R"({"max":10})");
  auto high = l.body.find("\"high\""), mid = l.body.find("\"mid\""), low = l.body.find("\"low\"");
  CHECK(high < mid);
  CHECK(mid < low);

  auto first = relay.curl("producer", "POST", "/v1/queues/render/jobs", R"({"payload":1,"idempotency_key":"order-7"})");
  auto again = relay.curl("producer", "POST", "/v1/queues/render/jobs", R"({"payload":2,"idempotency_key":"order-7"})");
  CHECK_EQ(first.status, 201);
  CHECK_EQ(again.status, 200);
  CHECK_EQ(field(first.body, "id"), field(again.body, "id"));

  std::string delayed = submit(relay, "encode-x", R"({"payload":1,"delay_ms":60000})");
  CHECK_EQ(field(relay.curl("producer", "GET", "/v1/jobs/" + delayed).body, "state"), "delayed");
  CHECK_EQ(relay.curl("worker", "POST", "/v1/queues/encode-x/lease", "{}").body, R"({"jobs":[]})");
  auto cancel = relay.curl("producer", "DELETE", "/v1/jobs/" + delayed);
  CHECK_EQ(cancel.status, 200);
  CHECK_EQ(field(cancel.body, "state"), "cancelled");
  CHECK_EQ(relay.curl("producer", "DELETE", "/v1/jobs/" + delayed).status, 409);
  // A worker cannot cancel.
  std::string other = submit(relay, "encode-x", R"({"payload":1})");
  CHECK_EQ(relay.curl("worker", "DELETE", "/v1/jobs/" + other).status, 403);
}

TEST_CASE("the results batch answers each item on its own") {
  relay_process relay;
  std::string a = submit(relay, "work", R"({"payload":"a"})");
  std::string b = submit(relay, "work", R"({"payload":"b"})");
  auto l = relay.curl("worker", "POST", "/v1/queues/work/lease", R"({"max":2})");
  REQUIRE_EQ(test::tls_pipe::count(l.body, "\"lease\""), 2u);
  // The first listed job is a, the second b (same priority, age order).
  auto la = l.body.find(a), lb = l.body.find(b);
  REQUIRE(la < lb);
  std::string lease_a = field(l.body.substr(la), "lease"), lease_b = field(l.body.substr(lb), "lease");
  std::string body = R"([{"id":")" + a + R"(","lease":")" + lease_a + R"(","result":{"n":1}},)" +
                     R"({"id":")" + b + R"(","lease":")" + lease_b + R"(","error":"nope","retry_delay_ms":0},)" +
                     R"({"id":")" + a + R"(","lease":")" + lease_a + R"(","result":2},)" +
                     R"({"id":"00000000000fffff","lease":")" + lease_a + R"(","result":3}])";
  auto r = relay.curl("worker", "POST", "/v1/results", body);
  CHECK_EQ(r.status, 200);
  CHECK(r.body.find(R"({"id":")" + a + R"(","status":200,"state":"succeeded"})") != std::string::npos);
  CHECK(r.body.find(R"({"id":")" + b + R"(","status":200,"state":"failed"})") != std::string::npos);
  CHECK(r.body.find(R"({"id":")" + a + R"(","status":409,"error":"lease_lost"})") != std::string::npos);
  CHECK(r.body.find(R"({"id":"00000000000fffff","status":404,"error":"not_found"})") != std::string::npos);
  CHECK(relay.curl("producer", "GET", "/v1/jobs/" + a).body.find(R"("result":{"n":1})") != std::string::npos);
}

TEST_CASE("a parked lease is woken by a submit, oldest waiter first") {
  relay_process relay;
  test::test_loop loop;
  relay::v1::client w1(&loop.loop, test::v1_options(relay.api_port, "worker"));
  relay::v1::client w2(&loop.loop, test::v1_options(relay.api_port, "worker2"));
  // Both clients share one loop: park w1 then w2 on the same queue.
  uv_loop_t* loop1 = &loop.loop;
  relay::v1::lease_request parked;
  parked.queue = "render";
  parked.wait_ms = 30000;
  // The payload of the one job leased, or the error's kind and message.
  auto got = [](const relay::v1::error& e, const relay::v1::lease_answer& a) {
    if (e) return std::string(e.kind_name()) + ": " + e.message;
    return a.jobs.size() == 1 ? std::string(a.jobs[0].payload) : std::to_string(a.jobs.size()) + " jobs";
  };
  std::string got1, got2;
  bool done1 = false, done2 = false;
  w1.lease(parked, [&](const relay::v1::error& e, relay::v1::lease_answer& a) { got1 = got(e, a), done1 = true; });
  auto waiting = [&](int n) {
    for (int i = 0; i < 500; ++i) {
      uv_run(loop1, UV_RUN_NOWAIT);
      // A queue with waiters only is no queue yet (issue 10), so the parked
      // count is read from the metrics.
      if (relay.ops_get("/metrics").body.find("relay_parked_requests{kind=\"lease\"} " + std::to_string(n) + "\n") !=
          std::string::npos)
        return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return false;
  };
  REQUIRE(waiting(1));
  w2.lease(parked, [&](const relay::v1::error& e, relay::v1::lease_answer& a) { got2 = got(e, a), done2 = true; });
  REQUIRE(waiting(2));

  relay::v1::blocking_client producer(test::v1_options(relay.api_port, "producer"));
  relay::v1::submit_request job;
  job.queue = "render";
  job.payload = R"("wake")";
  auto t0 = std::chrono::steady_clock::now();
  auto s = producer.submit(job);
  REQUIRE_MESSAGE(!s.err, s.err.message);
  REQUIRE(s.value.created);  // 201
  while (!done1 && std::chrono::steady_clock::now() - t0 < std::chrono::seconds(10)) uv_run(loop1, UV_RUN_ONCE);
  auto woke_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  REQUIRE(done1);
  CHECK_EQ(got1, R"("wake")");
  // Woken by the submit, not by its 30 s wait running out.
  CHECK_LT(woke_ms, 10000);
  MESSAGE("long-poll wake-up, submit sent to lease answer received: " << woke_ms << " ms");
  CHECK_FALSE(done2);
  // The second waiter gets the next job.
  job.payload = R"("second")";
  producer.submit(job);
  while (!done2) uv_run(loop1, UV_RUN_ONCE);
  CHECK_EQ(got2, R"("second")");
}

TEST_CASE("a lease that waits in vain answers an empty list when its wait is over") {
  relay_process relay;
  auto t0 = std::chrono::steady_clock::now();
  auto r = relay.curl("worker", "POST", "/v1/queues/render/lease", R"({"wait_ms":300})");
  auto ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  CHECK_EQ(r.status, 200);
  CHECK_EQ(r.body, R"({"jobs":[]})");
  CHECK_GE(ms, 290);
}

TEST_CASE("GET with wait_ms returns when the job finishes") {
  relay_process relay;
  std::string id = submit(relay, "render", R"({"payload":1})");
  test::test_loop loop;
  relay::v1::client reader(&loop.loop, test::v1_options(relay.api_port, "producer"));
  bool done = false;
  relay::v1::error err;
  relay::v1::job_view job;
  reader.get_job(id, 20000, [&](const relay::v1::error& e, relay::v1::job_view& v) { err = e, job = std::move(v), done = true; });
  for (int i = 0; i < 20; ++i) uv_run(&loop.loop, UV_RUN_NOWAIT), std::this_thread::sleep_for(std::chrono::milliseconds(5));
  CHECK_FALSE(done);
  auto l = lease_one(relay, "render");
  relay.curl("worker", "POST", "/v1/jobs/" + id + "/complete", R"({"lease":")" + l.lease + R"(","result":"fin"})");
  auto t0 = std::chrono::steady_clock::now();
  while (!done && std::chrono::steady_clock::now() - t0 < std::chrono::seconds(10)) uv_run(&loop.loop, UV_RUN_ONCE);
  REQUIRE(done);
  REQUIRE_MESSAGE(!err, err.message);
  CHECK_EQ(job.state, "succeeded");
  CHECK_EQ(job.result, R"("fin")");
}
