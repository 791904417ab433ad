// Issue 9: nothing stopped a second relay from opening the same journal.dir
// (replaying, truncating a "torn" tail the first one was still writing, and
// appending to segments of its own).
#include <doctest/doctest.h>

#include <filesystem>
#include <map>

#include "../support/relay_fixture.h"

namespace {

// Every file in `dir` with its size (a directory, such as blobs/ since
// issue 13, as 0).
std::map<std::string, uintmax_t> listing(const std::string& dir) {
  std::map<std::string, uintmax_t> out;
  for (auto& e : std::filesystem::directory_iterator(dir))
    out[e.path().filename()] = e.is_regular_file() ? e.file_size() : 0;
  return out;
}

test::run_result second_relay(const std::string& jdir, const test::tmpdir& cfg) {
  return test::run({test::env_or_fail("RELAY_BIN"), "--journal-dir", jdir, "--set",
                    "tls.cert=" + test::pki() + "/server.crt", "--set", "tls.key=" + test::pki() + "/server.key",
                    "--set", "tls.client_ca=" + test::pki() + "/ca.crt", "--set", "policy=" + (cfg / "policy.json"),
                    "--listen", "127.0.0.1:0", "--ops-listen", "127.0.0.1:0"},
                   cfg.path(), 5000);
}

}  // namespace

TEST_CASE("a second relay on the same journal.dir exits 1 with one error line naming the holder's PID") {
  test::tmpdir jdir;
  test::tmpdir cfg;
  test::write_file(cfg / "policy.json", test::default_policy());
  std::string id;
  {
    test::relay_process first(std::vector<std::string>{"--journal-dir", jdir.path()});
    auto s = first.curl("producer", "POST", "/v1/queues/render/jobs", R"({"payload":"mine"})");
    REQUIRE_EQ(s.status, 201);
    id = test::field(s.body, "id");
    auto before = listing(jdir.path());

    auto r = second_relay(jdir.path(), cfg);
    CHECK_EQ(r.exit_code, 1);
    std::vector<std::string> errors;
    for (const auto& l : test::lines(r.err))
      if (l.find("\"level\":\"error\"") != std::string::npos) errors.push_back(l);
    REQUIRE_EQ(errors.size(), 1u);
    CHECK_MESSAGE(errors[0].find("pid " + std::to_string(first.proc->pid())) != std::string::npos, errors[0]);
    CHECK_MESSAGE(errors[0].find(jdir.path()) != std::string::npos, errors[0]);
    // The lock is taken before replay: the second relay read, cut and
    // created nothing.
    CHECK(r.err.find("journal_replayed") == std::string::npos);
    CHECK_EQ(listing(jdir.path()), before);
    // The holder goes on serving.
    CHECK_EQ(first.curl("producer", "GET", "/v1/jobs/" + id).status, 200);
    first.proc->signal(SIGKILL);
    CHECK_EQ(first.proc->wait(5000), 128 + SIGKILL);
  }
  // A holder that died (even by SIGKILL) leaves no lock behind.
  test::relay_process next(std::vector<std::string>{"--journal-dir", jdir.path()});
  CHECK_EQ(next.curl("producer", "GET", "/v1/jobs/" + id).status, 200);
}
