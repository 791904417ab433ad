// Large payloads and results (issue 13), end to end with real processes on
// loopback: a producer (curl) submits, bunny runs the job with the exec
// handler (/bin/cat: the result is the payload) or the http handler
// (echo_service: the result is {"echo":<payload>}) and completes it, and the
// producer's GET shows payload and result byte for byte as they were sent.
//
// Sizes: 1 MiB, 16 MiB and test::large::max_bytes (256 MiB). A case the
// binaries built here cannot carry yet (relay's limits.max_body_bytes stops
// at 64 MiB today; bunny reads answers of at most 16 MiB, a constant, until
// issue 13's part C gives it limits.max_job_bytes) is reported skipped,
// with the reason in its description, never passed; each turns on by
// itself once the binaries accept the sizes (see tests/support/large.h).
#include <doctest/doctest.h>

#include <chrono>
#include <csignal>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <thread>

#include "../support/bunny_fixture.h"
#include "../support/large.h"

using test::bunny_options;
using test::bunny_process;
using test::relay_process;
namespace large = test::large;
using large::KiB;
using large::MiB;

namespace {

// Writes the concatenation of `parts` to `path` (a 256 MiB payload is not
// copied once more to add the braces around it).
void write_parts(const std::string& path, std::initializer_list<std::string_view> parts) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  for (auto p : parts) out.write(p.data(), static_cast<std::streamsize>(p.size()));
  out.flush();
  REQUIRE_MESSAGE(out.good(), "cannot write " << path);
}

// The real curl with `who`'s certificate; the request body from
// `body_file` (none when empty), the answer into `out_file`. Returns the
// HTTP status, 0 when curl failed (its error in `err`).
int curl_file(const relay_process& relay, const std::string& who, const std::string& method, const std::string& path,
              const std::string& body_file, const std::string& out_file, int max_time_s, std::string* err = nullptr) {
  const std::string& p = test::pki();
  std::vector<std::string> argv{"curl", "-sS", "--max-time", std::to_string(max_time_s), "--cacert", p + "/ca.crt",
                                "--cert", p + "/" + who + ".crt", "--key", p + "/" + who + ".key", "-X", method,
                                "-o", out_file, "-w", "%{http_code}"};
  if (!body_file.empty())
    argv.insert(argv.end(), {"-H", "Content-Type: application/json", "--data-binary", "@" + body_file});
  argv.push_back("https://" + relay.api + path);
  auto r = test::run(argv, relay.dir.path(), (max_time_s + 10) * 1000);
  if (err) *err = r.err;
  return r.exit_code == 0 ? std::atoi(r.out.c_str()) : 0;
}

// Submits `payload` to `queue`; returns the job's id.
std::string submit(const relay_process& relay, const std::string& queue, std::string_view payload) {
  std::string req = relay.dir / "submit.json", ans = relay.dir / "submit.out", err;
  write_parts(req, {R"({"payload":)", payload, "}"});
  int status = curl_file(relay, "producer", "POST", "/v1/queues/" + queue + "/jobs", req, ans, 300, &err);
  std::string body = test::read_file(ans);
  std::filesystem::remove(req);
  REQUIRE_MESSAGE(status == 201, "submit of " << payload.size() << " bytes: " << status << " " << body << err);
  return test::field(body, "id");
}

// Waits up to `seconds` for job `id` to end; its answer is left in
// `out_file`, and its state returned.
std::string wait_terminal(const relay_process& relay, const std::string& id, const std::string& out_file, int seconds) {
  auto until = std::chrono::steady_clock::now() + std::chrono::seconds(seconds);
  std::string state;
  do {
    std::string err;
    int status = curl_file(relay, "producer", "GET", "/v1/jobs/" + id + "?wait_ms=20000", {}, out_file, 300, &err);
    REQUIRE_MESSAGE(status == 200, "GET " << id << ": " << status << " " << err);
    std::ifstream in(out_file, std::ios::binary);
    std::string head(256, '\0');
    in.read(head.data(), static_cast<std::streamsize>(head.size()));
    head.resize(static_cast<size_t>(in.gcount()));
    state = test::field(head, "state");
    if (state == "succeeded" || state == "dead" || state == "cancelled") return state;
  } while (std::chrono::steady_clock::now() < until);
  return state;
}

