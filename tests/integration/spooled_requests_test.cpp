// Issue 13 part B end to end over mTLS, in process: the real listener,
// connections, API service, queue core, journal writer and blob store, with
// request bodies spooled the way the upload path (part A) hands them over.
// Until that path is merged, a request_handler in front of the service
// plays its part -- only here, in the test: large `payload` / `result`
// members are cut out of the body into a blob file and replaced by `null`,
// and the request carries the body_spool. Submit, lease (also a parked
// lease woken by the submit), complete, /v1/results and GET then run on
// references, byte for byte.
#include <doctest/doctest.h>

#include <filesystem>

#include "../support/blobs.h"
#include "../support/relay_fixture.h"
#include "api/service.h"
#include "relay/auth.h"
#include "relay/blob_store.h"
#include "relay/journal.h"
#include "relay/server.h"

using namespace relay;

namespace {

constexpr size_t threshold = 4096;

// The end of the JSON value starting at `i` (a test helper: inputs are
// the test's own, valid JSON).
size_t skip_value(const std::string& s, size_t i) {
  if (s[i] == '"') {
    for (++i; s[i] != '"'; ++i)
      if (s[i] == '\\') ++i;
    return i + 1;
  }
  if (s[i] == '{' || s[i] == '[') {
    int depth = 0;
    for (;; ++i) {
      char c = s[i];
      if (c == '"') {
        i = skip_value(s, i) - 1;
        continue;
      }
      if (c == '{' || c == '[') ++depth;
      if (c == '}' || c == ']') {
        if (--depth == 0) return i + 1;
      }
    }
  }
  while (i < s.size() && s[i] != ',' && s[i] != '}' && s[i] != ']') ++i;
  return i;
}

// What part A does to a body above the threshold, for bodies of the shape
// the tests send: {"k":v,...} or [{...},...] without whitespace.
void spool_body(http::request& req, const std::string& blobs, uv_loop_t* loop) {
  const std::string& b = req.body;
  std::vector<test::spool_value> cut;
  std::vector<std::pair<size_t, size_t>> spans;
  auto object = [&](size_t i, uint32_t item) {
    // i at '{'
    ++i;
    while (b[i] != '}') {
      size_t key_end = skip_value(b, i);
      std::string key = b.substr(i + 1, key_end - i - 2);
      size_t v = key_end + 1;
      size_t v_end = skip_value(b, v);
      if ((key == "payload" || key == "result") && v_end - v >= threshold) {
        cut.push_back({item, key == "payload" ? std::string_view("payload") : std::string_view("result"),
                       b.substr(v, v_end - v)});
        spans.emplace_back(v, v_end);
      }
      i = v_end;
      if (b[i] == ',') ++i;
    }
    return i + 1;
  };
  if (b[0] == '{') {
    object(0, 0);
  } else {
    size_t i = 1;
    uint32_t item = 0;
    while (b[i] != ']') {
      i = object(i, item++);
      if (b[i] == ',') ++i;
    }
  }
  if (cut.empty()) return;
  std::string skeleton;
  skeleton.reserve(b.size() + http::body_padding);
  size_t from = 0;
  for (auto [a, e] : spans) {
    skeleton.append(b, from, a - from);
    skeleton += "null";
    from = e;
  }
  skeleton.append(b, from, std::string::npos);
  skeleton.reserve(skeleton.size() + http::body_padding);
  req.body = std::move(skeleton);
  req.spool = test::make_spool(blobs, cut, loop);
}

struct spooling_handler final : net::request_handler {
  api::service& svc;
  std::string blobs;
  uv_loop_t* loop;
  spooling_handler(api::service& s, std::string b, uv_loop_t* l) : svc(s), blobs(std::move(b)), loop(l) {}
  void on_connected(net::server_conn& c) override { svc.on_connected(c); }
  bool on_headers(net::server_conn& c, http::request& r) override { return svc.on_headers(c, r); }
  void on_rejected(net::server_conn& c, api_error e) override { svc.on_rejected(c, e); }
  void on_request(net::server_conn& c, http::request& r) override {
    if (r.body.size() > threshold) spool_body(r, blobs, loop);
    svc.on_request(c, r);
  }
};

struct in_process_relay {
  test::tmpdir dir;
  uv_loop_t loop;
  ops::registry metrics;
  std::unique_ptr<journal::writer> writer;
  std::unique_ptr<queue::broker> broker;
  std::unique_ptr<journal::blob_store> store;
  std::shared_ptr<const auth::policy> policy;
  std::unique_ptr<api::service> svc;
  std::unique_ptr<spooling_handler> handler;
  std::unique_ptr<net::listener> listener;
  uint16_t port = 0;

