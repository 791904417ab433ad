// The plain-HTTP ops listener's handler: /healthz, /readyz, /metrics.
// It never serves job data, so it can be exposed to the monitoring
// namespace without exposing the queue.
#pragma once

#include <functional>
#include <string>

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

}  // namespace relay::ops