// Checks the job answer in `file`: succeeded, its payload exactly
// `payload`, its result exactly `prefix` + `payload` + `suffix`.
void check_job(const std::string& file, std::string_view payload, std::string_view prefix, std::string_view suffix) {
  large::mapped_file f(file);
  std::string_view body = f.view();
  std::string_view head = body.substr(0, 200);
  CHECK_MESSAGE(test::field(std::string(head), "state") == "succeeded", head);
  std::string_view got_payload = large::job_member(body, "payload", "result");
  std::string_view got_result = large::job_member(body, "result", "error");
  auto d = large::first_difference(got_payload, payload);
  CHECK_MESSAGE(d.empty(), "payload: " << d);
  bool result_ok = got_result.size() == prefix.size() + payload.size() + suffix.size() &&
                   got_result.substr(0, prefix.size()) == prefix &&
                   got_result.substr(prefix.size(), payload.size()) == payload &&
                   got_result.substr(prefix.size() + payload.size()) == suffix;
  CHECK_MESSAGE(result_ok, "result: " << got_result.size() << " bytes, expected " << prefix.size() << " + "
                                      << payload.size() << " + " << suffix.size() << "; "
                                      << large::first_difference(got_result.substr(std::min(prefix.size(), got_result.size())),
                                                                 payload));
}

// relay raised to the largest body it takes, with room to hold what the
// tests queue.
std::vector<std::string> relay_args() {
  return {"--set", std::string(large::relay_max_body_key) + "=" + std::to_string(large::relay_max_body()), "--set",
          "limits.max_held_bytes=" + std::to_string(uint64_t{4} << 30)};
}

// bunny on `queue` with `handler`, its limits raised for payloads of n
// bytes: the handler's output, and (where bunny has the key) the answers
// it reads; leases and requests long enough for the largest body under
// a sanitizer.
std::unique_ptr<bunny_process> large_bunny(const relay_process& relay, const std::string& queue,
                                           const std::string& handler, uint64_t n, const std::string& name) {
  bunny_options o;
  o.queues = R"([")" + queue + R"("])";
  o.handler = handler;
  o.lease_ms = 120000;
  o.extra_args = {"--set", "poll.request_timeout_ms=300000"};
  // With limits.max_job_bytes the handler's output follows it; without,
  // only the handler's own limit is raised (up to 64 MiB).
  if (large::bunny_limit_configurable())
    o.extra_args.insert(o.extra_args.end(),
                        {"--set", std::string(large::bunny_max_job_key) + "=" + std::to_string(large::max_bytes)});
  else
    o.extra_args.insert(o.extra_args.end(), {"--set", std::string(large::bunny_max_output_key) + "=" +
                                                          std::to_string(n + large::envelope_bytes)});
  return std::make_unique<bunny_process>(relay, o, name);
}

