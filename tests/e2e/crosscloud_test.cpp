// The cross-cloud path reproduced on one machine. Two network namespaces the
// test makes itself: "aws" runs relay (and a producer), "azure" runs bunny.
// They share only a veth pair on a private /30; a blackhole default route in
// each keeps every other packet on the machine; nftables in "aws" admits the
// API port from the azure address and nothing else (what the NetworkPolicy
// does in the cluster). bunny reaches relay through wan_proxy, the test's
// fault-injecting stand-in for the VPN: 40 ms each way, and a link the test
// cuts and resets.
//
// Needs root (namespaces, nftables). Where namespaces cannot be made the
// suite reports itself skipped (exit 77), never passed.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>
#include <unistd.h>

#include <cctype>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <map>
#include <memory>
#include <set>
#include <thread>

#include "../support/relay_fixture.h"

namespace {

const std::string aws_ip = "10.213.0.1";
const std::string azure_ip = "10.213.0.2";
constexpr int api_port = 8443;
constexpr int ops_port = 9090;
constexpr int other_port = 7000;  // some other service in "aws"
constexpr int wan_delay_ms = 40;

// The two namespaces, their link and their firewall; all removed on scope
// exit (deleting a namespace deletes its end of the veth pair).
class cloud_pair {
 public:
  cloud_pair() : aws("relay-aws-" + std::to_string(getpid())), azure("relay-azure-" + std::to_string(getpid())) {
    for (const auto& ns : {aws, azure}) must({"ip", "netns", "add", ns});
    must({"ip", "link", "add", "wan0", "netns", aws, "type", "veth", "peer", "name", "wan0", "netns", azure});
    for (auto [ns, ip] : {std::pair{aws, aws_ip}, {azure, azure_ip}}) {
      must({"ip", "-n", ns, "addr", "add", ip + "/30", "dev", "wan0"});
      must({"ip", "-n", ns, "link", "set", "wan0", "up"});
      must({"ip", "-n", ns, "link", "set", "lo", "up"});
      must({"ip", "-n", ns, "route", "add", "blackhole", "default"});
    }
    test::write_file(dir / "aws.nft", R"(table inet crosscloud {
  chain input {
    type filter hook input priority filter; policy drop;
    iif "lo" accept
    ct state established,related accept
    ip saddr )" + azure_ip + " tcp dport " + std::to_string(api_port) + R"( counter accept comment "relay API from azure"
    counter comment "dropped"
  }
})");
    must(in(aws, {"nft", "-f", dir / "aws.nft"}));
  }
  cloud_pair(const cloud_pair&) = delete;
  cloud_pair& operator=(const cloud_pair&) = delete;
  ~cloud_pair() {
    for (const auto& ns : {aws, azure}) test::run({"ip", "netns", "del", ns}, dir.path());
  }

  // argv run inside namespace `ns` (ip netns exec execs it: same PID).
  static std::vector<std::string> in(const std::string& ns, std::vector<std::string> argv) {
    argv.insert(argv.begin(), {"ip", "netns", "exec", ns});
    return argv;
  }
  test::run_result run(const std::string& ns, std::vector<std::string> argv, int timeout_ms = 30000) const {
    return test::run(in(ns, std::move(argv)), dir.path(), timeout_ms);
  }
  // Packets the "aws" firewall accepted from azure on the API port.
  long api_packets_admitted() const {
    auto r = run(aws, {"nft", "list", "chain", "inet", "crosscloud", "input"});
    auto p = r.out.find("dport " + std::to_string(api_port) + " counter packets ");
    return p == std::string::npos ? -1 : std::stol(r.out.substr(r.out.find("packets ", p) + 8));
  }

  test::tmpdir dir;
  const std::string aws, azure;

 private:
  void must(const std::vector<std::string>& argv) {
    auto r = test::run(argv, dir.path());
    REQUIRE_MESSAGE(r.exit_code == 0, "setting up the namespaces: `" << argv[0] << " " << argv[1] << " " << argv[2]
                                                                       << " …` failed: " << r.err);
  }
};

// relay (and another service) in "aws", wan_proxy and bunny in "azure".
struct scenario {
  cloud_pair clouds;
  test::tmpdir& dir = clouds.dir;
  std::unique_ptr<test::child> relay, other, proxy, bunny;

