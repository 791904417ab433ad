// Issue 12: relay::v1::blocking_client runs its private libuv loop only
// while a call is in progress, and libuv's clock (uv_now) only moves when
// the loop runs. A call made after the client sat idle computed its connect
// and request deadlines from the clock of the previous call: idle longer
// than the timeout, and the call failed at once with "timed out" without
// having tried. Found by the HA fault suite: producers alternating between
// a paused relay (each attempt a 2 s connect timeout) and the new leader
// could never reach the new leader. relayctl, which sleeps between retries,
// had the same shortened deadlines.
#include <doctest/doctest.h>

#include <chrono>
#include <thread>

#include "../support/relay_fixture.h"

TEST_CASE("a blocking_client call after an idle spell longer than its timeouts still has its whole timeout") {
  test::relay_process relay;
  auto o = test::v1_options(relay.api_port, "producer");
  o.connection.connect_timeout_ms = 400;
  o.request_timeout_ms = 600;
  relay::v1::blocking_client client(o);

  auto first = client.get_job("0000000000000001");
  CHECK_EQ(first.err.what, relay::v1::error::kind::refused);
  CHECK_EQ(first.err.status, 404);

  // Idle for longer than both timeouts, as between a producer's attempts.
  std::this_thread::sleep_for(std::chrono::milliseconds(1000));
  auto second = client.get_job("0000000000000001");
  CHECK_MESSAGE(second.err.what == relay::v1::error::kind::refused,
                "the call failed without its timeout: " << second.err.kind_name() << " " << second.err.message);
  CHECK_EQ(second.err.status, 404);

  // The same on a fresh connection (connect deadline, not only the request's).
  relay::v1::blocking_client fresh(o);
  std::this_thread::sleep_for(std::chrono::milliseconds(1000));
  auto third = fresh.get_job("0000000000000001");
  CHECK_MESSAGE(third.err.status == 404, third.err.kind_name() << " " << third.err.message);
}
