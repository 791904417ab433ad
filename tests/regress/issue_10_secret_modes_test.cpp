// Issue 10, "Secrets hygiene": a private key readable by other users went
// unnoticed. relay and bunny now warn (a log line and a gauge; never a
// refusal, since Kubernetes Secret volumes are 0644 by default) and never
// log key material.
#include <doctest/doctest.h>
#include <signal.h>
#include <sys/stat.h>

#include <thread>

#include "../support/bunny_fixture.h"

TEST_CASE("relay warns about a world-readable tls.key, and stops once it is 0440 (group read, as fsGroup needs)") {
  test::tmpdir keys;
  std::string key = keys / "server.key";
  test::write_file(key, test::read_file(test::pki() + "/server.key"));
  REQUIRE_EQ(chmod(key.c_str(), 0644), 0);
  test::relay_process relay({"--set", "tls.key=" + key});
  auto line = relay.proc->wait_for_line("\"event\":\"secret_file_exposed\"", 5000);
  REQUIRE_MESSAGE(line.has_value(), relay.proc->log());
  CHECK(line->find("\"key\":\"tls.key\"") != std::string::npos);
  CHECK(line->find("mode 0644") != std::string::npos);
  CHECK(relay.ops_get("/metrics").body.find("relay_secret_files_exposed 1\n") != std::string::npos);
  CHECK(relay.proc->log().find("PRIVATE KEY") == std::string::npos);

  REQUIRE_EQ(chmod(key.c_str(), 0440), 0);
  relay.proc->signal(SIGHUP);
  bool cleared = false;
  for (int i = 0; i < 100 && !cleared; ++i) {
    cleared = relay.ops_get("/metrics").body.find("relay_secret_files_exposed 0\n") != std::string::npos;
    if (!cleared) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  CHECK(cleared);
  // It still serves: a warning, not a refusal.
  CHECK_EQ(relay.curl("admin", "GET", "/v1/queues").status, 200);
}

TEST_CASE("bunny warns about a world-readable key file") {
  test::relay_process relay;
  test::bunny_process bunny(relay, {});
  // The fixture writes the bunny's key with the default umask (0644).
  auto line = bunny.proc->wait_for_line("\"event\":\"secret_file_exposed\"", 5000);
  REQUIRE_MESSAGE(line.has_value(), bunny.proc->log());
  CHECK(line->find("\"key\":\"tls.key\"") != std::string::npos);
  CHECK(bunny.proc->log().find("PRIVATE KEY") == std::string::npos);
}