  scenario() {
    const std::string& p = test::pki();
    test::write_file(dir / "policy.json", test::default_policy());
    // Both listeners on every address, deliberately: only the firewall keeps
    // the ops port from azure.
    test::write_file(dir / "relay.json", R"({"listen": "0.0.0.0:)" + std::to_string(api_port) +
                                             R"(", "ops_listen": "0.0.0.0:)" + std::to_string(ops_port) + R"(",
      "tls": {"cert": ")" + p + "/server.crt\", \"key\": \"" + p + "/server.key\", \"client_ca\": \"" + p + R"(/ca.crt"},
      "policy": ")" + dir / "policy.json" + R"(", "journal": {"dir": ")" + dir / "journal" + R"(", "fsync": "always"}})");
    relay = std::make_unique<test::child>(
        cloud_pair::in(clouds.aws, {test::env_or_fail("RELAY_BIN"), "--config", dir / "relay.json"}), dir / "relay.log");
    REQUIRE_MESSAGE(relay->wait_for_line("\"listener\":\"ops\"").has_value(), "relay did not start: " << relay->log());
    other = std::make_unique<test::child>(
        cloud_pair::in(clouds.aws, {test::env_or_fail("ECHO_SERVICE_BIN"), "0.0.0.0:" + std::to_string(other_port)}),
        dir / "other.log");
    REQUIRE(other->wait_for_line("\"listening\"").has_value());

    proxy = std::make_unique<test::child>(
        cloud_pair::in(clouds.azure, {test::env_or_fail("WAN_PROXY_BIN"), "127.0.0.1:" + std::to_string(api_port),
                                      aws_ip + ":" + std::to_string(api_port), std::to_string(wan_delay_ms)}),
        dir / "proxy.log");
    REQUIRE_MESSAGE(proxy->wait_for_line("\"proxy_listening\"").has_value(), proxy->log());

    // bunny knows relay by name; the proxy is its way there. Short leases
    // and timeouts so that link cuts expire leases within the test.
    test::write_file(dir / "bunny.json", R"({
      "relay": {"urls": ["https://127.0.0.1:)" + std::to_string(api_port) + R"("], "server_name": "relay.test"},
      "tls": {"cert": ")" + p + "/worker.crt\", \"key\": \"" + p + "/worker.key\", \"ca\": \"" + p + R"(/ca.crt"},
      "queues": ["render"], "concurrency": 4, "lease_ms": 3000,
      "handler": {"exec": [")" + test::env_or_fail("HANDLERS_DIR") + R"(/square.sh"], "timeout_ms": 10000},
      "ops_listen": "127.0.0.1:0",
      "poll": {"wait_ms": 4000, "request_timeout_ms": 6000, "backoff_base_ms": 100, "backoff_max_ms": 2000}})");
    bunny = std::make_unique<test::child>(
        cloud_pair::in(clouds.azure, {test::env_or_fail("BUNNY_BIN"), "--config", dir / "bunny.json"}), dir / "bunny.log");
    REQUIRE_MESSAGE(bunny->wait_for_line("\"event\":\"bunny_started\"").has_value(), bunny->log());
  }

  // relayctl inside "aws", as the producer (or as `who`).
  test::run_result producer(std::vector<std::string> args, int timeout_ms = 30000,
                            const std::string& who = "producer") const {
    const std::string& p = test::pki();
    std::vector<std::string> argv{test::env_or_fail("RELAYCTL_BIN"), "--url", "https://127.0.0.1:" + std::to_string(api_port),
                                  "--server-name", "localhost", "--ca", p + "/ca.crt", "--cert", p + "/" + who + ".crt",
                                  "--key", p + "/" + who + ".key"};
    argv.insert(argv.end(), args.begin(), args.end());
    return clouds.run(clouds.aws, argv, timeout_ms);
  }

  // Submits jobs whose payloads are [n, seconds] for n in [first, first+count).
  std::map<std::string, int> submit(int first, int count, const std::string& seconds) const {
    std::string batch = "[";
    for (int n = first; n < first + count; ++n) batch += (n > first ? ",[" : "[") + std::to_string(n) + "," + seconds + "]";
    test::write_file(dir / "batch.json", batch + "]");
    auto r = producer({"submit", "render", "--batch", "--max-attempts", "10", "--file", dir / "batch.json"});
    REQUIRE_MESSAGE(r.exit_code == 0, r.err);
    auto ids = test::lines(r.out);
    REQUIRE_EQ(ids.size(), static_cast<size_t>(count));
    std::map<std::string, int> jobs;
    for (int i = 0; i < count; ++i) jobs[ids[static_cast<size_t>(i)]] = first + i;
    return jobs;
  }

  // Waits for every job and checks each result is its own square, once.
  // Returns the attempts each took.
  std::vector<int> expect_every_result(const std::map<std::string, int>& jobs, int timeout_ms) const {
    std::vector<std::string> args{"wait", "--json", "--timeout", std::to_string(timeout_ms)};
    for (const auto& [id, n] : jobs) args.push_back(id);
    auto r = producer(args, timeout_ms + 30000);
    CHECK_MESSAGE(r.exit_code == 0, "relayctl wait: " << r.err);
    std::set<std::string> seen;
    std::vector<int> attempts;
    for (const auto& line : test::lines(r.out)) {
      std::string id = test::field(line, "id");
      REQUIRE_MESSAGE(jobs.count(id) == 1, "a result for a job never submitted: " << line);
      CHECK_MESSAGE(seen.insert(id).second, "two results for " << id);
      int n = jobs.at(id);
      CHECK_MESSAGE(test::field(line, "state") == "succeeded", line);
      CHECK_MESSAGE(test::field(line, "square") == std::to_string(n * n), line);
      attempts.push_back(std::stoi(test::field(line, "attempts")));
    }
    CHECK_EQ(seen.size(), jobs.size());
    return attempts;
  }

  long metric(const std::string& name) const {
    auto r = clouds.run(clouds.aws, {"curl", "-sS", "--max-time", "5", "http://127.0.0.1:" + std::to_string(ops_port) + "/metrics"});
    long total = 0;
    for (const auto& line : test::lines(r.out))
      if (line.rfind(name, 0) == 0 && (line[name.size()] == '{' || line[name.size()] == ' '))
        total += std::stol(line.substr(line.rfind(' ') + 1));
    return total;
  }

  // Waits until bunny holds leases (jobs are in flight across the link).
  void wait_until_leased() const {
    for (int i = 0; i < 200; ++i) {
      auto r = producer({"queues", "render", "--json"}, 30000, "admin");
      if (r.out.find("\"leased\":0") == std::string::npos && r.out.find("\"leased\":") != std::string::npos) return;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    FAIL("no job was leased within 10 s");
  }

  void cut_link_for(std::chrono::seconds how_long) const {
    wait_until_leased();
    proxy->signal(SIGUSR1);
    REQUIRE(proxy->wait_for_line("\"event\":\"link_cut\"").has_value());
    std::this_thread::sleep_for(how_long);
    proxy->signal(SIGUSR2);
  }
};

}  // namespace

