// Issue 10, "Queues are created only by those allowed to fill them": a
// consume-only identity could park lease long polls on new queue names until
// limits.max_queues was used up, and every producer's submit then failed with
// 429 too_many_queues; the names also showed in /metrics and GET /v1/queues.
// Parking no longer creates a queue, and a queue with no job and no waiter
// is forgotten.
#include <doctest/doctest.h>

#include "../support/relay_fixture.h"

using test::relay_process;

TEST_CASE("long polls on new queue names neither use up max_queues nor show as queues") {
  relay_process relay({"--set", "limits.max_queues=3"});
  std::vector<std::unique_ptr<test::tls_pipe>> parked;
  for (int i = 0; i < 8; ++i) {
    parked.push_back(std::make_unique<test::tls_pipe>(relay.api_port, "worker"));
    std::string body = R"({"max":1,"wait_ms":3000})";
    parked.back()->send("POST /v1/queues/encode-" + std::to_string(i) +
                        "/lease HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: " +
                        std::to_string(body.size()) + "\r\n\r\n" + body);
  }
  // Wait until relay has parked all eight.
  bool all_parked = false;
  for (int i = 0; i < 100 && !all_parked; ++i) {
    all_parked = relay.ops_get("/metrics").body.find("relay_parked_requests{kind=\"lease\"} 8") != std::string::npos;
    if (!all_parked) usleep(50 * 1000);
  }
  REQUIRE_MESSAGE(all_parked, relay.ops_get("/metrics").body);

  // Eight names are waited on; three queues with jobs still fit, and a
  // job on a queue that is waited on wakes its waiter.
  for (const char* q : {"render", "work", "encode-0"}) {
    auto r = relay.curl("producer", "POST", std::string("/v1/queues/") + q + "/jobs", R"({"payload":1})");
    CHECK_MESSAGE(r.status == 201, q << ": " << r.status << " " << r.body);
  }
  std::string woken = parked[0]->read_responses(1, 5000);
  CHECK_MESSAGE(woken.find("\"jobs\":[{") != std::string::npos, woken);

  auto listed = relay.curl("admin", "GET", "/v1/queues");
  REQUIRE_EQ(listed.status, 200);
  CHECK(listed.body.find("encode-1") == std::string::npos);
  CHECK(listed.body.find("\"render\"") != std::string::npos);
  CHECK(relay.ops_get("/metrics").body.find("encode-1") == std::string::npos);
  CHECK_EQ(relay.curl("admin", "GET", "/v1/queues/encode-1").status, 404);

  // A fourth queue with jobs is still refused: the limit holds for queues
  // that hold jobs.
  auto fourth = relay.curl("producer", "POST", "/v1/queues/fourth/jobs", R"({"payload":1})");
  CHECK_EQ(fourth.status, 429);

  // Once the waits run out the empty queues are forgotten: a waiter leaves
  // nothing behind.
  std::string expired = parked[1]->read_responses(1, 6000);
  CHECK_MESSAGE(expired.find("\"jobs\":[]") != std::string::npos, expired);
  CHECK(relay.ops_get("/metrics").body.find("relay_queues 3") != std::string::npos);
}