// A local service for the http handler (bodies up to 256 MiB): POST /run
// answers {"echo":<body>}.
struct echo_service {
  echo_service() : proc({test::env_or_fail("ECHO_SERVICE_BIN"), "127.0.0.1:0"}, dir / "echo.log") {
    auto line = proc.wait_for_line("\"listener\":\"echo\"");
    REQUIRE_MESSAGE(line.has_value(), proc.log());
    addr = test::json_field(*line, "addr");
  }
  std::string handler() const { return R"({"http": "http://)" + addr + R"(/run", "timeout_ms": 600000})"; }
  test::tmpdir dir;
  test::child proc;
  std::string addr;
};

const std::string exec_cat = R"({"exec": ["/bin/cat"], "timeout_ms": 600000})";

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Payloads of n bytes, a string and a structured document, each through
// the exec handler and the http handler.
void four_round_trips(uint64_t n) {
  auto t0 = std::chrono::steady_clock::now();
  relay_process relay(relay_args());
  echo_service echo;
  auto by_exec = large_bunny(relay, "render", exec_cat, n, "exec");
  auto by_http = large_bunny(relay, "work", echo.handler(), n, "http");
  struct one {
    std::string what, payload, queue, id;
  };
  std::vector<one> jobs;
  for (const char* queue : {"render", "work"}) {
    jobs.push_back({std::string("string via ") + queue, large::string_payload(n ^ 0x5157, n), queue, {}});
    jobs.push_back({std::string("structured via ") + queue, large::structured_payload(n ^ 0x7e57, n), queue, {}});
  }
  for (auto& j : jobs) j.id = submit(relay, j.queue, j.payload);
  for (auto& j : jobs) {
    CAPTURE(j.what);
    std::string out = relay.dir / ("job-" + j.id + ".json");
    std::string state = wait_terminal(relay, j.id, out, 300);
    REQUIRE_MESSAGE(state == "succeeded", j.what << ": " << state << "\nbunny: " << (j.queue == "render" ? by_exec : by_http)->proc->log());
    if (j.queue == "render") check_job(out, j.payload, "", "");
    else check_job(out, j.payload, R"({"echo":)", "}");
    std::filesystem::remove(out);
  }
  MESSAGE((n / KiB) << " KiB: four round trips (string and structured, exec and http) in " << seconds_since(t0) << " s");
}

// Whether a case of payloads of n bytes runs here, and if not, why.
const char* why_not(uint64_t n) {
  if (large::relay_max_body() == 0) return "RELAY_BIN is not set or relay does not start";
  if (n + large::envelope_bytes > large::relay_max_body())
    return "relay's limits.max_body_bytes cannot be raised that far yet (64 MiB today; issue 13 part A)";
  if (n + large::envelope_bytes > large::bunny_max_answer())
    return "bunny reads answers of at most 16 MiB (agent.h max_answer_bytes) and has no limits.max_job_bytes yet "
           "(issue 13 part C)";
  return "";
}

// Under AddressSanitizer the largest case is estimated well over the
// 60 s CI allows it (one 16 MiB-class round trip costs ~3 s in release and
// ~2.5x that under ASan; 256 MiB is 16 of them): it is skipped there, the
// other builds run it. RELAY_LARGE_MAX_UNDER_ASAN=1 runs it anyway, to
// measure.
#if defined(__SANITIZE_ADDRESS__)
const bool max_case_skipped_by_build = std::getenv("RELAY_LARGE_MAX_UNDER_ASAN") == nullptr;
#else
const bool max_case_skipped_by_build = false;
#endif

const char* why_not_max() {
  const char* why = why_not(large::max_bytes - large::envelope_bytes);
  if (*why || !max_case_skipped_by_build) return why;
  return "too slow under AddressSanitizer for CI's budget (estimated > 60 s); the other builds run it";
}

}  // namespace

TEST_CASE("large payloads: the limits of the binaries built here (what the skipped cases wait for)") {
  CHECK_GE(large::relay_max_body(), 64 * MiB);
  MESSAGE("relay max_body_bytes up to " << (large::relay_max_body() / MiB) << " MiB; bunny answers up to "
                                        << (large::bunny_max_answer() / MiB) << " MiB ("
                                        << std::string(large::bunny_limit_configurable() ? "configurable" : "fixed")
                                        << "); relay spills to blobs: " << std::string(large::relay_spills() ? "yes" : "no"));
  for (uint64_t n : {1 * MiB, 16 * MiB, large::max_bytes - large::envelope_bytes}) {
    std::string why = n == large::max_bytes - large::envelope_bytes ? why_not_max() : why_not(n);
    if (!why.empty()) MESSAGE("SKIPPED here: payloads of " << n << " bytes: " << why);
  }
}

TEST_CASE("1 MiB payloads and results, string and structured, exec and http handlers: byte for byte" *
          doctest::skip(!large::round_trip_fits(1 * MiB)) * doctest::description(why_not(1 * MiB))) {
  four_round_trips(1 * MiB);
}

TEST_CASE("16 MiB payloads and results, string and structured, exec and http handlers: byte for byte" *
          doctest::skip(!large::round_trip_fits(16 * MiB)) * doctest::description(why_not(16 * MiB))) {
  four_round_trips(16 * MiB);
}


// One round trip (CI's budget): the largest payload whose bodies (the
// submit, the lease answer, the complete) fit max_bytes.
TEST_CASE("the largest payload and result, exec handler: byte for byte" *
          doctest::skip(!large::round_trip_fits(large::max_bytes - large::envelope_bytes) || max_case_skipped_by_build) *
          doctest::description(why_not_max())) {
  const uint64_t n = large::max_bytes - large::envelope_bytes;
  auto t0 = std::chrono::steady_clock::now();
  relay_process relay(relay_args());
  auto bunny = large_bunny(relay, "render", exec_cat, n, "exec");
  std::string payload = large::string_payload(0xb16, n);
  std::string id = submit(relay, "render", payload);
  std::string out = relay.dir / "job.json";
  std::string state = wait_terminal(relay, id, out, 600);
  REQUIRE_MESSAGE(state == "succeeded", state << "\nbunny: " << bunny->proc->log());
  check_job(out, payload, "", "");
  MESSAGE(n << " bytes: one round trip in " << seconds_since(t0) << " s");
}
