// bunny's agent: leases jobs from relay, runs them through the handler and
// hands the outcomes back.
//
// Two connections to relay: one carries only the long-polling lease request
// (so that at most one request is parked on relay per idle bunny), the other
// carries heartbeats and results, which must never wait behind a parked poll.
// The lease asks for as many jobs as there are free slots, and for no more
// answer bytes than bunny will read, so a busy bunny never holds more leases
// than it can run and never drops an answer that would strand its jobs.
//
// Relay is not trusted: every lease answer is validated by the v1 client
// before any of it is used, and a job id leased again while an attempt of it
// is still here means that attempt's lease is gone: it is stopped, and the
// new attempt starts only once it has ended.
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
#include "relay/v1_client.h"

namespace relay::bunny {

// bunny's allocator policy (glibc), set once at start. A large job's
// buffers (relay's answer, the parse, the result, the TLS records) are
// tens of MiB that come and go with every job; served from mmap, each
// job's first touch of them page-faults 4 KiB at a time, which measured
// half of bunny's CPU per 16 MiB job. So blocks up to glibc's 32 MiB
// ceiling come from the heap and freed memory stays mapped while jobs run;
// the agent gives it back (malloc_trim) once it has been idle a while, so a
// quiet bunny does not keep its peak.
void keep_freed_memory_while_busy();
// Returns freed memory to the system (malloc_trim); what the agent calls
// when idle.
void give_back_freed_memory();

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

  // Requests go to the current relay address with the current certificate
  // and key; both clients follow a failover, a reload or a rotation.
  http::client_conn::options connection_options() const;
  // The most bytes bunny reads of one answer from relay; lease requests ask
  // relay to stay within it. A job of limits.max_job_bytes plus the
  // answer's own fields (id, lease, expiry: ~150 bytes a job), with room to
  // spare for fields a later relay may add. Reading an answer costs about
  // its size once more (validation; the payloads themselves are views, not
  // copies), so bunny's memory is sized by concurrency x max_job_bytes.
  static constexpr size_t answer_envelope_bytes = size_t{64} << 10;
  size_t max_answer_bytes() const { return static_cast<size_t>(_cfg.limits.max_job_bytes) + answer_envelope_bytes; }
  int64_t clamp_expiry(int64_t relay_ms) const;
  void reconnect(v1::client& c);
  void poll();
  void on_leased(const v1::error& e, v1::lease_answer& a, size_t asked);
  void start_job(job_input input, std::string lease, int64_t expires_ms);
  void run_job(job_slot* j);
  void job_done(job_slot* j, outcome o);
  void deliver(job_slot* j);
  void finish_job(job_slot* j);
  job_slot* find(uint64_t generation) const;
  void retry_poll_later();
  uint64_t backoff_ms(uint32_t failures);
  void transport_failed(const std::string& what, const v1::error& e);
  void relay_answered();
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

  // One carries only the long poll, the other heartbeats and results.
  std::unique_ptr<v1::client> _poll_client;
  std::unique_ptr<v1::client> _ctl_client;
  bool _polling = false;
  size_t _queue_index = 0;
  size_t _empty_streak = 0;
  uint32_t _poll_failures = 0;
  uv_timer_t _poll_timer{};
  uv_timer_t _drain_timer{};
  uv_timer_t _trim_timer{};  // gives freed memory back once no job has run for a while
  uv_fs_poll_t _cert_watch{}, _key_watch{}, _api_key_watch{};
  bool _connected = false;
  std::string _last_error;

  // Every slot by its generation, a number never reused: callbacks hold the
  // generation and find their own slot, or nothing once it is gone. One
  // attempt per job id at a time: _by_id names the newest slot of an id.
  std::unordered_map<uint64_t, job_slot*> _slots;
  std::unordered_map<std::string, job_slot*> _by_id;
  uint64_t _next_generation = 1;
  size_t _running = 0;   // slots holding a concurrency place (run started or waiting to start)
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
  ops::counter& _answers_rejected;
  ops::counter& _superseded;
  ops::histogram& _duration;
  ops::gauge& _running_gauge;
  ops::gauge& _connected_gauge;
  ops::gauge& _exposed_secrets;
};

}  // namespace relay::bunny
