// bunny's agent: leases jobs from relay, runs them through the handler and
// hands the outcomes back.
//
// Two connections to relay: one carries only the long-polling lease request
// (so that at most one request is parked on relay per idle bunny), the other
// carries heartbeats and results, which must never wait behind a parked poll.
// The lease asks for as many jobs as there are free slots, so a busy bunny
// never holds more leases than it can run.
#pragma once

#include <uv.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <unordered_map>

#include "bunny/handler.h"
#include "relay/config.h"
#include "relay/http_client.h"
#include "relay/metrics.h"
#include "relay/tls.h"

namespace relay::bunny {

class agent {
 public:
  agent(uv_loop_t* loop, config::bunny_config cfg, ops::registry& metrics);
  agent(const agent&) = delete;
  agent& operator=(const agent&) = delete;
  ~agent();

  // Loads the TLS material, the API key and the handler, starts polling.
  bool start(std::string& error);
  // SIGTERM: stop leasing; running jobs get drain_timeout_ms to finish, then
  // are failed so relay gives them to another worker; outcomes are
  // delivered; then on_stopped runs.
  void begin_drain();
  // Rebuilds the client certificate context from the files now.
  void reload_tls();
  // Rereads api_key_file (a rotated key); on error the key in use stays.
  // Requests already sent keep the key they carry.
  bool load_api_key(std::string& error);
  // Empty when ready, else why not.
  std::string readiness() const;
  // bunny's client TLS settings from its configuration.
  static tls::client_options tls_options(const config::bunny_config& cfg);

  std::function<void()> on_stopped;

 private:
  class job_slot;
  friend class job_slot;

  http::client_conn* connection(http::client_conn*& slot);
  bool drop(http::client_conn*& slot);
  void poll();
  void on_leased(const http::client_error& error, http::client_response& r);
  void start_job(job_input input, std::string lease, int64_t expires_ms);
  void job_done(job_slot* j, outcome o);
  void deliver(job_slot* j);
  void finish_job(job_slot* j);
  void retry_poll_later();
  uint64_t backoff_ms(uint32_t failures);
  void transport_failed(const std::string& what, const http::client_error& error);
  void check_drained();
  void stop();
  static void on_file_change(uv_fs_poll_t* h, int status, const uv_stat_t* prev, const uv_stat_t* curr);

  uv_loop_t* _loop;
  config::bunny_config _cfg;
  std::vector<config::url> _urls;
  size_t _url_index = 0;
  std::shared_ptr<const tls::context> _tls;
  std::string _auth_header;  // "Authorization: Bearer …\r\n" or empty; never logged
  std::unique_ptr<handler> _handler;

  http::client_conn* _poll_conn = nullptr;
  http::client_conn* _ctl_conn = nullptr;
  bool _polling = false;
  size_t _queue_index = 0;
  size_t _empty_streak = 0;
  uint32_t _poll_failures = 0;
  uv_timer_t _poll_timer{};
  uv_timer_t _drain_timer{};
  uv_fs_poll_t _cert_watch{}, _key_watch{}, _api_key_watch{};
  bool _connected = false;
  std::string _last_error;

  std::unordered_map<std::string, job_slot*> _jobs;
  size_t _running = 0;
  bool _draining = false;
  bool _stopped = false;
  bool _handles_open = false;  // start() initialised the timers and watches
  bool _started_ok = false;    // start() succeeded
  uint64_t _rng;

  ops::counter& _started;
  ops::counter& _succeeded;
  ops::counter& _failed;
  ops::counter& _timed_out;
  ops::counter& _lease_lost;
  ops::counter& _abandoned;
  ops::counter& _reconnects;
  ops::counter& _tls_reloads;
  ops::histogram& _duration;
  ops::gauge& _running_gauge;
  ops::gauge& _connected_gauge;
  ops::gauge& _exposed_secrets;
};

}  // namespace relay::bunny
