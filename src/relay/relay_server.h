// Wiring for the relay process: configuration → TLS context, policy, queue
// core, API service, listeners and signals. No request logic lives here.
#pragma once

#include <uv.h>

#include <array>
#include <memory>
#include <string>

#include "api/service.h"
#include "relay/blob_store.h"
#include "relay/api_keys.h"
#include "relay/auth.h"
#include "relay/config.h"
#include "relay/journal_postgres.h"
#include "relay/metrics.h"
#include "relay/ops.h"
#include "relay/queue.h"
#include "relay/server.h"
#include "relay/tls.h"

namespace relay {

class relay_server {
 public:
  relay_server(uv_loop_t* loop, config::relay_config cfg, bool repair_journal = false);
  relay_server(const relay_server&) = delete;
  relay_server& operator=(const relay_server&) = delete;
  ~relay_server();

  // Loads TLS material and the policy, binds both listeners. On failure
  // returns false with `error` naming the file or address.
  bool start(std::string& error);
  // SIGTERM: stop accepting, answer parked requests, let in-flight requests
  // finish (up to limits.drain_timeout_ms), then close everything.
  void begin_drain();
  // SIGHUP, or a change to one of their files: rebuild the TLS context and
  // policy aside and swap them in; on any error keep the ones in use. The
  // API keys are reloaded the same way, independently of the rest.
  void reload();
  // Closes everything now; the loop then runs out of handles and returns.
  void stop();

  // Validates what start() would load, without binding anything.
  static bool check(const config::relay_config& cfg, std::string& error);

  // After the loop has run out: true if this relay lost the leadership of
  // its shard and must start over as a standby (main re-executes itself:
  // a fresh process, no state from the time it led).
  bool restart_as_standby() const { return _restart; }
  // The exit code once the loop has run out (start-up failures aside).
  int exit_code() const { return _exit_code; }

 private:
  static void on_signal(uv_signal_t* s, int signum);
  static void on_file_change(uv_fs_poll_t* h, int status, const uv_stat_t*, const uv_stat_t*);
  void watch_files();
  // Rereads auth.api_keys (in the key modes); a bad file keeps the keys in
  // use and is logged and audited as a refused reload.
  void reload_api_keys();
  static void on_drain_tick(uv_timer_t* t);
  std::string readiness() const;
  bool open_journal(std::string& error);
  // After replay: checks held jobs' blob references, sweeps orphan files,
  // and opens the blob store (file backend).
  bool open_blobs(std::string& error);
  bool make_blobs_dir(std::string& error);
  std::string blobs_dir() const { return _cfg.journal.dir + "/blobs"; }
  // Opens the API listener and announces the relay as serving.
  bool serve(std::string& error);
  // The postgres backend: start as a standby; lead once the shard is ours.
  bool start_standby(std::string& error);
#if RELAY_WITH_POSTGRES
  void lead(uint64_t epoch);
  // Leadership is lost: acknowledge nothing more, answer 503, stop, and
  // have main start over as a standby.
  void step_down(const std::string& reason);
  static void on_lease_tick(uv_timer_t* t);
#endif
  // What a reload swaps in, as the audit stream names it.
  struct fingerprints {
    std::string cert, client_ca, crl, policy;
  };
  fingerprints fingerprint(const tls::context& ctx) const;
  // Warns (log and relay_secret_files_exposed) about key files open to
  // others; at start and on every reload.
  void check_secret_modes();
  static void on_compact_tick(uv_timer_t* t);
  static void on_ticket_tick(uv_timer_t* t);
  void compact_step();

  uv_loop_t* _loop;
  config::relay_config _cfg;
  ops::registry _metrics;
  std::shared_ptr<const tls::context> _tls;
  std::shared_ptr<const auth::policy> _policy;
  fingerprints _loaded;
  std::shared_ptr<const auth::api_keys> _api_keys;  // null in mtls mode
  std::unique_ptr<queue::broker> _broker;
  std::unique_ptr<journal::backend> _journal;
  // Spilled payloads and results (file backend only).
  std::unique_ptr<journal::blob_store> _blobs;
  // The postgres backend (null with files): leadership, and its deadline,
  // past which nothing is acknowledged.
#if RELAY_WITH_POSTGRES
  journal::postgres::deadline _lease_deadline;
  std::unique_ptr<journal::postgres::leadership> _leadership;
  journal::postgres::journal* _shared_journal = nullptr;  // _journal, when it is PostgreSQL
#endif
  uv_timer_t _lease_timer{};
  bool _lost = false;     // step_down() ran
  bool _restart = false;  // ... and the process starts over as a standby
  bool _signals_held = false;  // stop() blocked the stop signals for the restart
  int _exit_code = 0;
  uint64_t _drain_limit_ms = 0;
  bool _repair_journal;
  uv_timer_t _compact_timer{};
  // Compaction in progress: the segment it started and the ids still to copy.
  uint64_t _compact_segment = 0;
  std::vector<queue::job_id> _compact_ids;
  size_t _compact_next = 0;
  uint64_t _compact_bytes_before = 0;
  std::unique_ptr<api::service> _api;
  std::unique_ptr<ops::ops_handler> _ops;
  std::unique_ptr<net::listener> _api_listener;
  std::unique_ptr<net::listener> _ops_listener;
  uv_signal_t _sigterm{}, _sigint{}, _sighup{};
  // cert, key, client CA, CRL, policy, API keys
  std::array<uv_fs_poll_t, 6> _file_watches{};
  size_t _file_watch_count = 0;
  // One reload for files that change together (a Secret swap, a key and
  // its certificate written one after the other).
  uv_timer_t _reload_settle{};
  // Replaces the session ticket keys every tls.session_lifetime_ms.
  uv_timer_t _ticket_timer{};
  uv_timer_t _drain_timer{};
  uint64_t _drain_started = 0;
  bool _draining = false;
  bool _stopped = false;
  // start() initialised the signals and timers (stop() closes them).
  bool _handles_open = false;
  ops::counter& _reloads_ok;
  ops::counter& _reloads_failed;
  ops::counter& _compactions;
  ops::gauge& _exposed_secrets;
  ops::gauge& _api_keys_gauge;
};

}  // namespace relay
