#include "relay/relay_server.h"

#include <pthread.h>
#include <sys/resource.h>
#include <sys/stat.h>

#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <cstring>
#include <chrono>
#include <cstdio>

#include "relay/audit.h"
#include "relay/log.h"

namespace relay {
namespace {

tls::server_options tls_options(const config::relay_config& cfg) {
  tls::server_options o;
  o.cert_file = cfg.tls.cert;
  o.key_file = cfg.tls.key;
  o.client_ca_file = cfg.tls.client_ca;
  o.crl_file = cfg.tls.crl;
  o.min_version = cfg.tls.min_version;
  o.session_lifetime_ms = cfg.tls.session_lifetime_ms;
  o.require_client_cert = cfg.auth.mode != "api_key";
  return o;
}

bool uses_api_keys(const config::relay_config& cfg) { return cfg.auth.mode != "mtls"; }

// A key whose principal the policy does not name authenticates but is
// denied everything; worth a line, not a refusal (the policy and the keys
// reload separately, and one may run ahead of the other).
void warn_unknown_principals(const auth::api_keys& keys, const auth::policy& policy) {
  for (const auth::api_key& k : keys.keys())
    if (!policy.principal_named(k.principal))
      log::warn("api_key_unknown_principal").str("key_id", k.id).str("principal", k.principal);
}

// Start-up errors name the configuration key as well as the file, so that
// the operator knows which setting to fix; what the TLS library or the policy
// parser says about a file's content follows from their own loaders.
bool check_files(const config::relay_config& cfg, std::string& error) {
  using config::readable_file;
  return readable_file("tls.cert", cfg.tls.cert, error) && readable_file("tls.key", cfg.tls.key, error) &&
         readable_file("tls.client_ca", cfg.tls.client_ca, error) &&
         (!cfg.tls.crl || readable_file("tls.crl", *cfg.tls.crl, error)) && readable_file("policy", cfg.policy, error) &&
         (!uses_api_keys(cfg) || readable_file("auth.api_keys", *cfg.auth.api_keys, error));
}

// Why journal.backend "postgres" cannot run in this build.
std::string no_postgres_backend() {
  return "journal.backend \"postgres\" needs a relay built with -Dtls=openssl (libpq links OpenSSL 3, which must not "
         "share a process with BoringSSL; see docs/ha.md); this relay was built with " +
         std::string(tls::library_version());
}

// SHA-256 of a file's bytes; empty if it cannot be read (a reload that got
// this far has just read it).
std::string file_sha256(const std::string& path) {
  std::string text, error;
  return config::read_file(path, text, error) ? tls::sha256_hex(text) : std::string();
}

// How long watched files must stay unchanged before they are reloaded.
constexpr uint64_t reload_settle_ms = 200;

net::conn_options conn_options(const config::relay_config& cfg) {
  net::conn_options o;
  o.http.max_body_bytes = cfg.limits.max_body_bytes;
  o.http.max_header_bytes = cfg.limits.max_header_bytes;
  o.http.max_uri_bytes = cfg.limits.max_uri_bytes;
  o.header_timeout_ms = static_cast<uint32_t>(cfg.limits.header_timeout_ms);
  o.idle_timeout_ms = static_cast<uint32_t>(cfg.limits.idle_timeout_ms);
  o.handshake_timeout_ms = static_cast<uint32_t>(cfg.limits.handshake_timeout_ms);
  o.min_body_rate = cfg.limits.min_body_rate_bytes_per_s;
  o.max_pending_output = cfg.limits.max_pending_output_bytes;
  o.linger.total_ms = static_cast<uint32_t>(cfg.limits.lingering_time_ms);
  o.linger.between_ms = static_cast<uint32_t>(cfg.limits.lingering_timeout_ms);
  o.max_age_ms = cfg.limits.max_connection_age_ms;
  return o;
}

}  // namespace

relay_server::relay_server(uv_loop_t* loop, config::relay_config cfg, bool repair_journal)
    : _loop(loop),
      _cfg(std::move(cfg)),
      _repair_journal(repair_journal),
      _reloads_ok(_metrics.get_counter("relay_reloads_total", "Reloads of TLS material and policy (SIGHUP or a file change).",
                                       "result=\"ok\"")),
      _reloads_failed(_metrics.get_counter("relay_reloads_total", "Reloads of TLS material and policy (SIGHUP or a file change).",
                                           "result=\"failed\"")),
      _compactions(_metrics.get_counter("relay_journal_compactions_total", "Journal compactions completed.")),
      _exposed_secrets(_metrics.get_gauge("relay_secret_files_exposed",
                                          "Secret files (tls.key, auth.api_keys) readable by any user or writable by their group.")),
      _api_keys_gauge(_metrics.get_gauge("relay_api_keys", "API keys loaded (auth.api_keys), expired ones included.")) {
  // The log buffer is the process's; its losses are reported with relay's figures.
  _metrics.add_collector([](std::string& out) {
    ops::registry::write_header(out, "relay_log_lines_dropped_total",
                                "Log lines dropped because stderr was not read fast enough (the log buffer was full).",
                                "counter");
    out += "relay_log_lines_dropped_total " + std::to_string(log::dropped_lines()) + "\n";
    ops::registry::write_header(out, "relay_audit_lines_dropped_total",
                                "Audit lines dropped because audit.path was not written fast enough (its buffer was full).",
                                "counter");
    out += "relay_audit_lines_dropped_total " + std::to_string(audit::dropped_lines()) + "\n";
    ops::registry::write_header(out, "relay_audit_reopens_total",
                                "Times the audit file was reopened (SIGHUP, or its path moved).", "counter");
    out += "relay_audit_reopens_total " + std::to_string(audit::reopens()) + "\n";
  });
}

relay_server::~relay_server() = default;

bool relay_server::check(const config::relay_config& cfg, std::string& error) {
  if (!check_files(cfg, error)) return false;
  if (cfg.journal.backend == "postgres") {
    if (!journal::postgres::available) {
      error = no_postgres_backend();
      return false;
    }
    std::string dsn;
    if (!config::read_file(*cfg.journal.postgres.dsn_file, dsn, error)) {
      error = "journal.postgres.dsn_file " + error;
      return false;
    }
    if (dsn.find_first_not_of(" \t\r\n") == std::string::npos) {
      error = "journal.postgres.dsn_file " + *cfg.journal.postgres.dsn_file +
              " is empty; it must hold a libpq connection string";
      return false;
    }
#if RELAY_WITH_POSTGRES
    while (std::isspace(static_cast<unsigned char>(dsn.back()))) dsn.pop_back();
    if (!journal::postgres::valid_dsn(dsn, error)) {
      error = "journal.postgres.dsn_file " + *cfg.journal.postgres.dsn_file + " " + error;
      return false;
    }
#endif
  }
  if (!tls::context::make_server(tls_options(cfg), error)) return false;
  auto policy = auth::policy::load(cfg.policy, error);
  if (!policy) return false;
  if (uses_api_keys(cfg)) {
    auto keys = auth::api_keys::load(*cfg.auth.api_keys, error);
    if (!keys) return false;
    warn_unknown_principals(*keys, *policy);
  }
  return true;
}

bool relay_server::start(std::string& error) {
  // Every handle first, so that stop() can close them whatever fails below:
  // closing a handle that was never initialised aborts in libuv.
  for (auto [sig, num] : {std::pair{&_sigterm, SIGTERM}, {&_sigint, SIGINT}, {&_sighup, SIGHUP}}) {
    uv_signal_init(_loop, sig);
    sig->data = this;
    uv_signal_start(sig, on_signal, num);
  }
  for (uv_timer_t* t : {&_drain_timer, &_compact_timer, &_reload_settle, &_ticket_timer, &_lease_timer}) {
    uv_timer_init(_loop, t);
    t->data = this;
  }
  _handles_open = true;
  // First, so that every refusal from here on is in the audit stream.
  if (_cfg.audit.path && !audit::open(*_cfg.audit.path, error)) {
    error = "audit.path " + error;
    return false;
  }
  if (!check_files(_cfg, error)) return false;
  _tls = tls::context::make_server(tls_options(_cfg), error);
  if (!_tls) return false;
  _policy = auth::policy::load(_cfg.policy, error);
  if (!_policy) return false;
  _loaded = fingerprint(*_tls);
  check_secret_modes();
  if (uses_api_keys(_cfg)) {
    _api_keys = auth::api_keys::load(*_cfg.auth.api_keys, error);
    if (!_api_keys) return false;
    warn_unknown_principals(*_api_keys, *_policy);
    _api_keys_gauge.set(static_cast<int64_t>(_api_keys->keys().size()));
  } else if (_cfg.auth.api_keys) {
    log::warn("api_keys_ignored").str("reason", "auth.mode is mtls: no request is checked for a key");
  }

  queue::broker_limits limits;
  limits.max_jobs = _cfg.limits.max_jobs;
  limits.max_held_bytes = _cfg.limits.max_held_bytes;
  limits.max_queues = _cfg.limits.max_queues;
  limits.max_queue_depth = _cfg.limits.max_queue_depth;
  limits.result_ttl_ms = static_cast<queue::time_ms>(_cfg.limits.result_ttl_ms);
  _broker = std::make_unique<queue::broker>(limits, tls::random_bytes);
  bool shared = _cfg.journal.backend == "postgres";
  if (!shared && !open_journal(error)) return false;
  if (shared && !start_standby(error)) return false;
  api::authn_options authn;
  authn.mode = _cfg.auth.mode == "api_key"        ? api::authn_options::auth_mode::api_key
               : _cfg.auth.mode == "mtls+api_key" ? api::authn_options::auth_mode::mtls_and_api_key
                                                  : api::authn_options::auth_mode::mtls;
  authn.keys = [this] { return _api_keys; };
  authn.max_failures = static_cast<uint32_t>(_cfg.auth.max_failures);
  authn.failure_window_ms = _cfg.auth.failure_window_ms;
  _api = std::make_unique<api::service>(_loop, *_broker, [this] { return _policy; }, _metrics, _journal.get(),
                                        std::move(authn));
  _api->set_blob_store(_blobs.get());
  _ops = std::make_unique<ops::ops_handler>(_metrics, [this] { return readiness(); });

  net::listener_options ops_opts;
  ops_opts.name = "ops";
  ops_opts.address = _cfg.ops_listen;
  ops_opts.conn = conn_options(_cfg);
  ops_opts.conn.http.max_body_bytes = 0;
  // Probes and scrapes: few clients, no bodies. Its slots are protected by
  // eviction of silent connections rather than a per-address cap (kubelet
  // probes all come from the node's address).
  ops_opts.max_connections = 64;
  ops_opts.max_connections_per_ip = 64;
  _ops_listener = std::make_unique<net::listener>(_loop, ops_opts, *_ops, _metrics);
  if (!_ops_listener->start(error)) return false;
  watch_files();
  if (uint64_t every = _cfg.tls.session_lifetime_ms) uv_timer_start(&_ticket_timer, on_ticket_tick, every, every);
  if (shared) {
    // A standby: no API port until the shard is ours (the load balancer's
    // health check then finds only the leader).
    ops::notify_service_manager("READY=1\nSTATUS=standby");
    return true;
  }
  return serve(error);
}

bool relay_server::serve(std::string& error) {
  net::listener_options api_opts;
  api_opts.name = "api";
  api_opts.address = _cfg.listen;
  api_opts.tls = [this] { return _tls; };
  api_opts.conn = conn_options(_cfg);
  if (_cfg.limits.spill_threshold_bytes > 0) {
    api_opts.conn.spill_threshold = _cfg.limits.spill_threshold_bytes;
    api_opts.conn.spool_dir = blobs_dir();
  }
  api_opts.max_connections = _cfg.limits.max_connections;
  api_opts.max_connections_per_ip = _cfg.limits.max_connections_per_ip;
  api_opts.max_pending_body_bytes = _cfg.limits.max_pending_body_bytes;
  _api_listener = std::make_unique<net::listener>(_loop, api_opts, *_api, _metrics);
  if (!_api_listener->start(error)) return false;

  log::info("relay_started")
      .str("tls_library", tls::library_version())
      .str("journal_backend", _cfg.journal.backend)
      .str("journal_backends", journal::postgres::available ? "file,postgres" : "file")
      .str("policy", _cfg.policy)
      .num("policy_principals", static_cast<int64_t>(_policy->principal_count()))
      .str("auth_mode", _cfg.auth.mode)
      .num("api_keys", _api_keys ? static_cast<int64_t>(_api_keys->keys().size()) : 0);
  audit::event("started", log::level::info)
      .num("pid", static_cast<int64_t>(::getpid()))
      .str("tls_library", tls::library_version())
      .str("auth_mode", _cfg.auth.mode)
      .str("listen", _api_listener->address())
      .str("cert_sha256", _loaded.cert)
      .str("client_ca_sha256", _loaded.client_ca)
      .str("crl_sha256", _loaded.crl)
      .str("policy_sha256", _loaded.policy)
      .num("policy_principals", static_cast<int64_t>(_policy->principal_count()))
      .num("api_keys", _api_keys ? static_cast<int64_t>(_api_keys->keys().size()) : 0);
  // The journal is replayed and both listeners are open: a Type=notify unit
  // counts as started only now.
  ops::notify_service_manager("READY=1\nSTATUS=serving");
  return true;
}

// Spooled request values land here (issue 13). Owner-only: they are job
// data. An existing directory is made 0700 too, so that a umask or a hand
// that made it looser does not leave payloads readable.
bool relay_server::make_blobs_dir(std::string& error) {
  std::string dir = blobs_dir();
  if (::mkdir(dir.c_str(), 0700) != 0 && errno != EEXIST) {
    error = "journal.dir " + _cfg.journal.dir + ": cannot create " + dir + ": " + std::strerror(errno);
    return false;
  }
  struct stat st {};
  if (::stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    error = "journal.dir " + _cfg.journal.dir + ": " + dir + " is not a directory";
    return false;
  }
  if ((st.st_mode & 07777) != 0700 && ::chmod(dir.c_str(), 0700) != 0) {
    error = "journal.dir " + _cfg.journal.dir + ": cannot make " + dir + " 0700: " + std::strerror(errno);
    return false;
  }
  return true;
}

bool relay_server::open_journal(std::string& error) {
  journal::options o;
  o.dir = _cfg.journal.dir;
  o.fsync = _cfg.journal.fsync == "always" ? journal::fsync_mode::always
            : _cfg.journal.fsync == "batch" ? journal::fsync_mode::batch
                                            : journal::fsync_mode::off;
  o.batch_interval_ms = static_cast<uint32_t>(_cfg.journal.batch_interval_ms);
  o.segment_bytes = _cfg.journal.segment_bytes;
  auto writer = std::make_unique<journal::writer>(_loop, o, _metrics);
  // One relay per journal.dir, locked before replay: replay may cut a tail
  // that another relay is still writing.
  if (!writer->lock(error)) return false;
  // Replay first: nothing listens until the queues are what they were.
  auto t0 = std::chrono::steady_clock::now();
  journal::replay_result res;
  if (!journal::replay(_cfg.journal.dir, _repair_journal, [this](const queue::record& r) { return _broker->apply(r); },
                       res, error))
    return false;
  double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  _metrics.get_gauge("relay_journal_replay_milliseconds", "How long the last start-up replay took.")
      .set(static_cast<int64_t>(seconds * 1000));
  log::info("journal_replayed")
      .str("dir", _cfg.journal.dir)
      .num("segments", static_cast<int64_t>(res.segments))
      .num("records", static_cast<int64_t>(res.records))
      .num("bytes", static_cast<int64_t>(res.bytes))
      .num("jobs", static_cast<int64_t>(_broker->job_count()))
      .num("milliseconds", static_cast<int64_t>(seconds * 1000))
      .num("max_rss_kb", ru.ru_maxrss);
  if (res.skipped)
    log::info("journal_records_superseded")
        .num("records", static_cast<int64_t>(res.skipped))
        .str("why", "records written before a compaction snapshot of the same job; the snapshot holds their effect");
  if (!res.note.empty()) log::warn(res.truncated ? "journal_tail_truncated" : "journal_repaired").str("detail", res.note);

  if (!writer->open(res.next_segment, error)) {
    // E.g. an existing directory relay may not write in.
    if (error.rfind("journal.dir", 0) != 0) error = "journal.dir " + _cfg.journal.dir + ": " + error;
    return false;
  }
  _broker->set_sink(writer.get());
  _journal = std::move(writer);
  // Every segment starts with the id counter, so ids are never reused even
  // after compaction deletes the segments that handed them out.
  _journal->append(_broker->meta_record(api::service::now()));
  // Leases that ran out while relay was down expire now, as records.
  _broker->advance(api::service::now());
  if (!open_blobs(error)) return false;
  uv_timer_start(&_compact_timer, on_compact_tick, 1000, 1000);
  return true;
}

bool relay_server::open_blobs(std::string& error) {
  std::string dir = blobs_dir();
  if (!make_blobs_dir(error)) return false;
  // Enough for the largest single answer and a few more in flight; one is
  // always let through whatever its size.
  constexpr size_t max_reading_bytes = size_t{512} << 20;
  _blobs = std::make_unique<journal::blob_store>(_loop, dir, max_reading_bytes, _metrics);
  // Every job still held after replay and advance must be able to show its
  // values. In always mode a record was written only after its blob file
  // was synced, so a missing or short file of an unfinished job is
  // corruption. Two cases are not: in batch and off modes the file may be
  // part of the window a crash is allowed to lose, so the job goes, as its
  // records could have; and a finished job's files are deleted once its
  // result retention ends, which a replay under a longer
  // limits.result_ttl_ms (or a clock set back) does not reproduce -- that
  // job was already forgotten, and is again.
  bool always = _cfg.journal.fsync == "always";
  struct lost_job {
    queue::job_id id;
    bool finished;
    std::string why;
  };
  std::vector<lost_job> lost;
  _broker->for_each_blob_ref([&](const queue::job& j, const queue::blob_ref& r) {
    std::string why = _blobs->check(r);
    if (!why.empty() && (lost.empty() || lost.back().id != j.id))
      lost.push_back({j.id, queue::is_terminal(j.state), std::move(why)});
  });
  for (const auto& l : lost) {
    std::string job = queue::format_job_id(l.id);
    if (always && !l.finished && !_repair_journal) {
      error = "journal " + _cfg.journal.dir + " is corrupt: job " + job + " names a blob file that cannot hold its value (" +
              l.why + "); with journal.fsync always that file was synced before the record. Start with "
              "--repair-journal to drop the job.";
      return false;
    }
    log::warn("blob_missing_job_dropped")
        .str("job", job)
        .str("problem", l.why)
        .str("why", l.finished ? "a finished job whose retention ended before (its files were deleted then)"
                    : always   ? "--repair-journal"
                               : "journal.fsync " + _cfg.journal.fsync + " may lose the last window");
    _broker->drop(l.id);
  }
  // Files no held job names: uploads a crash cut off, jobs forgotten while
  // relay was down. Deleted before serving, so disk follows live data.
  size_t swept = _blobs->sweep([this](uint64_t file) { return _broker->blob_referenced(file); });
  log::info("blobs_checked")
      .str("dir", dir)
      .num("files", static_cast<int64_t>(_broker->blob_files()))
      .num("bytes", static_cast<int64_t>(_broker->referenced_bytes()))
      .num("jobs_dropped", static_cast<int64_t>(lost.size()))
      .num("orphans_deleted", static_cast<int64_t>(swept));
  // A file goes only once everything journaled before its last reference
  // went is durable: the writer may still have to sync it for a batch
  // that names it (a job forgotten while the writer lags or retries), and
  // a sync of a deleted file would fail the journal for good. If that
  // durability fails, the file stays; the next start's sweep removes it.
  _broker->on_blob_unreferenced([this](uint64_t file) {
    _journal->when_durable([this, file](bool ok) {
      if (ok && _blobs) _blobs->release(file);
    });
  });
  return true;
}

#if RELAY_WITH_POSTGRES
namespace {

// Who this relay is in relay_leader.holder and the log: host, PID and a
// random part (a restarted process on the same host is someone else).
std::string holder_name() {
  char host[256] = {};
  ::gethostname(host, sizeof host - 1);
  uint8_t r[4];
  tls::random_bytes(r, sizeof r);
  char tail[16];
  std::snprintf(tail, sizeof tail, "%02x%02x%02x%02x", r[0], r[1], r[2], r[3]);
  return std::string(host) + "/" + std::to_string(::getpid()) + "/" + tail;
}

}  // namespace

bool relay_server::start_standby(std::string& error) {
  if (_repair_journal) {
    error = "--repair-journal cuts segment files (journal.backend \"file\"); a corrupt PostgreSQL journal row is "
            "dealt with in the database (see docs/ha.md)";
    return false;
  }
  journal::postgres::options o;
  const std::string& dsn_file = *_cfg.journal.postgres.dsn_file;
  if (!config::read_file(dsn_file, o.dsn, error)) {
    error = "journal.postgres.dsn_file " + error;
    return false;
  }
  while (!o.dsn.empty() && std::isspace(static_cast<unsigned char>(o.dsn.back()))) o.dsn.pop_back();
  if (o.dsn.empty()) {
    error = "journal.postgres.dsn_file " + dsn_file + " is empty; it must hold a libpq connection string";
    return false;
  }
  if (!journal::postgres::valid_dsn(o.dsn, error)) {
    error = "journal.postgres.dsn_file " + dsn_file + " " + error;
    return false;
  }
  o.shard = _cfg.journal.postgres.shard;
  o.lease_ms = static_cast<uint32_t>(_cfg.journal.postgres.lease_ms);
  o.renew_ms = static_cast<uint32_t>(_cfg.journal.postgres.renew_ms);
  o.max_batch_records = static_cast<uint32_t>(_cfg.journal.postgres.max_batch_records);
  o.holder = holder_name();
  auto j = std::make_unique<journal::postgres::journal>(_loop, o, _lease_deadline, _metrics);
  _shared_journal = j.get();
  _shared_journal->on_fenced([this](const std::string& reason) { step_down(reason); });
  _journal = std::move(j);
  journal::postgres::leadership::callbacks cb;
  cb.on_acquired = [this](uint64_t epoch) { lead(epoch); };
  cb.on_lost = [this](const std::string& reason) { step_down(reason); };
  _leadership = std::make_unique<journal::postgres::leadership>(_loop, o, _lease_deadline, _metrics, std::move(cb));
  log::info("standby")
      .str("shard", o.shard)
      .str("holder", o.holder)
      .num("lease_ms", o.lease_ms)
      .num("renew_ms", o.renew_ms);
  _leadership->start();
  return true;
}

void relay_server::lead(uint64_t epoch) {
  if (_draining || _stopped) return;
  auto t0 = std::chrono::steady_clock::now();
  // From here the deadline is checked on every turn: past it, step down
  // before any request is read (timers run before I/O in each iteration).
  uint64_t every = std::max<uint64_t>(10, std::min<uint64_t>(100, _cfg.journal.postgres.renew_ms / 4));
  uv_timer_start(&_lease_timer, on_lease_tick, every, every);
  _shared_journal->open(
      epoch, [this](const queue::record& r) { return _broker->apply(r); },
      [this, t0, epoch](const std::string& error, const journal::postgres::journal::replayed& res) {
        if (!error.empty()) {
          if (res.corrupt) {
            // Leading on a corrupt journal would lose what is past the bad row.
            log::error("start_failed").str("reason", error);
            _exit_code = 1;
            stop();
          } else {
            step_down(error);
          }
          return;
        }
        double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        _metrics.get_gauge("relay_journal_replay_milliseconds", "How long the last start-up replay took.")
            .set(static_cast<int64_t>(seconds * 1000));
        log::info("journal_replayed")
            .str("backend", "postgres")
            .str("shard", _cfg.journal.postgres.shard)
            .num("epoch", static_cast<int64_t>(epoch))
            .num("rows", static_cast<int64_t>(res.rows))
            .num("records", static_cast<int64_t>(res.run.records))
            .num("bytes", static_cast<int64_t>(res.bytes))
            .num("jobs", static_cast<int64_t>(_broker->job_count()))
            .num("milliseconds", static_cast<int64_t>(seconds * 1000));
        _broker->set_sink(_journal.get());
        _journal->append(_broker->meta_record(api::service::now()));
        _broker->advance(api::service::now());
        uv_timer_start(&_compact_timer, on_compact_tick, 1000, 1000);
        std::string serve_error;
        if (!serve(serve_error)) {
          log::error("start_failed").str("reason", serve_error);
          _exit_code = 1;
          stop();
        }
      });
}

void relay_server::on_lease_tick(uv_timer_t* t) {
  auto* self = static_cast<relay_server*>(t->data);
  if (!self->_lease_deadline.valid())
    self->step_down("the leadership lease ran out with no renewal: the database was out of reach, or this process "
                    "was paused");
}

void relay_server::step_down(const std::string& reason) {
  if (_lost || _stopped) return;
  _lost = true;
  // Told to stop already (SIGTERM): finish stopping, do not come back.
  _restart = !_draining;
  log::error("leadership_lost")
      .str("shard", _cfg.journal.postgres.shard)
      .num("epoch", static_cast<int64_t>(_leadership ? _leadership->epoch() : 0))
      .str("reason", reason)
      .str("effect", _restart ? "nothing more is acknowledged; restarting as a standby"
                              : "nothing more is acknowledged; stopping as told");
  audit::event("leadership_lost", log::level::error).str("shard", _cfg.journal.postgres.shard).str("reason", reason);
  uv_timer_stop(&_lease_timer);
  uv_timer_stop(&_compact_timer);
  // Every waiting answer becomes a 503 (its change may or may not be
  // committed: clients retry, producers with their idempotency keys).
  _shared_journal->fence(reason);
  _broker->set_sink(nullptr);
  if (!_api_listener) {
    stop();
    return;
  }
  // A short drain, so that the 503s reach their clients; every request
  // that still arrives is refused (the journal no longer serves).
  _drain_limit_ms = 1000;
  if (_draining) _drain_started = std::min(_drain_started, uv_now(_loop));
  else begin_drain();
}
#else
bool relay_server::start_standby(std::string& error) {
  error = no_postgres_backend();
  return false;
}
#endif

void relay_server::on_compact_tick(uv_timer_t* t) {
  auto* self = static_cast<relay_server*>(t->data);
  if (self->_compact_segment) {
    self->compact_step();
    return;
  }
  // Compact when the journal is large both in absolute terms and against
  // what is live (payloads, results and per-job overhead).
  // Values kept in blob files are not in the journal (snapshots carry
  // their references): they do not count towards what it should hold.
  uint64_t live = self->_broker->held_bytes() - self->_broker->referenced_bytes() + self->_broker->job_count() * 160;
  uint64_t disk = self->_journal->disk_bytes();
  if (disk < self->_cfg.journal.compact_min_bytes || disk < 2 * live) return;
  self->_compact_bytes_before = disk;
  self->_compact_segment = self->_journal->roll();
  self->_journal->append(self->_broker->meta_record(api::service::now()));
  self->_compact_ids = self->_broker->job_ids();
  self->_compact_next = 0;
  log::info("journal_compaction_started")
      .num("bytes", static_cast<int64_t>(disk))
      .num("live_jobs", static_cast<int64_t>(self->_compact_ids.size()));
  // Copy in slices so that the loop keeps serving requests meanwhile.
  uv_timer_start(t, on_compact_tick, 0, 1);
}

void relay_server::compact_step() {
  // A job's snapshot holds every change made to it so far; changes made
  // later follow it in the journal. A job forgotten meanwhile is skipped.
  constexpr size_t slice = 20000;
  size_t end = std::min(_compact_next + slice, _compact_ids.size());
  for (; _compact_next < end; ++_compact_next)
    if (const queue::job* j = _broker->find(_compact_ids[_compact_next])) _journal->append(_broker->snapshot_of(*j));
  if (_compact_next < _compact_ids.size()) return;
  _journal->delete_before(_compact_segment);
  _compactions.inc();
  log::info("journal_compaction_finished")
      .num("bytes_before", static_cast<int64_t>(_compact_bytes_before))
      .num("jobs_copied", static_cast<int64_t>(_compact_ids.size()));
  _compact_segment = 0;
  _compact_ids.clear();
  _compact_ids.shrink_to_fit();
  uv_timer_start(&_compact_timer, on_compact_tick, 1000, 1000);
}

std::string relay_server::readiness() const {
  if (_lost) return _restart ? "leadership lost: restarting as a standby" : "leadership lost: stopping";
  if (_draining) return "draining";
#if RELAY_WITH_POSTGRES
  // A standby, or a leader still replaying: the API port is not open.
  if (_leadership && !_api_listener) return _leadership->standby_status();
#endif
  if (_journal && !_journal->accepting())
    return "journal cannot take writes: " + (_journal->failure().empty() ? std::string("behind") : _journal->failure());
  if (!_tls) return "TLS material not loaded";
  if (!_policy) return "policy not loaded";
  return {};
}

void relay_server::on_signal(uv_signal_t* s, int signum) {
  auto* self = static_cast<relay_server*>(s->data);
  if (signum == SIGHUP) {
    self->reload();
    return;
  }
  // Told to stop: a leader stepping down does so, but does not come back.
  self->_restart = false;
  self->begin_drain();
}

void relay_server::watch_files() {
  if (_cfg.tls.reload_check_ms == 0) return;
  std::vector<const std::string*> paths{&_cfg.tls.cert, &_cfg.tls.key, &_cfg.tls.client_ca, &_cfg.policy};
  if (_cfg.tls.crl) paths.push_back(&*_cfg.tls.crl);
  if (uses_api_keys(_cfg)) paths.push_back(&*_cfg.auth.api_keys);
  // Polling stat() rather than inotify: Kubernetes updates a mounted Secret
  // by swapping a symlinked directory, which a watch on the file misses.
  for (const std::string* path : paths) {
    uv_fs_poll_t* w = &_file_watches[_file_watch_count++];
    uv_fs_poll_init(_loop, w);
    w->data = this;
    uv_fs_poll_start(w, on_file_change, path->c_str(), static_cast<unsigned>(_cfg.tls.reload_check_ms));
  }
}

void relay_server::on_file_change(uv_fs_poll_t* h, int status, const uv_stat_t*, const uv_stat_t*) {
  auto* self = static_cast<relay_server*>(h->data);
  if (status < 0) {
    // Gone or unreadable: keep serving with what is loaded; the next change
    // (the file coming back) reloads.
    char path[4096];
    size_t len = sizeof path;
    log::warn("watched_file_unreadable")
        .str("path", uv_fs_poll_getpath(h, path, &len) == 0 ? std::string(path, len) : std::string())
        .str("reason", uv_strerror(status));
    return;
  }
  uv_timer_start(&self->_reload_settle, [](uv_timer_t* t) { static_cast<relay_server*>(t->data)->reload(); },
                 reload_settle_ms, 0);
}

relay_server::fingerprints relay_server::fingerprint(const tls::context& ctx) const {
  fingerprints f;
  f.cert = ctx.own_certificate().sha256;
  f.client_ca = file_sha256(_cfg.tls.client_ca);
  if (_cfg.tls.crl) f.crl = file_sha256(*_cfg.tls.crl);
  f.policy = file_sha256(_cfg.policy);
  return f;
}

void relay_server::reload() {
  // A rotated audit file is reopened with every reload (SIGHUP is what
  // logrotate's postrotate sends).
  audit::reopen();
  // The keys are reloaded on their own: a bad keys file must not hold back
  // a renewed certificate, nor a bad certificate a key revocation.
  reload_api_keys();
  std::string error;
  auto ctx = tls::context::make_server(tls_options(_cfg), error);
  auto pol = ctx ? auth::policy::load(_cfg.policy, error) : nullptr;
  if (!ctx || !pol) {
    _reloads_failed.inc();
    audit::event("reload_failed", log::level::error)
        .str("reason", error)
        .str("kept", "previous TLS material and policy");
    return;
  }
  // Live connections keep the context they were accepted with, but not a
  // certificate the new CA bundle or CRL refuses: the listener verifies
  // each again, from the loop, and closes those that fail.
  _tls = std::move(ctx);
  _policy = std::move(pol);
  _reloads_ok.inc();
  if (_api) _api->policy_changed();
  if (_api_listener) _api_listener->recheck_peers();
  fingerprints now = fingerprint(*_tls);
  audit::event("reloaded", log::level::info)
      .str("cert_sha256", now.cert)
      .boolean("cert_changed", now.cert != _loaded.cert)
      .str("client_ca_sha256", now.client_ca)
      .boolean("client_ca_changed", now.client_ca != _loaded.client_ca)
      .str("crl_sha256", now.crl)
      .boolean("crl_changed", now.crl != _loaded.crl)
      .str("policy_sha256", now.policy)
      .boolean("policy_changed", now.policy != _loaded.policy)
      .num("policy_principals", static_cast<int64_t>(_policy->principal_count()));
  _loaded = std::move(now);
  check_secret_modes();
}

void relay_server::check_secret_modes() {
  size_t exposed = 0;
  std::string warning;
  auto check = [&](std::string_view key, const std::string& path) {
    if (!config::exposed_secret(key, path, warning)) return;
    ++exposed;
    log::warn("secret_file_exposed").str("key", key).str("path", path).str("reason", warning);
  };
  check("tls.key", _cfg.tls.key);
  if (_cfg.auth.api_keys) check("auth.api_keys", *_cfg.auth.api_keys);
  if (_cfg.journal.postgres.dsn_file && _cfg.journal.backend == "postgres")
    check("journal.postgres.dsn_file", *_cfg.journal.postgres.dsn_file);
  _exposed_secrets.set(static_cast<int64_t>(exposed));
}

void relay_server::on_ticket_tick(uv_timer_t* t) {
  auto* self = static_cast<relay_server*>(t->data);
  // A ticket is resumable for at most one period of these keys (older
  // contexts, kept by live connections, issue no tickets after their
  // handshakes): a ticket that leaks is useless within a session lifetime.
  std::string error;
  if (self->_tls && !self->_tls->rotate_ticket_keys(error)) log::error("ticket_key_rotation_failed").str("reason", error);
}

void relay_server::reload_api_keys() {
  if (!uses_api_keys(_cfg)) return;
  std::string error;
  auto keys = auth::api_keys::load(*_cfg.auth.api_keys, error);
  if (!keys) {
    _reloads_failed.inc();
    log::error("reload_failed").str("reason", error).str("kept", "previous API keys");
    audit::event("reload_failed", log::level::error)
        .str("what", "api_keys")
        .str("reason", error)
        .str("kept", "previous API keys")
        .num("api_keys", _api_keys ? static_cast<int64_t>(_api_keys->keys().size()) : 0);
    return;
  }
  // Every reload rereads the file; only a change is worth an audit line.
  std::string previous = _api_keys ? _api_keys->file_sha256() : std::string();
  if (keys->file_sha256() == previous) return;
  if (_policy) warn_unknown_principals(*keys, *_policy);
  int64_t now = api::service::now();
  audit::event("reloaded", log::level::info)
      .str("what", "api_keys")
      .str("api_keys_sha256", keys->file_sha256())
      .str("previous_sha256", previous)
      .num("api_keys", static_cast<int64_t>(keys->keys().size()))
      .num("api_keys_expired", static_cast<int64_t>(keys->expired_at(now)));
  // Requests take the keys at their headers; in-flight requests finish
  // under the keys they were checked with, the next request is checked
  // against these.
  _api_keys = std::move(keys);
  _api_keys_gauge.set(static_cast<int64_t>(_api_keys->keys().size()));
  if (_api) _api->credentials_changed();
}

void relay_server::begin_drain() {
  if (_draining || !_api_listener) {
    // A second signal: stop waiting.
    stop();
    return;
  }
  _draining = true;
  _drain_started = uv_now(_loop);
  ops::notify_service_manager("STOPPING=1\nSTATUS=draining");
  log::info("draining").num("open_connections", static_cast<int64_t>(_api_listener->open_connections()));
  _api->drain();
  _api_listener->drain();
  uv_timer_start(&_drain_timer, on_drain_tick, 0, 20);
}

void relay_server::on_drain_tick(uv_timer_t* t) {
  auto* self = static_cast<relay_server*>(t->data);
  bool idle = self->_api_listener->open_connections() == 0;
  uint64_t limit = self->_drain_limit_ms ? self->_drain_limit_ms : self->_cfg.limits.drain_timeout_ms;
  bool late = uv_now(self->_loop) - self->_drain_started >= limit;
  if (idle || late) self->stop();
}

void relay_server::stop() {
  if (_stopped) return;
  if (_restart && !_signals_held) {
    // The handlers are about to close: from here to the new process's loop,
    // a SIGTERM must wait rather than kill or vanish (see main()). Only this
    // thread can take one: the others were started with them blocked. One
    // caught just before, still in libuv's pipe, is read in this turn's
    // poll, so the close waits for the next turn; if it was a SIGTERM,
    // on_signal() cancels the restart.
    _signals_held = true;
    sigset_t stop_signals;
    sigemptyset(&stop_signals);
    for (int sig : {SIGTERM, SIGINT, SIGHUP}) sigaddset(&stop_signals, sig);
    pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);
    uv_timer_start(&_drain_timer, [](uv_timer_t* t) { static_cast<relay_server*>(t->data)->stop(); }, 0, 0);
    return;
  }
  _stopped = true;
  if (_api_listener) {
    auto cut = static_cast<int64_t>(_api_listener->open_connections());
    log::info("stopped").num("connections_cut", cut);
    audit::event("stopped", log::level::info).num("pid", static_cast<int64_t>(::getpid())).num("connections_cut", cut);
  }
  if (_handles_open) {
    for (uv_timer_t* t : {&_drain_timer, &_compact_timer, &_reload_settle, &_ticket_timer, &_lease_timer}) {
      uv_timer_stop(t);
      uv_close(reinterpret_cast<uv_handle_t*>(t), nullptr);
    }
    for (uv_signal_t* s : {&_sigterm, &_sigint, &_sighup}) uv_close(reinterpret_cast<uv_handle_t*>(s), nullptr);
  }
  for (size_t i = 0; i < _file_watch_count; ++i) uv_close(reinterpret_cast<uv_handle_t*>(&_file_watches[i]), nullptr);
  if (_blobs) _blobs->close();  // reads in flight answer nobody now
  if (_api) _api->close();
  if (_api_listener) _api_listener->close();
  if (_ops_listener) _ops_listener->close();
  if (_journal) {
    _broker->set_sink(nullptr);
    _journal->close();  // writes and syncs what is left, then joins the writer thread
  }
#if RELAY_WITH_POSTGRES
  // After the last commit: a leader that stops in good order hands the
  // shard over at once rather than after its lease.
  // After a step-down too: the release is fenced by epoch and holder, and
  // the journal's thread has stopped, so it only spares the next leader
  // the wait for a lease that nobody renews.
  if (_leadership) _leadership->stop(true);
#endif
}

}  // namespace relay
