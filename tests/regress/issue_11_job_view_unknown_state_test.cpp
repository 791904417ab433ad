// Issue 11 follow-up, found by the relay_answers fuzzer in issue 12's CI: the
// v1 client took a job view whose "state" was the empty string (or any
// string), so a caller such as relayctl's wait could be handed a job in no
// state relay has -- neither terminal nor pending -- from a broken or hostile
// relay. A job view's state is one of relay's seven.
#include <doctest/doctest.h>

#include "relay/v1_client.h"

TEST_CASE("a job view whose state is not one of relay's is refused") {
  const std::string head = R"({"id":"0000000000000001","queue":"q","state":)";
  for (const char* state : {R"("")", R"("done")", R"("Queued")", R"("queued ")"}) {
    CAPTURE(state);
    relay::v1::job_view j;
    std::string why;
    CHECK_FALSE(relay::v1::parse_job_view(head + state + R"(,"updated_ms":2})", j, why));
    CHECK_FALSE(why.empty());
  }
  for (const char* state : {"queued", "delayed", "leased", "succeeded", "failed", "dead", "cancelled"}) {
    CAPTURE(state);
    relay::v1::job_view j;
    std::string why;
    CHECK_MESSAGE(relay::v1::parse_job_view(head + "\"" + state + R"(","updated_ms":2})", j, why), why);
    CHECK_EQ(j.state, state);
  }
}
