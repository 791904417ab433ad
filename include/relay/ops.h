// The plain-HTTP ops listener's handler: /healthz, /readyz, /metrics.
// It never serves job data, so it can be exposed to the monitoring
// namespace without exposing the queue.
#pragma once

#include <functional>
#include <string>
#include <string_view>

#include "relay/metrics.h"
#include "relay/server.h"

namespace relay::ops {

class ops_handler final : public net::request_handler {
 public:
  // `ready` returns an empty string when ready, else why not.
  ops_handler(registry& metrics, std::function<std::string()> ready)
      : _metrics(metrics), _ready(std::move(ready)) {}
  void on_request(net::server_conn& conn, http::request& req) override;

 private:
  registry& _metrics;
  std::function<std::string()> _ready;
};

// Tells the service manager about a state change in systemd's notification
// protocol ("READY=1", "STOPPING=1", "STATUS=…", newline-separated), so that
// a Type=notify unit is started only once the process really serves. Sends
// one datagram to $NOTIFY_SOCKET without blocking; without that variable it
// does nothing and returns false, as it does when the send fails (the
// manager then sees no readiness, which a unit timeout reports).
bool notify_service_manager(std::string_view state);

// Makes the allocator return large freed blocks to the system at once
// (glibc otherwise keeps them: see allocator.cpp), so that RSS follows what
// is held. Call first thing in main(), before anything is allocated.
void return_freed_memory_promptly();

}  // namespace relay::ops
