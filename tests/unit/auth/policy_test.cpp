#include <doctest/doctest.h>

#include "relay/auth.h"

using namespace relay;
using auth::permission;

namespace {

std::shared_ptr<const auth::policy> parse(const std::string& json, std::string& error) {
  return auth::policy::parse(json, "policy.json", error);
}

const char* sample = R"({
  "principals": {
    "bunny": {"uri_san": "spiffe://azure/ns/jobs/sa/bunny"},
    "producer": {"dns_san": "producer.aws.internal"},
    "ops": {"cn": "ops-admin"}
  },
  "grants": [
    {"principal": "bunny", "allow": ["consume"], "queues": ["render", "encode-*"]},
    {"principal": "producer", "allow": ["submit", "read"], "queues": ["*"]},
    {"principal": "ops", "allow": ["admin"], "queues": ["*"]}
  ]
})";

}  // namespace

TEST_CASE("a principal is one name, matched only against matchers of its own kind") {
  std::string error;
  auto p = parse(sample, error);
  REQUIRE_MESSAGE(p, error);
  // The URI SAN is the name; the DNS SAN and CN are not looked at.
  tls::identity bunny{"spiffe://azure/ns/jobs/sa/bunny", "producer.aws.internal", "ops-admin"};
  REQUIRE(p->match(bunny));
  CHECK_EQ(*p->match(bunny), "bunny");
  tls::identity producer{"", "producer.aws.internal", "x"};
  REQUIRE(p->match(producer));
  CHECK_EQ(*p->match(producer), "producer");
  tls::identity ops{"", "", "ops-admin"};
  REQUIRE(p->match(ops));
  CHECK_EQ(*p->match(ops), "ops");
  // An unknown first name is unknown: no second chance through the others
  // (a CA that constrains URI SANs but not CNs must not grant admin).
  CHECK(p->match(tls::identity{"spiffe://test/ns/evil/sa/anything", "", "ops-admin"}) == nullptr);
  CHECK(p->match(tls::identity{"spiffe://test/ns/evil/sa/anything", "producer.aws.internal", ""}) == nullptr);
  CHECK(p->match(tls::identity{"", "evil.example", "ops-admin"}) == nullptr);
  CHECK(p->match(tls::identity{"spiffe://azure/ns/jobs/sa/bunny2", "", ""}) == nullptr);
  // A name of one kind never matches a matcher of another.
  CHECK(p->match(tls::identity{"", "spiffe://azure/ns/jobs/sa/bunny", ""}) == nullptr);
  CHECK(p->match(tls::identity{"", "", "producer.aws.internal"}) == nullptr);
  // A refused identity matches nothing.
  tls::identity refused;
  refused.refused = "a URI SAN holds control bytes or NUL";
  CHECK(p->match(refused) == nullptr);
  CHECK(p->match(tls::identity{}) == nullptr);
}

TEST_CASE("grants: exact names, prefix patterns, and default deny") {
  std::string error;
  auto p = parse(sample, error);
  REQUIRE(p);
  const std::string* bunny = p->match(tls::identity{"spiffe://azure/ns/jobs/sa/bunny", "", ""});
  CHECK(p->allows(bunny, permission::consume, "render"));
  CHECK(p->allows(bunny, permission::consume, "encode-h264"));
  CHECK(p->allows(bunny, permission::consume, "encode-"));
  CHECK_FALSE(p->allows(bunny, permission::consume, "encode"));
  CHECK_FALSE(p->allows(bunny, permission::consume, "render2"));
  CHECK_FALSE(p->allows(bunny, permission::submit, "render"));
  CHECK_FALSE(p->allows(bunny, permission::read, "render"));
  CHECK_FALSE(p->allows(nullptr, permission::read, "render"));
  CHECK(p->allows_somewhere(bunny, permission::consume));
  CHECK_FALSE(p->allows_somewhere(bunny, permission::admin));
  const std::string* producer = p->match(tls::identity{"", "producer.aws.internal", ""});
  CHECK(p->allows(producer, permission::submit, "anything"));
  CHECK_FALSE(p->allows(producer, permission::consume, "anything"));
}

