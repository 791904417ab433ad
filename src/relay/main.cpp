// relay: parse the command line, load the configuration, run the loop.
#include <uv.h>

#include <csignal>
#include <cstdio>
#include <cstring>
#include <optional>
#include <string>

#include <unistd.h>

#include <cerrno>

#include "relay/audit.h"
#include "relay/config.h"
#include "relay/log.h"
#include "relay/ops.h"
#include "relay/relay_server.h"

namespace {

constexpr const char* usage =
    "usage: relay [--config FILE] [--listen ADDR] [--ops-listen ADDR] [--journal-dir DIR]\n"
    "             [--set dotted.key=value]... [--check-config] [--repair-journal]\n"
    "\n"
    "  --config FILE        JSON configuration file\n"
    "  --listen ADDR        API listener (mTLS), IP:port; port 0 picks one\n"
    "  --ops-listen ADDR    ops listener (/healthz /readyz /metrics), plain HTTP\n"
    "  --journal-dir DIR    journal directory\n"
    "  --set KEY=VALUE      override any configuration key, e.g. limits.max_body_bytes=65536\n"
    "  --check-config       validate, print the effective configuration and exit\n"
    "  --repair-journal     if the journal is corrupt before its tail, cut it there and start\n"
    "                       (the log says what was dropped); without it relay refuses to start\n";

int fail(const std::string& msg, int code = 2) {
  std::fprintf(stderr, "relay: %s\n", msg.c_str());
  return code;
}

}  // namespace

int main(int argc, char** argv) {
  relay::ops::return_freed_memory_promptly();
  std::optional<std::string> config_file;
  relay::config::override_list overrides;
  bool check_only = false;
  bool repair_journal = false;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    auto value = [&]() -> std::optional<std::string> {
      if (i + 1 >= argc) return std::nullopt;
      return std::string(argv[++i]);
    };
    if (arg == "--help" || arg == "-h") {
      std::fputs(usage, stdout);
      return 0;
    } else if (arg == "--check-config") {
      check_only = true;
    } else if (arg == "--repair-journal") {
      repair_journal = true;
    } else if (arg == "--config" || arg == "--listen" || arg == "--ops-listen" || arg == "--journal-dir" ||
               arg == "--set") {
      auto v = value();
      if (!v) return fail(arg + " needs a value\n" + usage);
      if (arg == "--config") config_file = *v;
      else if (arg == "--listen") overrides.emplace_back("listen", *v);
      else if (arg == "--ops-listen") overrides.emplace_back("ops_listen", *v);
      else if (arg == "--journal-dir") overrides.emplace_back("journal.dir", *v);
      else if (std::string error; !relay::config::add_set_override(*v, overrides, error)) return fail(error);
    } else {
      return fail("unknown argument \"" + arg + "\"\n" + usage);
    }
  }

  relay::config::relay_config cfg;
  std::string error;
  if (!relay::config::load(config_file, overrides, cfg, error)) {
    // --check-config reports a bad configuration as before (exit 2); a start
    // that fails is exit 1 and one error line, like every start-up failure.
    if (check_only) return fail(error);
    relay::log::error("start_failed").str("reason", error);
    return 1;
  }
  if (check_only) {
    if (!relay::relay_server::check(cfg, error)) return fail(error, 1);
    std::fputs(relay::config::to_json(cfg).c_str(), stdout);
    return 0;
  }
  relay::log::set_min_level(relay::log::parse_level(cfg.log.level));
  // Writes to a socket the peer closed must fail with EPIPE, not kill relay.
  std::signal(SIGPIPE, SIG_IGN);

  uv_loop_t loop;
  uv_loop_init(&loop);
  int rc = 0;
  bool restart = false;
  {
    relay::relay_server server(&loop, cfg, repair_journal);
    if (!server.start(error)) {
      relay::log::error("start_failed").str("reason", error);
      rc = 1;
      server.stop();
    }
    uv_run(&loop, UV_RUN_DEFAULT);
    restart = server.restart_as_standby();
    if (!rc) rc = server.exit_code();
  }
  if (uv_loop_close(&loop) != 0) relay::log::warn("loop_not_closed_cleanly");
  if (restart) {
    // Lost the leadership of a shared journal: everything this process
    // knew may be stale. Start over as a fresh process (same PID, so its
    // supervisor sees no exit and applies no restart back-off).
    relay::log::warn("restarting_as_standby");
    relay::log::flush();
    relay::audit::flush();
    ::execv("/proc/self/exe", argv);
    relay::log::error("restart_failed").str("reason", std::strerror(errno));
    return 1;
  }
  return rc;
}
