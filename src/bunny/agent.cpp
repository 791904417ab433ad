#include "bunny/agent.h"

#ifdef __GLIBC__
#include <malloc.h>
#endif

#include <cstring>
#include <limits>
#include <ctime>

#include "relay/json.h"
#include "relay/json_read.h"
#include "relay/log.h"
#include "relay/ops.h"

namespace relay::bunny {
namespace {

int64_t wall_ms() {
  timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000 + ts.tv_nsec / 1000000;
}

// A result still undelivered this long after its lease expired belongs to a
// lease relay has certainly given up on.
constexpr int64_t lease_margin_ms = 1000;

// How long bunny keeps freed memory for the next job after the last ended.
constexpr uint64_t idle_trim_ms = 5000;

}  // namespace

void keep_freed_memory_while_busy() {
#ifdef __GLIBC__
  // 32 MiB is the largest threshold glibc takes (HEAP_MAX_SIZE / 2 on
  // 64-bit); larger blocks (limits.max_job_bytes above it) still use mmap.
  mallopt(M_MMAP_THRESHOLD, 32 << 20);
  // Never trimmed on free: give_back_freed_memory() decides when.
  mallopt(M_TRIM_THRESHOLD, std::numeric_limits<int>::max());
#endif
}

void give_back_freed_memory() {
#ifdef __GLIBC__
  malloc_trim(0);
#endif
}

// One leased attempt of a job: its handler run, its heartbeat timer and the
// delivery of its outcome. Freed from its timers' close callbacks.
class agent::job_slot {
 public:
  job_slot(agent& a, uint64_t gen, job_input in, std::string token, int64_t expires)
      : owner(a), generation(gen), input(std::move(in)), lease(std::move(token)), expires_ms(expires) {
    uv_timer_init(a._loop, &heartbeat);
    uv_timer_init(a._loop, &retry);
    heartbeat.data = retry.data = this;
    uint64_t every = std::max<uint64_t>(a._cfg.lease_ms / 3, 100);
    uv_timer_start(&heartbeat, on_heartbeat, every, every);
  }

  void close() {
    uv_timer_stop(&heartbeat);
    uv_timer_stop(&retry);
    for (uv_timer_t* t : {&heartbeat, &retry})
      uv_close(reinterpret_cast<uv_handle_t*>(t), [](uv_handle_t* h) {
        auto* j = static_cast<job_slot*>(h->data);
        if (--j->open_handles == 0) delete j;
      });
  }

  // Relay no longer holds this attempt's lease: nothing it does counts.
  void lose_lease(std::string_view why) {
    if (lease_lost) return;
    lease_lost = true;
    uv_timer_stop(&heartbeat);
    if (run) run->cancel(why);
  }

  static void on_heartbeat(uv_timer_t* t) {
    auto* j = static_cast<job_slot*>(t->data);
    agent& a = j->owner;
    if (j->lease_lost || a._stopped) return;
    uint64_t gen = j->generation;
    a._ctl_client->heartbeat(j->input.id, j->lease, static_cast<uint32_t>(a._cfg.lease_ms),
                             [&a, gen](const v1::error& e, int64_t& expires) {
                               job_slot* js = a.find(gen);
                               if (!js || js->lease_lost) return;
                               if (!e) {
                                 a.relay_answered();
                                 js->expires_ms = a.clamp_expiry(expires);
                                 return;
                               }
                               if (e.what == v1::error::kind::transport) {
                                 a.transport_failed("heartbeat", e);  // the next beat tries again
                               } else if (e.what == v1::error::kind::refused &&
                                          (e.status == 409 || e.status == 403 || e.status == 404)) {
                                 // Relay took the lease back: stop work nobody will accept.
                                 a._lease_lost.inc();
                                 log::warn("lease_lost")
                                     .str("job", js->input.id)
                                     .num("attempt", js->input.attempt)
                                     .num("status", e.status)
                                     .str("relay_said", e.message);
                                 js->lose_lease("lease lost");
                               } else if (e.what == v1::error::kind::bad_answer) {
                                 a._answers_rejected.inc();
                                 log::warn("bad_heartbeat_answer").str("job", js->input.id).str("reason", e.message);
                               }
                             });
  }

