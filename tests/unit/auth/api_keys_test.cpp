#include <doctest/doctest.h>

#include "relay/api_keys.h"
#include "relay/auth.h"
#include "relay/tls.h"

using namespace relay;
using auth::key_failure;

namespace {

std::string digest_hex(std::string_view key) {
  uint8_t d[32];
  tls::sha256(key, d);
  return tls::to_hex(d, sizeof d);
}

std::shared_ptr<const auth::api_keys> parse(const std::string& json, std::string& error) {
  return auth::api_keys::parse(json, "keys.json", error);
}

std::string entry(std::string_view principal, std::string_view key, std::string_view more = {}) {
  return R"({"principal":")" + std::string(principal) + R"(","sha256":")" + digest_hex(key) + "\"" +
         std::string(more) + "}";
}

// 2026-12-06T12:00:00Z
constexpr int64_t noon = 1796558400000;

}  // namespace

TEST_CASE("keys are found by their digest, several per principal, and never by anything else") {
  std::string error;
  auto keys = parse(R"({"keys":[)" + entry("bunny", "old-key", R"(,"id":"bunny-1")") + "," +
                        entry("bunny", "new-key", R"(,"id":"bunny-2","not_after":"2027-01-31T00:00:00Z")") + "," +
                        entry("producer", "prod-key") + "]}",
                    error);
  REQUIRE_MESSAGE(keys, error);
  REQUIRE_EQ(keys->keys().size(), 3u);

  auto old_key = keys->check("Bearer old-key", noon);
  CHECK_EQ(old_key.failure, key_failure::none);
  REQUIRE(old_key.key);
  CHECK_EQ(old_key.key->principal, "bunny");
  CHECK_EQ(old_key.key->id, "bunny-1");
  CHECK_EQ(old_key.key->owner, "apikey:bunny");
  auto new_key = keys->check("Bearer new-key", noon);
  REQUIRE(new_key.key);
  CHECK_EQ(new_key.key->id, "bunny-2");
  // Both keys of a principal own the same leases.
  CHECK_EQ(new_key.key->owner, old_key.key->owner);
  // An entry without an id is named by a prefix of its digest.
  auto prod = keys->check("Bearer prod-key", noon);
  REQUIRE(prod.key);
  CHECK_EQ(prod.key->id, "sha256:" + digest_hex("prod-key").substr(0, 12));

  // The scheme is case-insensitive, spaces around the token do not count.
  CHECK_EQ(keys->check("bearer   old-key ", noon).failure, key_failure::none);
  CHECK_EQ(keys->check("BEARER old-key", noon).failure, key_failure::none);

  auto wrong = keys->check("Bearer not-a-key", noon);
  CHECK_EQ(wrong.failure, key_failure::unknown);
  CHECK(wrong.key == nullptr);
  CHECK_EQ(wrong.digest_prefix, digest_hex("not-a-key").substr(0, 8));
  // The digest itself is not a key (what the file holds must not unlock).
  CHECK_EQ(keys->check("Bearer " + digest_hex("old-key"), noon).failure, key_failure::unknown);
  // A prefix or an extension of a key is another key.
  CHECK_EQ(keys->check("Bearer old-ke", noon).failure, key_failure::unknown);
  CHECK_EQ(keys->check("Bearer old-keyy", noon).failure, key_failure::unknown);

  CHECK_EQ(keys->check("", noon).failure, key_failure::missing);
  for (const char* bad : {"old-key", "Bearer", "Bearer ", "Bearerold-key", "Basic b2xkLWtleQ==", "Bearer old key",
                          "Bearer old-key,x", "Bearer =old", "Bearer old=key", "Token old-key"}) {
    CAPTURE(bad);
    auto r = keys->check(bad, noon);
    CHECK_EQ(r.failure, key_failure::malformed);
    CHECK(r.digest_prefix.empty());
  }
  CHECK_EQ(keys->check("Bearer " + std::string(auth::api_keys::max_token_bytes + 1, 'a'), noon).failure,
           key_failure::malformed);
}

