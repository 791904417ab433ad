#include <doctest/doctest.h>
#include <fcntl.h>
#include <unistd.h>

#include <string>
#include <vector>

#include "../../support/process.h"
#include "../../support/tmpdir.h"
#include "relay/log.h"

using namespace relay;

namespace {

// A buffer on a clock the test moves by hand.
struct clocked {
  int64_t now = 1'000'000;
  log::buffer buf;
  explicit clocked(size_t capacity = log::buffer::default_capacity) : buf(capacity, [this] { return now; }) {}
};

size_t count(const std::string& s, const std::string& needle) {
  size_t n = 0;
  for (size_t p = s.find(needle); p != std::string::npos; p = s.find(needle, p + 1)) ++n;
  return n;
}

}  // namespace

TEST_CASE("A buffered line starts with its event and ends with level and the clock's time") {
  clocked c;
  CHECK(c.buf.append(log::level::warn, "listening", {}, ",\"addr\":\"127.0.0.1:1\""));
  CHECK_EQ(c.buf.take(), "{\"event\":\"listening\",\"addr\":\"127.0.0.1:1\",\"level\":\"warn\",\"ts_ms\":1000000}\n");
  CHECK_EQ(c.buf.pending(), 0u);
}

TEST_CASE("A line with a source carries it as \"source\"") {
  clocked c;
  c.buf.append(log::level::info, "request_timeout", "10.0.0.7", {});
  CHECK_EQ(c.buf.take(), "{\"event\":\"request_timeout\",\"source\":\"10.0.0.7\",\"level\":\"info\",\"ts_ms\":1000000}\n");
}

TEST_CASE("The host part of an address is the address without its port") {
  CHECK_EQ(log::host_of("10.0.0.7:5133"), "10.0.0.7");
  CHECK_EQ(log::host_of("[::1]:443"), "::1");
  CHECK_EQ(log::host_of("::1"), "::1");
  CHECK_EQ(log::host_of("?"), "?");
  CHECK_EQ(log::host_of(""), "");
}

TEST_CASE("Lines keep their order across the end of the ring") {
  clocked c(300);
  std::string expected, got;
  for (int i = 0; i < 200; ++i) {
    std::string fields = ",\"i\":" + std::to_string(i);
    REQUIRE(c.buf.append(log::level::info, "n", {}, fields));
    expected += "{\"event\":\"n\"" + fields + ",\"level\":\"info\",\"ts_ms\":1000000}\n";
    // The reader takes odd amounts, so the start moves round the ring and
    // lines straddle its end; at most about two lines stay pending.
    while (c.buf.pending() > 100) {
      std::string_view part = c.buf.peek();
      size_t n = std::min<size_t>(part.size(), 37);
      got += part.substr(0, n);
      c.buf.consume(n);
    }
  }
  got += c.buf.take();
  CHECK_EQ(got, expected);
  CHECK_EQ(c.buf.dropped(), 0u);
}

TEST_CASE("A full buffer drops lines, counts them, and reports them once half of it is free") {
  clocked c(1000);
  const std::string fields = ",\"pad\":\"" + std::string(60, 'x') + "\"";
  size_t line_bytes;
  {
    clocked probe;
    probe.buf.append(log::level::info, "flood", {}, fields);
    line_bytes = probe.buf.pending();
  }
  const int fit = static_cast<int>(1000 / line_bytes);
  REQUIRE_GE(fit, 4);
  int written = 0, refused = 0;
  for (int i = 0; i < 30; ++i) (c.buf.append(log::level::info, "flood", {}, fields) ? written : refused)++;
  CHECK_EQ(written, fit);
  CHECK_EQ(refused, 30 - fit);
  CHECK_EQ(c.buf.dropped(), static_cast<uint64_t>(30 - fit));
  CHECK_LE(c.buf.pending(), 1000u);

  // A little room is not enough: dropping goes on until half is free.
  std::string_view first = c.buf.peek();
  size_t one_line = first.find('\n') + 1;
  c.buf.consume(one_line);
  CHECK_FALSE(c.buf.append(log::level::info, "flood", {}, fields));
  const uint64_t lost = static_cast<uint64_t>(31 - fit);
  CHECK_EQ(c.buf.dropped(), lost);

  std::string out = c.buf.take();
  CHECK_EQ(count(out, "\"event\":\"flood\""), static_cast<size_t>(fit - 1));
  // The report is written as soon as the reader frees half the buffer.
  const std::string report = "{\"event\":\"log_lines_dropped\",\"lines\":" + std::to_string(lost) +
                             ",\"total\":" + std::to_string(lost) + ",";
  CHECK_NE(out.find(report), std::string::npos);
  CHECK(c.buf.append(log::level::info, "after", {}, {}));
  std::string rest = c.buf.take();
  CHECK_EQ(rest.rfind("{\"event\":\"after\"", 0), 0u);
  CHECK_EQ(count(rest, "log_lines_dropped"), 0u);
}

