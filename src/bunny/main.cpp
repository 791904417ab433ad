// bunny: parse the command line, load the configuration, run the agent and
// its ops listener on one loop.
#include <uv.h>

#include <csignal>
#include <cstdio>
#include <optional>
#include <string>
#include <string_view>

#include "bunny/agent.h"
#include "bunny/guard.h"
#include "relay/config.h"
#include "relay/log.h"
#include "relay/ops.h"
#include "relay/server.h"

namespace {

constexpr const char* usage =
    "usage: bunny [--config FILE] [--set dotted.key=value]... [--check-config]\n"
    "\n"
    "  --config FILE     JSON configuration file\n"
    "  --set KEY=VALUE   override any key, e.g. concurrency=4 or queues=render,encode\n"
    "  --check-config    validate, print the effective configuration and exit\n"
    "\n"
    "Signals: SIGTERM/SIGINT drain (finish running jobs, deliver results, exit 0);\n"
    "SIGHUP reloads the client certificate now (it is also reloaded when its files change).\n";

int fail(const std::string& msg, int code = 2) {
  std::fprintf(stderr, "bunny: %s\n", msg.c_str());
  return code;
}

struct process {
  uv_loop_t* loop;
  relay::bunny::agent* agent;
  relay::net::listener* ops;
  uv_signal_t sigterm{}, sigint{}, sighup{};
};

}  // namespace

int main(int argc, char** argv) {
  // bunny re-executed as the guard of one exec handler: nothing of the
  // agent (allocator settings, log thread, loop) may start in that process.
  if (argc > 1 && std::string_view(argv[1]) == relay::bunny::guard_flag) return relay::bunny::run_guard(argc, argv);
  relay::bunny::keep_freed_memory_while_busy();
  std::optional<std::string> config_file;
  relay::config::override_list overrides;
  bool check_only = false;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      std::fputs(usage, stdout);
      return 0;
    } else if (arg == "--check-config") {
      check_only = true;
    } else if ((arg == "--config" || arg == "--set") && i + 1 < argc) {
      std::string v = argv[++i];
      if (arg == "--config") {
        config_file = v;
      } else if (std::string error; !relay::config::add_set_override(v, overrides, error)) {
        return fail(error);
      }
    } else {
      return fail("unknown or incomplete argument \"" + arg + "\"\n" + usage);
    }
  }
  relay::config::bunny_config cfg;
  std::string error;
  if (!relay::config::load(config_file, overrides, cfg, error)) {
    // --check-config reports a bad configuration as before (exit 2); a start
    // that fails is exit 1 and one error line, like every start-up failure.
    if (check_only) return fail(error);
    relay::log::error("start_failed").str("reason", error);
    return 1;
  }
  if (check_only) {
    if (!relay::tls::context::make_client(relay::bunny::agent::tls_options(cfg), error)) return fail(error, 1);
    std::fputs(relay::config::to_json(cfg).c_str(), stdout);
    return 0;
  }
  relay::log::set_min_level(relay::log::parse_level(cfg.log.level));
  std::signal(SIGPIPE, SIG_IGN);

  uv_loop_t loop;
  uv_loop_init(&loop);
  int rc = 0;
  {
    relay::ops::registry metrics;
    // The log buffer is the process's; its losses are reported with bunny's figures.
    metrics.add_collector([](std::string& out) {
      relay::ops::registry::write_header(
          out, "bunny_log_lines_dropped_total",
          "Log lines dropped because stderr was not read fast enough (the log buffer was full).", "counter");
      out += "bunny_log_lines_dropped_total " + std::to_string(relay::log::dropped_lines()) + "\n";
    });
    relay::bunny::agent agent(&loop, cfg, metrics);
    relay::ops::ops_handler ops_handler(metrics, [&agent] { return agent.readiness(); });
    relay::net::listener_options lo;
    lo.name = "ops";
    lo.address = cfg.ops_listen;
    lo.conn.http.max_body_bytes = 0;
    lo.max_connections = 64;
    relay::net::listener ops(&loop, lo, ops_handler, metrics);
    process p{&loop, &agent, &ops};

    auto close_all = [&p] {
      p.ops->close();
      for (uv_signal_t* s : {&p.sigterm, &p.sigint, &p.sighup}) uv_close(reinterpret_cast<uv_handle_t*>(s), nullptr);
    };
    agent.on_stopped = close_all;
    for (auto [sig, num] : {std::pair{&p.sigterm, SIGTERM}, {&p.sigint, SIGINT}, {&p.sighup, SIGHUP}}) {
      uv_signal_init(&loop, sig);
      sig->data = &p;
      uv_signal_start(sig, [](uv_signal_t* s, int signum) {
        auto* pp = static_cast<process*>(s->data);
        if (signum == SIGHUP) pp->agent->reload_tls();
        else pp->agent->begin_drain();
      }, num);
    }
    if (!ops.start(error) || !agent.start(error)) {
      relay::log::error("start_failed").str("reason", error);
      rc = 1;
      agent.begin_drain();
    }
    uv_run(&loop, UV_RUN_DEFAULT);
  }
  if (uv_loop_close(&loop) != 0) relay::log::warn("loop_not_closed_cleanly");
  return rc;
}
