// Issue 10, found by the second attack review of the API keys:
// - a long poll parked with a key that was then removed from the keys file,
//   or that passed its not_after while it waited, was still handed the next
//   job and its payload (new requests with the key already got 401);
// - an empty Authorization header followed by a real one was taken as one
//   credential (a proxy reading the first sees none).
#include <doctest/doctest.h>
#include <signal.h>

#include <ctime>
#include <thread>

#include "../support/relay_fixture.h"
#include "relay/api_keys.h"
#include "relay/tls.h"

namespace {

const std::string producer_key = "pR0duc3r-kEy_aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const std::string bunny_key = "bUnNy-kEy-1_bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

std::string entry(const std::string& principal, const std::string& key, const std::string& extra = {}) {
  uint8_t d[32];
  relay::tls::sha256(key, d);
  return R"({"principal":")" + principal + R"(","sha256":")" + relay::tls::to_hex(d, sizeof d) + "\"" + extra + "}";
}

std::string utc_in(int seconds) {
  std::time_t t = std::time(nullptr) + seconds;
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&t));
  return buf;
}

struct keyed {
  test::tmpdir kdir;
  std::unique_ptr<test::relay_process> relay;
  explicit keyed(const std::string& keys) {
    test::write_file(kdir / "keys.json", keys);
    relay = std::make_unique<test::relay_process>(std::vector<std::string>{
        "--set", "auth.mode=api_key", "--set", "auth.api_keys=" + (kdir / "keys.json"), "--set",
        "tls.reload_check_ms=0"});
  }
  std::string lease_request(const std::string& key) const {
    std::string body = R"({"max":1,"wait_ms":20000})";
    return "POST /v1/queues/render/lease HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + key +
           "\r\nContent-Type: application/json\r\nContent-Length: " + std::to_string(body.size()) + "\r\n\r\n" + body;
  }
  bool parked() const {
    for (int i = 0; i < 100; ++i) {
      if (relay->ops_get("/metrics").body.find("relay_parked_requests{kind=\"lease\"} 1") != std::string::npos)
        return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return false;
  }
  int submit() const {
    return relay->curl("", "POST", "/v1/queues/render/jobs", R"({"payload":"SECRET"})",
                       {"-H", "Authorization: Bearer " + producer_key})
        .status;
  }
};

}  // namespace

TEST_CASE("a lease parked with a key that is then removed is answered at once and never gets a job") {
  keyed k("{\"keys\":[" + entry("producer", producer_key) + "," + entry("bunny", bunny_key) + "]}");
  test::tls_pipe pipe(k.relay->api_port, "");
  pipe.send(k.lease_request(bunny_key));
  REQUIRE(k.parked());
  test::write_file(k.kdir / "keys.json", "{\"keys\":[" + entry("producer", producer_key) + "]}");
  k.relay->proc->signal(SIGHUP);
  std::string answer = pipe.read_responses(1, 5000);
  CHECK_MESSAGE(answer.find("\"jobs\":[]") != std::string::npos, answer);
  CHECK_EQ(k.submit(), 201);
  std::string more = pipe.read_responses(1, 500);
  CHECK(more.find("SECRET") == std::string::npos);
  CHECK(answer.find("SECRET") == std::string::npos);
}

TEST_CASE("a long poll waits no longer than its key's not_after") {
  keyed k("{\"keys\":[" + entry("producer", producer_key) + "," +
          entry("bunny", bunny_key, R"(,"not_after":")" + utc_in(2) + "\"") + "]}");
  test::tls_pipe pipe(k.relay->api_port, "");
  pipe.send(k.lease_request(bunny_key));
  std::string answer = pipe.read_responses(1, 8000);
  CHECK_MESSAGE(answer.find("\"jobs\":[]") != std::string::npos, answer);
  CHECK_EQ(k.submit(), 201);
  CHECK(pipe.read_responses(1, 500).find("SECRET") == std::string::npos);
}

TEST_CASE("an empty Authorization header followed by a real one is refused") {
  keyed k("{\"keys\":[" + entry("producer", producer_key) + "]}");
  test::tls_pipe pipe(k.relay->api_port, "");
  pipe.send("GET /v1/queues HTTP/1.1\r\nHost: x\r\nAuthorization:\r\nAuthorization: Bearer " + producer_key +
            "\r\n\r\n");
  std::string answer = pipe.read_responses(1, 5000);
  CHECK_MESSAGE(answer.rfind("HTTP/1.1 400", 0) == 0, answer);
}
