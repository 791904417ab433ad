#include <doctest/doctest.h>

#include <fstream>

#include "../../support/tmpdir.h"
#include "relay/config.h"

using namespace relay::config;

TEST_CASE("defaults, file values, relative paths and overrides") {
  test::tmpdir dir;
  std::ofstream(dir / "relay.json") << R"({"listen": "127.0.0.1:1", "tls": {"cert": "c.pem", "crl": "/abs/crl.pem"},
                                          "limits": {"max_body_bytes": 2048}})";
  relay_config c;
  std::string error;
  REQUIRE_MESSAGE(load(dir / "relay.json", {{"limits.max_jobs", "7"}, {"ops_listen", "127.0.0.1:2"}}, c, error), error);
  CHECK_EQ(c.listen, "127.0.0.1:1");
  CHECK_EQ(c.tls.cert, dir / "c.pem");
  CHECK_EQ(c.tls.crl.value(), "/abs/crl.pem");
  CHECK_EQ(c.tls.key, "tls.key");  // default, not from the file: left as given
  CHECK_EQ(c.limits.max_body_bytes, 2048u);
  CHECK_EQ(c.limits.max_jobs, 7u);
  CHECK_EQ(c.ops_listen, "127.0.0.1:2");
  CHECK_EQ(c.journal.fsync, "always");

  REQUIRE(load(std::nullopt, {{"tls.crl", "null"}}, c, error));
  CHECK_FALSE(c.tls.crl.has_value());
  std::string json = to_json(c);
  CHECK(json.find("\"crl\": null") != std::string::npos);
  CHECK(json.find("\"max_body_bytes\": 1048576") != std::string::npos);
}

TEST_CASE("bad configuration is refused with the key named") {
  test::tmpdir dir;
  relay_config c;
  std::string error;
  auto with = [&](const std::string& json) {
    std::ofstream(dir / "c.json", std::ios::trunc) << json;
    return load(dir / "c.json", {}, c, error);
  };
  CHECK_FALSE(with(R"({"tls": {"certs": "x"}})"));
  CHECK(error.find("unknown key \"tls.certs\"") != std::string::npos);
  CHECK_FALSE(with(R"({"limits": {"max_body_bytes": -1}})"));
  CHECK(error.find("\"limits.max_body_bytes\" must be an integer from 1 to") != std::string::npos);
  CHECK_FALSE(with(R"({"limits": {"idle_timeout_ms": 10}})"));
  CHECK_FALSE(with(R"({"tls": {"min_version": "1.1"}})"));
  CHECK(error.find("\"tls.min_version\" must be one of \"1.2\" \"1.3\"") != std::string::npos);
  CHECK_FALSE(with(R"({"auth": {"mode": "api_key"}})"));
  CHECK(error.find("\"auth.api_keys\" (the keys file) is required when \"auth.mode\" is \"api_key\"") != std::string::npos);
  CHECK_FALSE(with(R"({"auth": {"mode": "mtls+api_key", "api_keys": null}})"));
  CHECK(error.find("is required when \"auth.mode\" is \"mtls+api_key\"") != std::string::npos);
  CHECK(with(R"({"auth": {"mode": "api_key", "api_keys": "keys.json"}})"));
  CHECK_EQ(*c.auth.api_keys, dir / "keys.json");
  CHECK_FALSE(with(R"({"auth": {"mode": "bearer"}})"));
  CHECK(error.find("\"auth.mode\" must be one of \"mtls\" \"api_key\" \"mtls+api_key\"") != std::string::npos);
  CHECK_FALSE(with(R"({"tls": "x"})"));
  CHECK_FALSE(with(R"([1])"));
  CHECK_FALSE(load(std::nullopt, {{"limits.max_jobs", "lots"}}, c, error));
  CHECK(error.find("--set limits.max_jobs") == 0);
  CHECK_FALSE(load(std::nullopt, {{"nope", "1"}}, c, error));
  CHECK(error.find("unknown key \"nope\"") != std::string::npos);
  CHECK_FALSE(load(dir / "missing.json", {}, c, error));
  CHECK(error.find("missing.json: cannot open") != std::string::npos);
}

TEST_CASE("limits.spill_threshold_bytes and limits.max_body_bytes up to 256 MiB; postgres spills nothing") {
  test::tmpdir dir;
  relay_config c;
  std::string error;
  REQUIRE_MESSAGE(load(std::nullopt, {}, c, error), error);
  CHECK_EQ(c.limits.spill_threshold_bytes, 65536u);
  CHECK(to_json(c).find("\"spill_threshold_bytes\": 65536") != std::string::npos);
  REQUIRE_MESSAGE(load(std::nullopt, {{"limits.max_body_bytes", "268435456"}, {"limits.spill_threshold_bytes", "0"}},
                       c, error),
                  error);
  CHECK_EQ(c.limits.max_body_bytes, 268435456u);
  CHECK_EQ(c.limits.spill_threshold_bytes, 0u);
  CHECK_FALSE(load(std::nullopt, {{"limits.max_body_bytes", "268435457"}}, c, error));
  CHECK(error.find("limits.max_body_bytes") != std::string::npos);

  std::ofstream(dir / "dsn") << "host=/nonexistent\n";
  std::ofstream(dir / "pg.json") << R"({"journal": {"backend": "postgres", "postgres": {"dsn_file": "dsn"}},
                                        "limits": {"spill_threshold_bytes": 65536}})";
  REQUIRE_MESSAGE(load(dir / "pg.json", {}, c, error), error);
  CHECK_EQ(c.limits.spill_threshold_bytes, 0u);  // forced off: a standby could not read a spooled value
  CHECK_FALSE(load(dir / "pg.json", {{"limits.max_body_bytes", "67108865"}}, c, error));
  CHECK(error.find("\"limits.max_body_bytes\"") != std::string::npos);
  CHECK(error.find("postgres") != std::string::npos);
  CHECK(load(dir / "pg.json", {{"limits.max_body_bytes", "67108864"}}, c, error));
}