TEST_CASE("with thousands of keys each is found by itself and only by itself") {
  std::string json = R"({"keys":[)";
  for (int i = 0; i < 3000; ++i) json += (i ? "," : "") + entry("p" + std::to_string(i % 7), "key-" + std::to_string(i));
  json += "]}";
  std::string error;
  auto keys = parse(json, error);
  REQUIRE_MESSAGE(keys, error);
  for (int i = 0; i < 3000; ++i) {
    auto r = keys->check("Bearer key-" + std::to_string(i), noon);
    REQUIRE_EQ(r.failure, key_failure::none);
    CHECK_EQ(r.key, &keys->keys()[static_cast<size_t>(i)]);
  }
  CHECK_EQ(keys->check("Bearer key-3000", noon).failure, key_failure::unknown);
}

TEST_CASE("an expired key is refused from the instant after its not_after") {
  std::string error;
  auto keys = parse(R"({"keys":[)" + entry("bunny", "k", R"(,"id":"k1","not_after":"2026-12-06T12:00:00Z")") + "]}", error);
  REQUIRE_MESSAGE(keys, error);
  CHECK_EQ(keys->check("Bearer k", noon).failure, key_failure::none);
  auto late = keys->check("Bearer k", noon + 1);
  CHECK_EQ(late.failure, key_failure::expired);
  REQUIRE(late.key);
  CHECK_EQ(late.key->id, "k1");
  CHECK_EQ(keys->expired_at(noon), 0u);
  CHECK_EQ(keys->expired_at(noon + 1), 1u);
}

TEST_CASE("a bad keys file is refused with the file, the key's index and the problem") {
  std::string error;
  auto refused = [&](const std::string& json, const std::string& says) {
    CAPTURE(json);
    CHECK_FALSE(parse(json, error));
    CHECK_MESSAGE(error.find("keys.json: ") == 0, error);
    CHECK_MESSAGE(error.find(says) != std::string::npos, error);
  };
  std::string a = entry("bunny", "a"), b = entry("producer", "b");
  refused(R"({"keys":[)" + a + "," + b + "," + entry("ops", "a") + "]}", "keys[2].sha256 is the same key as keys[0]");
  // The same digest in upper case is the same key.
  std::string upper = digest_hex("b");
  for (char& ch : upper) ch = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
  refused(R"({"keys":[)" + b + R"(,{"principal":"x","sha256":")" + upper + R"("}]})", "keys[1].sha256 is the same key as keys[0]");
  refused(R"({"keys":[)" + entry("a", "1", R"(,"id":"same")") + "," + entry("b", "2", R"(,"id":"same")") + "]}",
          "keys[1].id \"same\" is already used by keys[0]");
  refused(R"({"keys":[{"principal":"bunny","sha256":"abc"}]})", "keys[0].sha256 must be 64 hex digits");
  refused(R"({"keys":[{"principal":"bunny","sha256":")" + std::string(63, 'a') + R"(g"}]})", "keys[0].sha256 must be 64 hex");
  refused(R"({"keys":[{"sha256":")" + digest_hex("a") + R"("}]})", "keys[0].principal is required");
  refused(R"({"keys":[{"principal":"bunny"}]})", "keys[0].sha256 is required");
  refused(R"({"keys":[{"principal":"","sha256":")" + digest_hex("a") + R"("}]})", "keys[0].principal must be");
  refused(R"({"keys":[{"principal":"a\u0001b","sha256":")" + digest_hex("a") + R"("}]})", "keys[0].principal must be");
  refused(R"({"keys":[{"principal":"bunny","key":"a","sha256":")" + digest_hex("a") + R"("}]})",
          "keys[0]: unknown key \"key\"");
  refused(R"({"keys":[)" + entry("bunny", "a", R"(,"id":"has space")") + "]}", "keys[0].id must be");
  refused(R"({"keys":[)" + entry("bunny", "a", R"(,"not_after":"2027-01-31T00:00:00+01:00")") + "]}",
          "keys[0].not_after must be an RFC 3339 UTC time");
  refused(R"({"keys":[)" + entry("bunny", "a", R"(,"not_after":"2027-02-30T00:00:00Z")") + "]}", "keys[0].not_after");
  refused(R"({"keys":[)" + entry("bunny", "a", R"(,"not_after":1700000000)") + "]}", "keys[0].not_after");
  refused(R"({"keys":[)" + a + R"(,7]})", "keys[1] must be an object");
  refused(R"({"keys":{}})", "\"keys\" must be an array");
  refused(R"({})", "\"keys\" is required");
  refused(R"({"keys":[],"extra":1})", "unknown key \"extra\"");
  refused(R"([])", "must be a JSON object");
  refused(R"({"keys":[)", "not valid JSON");
  CHECK_FALSE(auth::api_keys::load("/nonexistent/keys.json", error));
  CHECK_EQ(error.rfind("/nonexistent/keys.json: cannot open", 0), 0u);
  // An empty list is a valid file: nobody can authenticate with a key.
  auto none = parse(R"({"keys":[]})", error);
  REQUIRE(none);
  CHECK_EQ(none->check("Bearer a", noon).failure, key_failure::unknown);
}

