// Issue 9: a bad length field anywhere in the journal was taken for a torn
// tail. Setting the high bit of the 3rd record's length word (of 5
// acknowledged jobs) made a restart drop jobs 2-5 and truncate the segment
// on disk, with only a warn line and without --repair-journal.
#include <doctest/doctest.h>

#include <filesystem>

#include "../support/journaled.h"
#include "../support/relay_fixture.h"

using namespace relay;

TEST_CASE("a flipped high bit in a middle record's length stops replay naming segment and offset, and changes nothing on disk") {
  test::tmpdir dir;
  std::vector<queue::job_id> ids;
  {
    test::journaled j(dir.path());
    for (int i = 0; i < 5; ++i) ids.push_back(j.submit("\"" + std::string(40, static_cast<char>('a' + i)) + "\""));
    REQUIRE(j.sync());
  }
  std::string path = journal::segment_path(dir.path(), 1);
  std::string data = test::read_bytes(path);
  std::vector<size_t> at = test::record_offsets(data);
  REQUIRE_EQ(at.size(), 5u);
  std::string damaged = data;
  damaged[at[2] + 3] = static_cast<char>(static_cast<uint8_t>(damaged[at[2] + 3]) | 0x80);
  test::write_bytes(path, damaged);

  journal::replay_result res;
  std::string error;
  CHECK(test::replay_dir(dir.path(), res, error) == nullptr);
  bool named = error.find(path + " is corrupt at offset " + std::to_string(at[2])) != std::string::npos;
  CHECK_MESSAGE(named, error);
  CHECK(error.find("--repair-journal") != std::string::npos);
  // Nothing was cut: the operator decides.
  CHECK_EQ(test::read_bytes(path), damaged);

  // Repair cuts exactly there and says what it dropped.
  auto repaired = test::replay_dir(dir.path(), res, error, true);
  REQUIRE_MESSAGE(repaired, error);
  CHECK_EQ(repaired->job_count(), 2u);
  CHECK(repaired->find(ids[1]) != nullptr);
  CHECK(repaired->find(ids[2]) == nullptr);
  CHECK(res.note.find("repaired: cut " + path + " at offset " + std::to_string(at[2])) == 0);
  CHECK_EQ(std::filesystem::file_size(path), at[2]);
}

TEST_CASE("relay refuses to start on a damaged length word before the tail, and --repair-journal cuts there") {
  test::tmpdir jdir;
  std::vector<std::string> ids;
  std::vector<std::string> args{"--journal-dir", jdir.path(), "--set", "journal.fsync=always"};
  {
    test::relay_process relay(args);
    for (int i = 0; i < 5; ++i) {
      auto r = relay.curl("producer", "POST", "/v1/queues/render/jobs", R"({"payload":)" + std::to_string(i) + "}");
      REQUIRE_EQ(r.status, 201);
      ids.push_back(test::field(r.body, "id"));
    }
    relay.proc->signal(SIGKILL);
    relay.proc->wait(5000);
  }
  // The segment holds the id counter (meta) and then the five submits.
  std::string seg = journal::segment_path(jdir.path(), 1);
  std::string data = test::read_bytes(seg);
  std::vector<size_t> at = test::record_offsets(data);
  REQUIRE_EQ(at.size(), 6u);
  size_t victim = at[2];  // the 3rd record: the second job's submit
  data[victim + 3] = static_cast<char>(static_cast<uint8_t>(data[victim + 3]) | 0x80);
  test::write_bytes(seg, data);

  test::tmpdir cfg;
  test::write_file(cfg / "policy.json", test::default_policy());
  auto refused = test::run({test::env_or_fail("RELAY_BIN"), "--journal-dir", jdir.path(), "--set",
                            "tls.cert=" + test::pki() + "/server.crt", "--set", "tls.key=" + test::pki() + "/server.key",
                            "--set", "tls.client_ca=" + test::pki() + "/ca.crt", "--set", "policy=" + (cfg / "policy.json"),
                            "--listen", "127.0.0.1:0", "--ops-listen", "127.0.0.1:0"},
                           cfg.path(), 10000);
  CHECK_EQ(refused.exit_code, 1);
  bool named = refused.err.find(seg + " is corrupt at offset " + std::to_string(victim)) != std::string::npos;
  CHECK_MESSAGE(named, refused.err);
  CHECK_EQ(test::read_bytes(seg), data);  // untouched

  test::relay_process repaired(std::vector<std::string>{"--journal-dir", jdir.path(), "--repair-journal"});
  auto line = repaired.proc->wait_for_line("\"event\":\"journal_repaired\"");
  REQUIRE(line.has_value());
  CHECK(line->find("offset " + std::to_string(victim)) != std::string::npos);
  CHECK_EQ(repaired.curl("producer", "GET", "/v1/jobs/" + ids[0]).status, 200);
  CHECK_EQ(repaired.curl("producer", "GET", "/v1/jobs/" + ids[1]).status, 404);
}