TEST_CASE("A line larger than the buffer is dropped and counted") {
  clocked c(256);
  CHECK_FALSE(c.buf.append(log::level::error, "huge", {}, ",\"x\":\"" + std::string(300, 'y') + "\""));
  CHECK_EQ(c.buf.dropped(), 1u);
  CHECK_EQ(c.buf.pending(), 0u);
}

TEST_CASE("Repeats of one event from one source within a second become one line and a count") {
  clocked c;
  CHECK(c.buf.append(log::level::warn, "tls_handshake_failed", "10.0.0.7", ",\"reason\":\"first\""));
  for (int i = 0; i < 99; ++i) {
    c.now += 10;  // all inside the window: 1000000 .. 1000990
    CHECK_FALSE(c.buf.append(log::level::warn, "tls_handshake_failed", "10.0.0.7", ",\"reason\":\"other\""));
  }
  std::string out = c.buf.take();
  CHECK_EQ(count(out, "\n"), 1u);
  CHECK_NE(out.find("\"reason\":\"first\""), std::string::npos);

  // The window is still open at 999 ms...
  CHECK_EQ(c.buf.expire(), 1'001'000);
  CHECK_EQ(c.buf.take(), "");
  // ...and closes at one second, with the count.
  c.now = 1'001'000;
  CHECK_EQ(c.buf.expire(), -1);
  CHECK_EQ(c.buf.take(),
           "{\"event\":\"tls_handshake_failed\",\"source\":\"10.0.0.7\",\"repeated\":99,\"window_ms\":1000,"
           "\"level\":\"warn\",\"ts_ms\":1001000}\n");
  CHECK_EQ(c.buf.dropped(), 0u);

  // The next one opens a new window and is written in full.
  CHECK(c.buf.append(log::level::warn, "tls_handshake_failed", "10.0.0.7", ",\"reason\":\"again\""));
  CHECK_NE(c.buf.take().find("\"reason\":\"again\""), std::string::npos);
}

TEST_CASE("A window with no repeats ends without a line") {
  clocked c;
  c.buf.append(log::level::info, "request_timeout", "10.0.0.7", {});
  c.buf.take();
  c.now += 5000;
  CHECK_EQ(c.buf.expire(), -1);
  CHECK_EQ(c.buf.take(), "");
}

TEST_CASE("A line after its window ended reports the window's count first") {
  clocked c;
  c.buf.append(log::level::warn, "authz_denied", "10.0.0.7", {});
  c.buf.append(log::level::warn, "authz_denied", "10.0.0.7", {});
  c.buf.take();
  c.now += 1500;  // nobody called expire()
  CHECK(c.buf.append(log::level::warn, "authz_denied", "10.0.0.7", ",\"n\":3"));
  auto got = test::lines(c.buf.take());
  REQUIRE_EQ(got.size(), 2u);
  CHECK_NE(got[0].find("\"repeated\":1,"), std::string::npos);
  CHECK_NE(got[1].find("\"n\":3"), std::string::npos);
  // The stale entry of the first window is skipped.
  CHECK_EQ(c.buf.expire(), c.now + 1000);
}

TEST_CASE("Different sources, different events and lines without a source do not collapse") {
  clocked c;
  CHECK(c.buf.append(log::level::warn, "tls_handshake_failed", "10.0.0.7", {}));
  CHECK(c.buf.append(log::level::warn, "tls_handshake_failed", "10.0.0.8", {}));
  CHECK(c.buf.append(log::level::warn, "request_timeout", "10.0.0.7", {}));
  CHECK(c.buf.append(log::level::warn, "tls_handshake_failed", {}, {}));
  CHECK(c.buf.append(log::level::warn, "tls_handshake_failed", {}, {}));
  CHECK_EQ(test::lines(c.buf.take()).size(), 5u);
}

TEST_CASE("Past max_sources open windows, lines from new sources are written uncollapsed") {
  clocked c;
  for (size_t i = 0; i < log::buffer::max_sources; ++i)
    CHECK(c.buf.append(log::level::warn, "e", "s" + std::to_string(i), {}));
  CHECK(c.buf.append(log::level::warn, "e", "new", {}));
  CHECK(c.buf.append(log::level::warn, "e", "new", {}));
  CHECK_FALSE(c.buf.append(log::level::warn, "e", "s0", {}));
  CHECK_EQ(test::lines(c.buf.take()).size(), log::buffer::max_sources + 2);
}

TEST_CASE("A step back of the clock ends open windows instead of stretching them") {
  clocked c;
  c.buf.append(log::level::warn, "e", "s", {});
  c.buf.append(log::level::warn, "e", "s", {});
  c.buf.take();
  c.now -= 60'000;
  CHECK_EQ(c.buf.expire(), -1);
  CHECK_NE(c.buf.take().find("\"repeated\":1,"), std::string::npos);
}