TEST_CASE("RFC 3339 UTC timestamps") {
  int64_t ms = -1;
  CHECK(auth::parse_utc_timestamp("1970-01-01T00:00:00Z", ms));
  CHECK_EQ(ms, 0);
  CHECK(auth::parse_utc_timestamp("2026-12-06T12:00:00Z", ms));
  CHECK_EQ(ms, noon);
  CHECK(auth::parse_utc_timestamp("2026-12-06t12:00:00.25z", ms));
  CHECK_EQ(ms, noon + 250);
  CHECK(auth::parse_utc_timestamp("2024-02-29T23:59:59.999999Z", ms));
  for (const char* bad : {"2023-02-29T00:00:00Z", "2026-13-01T00:00:00Z", "2026-12-06T24:00:00Z", "2026-12-06 12:00:00Z",
                          "2026-12-06T12:00:00", "2026-12-06T12:00:00.Z", "2026-12-06T12:00Z", "2026-12-06",
                          "2026-12-06T12:00:00Zjunk", "2026-12-06T12:00:00.1234567890Z"}) {
    CAPTURE(bad);
    CHECK_FALSE(auth::parse_utc_timestamp(bad, ms));
  }
}

TEST_CASE("failures are counted per source in a window, in bounded memory") {
  auth::failure_limiter limit(3, 1000, 2);
  CHECK_EQ(limit.blocked_for("10.0.0.1", 0), 0u);
  limit.failed("10.0.0.1", 0);
  limit.failed("10.0.0.1", 100);
  CHECK_EQ(limit.blocked_for("10.0.0.1", 200), 0u);
  limit.failed("10.0.0.1", 200);
  // Blocked until the window that began with the first failure ends.
  CHECK_EQ(limit.blocked_for("10.0.0.1", 300), 700u);
  CHECK_EQ(limit.blocked_for("10.0.0.2", 300), 0u);
  CHECK_EQ(limit.blocked_for("10.0.0.1", 1000), 0u);
  CHECK_EQ(limit.tracked(), 0u);
  // Full: the source that failed least recently is forgotten.
  limit.failed("a", 2000);
  limit.failed("b", 2001);
  limit.failed("a", 2002);
  limit.failed("c", 2003);
  CHECK_EQ(limit.tracked(), 2u);
  limit.failed("a", 2004);
  CHECK_GT(limit.blocked_for("a", 2005), 0u);
  CHECK_EQ(limit.blocked_for("b", 2005), 0u);
  // 0 failures allowed means no limit at all.
  auth::failure_limiter off(0, 1000, 2);
  for (int i = 0; i < 100; ++i) off.failed("x", 0);
  CHECK_EQ(off.blocked_for("x", 1), 0u);
  CHECK_EQ(off.tracked(), 0u);
}

TEST_CASE("a key's principal is resolved by its policy name") {
  std::string error;
  auto p = auth::policy::parse(R"({"principals":{"bunny":{"uri_san":"spiffe://x/bunny"},"ops":{"cn":"ops-admin"}},
    "grants":[{"principal":"bunny","allow":["consume"],"queues":["render"]}]})",
                               "policy.json", error);
  REQUIRE_MESSAGE(p, error);
  REQUIRE(p->principal_named("bunny"));
  CHECK_EQ(*p->principal_named("bunny"), "bunny");
  CHECK(p->principal_named("bunny") == p->match(tls::identity{"spiffe://x/bunny", "", ""}));
  // Matcher values are not names.
  CHECK(p->principal_named("spiffe://x/bunny") == nullptr);
  CHECK(p->principal_named("ops-admin") == nullptr);
  CHECK(p->principal_named("") == nullptr);
}
