// Issue 9, "Abort during drain": five producers long-poll job J, a sixth
// long-polls job K with DELETE /v1/jobs/J pipelined behind it; SIGTERM made
// relay abort (uv_close: Assertion '!uv__is_closing(handle)' failed, exit
// 134), every time. Drain must answer every parked request exactly once and
// exit 0.
#include <doctest/doctest.h>

#include <chrono>
#include <csignal>
#include <thread>

#include "../support/hostile.h"
#include "../support/relay_fixture.h"

namespace h = test::hostile;
using test::field;
using test::relay_process;

TEST_CASE("SIGTERM with long polls parked on a job and a cancel of it pipelined behind another long poll answers each request once and exits 0") {
  for (int run = 0; run < 3; ++run) {
    CAPTURE(run);
    relay_process relay;
    auto ctx = test::client_tls("producer");
    auto submit = [&] {
      auto r = relay.curl("producer", "POST", "/v1/queues/render/jobs", R"({"payload":1})");
      REQUIRE_EQ(r.status, 201);
      return field(r.body, "id");
    };
    const std::string j = submit();
    const std::string k = submit();

    std::vector<std::unique_ptr<h::tls_client>> polls;
    for (int i = 0; i < 5; ++i) {
      polls.push_back(std::make_unique<h::tls_client>(ctx, relay.api_port));
      REQUIRE(polls.back()->handshake());
      REQUIRE(polls.back()->send(h::get_request("/v1/jobs/" + j + "?wait_ms=30000")));
    }
    h::tls_client sixth(ctx, relay.api_port);
    REQUIRE(sixth.handshake());
    REQUIRE(sixth.send(h::get_request("/v1/jobs/" + k + "?wait_ms=30000") +
                       "DELETE /v1/jobs/" + j + " HTTP/1.1\r\nHost: localhost\r\n\r\n"));
    // Parked: nothing is answered before the signal.
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
    for (auto& p : polls) CHECK(p->read_responses(1, 0).empty());
    CHECK(sixth.read_responses(1, 0).empty());

    relay.proc->signal(SIGTERM);
    for (size_t i = 0; i < polls.size(); ++i) {
      CAPTURE(i);
      polls[i]->read_until_closed(10000);
      auto got = polls[i]->responses();
      CHECK_EQ(got.size(), 1u);
      if (got.empty()) continue;
      CHECK_EQ(got[0].status, 200);
      CHECK(got[0].body.find("\"id\":\"" + j + "\"") != std::string::npos);
      CHECK(polls[i]->plain().empty());  // nothing after the one answer
    }
    sixth.read_until_closed(10000);
    auto got = sixth.responses();
    // The long poll is answered; the DELETE behind it is answered once, or
    // the connection closes after the long poll's answer.
    CHECK_GE(got.size(), 1u);
    CHECK_LE(got.size(), 2u);
    if (!got.empty()) {
      CHECK_EQ(got[0].status, 200);
      CHECK(got[0].body.find("\"id\":\"" + k + "\"") != std::string::npos);
    }
    if (got.size() == 2) MESSAGE("the pipelined DELETE was answered " << got[1].status);
    CHECK(sixth.plain().empty());
    int rc = relay.proc->wait(15000);
    CHECK_MESSAGE(rc == 0, "relay exited " << rc << "; log tail: " << relay.proc->log().substr(
                               relay.proc->log().size() > 600 ? relay.proc->log().size() - 600 : 0));
  }
}