TEST_CASE("expire_all writes every pending count (at exit)") {
  clocked c;
  for (int i = 0; i < 3; ++i) c.buf.append(log::level::warn, "e", "a", {});
  for (int i = 0; i < 2; ++i) c.buf.append(log::level::warn, "e", "b", {});
  c.buf.take();
  c.buf.expire_all();
  std::string out = c.buf.take();
  CHECK_NE(out.find("\"source\":\"a\",\"repeated\":2,"), std::string::npos);
  CHECK_NE(out.find("\"source\":\"b\",\"repeated\":1,"), std::string::npos);
  CHECK_EQ(c.buf.expire(), -1);
}

TEST_CASE("Process-wide log lines reach stderr through the writer thread, in order, with their source") {
  test::tmpdir dir;
  std::string path = dir / "stderr";
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
  REQUIRE_GE(fd, 0);
  int saved = ::dup(STDERR_FILENO);
  REQUIRE(log::flush());
  ::dup2(fd, STDERR_FILENO);
  for (int i = 0; i < 100; ++i) log::info("unit_ordered").num("i", i);
  log::warn("unit_peer").str("remote", "[::1]:443").str("reason", "x");
  log::warn("unit_explicit").source("tenant-7").str("remote", "10.1.1.1:1");
  bool flushed = log::flush();
  ::dup2(saved, STDERR_FILENO);
  ::close(saved);
  ::close(fd);
  CHECK(flushed);
  auto got = test::lines(test::read_file(path));
  REQUIRE_EQ(got.size(), 102u);
  for (int i = 0; i < 100; ++i)
    CHECK_EQ(got[static_cast<size_t>(i)].rfind("{\"event\":\"unit_ordered\",\"i\":" + std::to_string(i) + ",\"level\":\"info\"", 0), 0u);
  CHECK_NE(got[100].find("\"remote\":\"[::1]:443\",\"reason\":\"x\",\"source\":\"::1\",\"level\":\"warn\""), std::string::npos);
  CHECK_NE(got[101].find("\"source\":\"tenant-7\""), std::string::npos);
  CHECK_EQ(log::dropped_lines(), 0u);
}

TEST_CASE("Lines of one event from one source with different reasons are not repeats of each other") {
  clocked c;
  CHECK(c.buf.append(log::level::warn, "tls_handshake_failed", "10.0.0.7", ",\"reason\":\"expired\"", ",\"reason\":\"expired\""));
  CHECK(c.buf.append(log::level::warn, "tls_handshake_failed", "10.0.0.7", ",\"reason\":\"revoked\"", ",\"reason\":\"revoked\""));
  CHECK_FALSE(c.buf.append(log::level::warn, "tls_handshake_failed", "10.0.0.7", ",\"reason\":\"expired\"", ",\"reason\":\"expired\""));
  CHECK_EQ(test::lines(c.buf.take()).size(), 2u);
  c.now += 1000;
  CHECK_EQ(c.buf.expire(), -1);
  CHECK_EQ(c.buf.take(),
           "{\"event\":\"tls_handshake_failed\",\"source\":\"10.0.0.7\",\"reason\":\"expired\",\"repeated\":1,"
           "\"window_ms\":1000,\"level\":\"warn\",\"ts_ms\":1001000}\n");
}

TEST_CASE("A log line's \"reason\" field takes part in collapsing, and flush() writes pending counts") {
  test::tmpdir dir;
  std::string path = dir / "stderr";
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
  REQUIRE_GE(fd, 0);
  int saved = ::dup(STDERR_FILENO);
  REQUIRE(log::flush());
  ::dup2(fd, STDERR_FILENO);
  for (int i = 0; i < 3; ++i) log::warn("unit_collapse").str("remote", "10.9.9.9:1000").str("reason", "a");
  log::warn("unit_collapse").str("remote", "10.9.9.9:1001").str("reason", "b");
  bool flushed = log::flush();
  ::dup2(saved, STDERR_FILENO);
  ::close(saved);
  ::close(fd);
  CHECK(flushed);
  auto got = test::lines(test::read_file(path));
  REQUIRE_EQ(got.size(), 3u);
  CHECK_NE(got[0].find("\"reason\":\"a\""), std::string::npos);
  CHECK_NE(got[1].find("\"reason\":\"b\""), std::string::npos);
  CHECK_EQ(got[2].rfind("{\"event\":\"unit_collapse\",\"source\":\"10.9.9.9\",\"reason\":\"a\",\"repeated\":2,", 0), 0u);
}

