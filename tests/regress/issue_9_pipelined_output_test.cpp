// Issue 9, "Pipelined output amplification": one connection that submitted
// a 1 MB job and then pipelined 1,000 reads of it without ever reading made
// relay hold 2.3 GB; the ops listener (no authentication) the same with
// GET /metrics, about 46 MB per connection. A connection whose unsent
// responses exceed limits.max_pending_output_bytes must stop taking
// pipelined requests until its client reads.
#include <doctest/doctest.h>

#include <chrono>
#include <thread>

#include "../support/hostile.h"
#include "../support/relay_fixture.h"

namespace h = test::hostile;
using test::field;
using test::relay_process;

namespace {

constexpr long pending_output = 1048576;  // limits.max_pending_output_bytes (the default, set explicitly)
// Allowance over the contract's bound, for what is not queued output: the
// transient copies of the one response being built (its JSON body, then its
// TLS ciphertext, about 1 MB each here) and allocator slack (freed buffers
// glibc keeps resident). Measured on the fixed relay: about 3 MiB over.
constexpr long slack_kib = 4 * 1024;

// Waits until relay's RSS has not changed by more than 256 KiB for 1 s
// (or 15 s pass): the pipelined requests have been taken as far as relay
// takes them.
void settle(pid_t pid) {
  auto until = h::clock::now() + std::chrono::seconds(15);
  long last = h::rss_kib(pid);
  auto stable_since = h::clock::now();
  while (h::clock::now() < until && h::clock::now() - stable_since < std::chrono::seconds(1)) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    long now = h::rss_kib(pid);
    if (std::labs(now - last) > 256) stable_since = h::clock::now();
    last = now;
  }
}

std::string submit(const relay_process& relay, const std::string& payload_json) {
  auto r = relay.curl("producer", "POST", "/v1/queues/render/jobs", R"({"payload":)" + payload_json + "}");
  REQUIRE_EQ(r.status, 201);
  return field(r.body, "id");
}

}  // namespace

TEST_CASE("a connection that pipelines 1,000 reads of a 1 MB job and never reads holds at most max_pending_output plus one response, and gets every answer in order once it reads") {
  h::unperturbed_allocator();
  relay_process relay({"--set", "limits.max_pending_output_bytes=" + std::to_string(pending_output)});
  const pid_t pid = relay.proc->pid();
  auto ctx = test::client_tls("producer");

  const std::string big = submit(relay, "\"" + std::string(1000000, 'x') + "\"");
  // Every tenth request reads a different small job, so that the order of
  // the answers can be checked.
  std::vector<std::string> small;
  for (int i = 0; i < 100; ++i) small.push_back(submit(relay, std::to_string(i)));

  // One answer's size; reading it a few times also grows relay's heap to
  // what one response needs, so that the baseline already includes it.
  size_t response_bytes = 0;
  {
    h::tls_client warm(ctx, relay.api_port);
    REQUIRE(warm.handshake());
    for (int i = 0; i < 3; ++i) {
      warm.queue(h::get_request("/v1/jobs/" + big));
      auto got = warm.read_responses(1, 10000);
      REQUIRE_EQ(got.size(), 1u);
      REQUIRE_EQ(got[0].status, 200);
      response_bytes = got[0].size;
    }
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(300));

  std::string pipeline;
  std::vector<std::string> expect;  // the job id each answer must carry
  for (int i = 0; i < 1000; ++i) {
    const std::string& id = i % 10 == 9 ? small[static_cast<size_t>(i / 10)] : big;
    pipeline += h::get_request("/v1/jobs/" + id);
    expect.push_back(id);
  }

  h::rss_watch rss(pid);
  h::good_client good(ctx, relay.api_port, h::get_request("/v1/jobs/" + small[0]));
  h::tls_client reader(ctx, relay.api_port, {}, h::small_rcvbuf);
  REQUIRE(reader.handshake());
  reader.send(pipeline, 5000);  // what the socket does not take now goes out while reading below
  settle(pid);
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  rss.stop();
  auto served = good.stop();

  const long bound_kib = (pending_output + static_cast<long>(response_bytes) + 64 * 1024) / 1024 + slack_kib;
  MESSAGE("api: " << pipeline.size() << " bytes of pipelined GETs of a " << response_bytes
                  << "-byte answer; relay RSS before " << rss.before() << " KiB, peak " << rss.peak()
                  << " KiB, after " << rss.after() << " KiB; growth " << rss.growth() << " KiB (bound " << bound_kib
                  << " KiB = max_pending_output + one response + 64 KiB + " << slack_kib << " KiB slack)");
  MESSAGE("another client meanwhile: " << served.requests << " requests, " << served.errors << " errors, p99 "
                                       << served.p99_ms << " ms");
  if (h::rss_bounds_apply) CHECK_LE(rss.growth(), bound_kib);
  CHECK_GT(served.requests, 0u);
  CHECK_EQ(served.errors, 0u);

  // Now it reads: all 1,000 answers, in order, in bounded time.
  auto t0 = h::clock::now();
  auto until = t0 + std::chrono::seconds(60);
  size_t n = 0;
  size_t wrong = 0;
  while (n < expect.size() && !reader.closed() && h::clock::now() < until) {
    while (n < expect.size()) {
      auto r = h::take_response(reader.plain());
      if (!r) break;
      if (r->status != 200 || r->body.find("\"id\":\"" + expect[n] + "\"") == std::string::npos) {
        if (wrong++ == 0) MESSAGE("answer " << n << ": status " << r->status << ", expected job " << expect[n]);
      }
      ++n;
    }
    if (n < expect.size()) reader.pump(h::ms_left(until));
  }
  MESSAGE("the slow reader got " << n << " answers in " << h::ms_since(t0) << " ms"
                                 << (reader.closed() ? " (connection closed: " + reader.error() + ")" : ""));
  CHECK_EQ(n, expect.size());
  CHECK_EQ(wrong, 0u);
  CHECK_EQ(relay.ops_get("/healthz").status, 200);
}

