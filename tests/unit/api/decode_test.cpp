#include <doctest/doctest.h>

#include "api/decode.h"
#include "api/router.h"
#include "relay/http.h"

using namespace relay;
using namespace relay::api;

namespace {

// Bodies arrive from the parser with padding reserved; do the same here.
std::string padded(std::string s) {
  s.reserve(s.size() + http::body_padding);
  return s;
}

}  // namespace

TEST_CASE("payloads are kept as the exact bytes sent") {
  decoder d;
  std::vector<queue::submit_params> items;
  bool batch = true;
  decode_error err;
  std::string body = padded(R"({ "priority" : 3, "payload" :  {"a" : [1, 2.0 ,"\u00e9"]}  , "delay_ms": 10 })");
  REQUIRE_MESSAGE(d.submit(body, items, batch, err), err.message);
  CHECK_FALSE(batch);
  REQUIRE_EQ(items.size(), 1u);
  CHECK_EQ(items[0].payload, R"({"a" : [1, 2.0 ,"\u00e9"]})");
  CHECK_EQ(items[0].priority, 3);
  CHECK_EQ(items[0].delay_ms, 10);

  for (const char* scalar : {"12.50", "\"s\"", "true", "null", "-0"}) {
    items.clear();
    std::string b = padded(std::string(R"({"payload": )") + scalar + " }");
    REQUIRE(d.submit(b, items, batch, err));
    CHECK_EQ(items[0].payload, scalar);
  }
}

TEST_CASE("batches are arrays of job objects") {
  decoder d;
  std::vector<queue::submit_params> items;
  bool batch = false;
  decode_error err;
  std::string body = padded(R"([{"payload":1},{"payload":[2],"idempotency_key":"k"}])");
  REQUIRE(d.submit(body, items, batch, err));
  CHECK(batch);
  REQUIRE_EQ(items.size(), 2u);
  CHECK_EQ(items[1].payload, "[2]");
  CHECK_EQ(items[1].idempotency_key, "k");
  items.clear();
  std::string bad = padded(R"([{"payload":1}, 5])");
  CHECK_FALSE(d.submit(bad, items, batch, err));
  CHECK_EQ(err.message, "item 1 is not an object");
  items.clear();
  std::string empty = padded("[]");
  CHECK_FALSE(d.submit(empty, items, batch, err));
}

TEST_CASE("field errors name the field") {
  decoder d;
  decode_error err;
  std::vector<queue::submit_params> items;
  bool batch;
  std::string b1 = padded(R"({"payload":1,"max_attempts":0})");
  CHECK_FALSE(d.submit(b1, items, batch, err));
  CHECK(err.message.find("\"max_attempts\" must be an integer from 1 to 1000") == 0);
  items.clear();
  std::string b2 = padded(R"({"payload":1,"priority":1.5})");
  CHECK_FALSE(d.submit(b2, items, batch, err));
  CHECK_EQ(err.kind, api_error::invalid_field);
  items.clear();
  std::string b3 = padded(R"({"payload":1} trailing)");
  CHECK_FALSE(d.submit(b3, items, batch, err));
  CHECK_EQ(err.kind, api_error::invalid_json);
  items.clear();
  std::string deep = padded(std::string(5000, '[') + std::string(5000, ']'));
  CHECK_FALSE(d.submit(deep, items, batch, err));
  CHECK_EQ(err.kind, api_error::invalid_json);

  lease_args la;
  std::string l1 = padded(R"({"wait_ms":60001})");
  CHECK_FALSE(d.lease(l1, la, err));
  CHECK(err.message.find("wait_ms") != std::string::npos);
  std::string l2 = padded("");
  CHECK(d.lease(l2, la, err));
  CHECK_EQ(la.max, 1u);
  CHECK_EQ(la.max_bytes, SIZE_MAX);
  std::string l3 = padded(R"({"max":5,"max_bytes":250000})");
  CHECK(d.lease(l3, la, err));
  CHECK_EQ(la.max_bytes, 250000u);
  for (const char* bad : {R"({"max_bytes":0})", R"({"max_bytes":-1})", R"({"max_bytes":"1000"})",
                          R"({"max_bytes":1.5})", R"({"max_bytes":9007199254740992})", R"({"max_bytes":null})"}) {
    std::string l = padded(bad);
    CHECK_FALSE_MESSAGE(d.lease(l, la, err), bad);
    CHECK_EQ(err.kind, api_error::invalid_field);
    CHECK_MESSAGE(err.message.find("max_bytes") != std::string::npos, err.message);
  }

  outcome_args oa;
  std::string c1 = padded(R"({"lease":"zz","result":1})");
  CHECK_FALSE(d.complete(c1, oa, err));
  CHECK(err.message.find("lease") != std::string::npos);
  std::string c2 = padded(R"({"lease":"000102030405060708090a0b0c0d0e0f"})");
  CHECK_FALSE(d.complete(c2, oa, err));
  CHECK(err.message.find("\"result\" is required") != std::string::npos);
  std::string c3 = padded(R"({"lease":"000102030405060708090a0b0c0d0e0f","error":"x"})");
  CHECK_FALSE(d.complete(c3, oa, err));
  CHECK(err.message.find("unknown field \"error\"") != std::string::npos);
}

TEST_CASE("the results batch wants exactly one outcome per item") {
  decoder d;
  decode_error err;
  std::vector<outcome_args> out;
  std::string both = padded(R"([{"id":"0000000000000001","lease":"000102030405060708090a0b0c0d0e0f","result":1,"error":"x"}])");
  CHECK_FALSE(d.results(both, out, err));
  CHECK(err.message.find("exactly one") != std::string::npos);
  out.clear();
  std::string ok = padded(R"([{"id":"0000000000000001","lease":"000102030405060708090a0b0c0d0e0f","error":"x","retry_delay_ms":5}])");
  REQUIRE(d.results(ok, out, err));
  CHECK(out[0].failed);
  CHECK_EQ(out[0].error, "x");
  CHECK_EQ(out[0].retry_delay_ms, 5u);
}

TEST_CASE("routes") {
  using http::method;
  auto r = match_route(method::post, "/v1/queues/render/jobs");
  CHECK_EQ(r.which, route::submit);
  CHECK(r.method_allowed);
  CHECK_EQ(r.queue, "render");
  r = match_route(method::get, "/v1/queues/render/jobs");
  CHECK_EQ(r.which, route::submit);
  CHECK_FALSE(r.method_allowed);
  CHECK_EQ(r.allow, "POST");
  CHECK_EQ(match_route(method::del, "/v1/jobs/abc").which, route::cancel_job);
  CHECK_EQ(match_route(method::get, "/v1/jobs/abc").job, "abc");
  CHECK_EQ(match_route(method::post, "/v1/jobs/abc/complete").which, route::complete);
  CHECK_EQ(match_route(method::post, "/v1/queues/q/dead/requeue").which, route::requeue_dead);
  CHECK_EQ(match_route(method::get, "/v1/queues").which, route::list_queues);
  CHECK_EQ(match_route(method::post, "/v1/results").which, route::results);
  CHECK_EQ(match_route(method::get, "/v1/queues/q/jobs/extra/more").which, route::unknown);
  CHECK_EQ(match_route(method::get, "/v2/queues").which, route::unknown);
  CHECK_EQ(match_route(method::get, "v1/queues").which, route::unknown);
  CHECK_EQ(match_route(method::get, "/v1/jobs/").job, "");
}