// Found by the attack review of issue 10: collapsing audit lines by event,
// source and reason alone let a decoy denial hide the principal, queue and
// certificate of every other attempt from that address for a second.
TEST_CASE("Audit lines repeat only when every field but the peer's port is the same") {
  clocked c;
  auto denial = [&](const std::string& principal, const std::string& queue) {
    std::string collapse = ",\"audit\":true,\"principal\":\"" + principal + "\",\"queue\":\"" + queue + "\"";
    return c.buf.append(log::level::warn, "authz_denied", "10.0.0.7", collapse + ",\"remote\":\"10.0.0.7:1\"", collapse,
                        true);
  };
  CHECK(denial("bunny", "render"));
  CHECK(denial("producer", "payroll"));  // another principal: its own line
  CHECK(denial("bunny", "payroll"));     // another queue: its own line
  CHECK_FALSE(denial("bunny", "render"));
  CHECK_FALSE(denial("bunny", "render"));
  c.buf.take();
  c.now += log::buffer::repeat_window_ms;
  c.buf.expire();
  std::string out = c.buf.take();
  // The count names what repeated, and is marked as audit.
  CHECK_NE(out.find("{\"event\":\"authz_denied\",\"source\":\"10.0.0.7\",\"audit\":true,\"principal\":\"bunny\","
                    "\"queue\":\"render\",\"repeated\":2,"),
           std::string::npos);
}

TEST_CASE("Distinct audit lines are budgeted per source and in all, and what is suppressed is counted in a line") {
  clocked c;
  auto distinct = [&](const std::string& source, int i) {
    std::string f = ",\"audit\":true,\"sha256\":\"" + std::to_string(i) + "\"";
    return c.buf.append(log::level::warn, "tls_handshake_failed", source, f, f, true);
  };
  int written = 0;
  for (int i = 0; i < 100; ++i) written += distinct("10.0.0.7", i);
  CHECK_EQ(written, static_cast<int>(log::buffer::max_audit_lines_per_source));
  // Other sources still get theirs, up to the budget in all.
  int others = 0;
  for (int i = 0; i < 5000; ++i) others += distinct("10.1." + std::to_string(i / 250) + "." + std::to_string(i % 250), i);
  CHECK_EQ(written + others, static_cast<int>(log::buffer::max_audit_lines_per_window));
  // Operational lines are not budgeted.
  CHECK(c.buf.append(log::level::warn, "request_timeout", "10.0.0.7", ",\"n\":1", ",\"reason\":\"a\""));
  c.buf.take();
  c.now += log::buffer::repeat_window_ms;
  c.buf.expire();
  std::string out = c.buf.take();
  CHECK_NE(out.find("{\"event\":\"audit_lines_suppressed\",\"audit\":true,\"source\":\"10.0.0.7\",\"lines\":68,"),
           std::string::npos);
  // A new second, a new budget.
  CHECK(distinct("10.0.0.7", 100000));
}

TEST_CASE("Audit lines dropped from a full buffer are counted apart and the drop report is marked audit") {
  clocked c(4096);
  std::string f = ",\"audit\":true,\"x\":\"" + std::string(200, 'y') + "\"";
  uint64_t refused = 0;
  for (int i = 0; i < 40; ++i) refused += !c.buf.append(log::level::warn, "admin_action", {}, f, {}, true);
  CHECK_GT(refused, 0u);
  CHECK_EQ(c.buf.audit_dropped(), refused);
  CHECK_EQ(c.buf.dropped(), refused);
  // Reading makes room; the report follows the lines that were kept.
  std::string out = c.buf.take();
  CHECK(c.buf.append(log::level::info, "after", {}, {}));
  out += c.buf.take();
  CHECK_NE(out.find("\"event\":\"log_lines_dropped\""), std::string::npos);
  CHECK_NE(out.find("\"audit_lines\":" + std::to_string(refused) + ",\"audit\":true"), std::string::npos);
}

TEST_CASE("A string value longer than 1024 bytes is cut and says how long it was") {
  test::tmpdir dir;
  std::string path = dir / "stderr";
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
  REQUIRE_GE(fd, 0);
  int saved = ::dup(STDERR_FILENO);
  REQUIRE(log::flush());
  ::dup2(fd, STDERR_FILENO);
  // Two-byte characters, so that the cut must find a character boundary.
  std::string huge;
  for (int i = 0; i < 3000; ++i) huge += "\xc3\xa9";
  log::warn("unit_huge").str("subject", huge);
  bool flushed = log::flush();
  ::dup2(saved, STDERR_FILENO);
  ::close(saved);
  ::close(fd);
  CHECK(flushed);
  std::string got = test::read_file(path);
  CHECK_LT(got.size(), 1200u);
  CHECK_NE(got.find("...(6000 bytes)"), std::string::npos);
  CHECK_EQ(got.find("\xc3\"", 0), std::string::npos);  // no half character before the marker
}
