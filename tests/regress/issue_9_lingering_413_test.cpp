// Issue 9, "413 lost to a reset": a client that sends a body over the limit
// without Expect: 100-continue (Python's http.client, most libraries) got a
// TLS EOF instead of the 413, because the lingering close discarded only
// 256 KiB before closing with unread input (a reset). Lingering is bounded
// by time (limits.lingering_time_ms, limits.lingering_timeout_ms), not by
// so few bytes, so 2 MiB and 20 MiB over-limit uploads both read their 413.
#include <doctest/doctest.h>

#include <chrono>
#include <thread>

#include "../support/hostile.h"
#include "../support/relay_fixture.h"

namespace h = test::hostile;
using test::relay_process;

namespace {

// Sends an over-limit submit of `length` bytes, reading nothing until all of
// it is sent, then reads the answer. bytes_per_s 0: as fast as the socket
// takes it (on loopback the kernel's buffers can absorb a few MiB, hiding
// an early close); otherwise paced like a client on a real link, so that
// relay's reading and closing happen while the body is still arriving.
void check_413(const relay_process& relay, size_t length, size_t bytes_per_s) {
  CAPTURE(length);
  CAPTURE(bytes_per_s);
  h::tls_client c(test::client_tls("producer"), relay.api_port);
  REQUIRE(c.handshake());
  std::string request = "POST /v1/queues/render/jobs HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                        "Content-Length: " +
                        std::to_string(length) + "\r\n\r\n";
  request += "{\"payload\":\"" + std::string(length - 14, 'x') + "\"}";
  auto t0 = h::clock::now();
  bool all_sent = true;
  if (bytes_per_s == 0) {
    c.queue(request);
    all_sent = c.flush(30000);
  } else {
    constexpr size_t piece = 64 * 1024;
    for (size_t off = 0; off < request.size() && all_sent; off += piece) {
      c.queue(std::string_view(request).substr(off, piece));
      all_sent = c.flush(10000);
      // On schedule: piece number k leaves at k * piece / rate.
      auto due = t0 + std::chrono::microseconds((off + piece) * 1000000 / bytes_per_s);
      std::this_thread::sleep_until(due);
    }
  }
  double send_ms = h::ms_since(t0);
  auto got = c.read_responses(1, 5000);
  MESSAGE(length << "-byte body over a 1 MiB limit" << (bytes_per_s ? " at " + std::to_string(bytes_per_s) + " B/s" : "")
                 << ": all sent " << all_sent
                 << (c.write_error().empty() ? "" : " (send failed: " + c.write_error() + ")") << " in " << send_ms
                 << " ms; answer "
                 << (got.empty() ? "none (" + c.error() + (c.reset() ? ", reset" : "") + ")"
                                 : std::to_string(got[0].status)));
  CHECK(all_sent);
  REQUIRE_EQ(got.size(), 1u);
  CHECK_EQ(got[0].status, 413);
  CHECK(got[0].close);
  CHECK(got[0].body.find("payload_too_large") != std::string::npos);
}

constexpr size_t link_rate = 5u << 20;  // 5 MiB/s, a 40 Mbit/s link

}  // namespace

TEST_CASE("a client that sends a 2 MiB body over the limit without Expect: 100-continue reads its 413") {
  relay_process relay({"--set", "limits.max_body_bytes=1048576"});
  check_413(relay, 2u << 20, 0);
  check_413(relay, 2u << 20, link_rate);
}

TEST_CASE("a client that sends a 20 MiB body over the limit without Expect: 100-continue reads its 413") {
  relay_process relay({"--set", "limits.max_body_bytes=1048576"});
  check_413(relay, 20u << 20, 0);
  check_413(relay, 20u << 20, link_rate);
}

TEST_CASE("curl uploading 2 MiB and 20 MiB over the limit without Expect: 100-continue gets 413") {
  relay_process relay({"--set", "limits.max_body_bytes=1048576"});
  for (size_t length : {size_t{2} << 20, size_t{20} << 20}) {
    for (bool paced : {false, true}) {
      CAPTURE(length);
      CAPTURE(paced);
      // "Expect:" with no value stops curl from sending Expect: 100-continue.
      std::vector<std::string> extra{"-H", "Expect:"};
      if (paced) extra.insert(extra.end(), {"--limit-rate", std::to_string(link_rate)});
      auto r = relay.curl("producer", "POST", "/v1/queues/render/jobs",
                          "{\"payload\":\"" + std::string(length - 14, 'x') + "\"}", extra);
      MESSAGE("curl, " << length << " bytes" << std::string(paced ? " at 5 MiB/s" : "") << ": status " << r.status << ", exit "
                       << r.curl_exit << " " << r.err);
      CHECK_EQ(r.curl_exit, 0);
      CHECK_EQ(r.status, 413);
    }
  }
}
