// Issue 10, found by the attack review: idempotency keys were scoped by
// queue alone. A principal allowed to submit to a shared queue could claim
// another principal's key first (the other's submit then got 200 and the
// claimer's job, its own payload silently dropped), and learn the id and
// state of another principal's job from a guessed key. Keys now belong to
// the principal that submits.
#include <doctest/doctest.h>

#include "../support/relay_fixture.h"

TEST_CASE("an idempotency key names a job only for the principal that submitted it") {
  test::relay_process relay(
      {}, test::policy_with_grant(R"({"principal": "bunny2", "allow": ["submit"], "queues": ["shared"]})"));
  auto claim = relay.curl("worker2", "POST", "/v1/queues/shared/jobs",
                          R"({"payload":{"to":"mallory"},"idempotency_key":"order-43"})");
  REQUIRE_EQ(claim.status, 201);
  auto mine = relay.curl("producer", "POST", "/v1/queues/shared/jobs",
                         R"({"payload":{"to":"bob"},"idempotency_key":"order-43"})");
  CHECK_EQ(mine.status, 201);
  CHECK_NE(test::field(mine.body, "id"), test::field(claim.body, "id"));
  auto job = relay.curl("producer", "GET", "/v1/jobs/" + test::field(mine.body, "id"));
  CHECK(job.body.find("bob") != std::string::npos);

  // The producer's own retry still finds its job.
  auto again = relay.curl("producer", "POST", "/v1/queues/shared/jobs",
                          R"({"payload":{"to":"bob"},"idempotency_key":"order-43"})");
  CHECK_EQ(again.status, 200);
  CHECK_EQ(test::field(again.body, "id"), test::field(mine.body, "id"));

  // Guessing another principal's key reveals nothing of its job.
  auto theirs = relay.curl("producer", "POST", "/v1/queues/shared/jobs",
                           R"({"payload":1,"idempotency_key":"order-42"})");
  REQUIRE_EQ(theirs.status, 201);
  auto guess = relay.curl("worker2", "POST", "/v1/queues/shared/jobs", R"({"payload":2,"idempotency_key":"order-42"})");
  CHECK_EQ(guess.status, 201);
  CHECK_NE(test::field(guess.body, "id"), test::field(theirs.body, "id"));
}

TEST_CASE("a principal's idempotency key survives a restart") {
  test::relay_process relay;
  auto first = relay.curl("producer", "POST", "/v1/queues/render/jobs", R"({"payload":1,"idempotency_key":"k"})");
  REQUIRE_EQ(first.status, 201);
  relay.proc->signal(SIGTERM);
  REQUIRE_EQ(relay.proc->wait(10000), 0);
  // The same journal, a new process.
  relay.proc = std::make_unique<test::child>(
      std::vector<std::string>{test::env_or_fail("RELAY_BIN"), "--config", relay.dir / "relay.json"},
      relay.dir / "relay2.log");
  auto api_line = relay.proc->wait_for_line("\"listener\":\"api\"");
  REQUIRE(api_line.has_value());
  relay.api = test::json_field(*api_line, "addr");
  auto again = relay.curl("producer", "POST", "/v1/queues/render/jobs", R"({"payload":1,"idempotency_key":"k"})");
  CHECK_EQ(again.status, 200);
  CHECK_EQ(test::field(again.body, "id"), test::field(first.body, "id"));
}