  in_process_relay() {
    uv_loop_init(&loop);
    journal::options o;
    o.dir = dir.path();
    o.fsync = journal::fsync_mode::always;
    writer = std::make_unique<journal::writer>(&loop, o, metrics);
    std::string error;
    REQUIRE_MESSAGE(writer->open(1, error), error);
    broker = std::make_unique<queue::broker>(queue::broker_limits{}, tls::random_bytes, writer.get());
    std::string blobs = dir / "blobs";
    ::mkdir(blobs.c_str(), 0700);
    store = std::make_unique<journal::blob_store>(&loop, blobs, 8u << 20, metrics);
    broker->on_blob_unreferenced([this](uint64_t f) { store->release(f); });
    policy = auth::policy::parse(test::default_policy(), "test policy", error);
    REQUIRE_MESSAGE(policy, error);
    svc = std::make_unique<api::service>(&loop, *broker, [this] { return policy; }, metrics, writer.get());
    svc->set_blob_store(store.get());
    handler = std::make_unique<spooling_handler>(*svc, blobs, &loop);
    net::listener_options lo;
    lo.name = "api";
    lo.address = "127.0.0.1:0";
    auto ctx = test::server_tls();
    lo.tls = [ctx] { return ctx; };
    lo.conn.http.max_body_bytes = 64u << 20;
    listener = std::make_unique<net::listener>(&loop, lo, *handler, metrics);
    REQUIRE_MESSAGE(listener->start(error), error);
    const std::string& a = listener->address();
    port = static_cast<uint16_t>(std::stoi(a.substr(a.rfind(':') + 1)));
  }
  ~in_process_relay() {
    svc->close();
    listener->close();
    store->close();
    broker->set_sink(nullptr);
    writer->close();
    uv_run(&loop, UV_RUN_DEFAULT);
    listener.reset();
    CHECK_EQ(uv_loop_close(&loop), 0);
  }
  template <class Done>
  bool run_until(Done done) {
    uv_timer_t tick;
    uv_timer_init(&loop, &tick);
    uv_timer_start(&tick, [](uv_timer_t*) {}, 5, 5);
    for (int i = 0; i < 4000 && !done(); ++i) uv_run(&loop, UV_RUN_ONCE);
    uv_close(reinterpret_cast<uv_handle_t*>(&tick), nullptr);
    uv_run(&loop, UV_RUN_NOWAIT);
    return done();
  }
  size_t blob_files() const {
    size_t n = 0;
    for (auto& e : std::filesystem::directory_iterator(dir / "blobs")) n += e.path().filename().string().size() == 16;
    return n;
  }
};

// One call through a v1 client on the relay's own loop.
struct call_result {
  bool done = false;
  v1::error err;
  std::string body;
};
call_result call(in_process_relay& r, v1::client& c, std::string_view method, std::string target, std::string body) {
  call_result out;
  c.call(method, target, body, [&](const v1::error& e, std::string& b) {
    out.err = e;
    out.body = b;
    out.done = true;
  });
  REQUIRE(r.run_until([&] { return out.done; }));
  return out;
}

std::string raw_between(const std::string& body, const std::string& from, const std::string& to) {
  size_t a = body.find(from);
  if (a == std::string::npos) return {};
  a += from.size();
  size_t b = body.find(to, a);
  return b == std::string::npos ? std::string() : body.substr(a, b - a);
}

}  // namespace

