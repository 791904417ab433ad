// API keys end to end (issue 10, part 6): keys made by relayctl api-key new,
// relayctl and bunny authenticating with them, and a bunny's key rotated
// while it works.
#include <doctest/doctest.h>

#include <csignal>

#include "../support/bunny_fixture.h"
#include "relay/api_keys.h"

using test::bunny_options;
using test::bunny_process;
using test::field;
using test::lines;
using test::relay_process;

namespace {

struct new_key {
  std::string key;    // the secret, as relayctl printed it
  std::string entry;  // the line for relay's keys file
};

new_key make_key(const std::string& principal, const std::string& cwd) {
  auto r = test::run({test::env_or_fail("RELAYCTL_BIN"), "api-key", "new", "--principal", principal}, cwd);
  REQUIRE_MESSAGE(r.exit_code == 0, r.err);
  auto out = lines(r.out);
  REQUIRE_EQ(out.size(), 2u);
  return {out[0], out[1]};
}

// relayctl with an API key file and no client certificate.
test::run_result relayctl_with_key(const relay_process& relay, const std::string& key_file,
                                   std::vector<std::string> args, int timeout_ms = 60000) {
  std::vector<std::string> argv{test::env_or_fail("RELAYCTL_BIN"), "--url",
                                "https://127.0.0.1:" + std::to_string(relay.api_port), "--server-name", "localhost",
                                "--ca", test::pki() + "/ca.crt", "--api-key-file", key_file};
  argv.insert(argv.end(), args.begin(), args.end());
  return test::run(argv, relay.dir.path(), timeout_ms);
}

}  // namespace

TEST_CASE("relayctl api-key new prints a fresh key once and the keys-file line that matches it") {
  test::tmpdir dir;
  auto a = make_key("bunny", dir.path());
  auto b = make_key("bunny", dir.path());
  CHECK_NE(a.key, b.key);
  // 32 random bytes in base64url, no padding.
  CHECK_EQ(a.key.size(), 43u);
  CHECK_EQ(a.key.find_first_not_of("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"), std::string::npos);
  CHECK(a.entry.find("\"principal\": \"bunny\"") != std::string::npos);
  CHECK(a.entry.find(a.key) == std::string::npos);
  // The line is what relay loads, and it recognises the key by it.
  std::string error;
  auto keys = relay::auth::api_keys::parse("{\"keys\":[" + a.entry + "," + b.entry + "]}", "keys.json", error);
  REQUIRE_MESSAGE(keys, error);
  auto found = keys->check("Bearer " + a.key, 0);
  CHECK_EQ(found.failure, relay::auth::key_failure::none);
  REQUIRE(found.key);
  CHECK_EQ(found.key->principal, "bunny");
  CHECK_EQ(found.key->id.rfind("bunny-", 0), 0u);
  // Bad input is refused before a key is made.
  auto bad = test::run({test::env_or_fail("RELAYCTL_BIN"), "api-key", "new", "--principal", "bunny", "--not-after",
                        "tomorrow"},
                       dir.path());
  CHECK_EQ(bad.exit_code, 2);
  CHECK(bad.out.empty());
  CHECK_MESSAGE(bad.err.find("not_after must be an RFC 3339 UTC time") != std::string::npos, bad.err);
  auto no_principal = test::run({test::env_or_fail("RELAYCTL_BIN"), "api-key", "new"}, dir.path());
  CHECK_EQ(no_principal.exit_code, 2);
}