TEST_CASE("connections that pipeline GET /metrics on the ops listener and never read hold at most max_pending_output plus one response each") {
  h::unperturbed_allocator();
  relay_process relay({"--set", "limits.max_pending_output_bytes=" + std::to_string(pending_output)});
  const pid_t pid = relay.proc->pid();
  const uint16_t ops_port = static_cast<uint16_t>(std::stoi(relay.ops.substr(relay.ops.rfind(':') + 1)));
  // Some series, so that /metrics is as large as a busy relay's.
  for (int q = 0; q < 20; ++q)
    REQUIRE_EQ(relay.curl("producer", "POST", "/v1/queues/q" + std::to_string(q) + "/jobs", R"({"payload":1})").status,
               201);

  size_t response_bytes = 0;
  {
    h::tls_client warm(nullptr, ops_port);
    for (int i = 0; i < 3; ++i) {
      warm.send(h::get_request("/metrics"));
      auto got = warm.read_responses(1, 5000);
      REQUIRE_EQ(got.size(), 1u);
      REQUIRE_EQ(got[0].status, 200);
      response_bytes = got[0].size;
    }
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(300));

  constexpr int connections = 8;
  constexpr int requests = 1000;
  std::string pipeline;
  for (int i = 0; i < requests; ++i) pipeline += h::get_request("/metrics");

  h::rss_watch rss(pid);
  auto ctx = test::client_tls("producer");
  h::good_client good(ctx, relay.api_port, h::get_request("/v1/jobs/0000000000000001"));
  std::vector<std::unique_ptr<h::tls_client>> readers;
  for (int c = 0; c < connections; ++c) {
    readers.push_back(std::make_unique<h::tls_client>(nullptr, ops_port, std::string(), h::small_rcvbuf));
    readers.back()->send(pipeline, 2000);
  }
  settle(pid);
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  auto health_t0 = h::clock::now();
  int health = relay.ops_get("/healthz").status;
  double health_ms = h::ms_since(health_t0);
  rss.stop();
  auto served = good.stop();

  const long bound_kib =
      connections * ((pending_output + static_cast<long>(response_bytes) + 64 * 1024) / 1024) + slack_kib;
  MESSAGE("ops: " << connections << " connections x " << requests << " pipelined GET /metrics (" << response_bytes
                  << "-byte answer); relay RSS before " << rss.before() << " KiB, peak " << rss.peak() << " KiB, after "
                  << rss.after() << " KiB; growth " << rss.growth() << " KiB (bound " << bound_kib << " KiB)");
  MESSAGE("meanwhile /healthz " << health << " in " << health_ms << " ms; API client " << served.requests
                                << " requests, " << served.errors << " errors, p99 " << served.p99_ms << " ms");
  if (h::rss_bounds_apply) CHECK_LE(rss.growth(), bound_kib);
  CHECK_EQ(health, 200);
  CHECK_EQ(served.errors, 0u);

  // One of them reads: every answer arrives.
  auto got = readers[0]->read_responses(requests, 60000);
  size_t ok = 0;
  for (const auto& r : got) ok += r.status == 200 && r.body.find("# TYPE") != std::string::npos;
  MESSAGE("the reader got " << got.size() << " answers, " << ok << " of them metrics"
                            << (readers[0]->closed() ? " (connection closed: " + readers[0]->error() + ")" : ""));
  CHECK_EQ(ok, static_cast<size_t>(requests));
}