TEST_CASE("spooled submit, lease, complete, results and GET: byte for byte, stored by reference") {
  in_process_relay r;
  v1::client producer(&r.loop, test::v1_options(r.port, "producer"));
  v1::client worker(&r.loop, test::v1_options(r.port, "worker"));
  std::string p1 = test::random_json_string(1u << 20, 11);
  std::string p2 = "{\"rows\":[" + test::random_json_string(200000, 12) + ",{\"a\":[1,2]}]}";
  std::string r1 = test::random_json_string(2u << 20, 13), r2 = "[" + test::random_json_string(50000, 14) + "]";

  // A single spooled submit.
  auto s = call(r, producer, "POST", "/v1/queues/work/jobs", "{\"payload\":" + p1 + ",\"priority\":1}");
  REQUIRE_MESSAGE(s.err.what == v1::error::kind::none, s.body);
  std::string id1 = test::field(s.body, "id");
  const queue::job* j1 = r.broker->find(*queue::parse_job_id(id1));
  REQUIRE(j1);
  CHECK(j1->payload.is_ref());
  CHECK_EQ(j1->payload.size(), p1.size());
  CHECK_EQ(r.blob_files(), 1u);
  // A batch: one spool file, one value by reference, one inline.
  s = call(r, producer, "POST", "/v1/queues/work/jobs", "[{\"payload\":\"small\"},{\"payload\":" + p2 + "}]");
  REQUIRE_MESSAGE(s.err.what == v1::error::kind::none, s.body);
  CHECK_EQ(r.blob_files(), 2u);

  // Lease both: the answer reads both spilled payloads back.
  auto l = call(r, worker, "POST", "/v1/queues/work/lease", R"({"max":3})");
  REQUIRE_MESSAGE(l.err.what == v1::error::kind::none, l.body);
  CHECK(raw_between(l.body, ",\"payload\":", "},{\"id\"") == p1);
  CHECK_NE(l.body.find(",\"payload\":\"small\"}"), std::string::npos);
  std::string tail = ",\"payload\":" + p2 + "}]}";
  CHECK((l.body.size() > tail.size() && l.body.compare(l.body.size() - tail.size(), tail.size(), tail) == 0));
  std::string lease1 = test::field(l.body, "lease");

  // Complete with a spooled result.
  auto c = call(r, worker, "POST", "/v1/jobs/" + id1 + "/complete", "{\"lease\":\"" + lease1 + "\",\"result\":" + r1 + "}");
  REQUIRE_MESSAGE(c.err.what == v1::error::kind::none, c.body);
  CHECK(j1->outcome.is_ref());
  CHECK_EQ(r.blob_files(), 3u);
  auto g = call(r, producer, "GET", "/v1/jobs/" + id1, "");
  REQUIRE_MESSAGE(g.err.what == v1::error::kind::none, g.body);
  CHECK(raw_between(g.body, ",\"payload\":", ",\"result\":") == p1);
  CHECK(raw_between(g.body, ",\"result\":", ",\"error\":") == r1);

  // /v1/results with a spooled result for the batch's large job; the small
  // one's lease is stale-free too.
  std::vector<std::pair<std::string, std::string>> leased;  // id, lease
  for (size_t at = l.body.find("{\"id\":\""); at != std::string::npos; at = l.body.find("{\"id\":\"", at + 1)) {
    std::string rest = l.body.substr(at);
    leased.emplace_back(test::field(rest, "id"), test::field(rest, "lease"));
  }
  REQUIRE_EQ(leased.size(), 3u);
  std::string results = "[{\"id\":\"" + leased[1].first + "\",\"lease\":\"" + leased[1].second + "\",\"result\":1},{\"id\":\"" +
                        leased[2].first + "\",\"lease\":\"" + leased[2].second + "\",\"result\":" + r2 + "}]";
  auto rr = call(r, worker, "POST", "/v1/results", results);
  REQUIRE_MESSAGE(rr.err.what == v1::error::kind::none, rr.body);
  CHECK_EQ(rr.body.find("409"), std::string::npos);
  g = call(r, producer, "GET", "/v1/jobs/" + leased[2].first, "");
  CHECK(raw_between(g.body, ",\"payload\":", ",\"result\":") == p2);
  CHECK(raw_between(g.body, ",\"result\":", ",\"error\":") == r2);
  g = call(r, producer, "GET", "/v1/jobs/" + leased[1].first, "");
  CHECK(raw_between(g.body, ",\"result\":", ",\"error\":") == "1");

  // A stale lease: the result is not stored and its spool file goes.
  size_t before = r.blob_files();
  c = call(r, worker, "POST", "/v1/jobs/" + id1 + "/complete", "{\"lease\":\"" + lease1 + "\",\"result\":" + r2 + "}");
  CHECK_EQ(c.err.status, 409);
  REQUIRE(r.run_until([&] { return r.blob_files() == before; }));

  // A parked lease woken by a spooled submit gets the payload read back.
  call_result parked;
  worker.call("POST", "/v1/queues/work/lease", R"({"wait_ms":5000})", [&](const v1::error& e, std::string& b) {
    parked.err = e;
    parked.body = b;
    parked.done = true;
  });
  r.run_until([&] { return r.svc->parked() == 1; });
  REQUIRE_EQ(r.svc->parked(), 1u);
  std::string p3 = test::random_json_string(300000, 15);
  s = call(r, producer, "POST", "/v1/queues/work/jobs", "{\"payload\":" + p3 + "}");
  REQUIRE(s.err.what == v1::error::kind::none);
  REQUIRE(r.run_until([&] { return parked.done; }));
  REQUIRE_MESSAGE(parked.err.what == v1::error::kind::none, parked.body);
  CHECK(raw_between(parked.body, ",\"payload\":", "}]}") == p3);

  // A GET long poll woken by a spooled completion.
  std::string id3 = test::field(s.body, "id"), lease3 = test::field(parked.body, "lease");
  call_result waiting;
  producer.call("GET", "/v1/jobs/" + id3 + "?wait_ms=5000", "", [&](const v1::error& e, std::string& b) {
    waiting.err = e;
    waiting.body = b;
    waiting.done = true;
  });
  r.run_until([&] { return r.svc->parked() == 1; });
  c = call(r, worker, "POST", "/v1/jobs/" + id3 + "/complete", "{\"lease\":\"" + lease3 + "\",\"result\":" + r1 + "}");
  REQUIRE(c.err.what == v1::error::kind::none);
  REQUIRE(r.run_until([&] { return waiting.done; }));
  CHECK(raw_between(waiting.body, ",\"result\":", ",\"error\":") == r1);

  // A spooled value where the route takes none: refused, the file removed.
  before = r.blob_files();
  auto f = call(r, worker, "POST", "/v1/jobs/" + id3 + "/fail", "{\"lease\":\"" + lease3 + "\",\"error\":\"x\",\"result\":" + r2 + "}");
  CHECK_EQ(f.err.status, 400);
  REQUIRE(r.run_until([&] { return r.blob_files() == before; }));
}