TEST_CASE("jobs flow from a producer in aws to bunny in azure over mTLS across the WAN, and only the API port is open") {
  scenario s;
  auto jobs = s.submit(1, 40, "0");
  auto attempts = s.expect_every_result(jobs, 60000);
  CHECK_EQ(attempts.size(), 40u);
  // The jobs crossed the link: through the proxy, admitted by the firewall,
  // and relay saw bunny's certificate identity.
  CHECK(s.proxy->log().find("\"event\":\"proxy_connection\"") != std::string::npos);
  CHECK_GT(s.clouds.api_packets_admitted(), 0);
  CHECK(s.relay->log().find("\"event\":\"authz_denied\"") == std::string::npos);

  const auto& c = s.clouds;
  auto url = [](int port, const std::string& path = "/healthz") {
    return "http://" + aws_ip + ":" + std::to_string(port) + path;
  };
  // From azure: the ops port and another port time out (dropped, not even
  // refused), while relay's API answers over mTLS.
  for (int port : {ops_port, other_port}) {
    auto r = c.run(c.azure, {"curl", "-sS", "--connect-timeout", "2", "-o", "/dev/null", url(port)});
    CHECK_MESSAGE(r.exit_code == 28, "port " << port << " reachable from azure? curl exit " << r.exit_code << ": " << r.err);
  }
  const std::string& p = test::pki();
  auto api = c.run(c.azure, {"curl", "-sS", "--max-time", "10", "--cacert", p + "/ca.crt", "--cert", p + "/admin.crt",
                             "--key", p + "/admin.key", "--resolve", "relay.test:8443:" + aws_ip, "-o", "/dev/null",
                             "-w", "%{http_code}", "https://relay.test:8443/v1/queues/render"});
  CHECK_EQ(api.out, "200");
  // Without a client certificate the API refuses the handshake.
  auto anon = c.run(c.azure, {"curl", "-sS", "--max-time", "10", "--cacert", p + "/ca.crt", "--resolve",
                              "relay.test:8443:" + aws_ip, "https://relay.test:8443/v1/queues/render"});
  CHECK_NE(anon.exit_code, 0);
  // The same ports are open inside aws: the firewall, not their absence,
  // keeps azure out.
  for (int port : {ops_port, other_port}) {
    auto r = c.run(c.aws, {"curl", "-sS", "--max-time", "5", "-o", "/dev/null", "-w", "%{http_code}", url(port)});
    CHECK_MESSAGE(r.exit_code == 0, "port " << port << " not listening inside aws: " << r.err);
  }
  // Nothing leaves the pair: everything but the /30 is a blackhole.
  for (const auto& ns : {c.aws, c.azure}) {
    auto r = c.run(ns, {"ip", "route", "show", "default"});
    CHECK_MESSAGE(r.out.rfind("blackhole default", 0) == 0, ns << ": " << r.out << r.err);
    auto out = c.run(ns, {"curl", "-sS", "--connect-timeout", "2", "http://192.0.2.1/"});
    CHECK_NE(out.exit_code, 0);
  }
}

