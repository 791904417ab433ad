// Issue 11: a SIGKILLed bunny left its exec handler running (in a session
// of its own), so relay redelivered the job and the orphan ran to
// completion beside the new attempt. Now the handler, what it started in
// its process group, and what it started in a session of its own all die
// with bunny.
#include <doctest/doctest.h>

#include <cerrno>
#include <chrono>
#include <csignal>
#include <thread>

#include "../support/bunny_fixture.h"

namespace {

// Whether `pid` is gone: no such process, or a zombie (dead, its parent
// has not reaped it yet; init or a subreaper will).
bool gone(pid_t pid) {
  if (::kill(pid, 0) != 0 && errno == ESRCH) return true;
  std::string stat = test::read_file("/proc/" + std::to_string(pid) + "/stat");
  size_t paren = stat.rfind(')');
  if (stat.empty() || paren == std::string::npos) return true;  // ended since kill()
  return stat.size() > paren + 2 && (stat[paren + 2] == 'Z' || stat[paren + 2] == 'X');
}

pid_t read_pid(const test::tmpdir& dir, const std::string& name) {
  return static_cast<pid_t>(std::atoi(test::read_file(dir / name).c_str()));
}

}  // namespace

TEST_CASE("issue 11: a SIGKILLed bunny takes its handler and everything the handler started with it") {
  test::relay_process relay;
  test::tmpdir pids;
  test::bunny_process bunny(relay, {.concurrency = 1,
                                    .lease_ms = 60000,
                                    .handler = R"({"exec": [")" + test::handler_path("orphans.sh") + R"(", ")" +
                                               pids.path() + R"("], "timeout_ms": 120000})"});
  auto r = relay.curl("producer", "POST", "/v1/queues/render/jobs", R"({"payload": 1})");
  REQUIRE_MESSAGE(r.status == 201, r.body);

  auto until = std::chrono::steady_clock::now() + std::chrono::seconds(15);
  while (test::read_file(pids / "handler.pid").empty() && std::chrono::steady_clock::now() < until)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  REQUIRE_MESSAGE(!test::read_file(pids / "handler.pid").empty(), bunny.proc->log());
  const pid_t started[] = {read_pid(pids, "handler.pid"), read_pid(pids, "child.pid"), read_pid(pids, "detached.pid")};
  for (pid_t p : started) {
    REQUIRE_GT(p, 1);
    REQUIRE_FALSE(gone(p));
  }

  bunny.proc->signal(SIGKILL);
  CHECK_EQ(bunny.proc->wait(5000), 128 + SIGKILL);

  until = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  auto all_gone = [&] {
    for (pid_t p : started)
      if (!gone(p)) return false;
    return true;
  };
  while (!all_gone() && std::chrono::steady_clock::now() < until)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  CHECK_MESSAGE(gone(started[0]), "the handler outlived bunny");
  CHECK_MESSAGE(gone(started[1]), "the handler's child in its process group outlived bunny");
  CHECK_MESSAGE(gone(started[2]), "the handler's child in a session of its own outlived bunny");

  // Without the fix they would run on for minutes: these are this test's
  // own processes (started by the handler it configured), so stop them.
  for (pid_t p : started)
    if (!gone(p)) ::kill(p, SIGKILL);
}