TEST_CASE("policy errors name the file and the key") {
  std::string error;
  CHECK_FALSE(parse("{", error));
  CHECK(error.find("policy.json: not valid JSON") == 0);
  CHECK_FALSE(parse(R"({"principals": {}, "grants": [], "extra": 1})", error));
  CHECK(error.find("unknown key \"extra\"") != std::string::npos);
  CHECK_FALSE(parse(R"({"principals": {"a": {"email": "x"}}, "grants": []})", error));
  CHECK(error.find("principals.a: unknown key \"email\"") != std::string::npos);
  CHECK_FALSE(parse(R"({"principals": {"a": {"cn": "x"}, "b": {"cn": "x"}}, "grants": []})", error));
  CHECK(error.find("already used by principal \"a\"") != std::string::npos);
  CHECK_FALSE(parse(R"({"principals": {"a": {"cn": "x"}}, "grants": [{"principal": "a", "allow": ["fly"], "queues": ["q"]}]})", error));
  CHECK(error.find("grants[0].allow: unknown permission") != std::string::npos);
  CHECK_FALSE(parse(R"({"principals": {"a": {"cn": "x"}}, "grants": [{"principal": "a", "allow": ["read"], "queues": ["a*b"]}]})", error));
  CHECK(error.find("grants[0].queues") != std::string::npos);
  CHECK_FALSE(parse(R"({"principals": {"a": {"cn": "x"}}, "grants": [{"principal": "a", "allow": ["read"], "queues": []}]})", error));
  CHECK(error.find("at least one queue") != std::string::npos);
  CHECK_FALSE(parse(R"({"principals": {"a": {"cn": ""}}, "grants": []})", error));
  CHECK(error.find("non-empty") != std::string::npos);
}

TEST_CASE("queue names") {
  CHECK(auth::valid_queue_name("render"));
  CHECK(auth::valid_queue_name("encode-h264.v2_x"));
  CHECK_FALSE(auth::valid_queue_name(""));
  CHECK_FALSE(auth::valid_queue_name(".hidden"));
  CHECK_FALSE(auth::valid_queue_name("a/b"));
  CHECK_FALSE(auth::valid_queue_name("a%20b"));
  CHECK_FALSE(auth::valid_queue_name(std::string(129, 'a')));
}

namespace {

std::string with(const std::string& extra) {
  return R"({"principals": {"a": {"cn": "a"}, "b": {"cn": "b"}, "c": {"cn": "c"}},
             "grants": [{"principal": "a", "allow": ["submit"], "queues": ["*"]}], )" +
         extra + "}";
}

}  // namespace

TEST_CASE("limits: rates and bursts per principal, \"*\" for the rest") {
  std::string error;
  auto p = parse(with(R"("limits": [
      {"principal": "a", "requests_per_s": 200, "burst": 400, "jobs_per_s": 5000, "jobs_burst": 10000},
      {"principal": "b", "requests_per_s": 0.5},
      {"principal": "*", "jobs_per_s": 2.5}
    ])"),
                 error);
  REQUIRE_MESSAGE(p, error);
  CHECK(p->has_rate_limits());
  const auth::rate_limits* a = p->limits_for("a");
  REQUIRE(a);
  CHECK_EQ(a->requests_per_s, 200.0);
  CHECK_EQ(a->burst, 400.0);
  CHECK_EQ(a->jobs_per_s, 5000.0);
  CHECK_EQ(a->jobs_burst, 10000.0);
  // A burst left out is the rate rounded up, and at least one token.
  const auth::rate_limits* b = p->limits_for("b");
  REQUIRE(b);
  CHECK_EQ(b->requests_per_s, 0.5);
  CHECK_EQ(b->burst, 1.0);
  CHECK_EQ(b->jobs_per_s, 0.0);  // not limited
  // Everyone else, named or not, gets "*".
  const auth::rate_limits* c = p->limits_for("c");
  REQUIRE(c);
  CHECK_EQ(c->requests_per_s, 0.0);
  CHECK_EQ(c->jobs_per_s, 2.5);
  CHECK_EQ(c->jobs_burst, 3.0);
  CHECK_EQ(p->limits_for_unmatched(), c);

  auto none = parse(with(R"("limits": [{"principal": "a", "requests_per_s": 1}])"), error);
  REQUIRE_MESSAGE(none, error);
  CHECK(none->limits_for("b") == nullptr);
  CHECK(none->limits_for_unmatched() == nullptr);
  auto plain = parse(sample, error);
  REQUIRE(plain);
  CHECK_FALSE(plain->has_rate_limits());
  CHECK(plain->limits_for("producer") == nullptr);
  CHECK_EQ(plain->max_depth("render"), 0u);
}

TEST_CASE("queue_limits: the exact name, else the longest pattern") {
  std::string error;
  auto p = parse(with(R"("queue_limits": [
      {"queues": ["*"], "max_depth": 1000},
      {"queues": ["encode-*", "render"], "max_depth": 50},
      {"queues": ["encode-h264*"], "max_depth": 7},
      {"queues": ["encode-h264"], "max_depth": 9}
    ])"),
                 error);
  REQUIRE_MESSAGE(p, error);
  CHECK_EQ(p->max_depth("render"), 50u);
  CHECK_EQ(p->max_depth("render2"), 1000u);
  CHECK_EQ(p->max_depth("encode-vp9"), 50u);
  CHECK_EQ(p->max_depth("encode-h264-hi"), 7u);
  CHECK_EQ(p->max_depth("encode-h264"), 9u);
  CHECK_FALSE(p->has_rate_limits());
  auto some = parse(with(R"("queue_limits": [{"queues": ["render"], "max_depth": 1}])"), error);
  REQUIRE_MESSAGE(some, error);
  CHECK_EQ(some->max_depth("render"), 1u);
  CHECK_EQ(some->max_depth("other"), 0u);
}