TEST_CASE("a 10 s link cut and a reset lose nothing: bunny reconnects and every result arrives") {
  scenario s;
  auto jobs = s.submit(100, 60, "0.3");
  s.cut_link_for(std::chrono::seconds(10));
  // Then a reset of every connection while work is in flight.
  s.wait_until_leased();
  s.proxy->signal(SIGHUP);
  REQUIRE(s.proxy->wait_for_line("\"event\":\"link_reset\"").has_value());
  auto attempts = s.expect_every_result(jobs, 120000);
  CHECK_EQ(attempts.size(), jobs.size());
  CHECK(s.bunny->log().find("\"event\":\"relay_unreachable\"") != std::string::npos);
}

TEST_CASE("a 60 s link cut loses nothing: leases that expired are redelivered and every result arrives once") {
  scenario s;
  auto jobs = s.submit(1000, 60, "0.3");
  s.cut_link_for(std::chrono::seconds(60));
  auto attempts = s.expect_every_result(jobs, 180000);
  CHECK_EQ(attempts.size(), jobs.size());
  // Leases of jobs in flight ran out during the cut; relay gave them out
  // again and their second runs' results are the ones recorded.
  CHECK_GT(s.metric("relay_jobs_expired_total"), 0);
  bool redelivered = false;
  for (int a : attempts) redelivered |= a > 1;
  CHECK(redelivered);
}

int main(int argc, char** argv) {
  std::signal(SIGPIPE, SIG_IGN);
  // Network namespaces need root (CAP_SYS_ADMIN and CAP_NET_ADMIN). Where
  // they cannot be made, say so and report "skipped" to meson (77).
  std::string probe = "relay-probe-" + std::to_string(getpid());
  test::tmpdir dir;
  auto made = test::run({"ip", "netns", "add", probe}, dir.path());
  if (made.exit_code != 0) {
    while (!made.err.empty() && std::isspace(static_cast<unsigned char>(made.err.back()))) made.err.pop_back();
    std::fprintf(stderr, "SKIP: cannot create network namespaces here (%s): the cross-cloud scenario did not run\n",
                 made.err.empty() ? "ip netns add failed" : made.err.c_str());
    return 77;
  }
  test::run({"ip", "netns", "del", probe}, dir.path());
  doctest::Context context(argc, argv);
  return context.run();
}
