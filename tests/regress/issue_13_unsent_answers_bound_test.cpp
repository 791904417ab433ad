// Issue 13, attack review: relay bounds the bytes it reads back from blob
// files and holds for answers (blob_store's reservation, 512 MiB), but it
// gave its share back as soon as an answer was queued on its connection,
// while the answer's bytes stay in memory until the peer reads them. A
// client allowed to read a job with a large spilled value could open many
// connections, GET it on each and never read: every answer was read back
// (the bound was free again at once) and held -- N x the value's size, the
// memory growing with what peers ask, up to exhaustion. The share is now
// held until the answer's bytes are encrypted onto the wire (or the
// connection closes): stream::write_owned's `keep`.
#include <doctest/doctest.h>

#include <chrono>
#include <memory>
#include <thread>
#include <vector>

#include "../support/blobs.h"
#include "../support/relay_fixture.h"

using test::relay_process;

namespace {

long long metric(const relay_process& relay, const std::string& name) {
  std::string m = relay.ops_get("/metrics").body;
  size_t at = m.find("\n" + name + " ");
  if (at == std::string::npos) return -1;
  return std::stoll(m.substr(at + name.size() + 2));
}

template <class Done>
bool wait_for(Done done, int ms = 30000) {
  for (int i = 0; i < ms / 50 && !done(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  return done();
}

}  // namespace

TEST_CASE("issue 13: answers filled from blob files count against the read bound until they are sent") {
  relay_process relay({"--set", "limits.max_body_bytes=67108864"});
  // Spilled (above the 64 KiB threshold) and far above what socket
  // buffers take: most of each answer stays in relay's memory unread.
  const size_t size = 24u << 20;
  std::string payload = test::random_json_string(size, 13);
  auto s = relay.curl("producer", "POST", "/v1/queues/big/jobs", "{\"payload\":" + payload + "}");
  REQUIRE_EQ(s.status, 201);
  std::string id = test::field(s.body, "id");
  REQUIRE_FALSE(id.empty());

  const int readers = 4;
  std::vector<std::unique_ptr<test::tls_pipe>> pipes;
  for (int i = 0; i < readers; ++i) {
    pipes.push_back(std::make_unique<test::tls_pipe>(relay.api_port, "producer"));
    pipes.back()->send("GET /v1/jobs/" + id + " HTTP/1.1\r\nHost: x\r\n\r\n");  // and never read
  }
  REQUIRE(wait_for([&] { return metric(relay, "relay_blob_reads_total") >= readers; }));
  std::this_thread::sleep_for(std::chrono::milliseconds(500));  // the answers are queued on their connections
  // Each unread answer still holds its share of the bound.
  CHECK_GE(metric(relay, "relay_blob_reading_bytes"), static_cast<long long>(size));

  // Closed connections give their shares back.
  pipes.clear();
  CHECK(wait_for([&] { return metric(relay, "relay_blob_reading_bytes") == 0; }));
  // And an answer that is read gives its share back once sent.
  auto g = relay.curl("producer", "GET", "/v1/jobs/" + id);
  CHECK_EQ(g.status, 200);
  CHECK(wait_for([&] { return metric(relay, "relay_blob_reading_bytes") == 0; }));
}