TEST_CASE("limits and queue_limits: errors name the key") {
  struct bad {
    const char* extra;
    const char* says;
  };
  const bad cases[] = {
      {R"("limits": {})", "\"limits\" must be an array"},
      {R"("limits": [1])", "limits[0] must be an object"},
      {R"("limits": [{"requests_per_s": 1}])", "limits[0].principal is required"},
      {R"("limits": [{"principal": 1, "requests_per_s": 1}])", "limits[0].principal must be a string"},
      {R"("limits": [{"principal": "zed", "requests_per_s": 1}])",
       "limits[0].principal \"zed\" is not defined in \"principals\""},
      {R"("limits": [{"principal": "a"}])", "limits[0] needs requests_per_s or jobs_per_s"},
      {R"("limits": [{"principal": "a", "requests_per_s": 0}])", "limits[0].requests_per_s must be a number above 0"},
      {R"("limits": [{"principal": "a", "requests_per_s": -1}])", "limits[0].requests_per_s must be a number above 0"},
      {R"("limits": [{"principal": "a", "requests_per_s": "5"}])", "limits[0].requests_per_s must be a number"},
      {R"("limits": [{"principal": "a", "jobs_per_s": 1e10}])", "limits[0].jobs_per_s must be a number above 0 and at most 1e9"},
      {R"("limits": [{"principal": "a", "requests_per_s": 1, "burst": 0}])", "limits[0].burst must be a whole number"},
      {R"("limits": [{"principal": "a", "requests_per_s": 1, "burst": 1.5}])", "limits[0].burst must be a whole number"},
      {R"("limits": [{"principal": "a", "jobs_per_s": 1, "jobs_burst": 1000000001}])",
       "limits[0].jobs_burst must be a whole number from 1 to 1000000000"},
      {R"("limits": [{"principal": "a", "burst": 5}])", "limits[0].burst needs requests_per_s"},
      {R"("limits": [{"principal": "a", "requests_per_s": 1, "jobs_burst": 5}])", "limits[0].jobs_burst needs jobs_per_s"},
      {R"("limits": [{"principal": "a", "requests_per_s": 1, "rps": 5}])", "limits[0]: unknown key \"rps\""},
      {R"("limits": [{"principal": "a", "requests_per_s": 1}, {"principal": "b", "requests_per_s": 1},
                     {"principal": "a", "jobs_per_s": 1}])",
       "limits[2].principal \"a\" already has limits in limits[0]"},
      {R"("limits": [{"principal": "*", "requests_per_s": 1}, {"principal": "*", "jobs_per_s": 1}])",
       "limits[1].principal \"*\" already has limits in limits[0]"},
      {R"("queue_limits": {})", "\"queue_limits\" must be an array"},
      {R"("queue_limits": ["render"])", "queue_limits[0] must be an object"},
      {R"("queue_limits": [{"max_depth": 5}])", "queue_limits[0].queues must name at least one queue"},
      {R"("queue_limits": [{"queues": [], "max_depth": 5}])", "queue_limits[0].queues must name at least one queue"},
      {R"("queue_limits": [{"queues": [5], "max_depth": 5}])", "queue_limits[0].queues must hold strings"},
      {R"("queue_limits": [{"queues": ["a/b"], "max_depth": 5}])", "queue_limits[0].queues: \"a/b\" is not a valid queue name"},
      {R"("queue_limits": [{"queues": ["a/*"], "max_depth": 5}])", "queue_limits[0].queues: \"a/*\" is not a valid pattern"},
      {R"("queue_limits": [{"queues": ["render"]}])", "queue_limits[0].max_depth is required"},
      {R"("queue_limits": [{"queues": ["render"], "max_depth": 0}])", "queue_limits[0].max_depth must be a whole number"},
      {R"("queue_limits": [{"queues": ["render"], "max_depth": -3}])", "queue_limits[0].max_depth must be a whole number"},
      {R"("queue_limits": [{"queues": ["render"], "max_depth": 5, "depth": 1}])", "queue_limits[0]: unknown key \"depth\""},
      {R"("queue_limits": [{"queues": ["x-*"], "max_depth": 5}, {"queues": ["y", "x-*"], "max_depth": 6}])",
       "queue_limits[1].queues: \"x-*\" already has a max_depth in queue_limits[0]"},
  };
  for (const auto& c : cases) {
    std::string error;
    CAPTURE(c.extra);
    CHECK_FALSE(parse(with(c.extra), error));
    CHECK_MESSAGE(error.find(std::string("policy.json: ") + c.says) == 0, error);
  }
}