  static void on_retry(uv_timer_t* t) { static_cast<job_slot*>(t->data)->owner.deliver(static_cast<job_slot*>(t->data)); }

  agent& owner;
  const uint64_t generation;
  job_input input;
  std::string lease;
  int64_t expires_ms;  // relay's clock, bounded by bunny's own (clamp_expiry)
  uint64_t started = 0;
  handler_run* run = nullptr;
  bool lease_lost = false;
  bool stopped_by_drain = false;
  // A newer attempt of the same job, started when this one has ended, and
  // the attempt a waiting slot waits for.
  job_slot* waiting = nullptr;
  job_slot* ahead = nullptr;
  outcome result;
  std::shared_ptr<const std::string> complete_body;  // when result.ok: the complete request's body
  uint32_t delivery_failures = 0;
  uv_timer_t heartbeat{};
  uv_timer_t retry{};
  int open_handles = 2;
};

agent::agent(uv_loop_t* loop, config::bunny_config cfg, ops::registry& m)
    : _loop(loop),
      _cfg(std::move(cfg)),
      _started(m.get_counter("bunny_jobs_started_total", "Jobs handed to the handler.")),
      _succeeded(m.get_counter("bunny_jobs_succeeded_total", "Handler runs that produced a result.")),
      _failed(m.get_counter("bunny_jobs_failed_total", "Handler runs that failed (including timeouts).")),
      _timed_out(m.get_counter("bunny_jobs_timed_out_total", "Handler runs stopped at handler.timeout_ms.")),
      _lease_lost(m.get_counter("bunny_jobs_lease_lost_total", "Jobs dropped because relay took the lease back.")),
      _abandoned(m.get_counter("bunny_results_abandoned_total",
                               "Outcomes not delivered before their lease certainly expired.")),
      _reconnects(m.get_counter("bunny_reconnects_total", "Connections to relay dropped and re-established.")),
      _tls_reloads(m.get_counter("bunny_tls_reloads_total", "Client certificate reloads.")),
      _answers_rejected(m.get_counter("bunny_lease_answers_rejected_total",
                                      "Answers from relay (or jobs in a lease answer) refused as not keeping the API "
                                      "contract; a refused job is not run and its lease left to expire.")),
      _superseded(m.get_counter("bunny_jobs_superseded_total",
                                "Attempts stopped or dropped because relay leased their job again.")),
      _duration(m.get_histogram("bunny_handler_duration_seconds", "Handler run time.", ops::latency_bounds_seconds())),
      _running_gauge(m.get_gauge("bunny_jobs_running", "Handler runs in progress.")),
      _connected_gauge(m.get_gauge("bunny_relay_connected", "1 when the last exchange with relay succeeded.")),
      _exposed_secrets(m.get_gauge("bunny_secret_files_exposed",
                                   "Secret files (tls.key, api_key_file) readable by any user or writable by their group.")) {
  uint8_t seed[8];
  tls::random_bytes(seed, sizeof seed);
  std::memcpy(&_rng, seed, sizeof _rng);
  _rng |= 1;
}

agent::~agent() = default;

tls::client_options agent::tls_options(const config::bunny_config& cfg) {
  tls::client_options o;
  o.cert_file = cfg.tls.cert;
  o.key_file = cfg.tls.key;
  o.ca_file = cfg.tls.ca;
  o.min_version = cfg.tls.min_version;
  return o;
}

bool agent::start(std::string& error) {
  // Every handle first, so that stop() can close them whatever fails below.
  uv_timer_init(_loop, &_poll_timer);
  _poll_timer.data = this;
  uv_timer_init(_loop, &_drain_timer);
  _drain_timer.data = this;
  uv_timer_init(_loop, &_trim_timer);
  _trim_timer.data = this;
  for (uv_fs_poll_t* watch : {&_cert_watch, &_key_watch, &_api_key_watch}) {
    uv_fs_poll_init(_loop, watch);
    watch->data = this;
  }
  _handles_open = true;
  if (!config::readable_file("tls.ca", _cfg.tls.ca, error)) return false;
  for (auto [key, path] : {std::pair{"tls.cert", &_cfg.tls.cert}, {"tls.key", &_cfg.tls.key}})
    if (*path && !config::readable_file(key, **path, error)) return false;
  for (const auto& u : _cfg.relay.urls) {
    config::url parsed;
    if (!config::parse_url(u, parsed, error)) return false;
    _urls.push_back(parsed);
  }
  _tls = tls::context::make_client(tls_options(_cfg), error);
  if (!_tls) return false;
  // Warned about, not refused: Secret volumes are 0644 unless told otherwise.
  int64_t exposed = 0;
  const std::string no_file;
  const std::string* key_file = _cfg.api_key_file ? &*_cfg.api_key_file : &no_file;
  const std::string* tls_key = _cfg.tls.key ? &*_cfg.tls.key : &no_file;
  for (auto [key, path] : {std::pair<const char*, const std::string*>{"tls.key", tls_key}, {"api_key_file", key_file}}) {
    std::string warning;
    if (path->empty() || !config::exposed_secret(key, *path, warning)) continue;
    ++exposed;
    log::warn("secret_file_exposed").str("key", key).str("path", *path).str("reason", warning);
  }
  _exposed_secrets.set(exposed);
  if (_cfg.api_key_file && !load_api_key(error)) return false;
  if (!_cfg.handler.exec.empty()) {
    _handler = make_exec_handler(_loop, {_cfg.handler.exec, _cfg.handler.timeout_ms, _cfg.handler.kill_grace_ms,
                                         static_cast<size_t>(_cfg.handler.max_output_bytes)});
  } else {
    config::url u;
    if (!config::parse_url(*_cfg.handler.http, u, error)) return false;
    _handler = make_http_handler(_loop, {u.host, u.port, u.path, _cfg.handler.timeout_ms,
                                         static_cast<size_t>(_cfg.handler.max_output_bytes)});
  }
  // Kubernetes swaps mounted Secrets by renaming a symlinked directory, which
  // inotify on the file misses; polling the stat catches every kind of swap.
  for (auto [watch, path] : {std::pair{&_cert_watch, &_cfg.tls.cert}, {&_key_watch, &_cfg.tls.key}}) {
    if (*path) uv_fs_poll_start(watch, on_file_change, (*path)->c_str(), static_cast<unsigned>(_cfg.tls.reload_check_ms));
  }
  // A rotated API key (a Secret update) is picked up like a certificate.
  if (_cfg.api_key_file)
    uv_fs_poll_start(&_api_key_watch, on_file_change, _cfg.api_key_file->c_str(),
                     static_cast<unsigned>(_cfg.tls.reload_check_ms));
  v1::client::options co;
  co.connection = connection_options();
  co.extra_headers = _auth_header;
  co.request_timeout_ms = static_cast<uint32_t>(_cfg.poll.request_timeout_ms);
  _poll_client = std::make_unique<v1::client>(_loop, co);
  _ctl_client = std::make_unique<v1::client>(_loop, co);
  log::info("bunny_started")
      .str("relay", _cfg.relay.urls.front())
      .num("concurrency", static_cast<int64_t>(_cfg.concurrency))
      .str("handler", _cfg.handler.exec.empty() ? "http" : "exec")
      .str("tls_library", tls::library_version());
  // Ready means configured and running; reaching relay is a matter of
  // /readyz and bunny_relay_connected, since bunny waits for relay forever.
  ops::notify_service_manager("READY=1\nSTATUS=running");
  _started_ok = true;
  poll();
  return true;
}

std::string agent::readiness() const {
  if (_draining) return "draining";
  if (!_connected) return _last_error.empty() ? "not connected to relay yet" : "relay unreachable: " + _last_error;
  return {};
}

// ---- Connections ----

http::client_conn::options agent::connection_options() const {
  const config::url& u = _urls[_url_index % _urls.size()];
  http::client_conn::options o;
  o.host = u.host;
  o.port = u.port;
  o.server_name = _cfg.relay.server_name.value_or(u.host);
  o.tls = _tls;
  o.connect_timeout_ms = static_cast<uint32_t>(_cfg.poll.request_timeout_ms);
  o.max_response_bytes = max_answer_bytes();
  return o;
}

void agent::reconnect(v1::client& c) {
  c.reset();
  c.set_connection(connection_options());
  _reconnects.inc();
}

void agent::relay_answered() {
  _connected = true;
  _connected_gauge.set(1);
  _last_error.clear();
}

void agent::transport_failed(const std::string& what, const v1::error& e) {
  if (e.transport == http::client_error::kind::closed) return;  // we closed it ourselves
  if (_connected || _last_error != e.message) {
    log::warn("relay_unreachable")
        .str("during", what)
        .str("relay", _cfg.relay.urls[_url_index % _urls.size()])
        .str("kind", http::to_string(e.transport))
        .str("reason", e.message);
  }
  _connected = false;
  _connected_gauge.set(0);
  _last_error = e.message;
}

int64_t agent::clamp_expiry(int64_t relay_ms) const {
  // Relay's clock decides when its lease ends, but a relay that claims a
  // lease far beyond what bunny asked for would have bunny hold an outcome
  // (and retry its delivery) for that long: bunny's own bound wins.
  return std::min<int64_t>(relay_ms, wall_ms() + static_cast<int64_t>(_cfg.lease_ms));
}

uint64_t agent::backoff_ms(uint32_t failures) {
  // Exponential with full jitter: uniform in [0, min(cap, base * 2^n)], so
  // that many bunnies cut off together do not come back together.
  uint64_t cap = _cfg.poll.backoff_base_ms << std::min<uint32_t>(failures, 20);
  cap = std::min<uint64_t>(cap, _cfg.poll.backoff_max_ms);
  _rng ^= _rng << 13;
  _rng ^= _rng >> 7;
  _rng ^= _rng << 17;
  return _rng % (cap + 1);
}

void agent::retry_poll_later() {
  uint64_t delay = backoff_ms(_poll_failures++);
  uv_timer_start(&_poll_timer, [](uv_timer_t* t) { static_cast<agent*>(t->data)->poll(); }, delay, 0);
}

agent::job_slot* agent::find(uint64_t generation) const {
  auto it = _slots.find(generation);
  return it == _slots.end() ? nullptr : it->second;
}

// ---- Leasing ----

void agent::poll() {
  if (_draining || _stopped || _polling || uv_is_active(reinterpret_cast<uv_handle_t*>(&_poll_timer))) return;
  size_t free = _cfg.concurrency > _running ? _cfg.concurrency - _running : 0;
  if (free == 0) return;
  // With several queues: sweep the others without waiting, then park on one.
  size_t n = _cfg.queues.size();
  v1::lease_request r;
  r.queue = _cfg.queues[_queue_index % n];
  r.max = static_cast<uint32_t>(free);
  r.wait_ms = static_cast<uint32_t>((n == 1 || _empty_streak + 1 >= n) ? _cfg.poll.wait_ms : 0);
  r.lease_ms = static_cast<uint32_t>(_cfg.lease_ms);
  // Relay stops adding jobs before the answer outgrows what the client
  // reads; an answer dropped for its size would leave its jobs leased to
  // nobody until they expire, and burn an attempt of each.
  r.max_bytes = max_answer_bytes();
  _polling = true;
  _poll_client->lease(r, [this, free](const v1::error& e, v1::lease_answer& a) { on_leased(e, a, free); });
}

void agent::on_leased(const v1::error& e, v1::lease_answer& a, size_t asked) {
  _polling = false;
  if (_draining || _stopped) return;
  const std::string& queue = _cfg.queues[_queue_index % _cfg.queues.size()];
  // Only the body: a header line over its bound is a broken relay, not a
  // large job (client_conn words the two differently).
  if (e.what == v1::error::kind::transport && e.transport == http::client_error::kind::too_large &&
      e.message.find("response body larger than") != std::string::npos) {
    // Relay is reachable and sent an answer bunny will not read: a job
    // larger than this bunny takes (relay always sends at least one job,
    // whatever max_bytes asked). Its lease runs out on relay and it goes
    // to a worker that takes it, or dead. Named as what it is, not as relay
    // being unreachable, with the key that decides it.
    _answers_rejected.inc();
    log::error("lease_answer_too_large")
        .str("queue", queue)
        .num("limit_bytes", static_cast<int64_t>(max_answer_bytes()))
        .str("reason", "relay's lease answer is larger than this bunny reads (limits.max_job_bytes = " +
                           std::to_string(_cfg.limits.max_job_bytes) +
                           ", plus 65536 for the answer's own fields); the job in it is not run here. Raise "
                           "limits.max_job_bytes (up to 268435456) to take it");
    relay_answered();
    reconnect(*_poll_client);  // the connection dropped the answer mid-way
    retry_poll_later();
    return;
  }
  if (e.what == v1::error::kind::transport) {
    transport_failed("lease", e);
    ++_url_index;  // try the next relay address, if any
    reconnect(*_poll_client);
    retry_poll_later();
    return;
  }
  if (e) {
    if (e.what == v1::error::kind::bad_answer) {
      // Never the answer itself in the log: it may hold payloads.
      _answers_rejected.inc();
      log::error("bad_lease_answer").str("queue", queue).str("reason", e.message);
    } else {
      log::warn("lease_refused").str("queue", queue).num("status", e.status).str("code", e.code).str("relay_said", e.message);
    }
    relay_answered();
    retry_poll_later();
    return;
  }
  relay_answered();
  _poll_failures = 0;
  for (const auto& r : a.rejected) {
    _answers_rejected.inc();
    log::error("bad_lease_answer")
        .str("queue", queue)
        .num("index", static_cast<int64_t>(r.index))
        .str("job", r.id)
        .str("reason", r.reason)
        .num("bytes", static_cast<int64_t>(a.bytes));
  }
  size_t got = 0;
  for (auto& job : a.jobs) {
    if (got == asked) {
      // More jobs than free slots: running them would break the
      // concurrency bound. They are not ours to run; relay's lease on them
      // runs out and they go to another worker.
      _answers_rejected.inc();
      log::error("bad_lease_answer").str("queue", queue).str("job", job.id).str("reason", "more jobs than were asked for");
      continue;
    }
    ++got;
    job_input in;
    in.id = std::move(job.id);
    in.queue = queue;
    in.attempt = job.attempt;
    in.payload = job.payload;
    in.keep = a.body;  // the payload stays in the answer; each job holds it
    start_job(std::move(in), std::move(job.lease), clamp_expiry(job.lease_expires_ms));
  }
  if (got == 0) {
    ++_queue_index;
    _empty_streak = (_empty_streak + 1 >= _cfg.queues.size()) ? 0 : _empty_streak + 1;
  } else {
    _empty_streak = 0;
  }
  poll();
}

void agent::start_job(job_input input, std::string lease, int64_t expires_ms) {
  auto known = _by_id.find(input.id);
  if (known != _by_id.end()) {
    for (job_slot* s = known->second; s; s = s->waiting) {
      if (s->lease == lease) {
        // The same lease again: a replayed or duplicated answer, not a new
        // attempt. The one here goes on.
        _answers_rejected.inc();
        log::warn("bad_lease_answer").str("job", input.id).str("reason", "a lease this bunny already holds, sent again");
        return;
      }
    }
  }
  ++_running;  // a waiting attempt holds its place too
  _running_gauge.set(static_cast<int64_t>(_running));
  uint64_t gen = _next_generation++;
  auto* j = new job_slot(*this, gen, std::move(input), std::move(lease), expires_ms);
  _slots.emplace(gen, j);
  job_slot*& head = _by_id[j->input.id];
  if (!head) {
    head = j;
    run_job(j);
    return;
  }
  // Relay leases a job again only once the earlier lease has expired (a link
  // cut longer than lease_ms does that): the attempt here is dead. Stop it
  // and drop its outcome; the new attempt starts once it has ended, so two
  // attempts of one job never run side by side.
  _superseded.inc();
  log::warn("job_superseded")
      .str("job", j->input.id)
      .num("earlier_attempt", head->input.attempt)
      .num("new_attempt", j->input.attempt)
      .str("action", head->run ? "stopping the earlier attempt; the new one starts when it has ended"
                               : "dropping the earlier attempt's outcome");
  if (!head->run) {
    finish_job(head);  // an outcome relay will refuse: the lease is gone
    _by_id[j->input.id] = j;
    run_job(j);
    return;
  }
  head->lose_lease("relay leased the job again");
  if (job_slot* skipped = head->waiting) {
    // Leased a third time while the first still ends: the one between never
    // starts.
    skipped->lose_lease("relay leased the job again");
    --_running;
    finish_job(skipped);
  }
  head->waiting = j;
  j->ahead = head;
}

void agent::run_job(job_slot* j) {
  j->started = uv_now(_loop);
  _started.inc();
  log::info("job_started")
      .str("job", j->input.id)
      .str("queue", j->input.queue)
      .num("attempt", j->input.attempt)
      .num("payload_bytes", static_cast<int64_t>(j->input.payload.size()));
  uint64_t gen = j->generation;
  j->run = _handler->start(j->input, [this, gen](outcome o) {
    if (job_slot* js = find(gen)) job_done(js, std::move(o));
  });
  // The run holds the payload as long as it needs it; the slot lets go, so
  // relay's answer is freed once the handler has it.
  j->input.payload = {};
  j->input.keep.reset();
}

void agent::job_done(job_slot* j, outcome o) {
  j->run = nullptr;
  --_running;
  _running_gauge.set(static_cast<int64_t>(_running));
  // Restarted by every job that ends: fires only after idle_trim_ms with
  // nothing finishing. A job still running then is fine: trimming only
  // returns memory that is free.
  if (!_stopped)
    uv_timer_start(&_trim_timer, [](uv_timer_t*) { give_back_freed_memory(); }, idle_trim_ms, 0);
  double seconds = static_cast<double>(uv_now(_loop) - j->started) / 1000.0;
  _duration.observe(seconds);
  if (o.ok) _succeeded.inc();
  else _failed.inc();
  if (o.timed_out) _timed_out.inc();
  // Only bunny's own words go to the log; the handler's (a stderr tail, a
  // local service's answer) go to relay: they may echo the payload.
  log::info("job_finished")
      .str("job", j->input.id)
      .num("attempt", j->input.attempt)
      .boolean("ok", o.ok)
      .num("duration_ms", static_cast<int64_t>(seconds * 1000))
      .str("error", std::string_view(o.error).substr(0, o.error_own_bytes));
  if (job_slot* next = j->waiting) {
    // A newer attempt of this job waited for this one to end.
    finish_job(j);
    _by_id[next->input.id] = next;
    if (_stopped || next->lease_lost) {
      // Gone while it waited (a heartbeat answered 409, or bunny stops):
      // relay has taken it back, so it never starts here.
      --_running;
      finish_job(next);
    } else if (_draining) {
      // Leaving: the new attempt goes back to relay unstarted, to run
      // elsewhere at once.
      --_running;
      next->stopped_by_drain = true;
      next->result.error = "bunny shut down before the job started";
      deliver(next);
    } else {
      run_job(next);
    }
  } else if (j->lease_lost) {
    finish_job(j);
  } else {
    j->result = std::move(o);
    if (j->result.ok) {
      // The envelope goes into the room the handler left before its result;
      // the body is then shared with the connection, and reused as it is
      // if the delivery has to be tried again.
      if (v1::fill_complete_body(j->result.result, j->lease)) {
        j->complete_body = std::make_shared<const std::string>(std::move(j->result.result));
      } else {
        j->result.ok = false;
        j->result.error = "bunny could not lay out the result for relay";
        j->result.error_own_bytes = j->result.error.size();
      }
      j->result.result.clear();
    }
    deliver(j);
  }
  poll();
}

// ---- Results ----

void agent::deliver(job_slot* j) {
  uint64_t gen = j->generation;
  auto delivered = [this, gen](const v1::error& e) {
    job_slot* js = find(gen);
    if (!js) return;
    const std::string& id = js->input.id;
    bool retry = false;
    if (!e) {
      relay_answered();
      log::info("result_delivered").str("job", id).num("attempt", js->input.attempt).boolean("ok", js->result.ok);
    } else if (e.what == v1::error::kind::transport) {
      transport_failed("result", e);
      reconnect(*_ctl_client);
      retry = true;
    } else if (e.what == v1::error::kind::refused && e.status == 409) {
      log::warn("result_refused").str("job", id).str("reason", "lease lost; relay will deliver the job again");
    } else if (e.what == v1::error::kind::refused && (e.status == 401 || e.status == 429 || e.status >= 500)) {
      // 401: the key was refused -- mid-rotation, or the file is being
      // fixed; the result is kept and retried until its lease runs out.
      if (e.status == 401) log::warn("api_key_refused").str("during", "result").str("job", id);
      retry = true;
    } else {
      log::error("result_refused").str("job", id).num("status", e.status).str("code", e.code).str("relay_said", e.message);
    }
    if (!retry || js->lease_lost) {
      finish_job(js);
      return;
    }
    if (wall_ms() > js->expires_ms + lease_margin_ms) {
      // Relay has certainly redelivered it by now; keep nothing.
      _abandoned.inc();
      log::warn("result_abandoned").str("job", id).str("reason", "lease expired before relay could be reached; relay will deliver the job again");
      finish_job(js);
      return;
    }
    uv_timer_start(&js->retry, job_slot::on_retry, backoff_ms(js->delivery_failures++), 0);
  };
  if (j->result.ok) {
    _ctl_client->complete_body(j->input.id, j->complete_body, std::move(delivered));
  } else {
    // A job stopped because this bunny is leaving should run elsewhere now.
    std::optional<uint32_t> delay;
    if (j->stopped_by_drain) delay = 0;
    _ctl_client->fail(j->input.id, j->lease, j->result.error, delay, std::move(delivered));
  }
}

void agent::finish_job(job_slot* j) {
  _slots.erase(j->generation);
  if (j->ahead) j->ahead->waiting = nullptr;
  if (j->waiting) j->waiting->ahead = nullptr;
  j->ahead = j->waiting = nullptr;
  auto it = _by_id.find(j->input.id);
  if (it != _by_id.end() && it->second == j) _by_id.erase(it);
  j->close();
  check_drained();
}

// ---- Certificates ----

void agent::on_file_change(uv_fs_poll_t* h, int status, const uv_stat_t*, const uv_stat_t*) {
  auto* a = static_cast<agent*>(h->data);
  if (h == &a->_api_key_watch) {
    std::string error;
    if (status < 0) log::warn("api_key_file_unreadable").str("path", *a->_cfg.api_key_file).str("reason", uv_strerror(status));
    else if (!a->load_api_key(error)) log::warn("api_key_reload_failed").str("reason", error);
    else log::info("api_key_reloaded").str("path", *a->_cfg.api_key_file);
    return;
  }
  if (status < 0) {
    log::warn("tls_file_unreadable").str("path", *(h == &a->_cert_watch ? a->_cfg.tls.cert : a->_cfg.tls.key)).str("reason", uv_strerror(status));
    return;
  }
  a->reload_tls();
}

void agent::reload_tls() {
  std::string error;
  auto ctx = tls::context::make_client(tls_options(_cfg), error);
  if (!ctx) {
    // Mid-rotation the key may not match the certificate yet; the next
    // change retries. Meanwhile the old context stays in use.
    log::warn("tls_reload_failed").str("reason", error);
    return;
  }
  _tls = std::move(ctx);
  _tls_reloads.inc();
  if (_poll_client) {
    _poll_client->set_connection(connection_options());
    _ctl_client->set_connection(connection_options());
  }
  log::info("tls_reloaded").str("cert", _cfg.tls.cert.value_or(""));
  // Connections switch to the new certificate at their next idle moment
  // (agent::connection); running jobs keep going.
}

bool agent::load_api_key(std::string& error) {
  if (!v1::read_api_key_file(*_cfg.api_key_file, _auth_header, error)) return false;
  if (_poll_client) {
    _poll_client->set_extra_headers(_auth_header);
    _ctl_client->set_extra_headers(_auth_header);
  }
  return true;
}

// ---- Shutdown ----

void agent::begin_drain() {
  if (_draining) return;
  _draining = true;
  if (!_started_ok) {
    // start() failed (or never ran): nothing to drain, only handles to close.
    stop();
    return;
  }
  ops::notify_service_manager("STOPPING=1\nSTATUS=draining");
  log::info("draining").num("running", static_cast<int64_t>(_running)).num("grace_ms", static_cast<int64_t>(_cfg.drain_timeout_ms));
  uv_timer_stop(&_poll_timer);
  if (_poll_client) _poll_client->reset();  // relay forgets the parked lease when its connection closes
  uv_timer_start(
      &_drain_timer,
      [](uv_timer_t* t) {
        auto* a = static_cast<agent*>(t->data);
        if (a->_running > 0) {
          log::warn("drain_grace_over").num("running", static_cast<int64_t>(a->_running));
          for (auto& [gen, j] : a->_slots) {
            if (j->run) {
              j->stopped_by_drain = true;
              j->run->cancel("bunny shut down before the job finished");
            }
          }
        }
        // Give deliveries one more request timeout, then stop regardless.
        uv_timer_start(t, [](uv_timer_t* t2) { static_cast<agent*>(t2->data)->stop(); },
                       a->_cfg.poll.request_timeout_ms + a->_cfg.handler.kill_grace_ms, 0);
      },
      _cfg.drain_timeout_ms, 0);
  check_drained();
}

void agent::check_drained() {
  if (_draining && _slots.empty()) stop();
}

void agent::stop() {
  if (_stopped) return;
  _stopped = true;
  if (!_slots.empty()) log::warn("stopped_with_undelivered_results").num("jobs", static_cast<int64_t>(_slots.size()));
  std::vector<job_slot*> left;
  for (auto& [gen, j] : _slots) left.push_back(j);
  for (job_slot* j : left) {
    if (!find(j->generation)) continue;  // finished with the one before it
    j->lease_lost = true;  // an outcome that still arrives is dropped
    uv_timer_stop(&j->heartbeat);
    if (j->run) {
      j->run->cancel("bunny stopped");  // finished when the run reports
    } else {
      if (j->ahead) --_running;  // waited, never ran
      finish_job(j);
    }
  }
  // Outstanding requests' callbacks never run once their client is gone.
  _poll_client.reset();
  _ctl_client.reset();
  if (_handler) _handler->shutdown();
  if (_handles_open) {
    for (uv_timer_t* t : {&_poll_timer, &_drain_timer, &_trim_timer}) {
      uv_timer_stop(t);
      uv_close(reinterpret_cast<uv_handle_t*>(t), nullptr);
    }
    for (uv_fs_poll_t* w : {&_cert_watch, &_key_watch, &_api_key_watch}) {
      uv_fs_poll_stop(w);
      uv_close(reinterpret_cast<uv_handle_t*>(w), nullptr);
    }
  }
  if (_started_ok) log::info("stopped");
  if (on_stopped) on_stopped();
}

}  // namespace relay::bunny