TEST_CASE("api_key mode end to end: relayctl and bunny with keys, and a bunny key rotated while it works") {
  test::tmpdir keys_dir;
  auto producer = make_key("producer", keys_dir.path());
  auto bunny_old = make_key("bunny", keys_dir.path());
  auto bunny_new = make_key("bunny", keys_dir.path());
  test::write_file(keys_dir / "keys.json", "{\"keys\":[" + producer.entry + ",\n" + bunny_old.entry + "]}");
  test::write_file(keys_dir / "producer.key", producer.key + "\n");
  relay_process relay({"--set", "auth.mode=api_key", "--set", "auth.api_keys=" + (keys_dir / "keys.json"), "--set",
                       "tls.reload_check_ms=100"});
  // bunny still presents its certificate (verified); the key names it.
  bunny_process bunny(relay, {.api_key = bunny_old.key}, "keyed");

  auto sub = relayctl_with_key(relay, keys_dir / "producer.key", {"submit", "render", "[3, 4]"});
  REQUIRE_MESSAGE(sub.exit_code == 0, sub.err);
  std::string first = lines(sub.out).at(0);
  auto w = relayctl_with_key(relay, keys_dir / "producer.key", {"wait", "--json", "--timeout", "30000", first}, 60000);
  REQUIRE_MESSAGE(w.exit_code == 0, w.err);
  CHECK_EQ(field(w.out, "state"), "succeeded");
  CHECK_MESSAGE(w.out.find("\"square\":") != std::string::npos, w.out);

  // Rotation: relay learns the new key, the bunny's Secret changes, relay
  // forgets the old key. No restart, no job lost.
  test::write_file(keys_dir / "keys.json",
                   "{\"keys\":[" + producer.entry + ",\n" + bunny_old.entry + ",\n" + bunny_new.entry + "]}");
  relay.proc->signal(SIGHUP);
  REQUIRE(relay.proc->wait_for_line("\"api_keys\":3").has_value());
  test::write_file(bunny.dir / "api.key.new", bunny_new.key + "\n");
  REQUIRE_EQ(std::rename((bunny.dir / "api.key.new").c_str(), (bunny.dir / "api.key").c_str()), 0);
  REQUIRE(bunny.proc->wait_for_line("\"event\":\"api_key_reloaded\"").has_value());
  test::write_file(keys_dir / "keys.json", "{\"keys\":[" + producer.entry + ",\n" + bunny_new.entry + "]}");
  relay.proc->signal(SIGHUP);
  REQUIRE(relay.proc->wait_for_line("\"api_keys\":2").has_value());

  auto more = relayctl_with_key(relay, keys_dir / "producer.key", {"submit", "render", "5"});
  REQUIRE_MESSAGE(more.exit_code == 0, more.err);
  auto w2 = relayctl_with_key(relay, keys_dir / "producer.key",
                              {"wait", "--json", "--timeout", "30000", lines(more.out).at(0)}, 60000);
  REQUIRE_MESSAGE(w2.exit_code == 0, w2.err);
  CHECK_MESSAGE(w2.out.find("\"square\":25") != std::string::npos, w2.out);
  // The old key was never refused: bunny switched before relay dropped it.
  CHECK(relay.proc->log().find("api_key_refused") == std::string::npos);

  // relayctl without a key, or with the retired one, is refused with 401.
  test::write_file(keys_dir / "old.key", bunny_old.key);
  auto stale = relayctl_with_key(relay, keys_dir / "old.key", {"queues"});
  CHECK_EQ(stale.exit_code, 1);
  CHECK_MESSAGE(stale.err.find("relay answered 401: the API key is not valid") != std::string::npos, stale.err);
  test::write_file(keys_dir / "two-lines.key", "a\nb\n");
  auto bad_file = relayctl_with_key(relay, keys_dir / "two-lines.key", {"queues"});
  CHECK_EQ(bad_file.exit_code, 2);
  CHECK_MESSAGE(bad_file.err.find("two-lines.key: the API key file must hold one key on one line") != std::string::npos,
                bad_file.err);
  // No key material in any log.
  for (const auto* k : {&producer.key, &bunny_old.key, &bunny_new.key}) {
    CHECK(relay.proc->log().find(*k) == std::string::npos);
    CHECK(bunny.proc->log().find(*k) == std::string::npos);
  }

  // A bunny with no client certificate at all, only its key, takes over.
  bunny.proc->signal(SIGTERM);
  CHECK_EQ(bunny.proc->wait(15000), 0);
  bunny_process keyed_only(relay, {.who = "", .api_key = bunny_new.key}, "keyed-only");
  auto last = relayctl_with_key(relay, keys_dir / "producer.key", {"submit", "render", "6"});
  REQUIRE_MESSAGE(last.exit_code == 0, last.err);
  auto w3 = relayctl_with_key(relay, keys_dir / "producer.key",
                              {"wait", "--json", "--timeout", "30000", lines(last.out).at(0)}, 60000);
  REQUIRE_MESSAGE(w3.exit_code == 0, w3.err);
  CHECK_MESSAGE(w3.out.find("\"square\":36") != std::string::npos, w3.out);
  CHECK(keyed_only.proc->wait_for_line("\"event\":\"result_delivered\"").has_value());
}

TEST_CASE("bunny without a client certificate needs an API key, and a certificate needs its key") {
  test::tmpdir dir;
  auto check = [&](const std::string& tls_and_key) {
    test::write_file(dir / "bunny.json", R"({"relay": {"urls": ["https://127.0.0.1:1"]}, "tls": )" + tls_and_key +
                                             R"(, "handler": {"exec": ["/bin/true"]}})");
    return test::run({test::env_or_fail("BUNNY_BIN"), "--config", dir / "bunny.json", "--check-config"}, dir.path());
  };
  auto no_key = check(R"({"cert": null, "key": null, "ca": "ca.crt"})");
  CHECK_NE(no_key.exit_code, 0);
  CHECK_MESSAGE(no_key.err.find("without a client certificate (\"tls.cert\": null) bunny needs \"api_key_file\"") !=
                    std::string::npos,
                no_key.err);
  auto half = check(R"({"cert": null, "ca": "ca.crt"}, "api_key_file": "k")");
  CHECK_NE(half.exit_code, 0);
  CHECK_MESSAGE(half.err.find("\"tls.cert\" and \"tls.key\" go together") != std::string::npos, half.err);
}
