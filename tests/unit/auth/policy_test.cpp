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
