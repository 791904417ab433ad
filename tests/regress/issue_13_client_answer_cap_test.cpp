// Issue 13, defect found by part D's tests: relay stores a job whose
// payload and result each fit limits.max_body_bytes (64 MiB at most
// today), but the project's own client reads answers of at most 64 MiB
// (http::client_conn::options::max_response_bytes), so `relayctl get`
// cannot show a job with a 40 MiB payload and a 40 MiB result: relay
// accepted both, and its own CLI answers "too large". A job's view holds
// its payload and its result, so the client must read at least twice the
// largest body relay takes. Failed on main as of 51ef762; fixed by
// relayctl's answer limit of 2 x 256 MiB + 1 MiB (issue 13).
#include <doctest/doctest.h>

#include <fstream>

#include "../support/bunny_fixture.h"
#include "../support/large.h"

using test::relay_process;
namespace large = test::large;
using large::MiB;

namespace {

int curl_file(const relay_process& relay, const std::string& who, const std::string& path, const std::string& body_file,
              const std::string& out_file) {
  const std::string& p = test::pki();
  auto r = test::run({"curl", "-sS", "--max-time", "120", "--cacert", p + "/ca.crt", "--cert", p + "/" + who + ".crt",
                      "--key", p + "/" + who + ".key", "-o", out_file, "-w", "%{http_code}", "-H",
                      "Content-Type: application/json", "--data-binary", "@" + body_file, "https://" + relay.api + path},
                     relay.dir.path(), 130000);
  return r.exit_code == 0 ? std::atoi(r.out.c_str()) : 0;
}

void write_parts(const std::string& path, std::initializer_list<std::string_view> parts) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  for (auto p : parts) out.write(p.data(), static_cast<std::streamsize>(p.size()));
}

}  // namespace

TEST_CASE("issue 13: relayctl shows a job relay accepted, a 40 MiB payload with a 40 MiB result") {
  relay_process relay({"--set", "limits.max_body_bytes=" + std::to_string(64 * MiB)});
  const std::string payload = large::string_payload(0xc11e47, 40 * MiB);
  const std::string result = large::string_payload(0x7e5017, 40 * MiB);
  std::string req = relay.dir / "req.json", out = relay.dir / "out.json";

  write_parts(req, {R"({"payload":)", payload, "}"});
  REQUIRE_EQ(curl_file(relay, "producer", "/v1/queues/render/jobs", req, out), 201);
  std::string id = test::field(test::read_file(out), "id");
  write_parts(req, {R"({"lease_ms":60000})"});
  REQUIRE_EQ(curl_file(relay, "worker", "/v1/queues/render/lease", req, out), 200);
  std::string lease;
  {
    std::ifstream in(out, std::ios::binary);
    std::string head(512, '\0');
    in.read(head.data(), static_cast<std::streamsize>(head.size()));
    lease = test::field(head, "lease");
  }
  REQUIRE_EQ(lease.size(), 32u);
  write_parts(req, {R"({"lease":")", lease, R"(","result":)", result, "}"});
  REQUIRE_EQ(curl_file(relay, "worker", "/v1/jobs/" + id + "/complete", req, out), 200);

  auto shown = test::relayctl(relay, "producer", {"--json", "get", id});
  REQUIRE_MESSAGE(shown.exit_code == 0, "relayctl get: exit " << shown.exit_code << ": " << shown.err);
  std::string_view body = shown.out;
  auto got_payload = large::job_member(body, "payload", "result");
  auto got_result = large::job_member(body, "result", "error");
  CHECK_MESSAGE(got_payload == payload, large::first_difference(got_payload, payload));
  CHECK_MESSAGE(got_result == result, large::first_difference(got_result, result));
}
