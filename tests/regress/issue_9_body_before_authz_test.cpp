// Issue 9, "Bodies are buffered before the request is authorised": 64
// connections of an identity with no grants, each sending the headers of a
// 1 MiB submit and then the body one byte short, held about 1.1 MB each
// (RSS 6 -> 76 MB). Routes are authorised when the headers are complete, so
// such a request is refused before its body is read; the bytes held in
// partly received bodies are capped (limits.max_pending_body_bytes); and a
// body must keep arriving at limits.min_body_rate_bytes_per_s.
#include <doctest/doctest.h>

#include <chrono>
#include <map>
#include <thread>

#include "../support/hostile.h"
#include "../support/relay_fixture.h"
#include "relay/tls.h"

namespace h = test::hostile;
using test::relay_process;

namespace {

// The headers of a submit announcing `length` bytes.
std::string submit_headers(size_t length) {
  return "POST /v1/queues/render/jobs HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
         "Content-Length: " +
         std::to_string(length) + "\r\n\r\n";
}

// A JSON submit body of exactly `length` bytes.
std::string submit_body(size_t length) {
  const std::string head = "{\"payload\":\"", tail = "\"}";
  return head + std::string(length - head.size() - tail.size(), 'x') + tail;
}

}  // namespace

TEST_CASE("submits by an identity with no grants are refused before their bodies are read") {
  h::unperturbed_allocator();
  relay_process relay;
  const pid_t pid = relay.proc->pid();
  constexpr int connections = 64;
  constexpr size_t length = 1 << 20;
  // Per connection, until its answer: a TLS session (~32 KiB), one socket
  // read waiting in its TLS input buffer (64 KiB) and its plaintext (64 KiB,
  // the headers arrive with the first body bytes); 160 KiB each, 10 MiB in
  // all. The bodies themselves would be 64 MiB (76 MB was seen). OpenSSL's
  // sessions and buffers are larger than BoringSSL's: its build peaked at
  // 5.4-10.8 MiB over these 64 connections, so it gets 192 KiB each.
  const bool openssl = std::string(relay::tls::library_version()).find("OpenSSL") != std::string::npos;
  const long bound_kib = connections * (openssl ? 192 : 160);
  auto nogrant = test::client_tls("nogrant");
  const std::string body = submit_body(length);

  std::vector<std::unique_ptr<h::tls_client>> conns;
  for (int i = 0; i < connections; ++i) {
    conns.push_back(std::make_unique<h::tls_client>(nogrant, relay.api_port));
    REQUIRE(conns.back()->handshake());
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  h::rss_watch rss(pid);
  // All at once; relay need not read the bodies, and what it does not take
  // stays queued here.
  for (auto& c : conns) c->queue(submit_headers(length) + body.substr(0, length - 1));
  // Each is answered while its body is still one byte short.
  h::pump_all(conns, 5000, [&] {
    for (auto& c : conns)
      if (!c->closed() && c->plain().find("\r\n\r\n") == std::string::npos) return false;
    return true;
  });
  int refused = 0, with_close = 0;
  std::map<int, int> statuses;  // status (0: none) -> connections
  for (auto& c : conns) {
    auto got = c->responses();
    int status = got.empty() ? 0 : got[0].status;
    ++statuses[status];
    refused += status == 403 || status == 404;
    with_close += !got.empty() && got[0].close;
  }
  std::string seen;
  for (auto [status, n] : statuses) seen += " " + std::to_string(n) + "x" + std::to_string(status);
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  rss.stop();
  MESSAGE(connections << " unauthorised 1 MiB submits, body one byte short: " << refused << " refused (statuses:" << seen << "), " << with_close << " with Connection: close; relay RSS before "
                      << rss.before() << " KiB, peak " << rss.peak() << " KiB, after " << rss.after() << " KiB (bound +"
                      << bound_kib << " KiB)");
  CHECK_EQ(refused, connections);
  CHECK_EQ(with_close, connections);
  if (h::rss_bounds_apply) CHECK_LE(rss.growth(), bound_kib);
  CHECK_EQ(relay.ops_get("/healthz").status, 200);
}

TEST_CASE("partly received bodies beyond max_pending_body_bytes are refused with 503 and Retry-After, and the admitted ones complete") {
  // Bodies held whole (no spooling): a spooled body holds far less RAM,
  // and tests/integration/spool_test.cpp covers its share of the budget.
  relay_process relay({"--set", "limits.max_pending_body_bytes=4194304", "--set", "limits.max_body_bytes=1048576",
                       "--set", "limits.spill_threshold_bytes=0"});
  constexpr size_t length = 1 << 20;
  constexpr int connections = 8;
  auto producer = test::client_tls("producer");
  const std::string body = submit_body(length);

  std::vector<std::unique_ptr<h::tls_client>> conns;
  for (int i = 0; i < connections; ++i) {
    conns.push_back(std::make_unique<h::tls_client>(producer, relay.api_port));
    REQUIRE(conns.back()->handshake());
    conns.back()->queue(submit_headers(length) + body.substr(0, length - 1));
    conns.back()->flush(1000);
    // One at a time, so that which bodies came first is well defined.
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  std::vector<int> unavailable;  // indices answered 503
  for (int i = 0; i < connections; ++i) {
    auto got = conns[static_cast<size_t>(i)]->read_responses(1, 500);
    if (got.empty()) continue;
    CAPTURE(i);
    CHECK_EQ(got[0].status, 503);
    CHECK(got[0].close);
    CHECK_FALSE(got[0].retry_after.empty());
    CHECK(conns[static_cast<size_t>(i)]->read_until_closed(3000));
    if (got[0].status == 503) unavailable.push_back(i);
  }
  MESSAGE(unavailable.size() << " of " << connections
                             << " partly sent 1 MiB bodies were refused with 503 (max_pending_body_bytes 4 MiB)");
  // Four bodies of 1 MiB fit in 4 MiB, or three if relay reserves a little
  // more than the announced length; the rest are refused.
  CHECK_GE(unavailable.size(), 3u);
  CHECK_LE(unavailable.size(), 5u);
  // The admitted ones (the first ones) finish their bodies and are served.
  int created = 0;
  for (int i = 0; i < connections; ++i) {
    if (std::find(unavailable.begin(), unavailable.end(), i) != unavailable.end()) continue;
    auto& c = conns[static_cast<size_t>(i)];
    c->send(body.substr(length - 1));
    auto got = c->read_responses(1, 5000);
    created += !got.empty() && got[0].status == 201;
  }
  CHECK_EQ(static_cast<size_t>(created), connections - unavailable.size());
  CHECK_EQ(relay.ops_get("/healthz").status, 200);
}

TEST_CASE("a body trickled slower than min_body_rate_bytes_per_s gets 408, while one faster than it is served") {
  relay_process relay({"--set", "limits.min_body_rate_bytes_per_s=1000", "--set", "limits.header_timeout_ms=500"});
  auto producer = test::client_tls("producer");

  SUBCASE("100 bytes per second") {
    const std::string body = submit_body(10000);
    h::tls_client c(producer, relay.api_port);
    REQUIRE(c.handshake());
    c.send(submit_headers(body.size()));
    auto t0 = h::clock::now();
    std::vector<h::response> got;
    for (size_t off = 0; off < body.size() && got.empty() && !c.closed() && h::ms_since(t0) < 5000; off += 10) {
      c.send(body.substr(off, 10));
      got = c.read_responses(1, 100);
    }
    double ms = h::ms_since(t0);
    MESSAGE("a body at 100 B/s: " << (got.empty() ? 0 : got[0].status) << " after " << ms << " ms");
    REQUIRE_EQ(got.size(), 1u);
    CHECK_EQ(got[0].status, 408);
    CHECK(got[0].close);
    CHECK_LT(ms, 4000);
  }
  SUBCASE("4000 bytes per second") {
    const std::string body = submit_body(8000);
    h::tls_client c(producer, relay.api_port);
    REQUIRE(c.handshake());
    c.send(submit_headers(body.size()));
    std::vector<h::response> got;
    for (size_t off = 0; off < body.size() && got.empty() && !c.closed(); off += 400) {
      c.send(body.substr(off, 400));
      got = c.read_responses(1, 100);
    }
    if (got.empty()) got = c.read_responses(1, 5000);
    REQUIRE_EQ(got.size(), 1u);
    CHECK_EQ(got[0].status, 201);
  }
}
