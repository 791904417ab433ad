#include "bunny/agent.h"

#include <cstring>
#include <ctime>
#include <fstream>
#include <sstream>

#include "relay/api_keys.h"
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

}  // namespace

// One leased job: its handler run, its heartbeat timer and the delivery of
// its outcome. Freed from its timers' close callbacks.
class agent::job_slot {
 public:
  job_slot(agent& a, job_input in, std::string token, int64_t expires)
      : owner(a), input(std::move(in)), lease(std::move(token)), expires_ms(expires), started(uv_now(a._loop)) {
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

  static void on_heartbeat(uv_timer_t* t) {
    auto* j = static_cast<job_slot*>(t->data);
    agent& a = j->owner;
    if (j->lease_lost || a._stopped) return;
    std::string body = "{\"lease\":\"" + j->lease + "\",\"extend_ms\":" + std::to_string(a._cfg.lease_ms) + "}";
    std::string id = j->input.id;
    a.connection(a._ctl_conn)->request(
        "POST", "/v1/jobs/" + id + "/heartbeat", body,
        [&a, id](const http::client_error& error, http::client_response& r) {
          auto it = a._jobs.find(id);
          if (it == a._jobs.end()) return;
          job_slot* js = it->second;
          if (error) {
            a.transport_failed("heartbeat", error);  // the next beat tries again
            return;
          }
          if (r.status == 200) {
            a._connected = true;
            std::string copy = r.body;
            json::pad(copy);
            simdjson::ondemand::parser p;
            simdjson::ondemand::document d;
            int64_t exp = 0;
            if (!p.iterate(copy).get(d) && !d["lease_expires_ms"].get_int64().get(exp)) js->expires_ms = exp;
            return;
          }
          if (r.status == 409 || r.status == 403 || r.status == 404) {
            // Relay took the lease back: stop work nobody will accept.
            js->lease_lost = true;
            a._lease_lost.inc();
            log::warn("lease_lost").str("job", id).num("status", r.status).str("relay_said", r.body.substr(0, 300));
            uv_timer_stop(&js->heartbeat);
            if (js->run) js->run->cancel("lease lost");
          }
        },
        static_cast<uint32_t>(a._cfg.poll.request_timeout_ms), a._auth_header);
  }

  static void on_retry(uv_timer_t* t) { static_cast<job_slot*>(t->data)->owner.deliver(static_cast<job_slot*>(t->data)); }

  agent& owner;
  job_input input;
  std::string lease;
  int64_t expires_ms;
  uint64_t started;
  handler_run* run = nullptr;
  bool lease_lost = false;
  bool stopped_by_drain = false;
  outcome result;
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

http::client_conn* agent::connection(http::client_conn*& slot) {
  // A connection opened before a certificate reload keeps presenting the old
  // identity; replace it as soon as nothing is in flight on it.
  if (slot && slot->tls_context() != _tls && slot->outstanding() == 0) drop(slot);
  if (!slot) {
    const config::url& u = _urls[_url_index % _urls.size()];
    http::client_conn::options o;
    o.host = u.host;
    o.port = u.port;
    o.server_name = _cfg.relay.server_name.value_or(u.host);
    o.tls = _tls;
    o.connect_timeout_ms = static_cast<uint32_t>(_cfg.poll.request_timeout_ms);
    slot = http::client_conn::create(_loop, o);
  }
  return slot;
}

bool agent::drop(http::client_conn*& slot) {
  if (!slot) return false;
  http::client_conn* c = slot;
  slot = nullptr;
  c->close();
  return true;
}

void agent::transport_failed(const std::string& what, const http::client_error& error) {
  if (error.what == http::client_error::kind::closed) return;  // we closed it ourselves
  if (_connected || _last_error != error.message) {
    log::warn("relay_unreachable")
        .str("during", what)
        .str("relay", _cfg.relay.urls[_url_index % _urls.size()])
        .str("reason", error.message);
  }
  _connected = false;
  _connected_gauge.set(0);
  _last_error = error.message;
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

// ---- Leasing ----

void agent::poll() {
  if (_draining || _stopped || _polling || uv_is_active(reinterpret_cast<uv_handle_t*>(&_poll_timer))) return;
  size_t free = _cfg.concurrency > _running ? _cfg.concurrency - _running : 0;
  if (free == 0) return;
  // With several queues: sweep the others without waiting, then park on one.
  size_t n = _cfg.queues.size();
  const std::string& queue = _cfg.queues[_queue_index % n];
  uint64_t wait = (n == 1 || _empty_streak + 1 >= n) ? _cfg.poll.wait_ms : 0;
  std::string body = "{\"max\":" + std::to_string(free) + ",\"wait_ms\":" + std::to_string(wait) +
                     ",\"lease_ms\":" + std::to_string(_cfg.lease_ms) + "}";
  _polling = true;
  connection(_poll_conn)->request(
      "POST", "/v1/queues/" + queue + "/lease", body,
      [this](const http::client_error& error, http::client_response& r) { on_leased(error, r); },
      static_cast<uint32_t>(wait + _cfg.poll.request_timeout_ms), _auth_header);
}

void agent::on_leased(const http::client_error& error, http::client_response& r) {
  _polling = false;
  if (_draining || _stopped) return;
  if (error) {
    transport_failed("lease", error);
    if (drop(_poll_conn)) {
      ++_url_index;  // try the next relay address, if any
      _reconnects.inc();
    }
    retry_poll_later();
    return;
  }
  if (r.status != 200) {
    log::warn("lease_refused").num("status", r.status).str("relay_said", r.body.substr(0, 300));
    _connected = true;
    _connected_gauge.set(1);
    retry_poll_later();
    return;
  }
  _connected = true;
  _connected_gauge.set(1);
  _last_error.clear();
  _poll_failures = 0;
  std::string body = std::move(r.body);
  json::pad(body);
  simdjson::ondemand::parser parser;
  simdjson::ondemand::document doc;
  simdjson::ondemand::array jobs;
  size_t got = 0;
  // Never the body itself in the log: it may hold payloads.
  if (parser.iterate(body).get(doc) || doc["jobs"].get_array().get(jobs)) {
    log::error("bad_lease_answer")
        .str("reason", "not a JSON object with a \"jobs\" array")
        .num("bytes", static_cast<int64_t>(body.size()));
    retry_poll_later();
    return;
  }
  for (auto el : jobs) {
    simdjson::ondemand::object o;
    if (el.get_object().get(o)) break;
    job_input in;
    in.queue = _cfg.queues[_queue_index % _cfg.queues.size()];
    std::string lease;
    int64_t expires = 0;
    bool ok = true;
    for (auto f : o) {
      simdjson::ondemand::field field;
      std::string_view key, s;
      if (std::move(f).get(field) || field.unescaped_key().get(key)) {
        ok = false;
        break;
      }
      int64_t n = 0;
      if (key == "id" && !field.value().get_string().get(s)) in.id = s;
      else if (key == "lease" && !field.value().get_string().get(s)) lease = s;
      else if (key == "attempt" && !field.value().get_int64().get(n)) in.attempt = static_cast<uint32_t>(n);
      else if (key == "lease_expires_ms" && !field.value().get_int64().get(n)) expires = n;
      else if (key == "payload" && json::raw_value(field.value(), s)) in.payload = s;
    }
    if (!ok || in.id.empty() || lease.empty()) {
      log::error("bad_lease_answer")
          .str("reason", "a job without an id or a lease, or with a field that is not JSON")
          .num("bytes", static_cast<int64_t>(body.size()));
      break;
    }
    ++got;
    start_job(std::move(in), std::move(lease), expires);
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
  ++_running;
  _running_gauge.set(static_cast<int64_t>(_running));
  _started.inc();
  auto* j = new job_slot(*this, std::move(input), std::move(lease), expires_ms);
  _jobs[j->input.id] = j;
  log::info("job_started").str("job", j->input.id).str("queue", j->input.queue).num("attempt", j->input.attempt);
  j->run = _handler->start(j->input, [this, j](outcome o) { job_done(j, std::move(o)); });
}

void agent::job_done(job_slot* j, outcome o) {
  j->run = nullptr;
  --_running;
  _running_gauge.set(static_cast<int64_t>(_running));
  double seconds = static_cast<double>(uv_now(_loop) - j->started) / 1000.0;
  _duration.observe(seconds);
  if (o.ok) _succeeded.inc();
  else _failed.inc();
  if (o.timed_out) _timed_out.inc();
  // Only bunny's own words go to the log; the handler's (a stderr tail, a
  // local service's answer) go to relay: they may echo the payload.
  log::info("job_finished")
      .str("job", j->input.id)
      .boolean("ok", o.ok)
      .num("duration_ms", static_cast<int64_t>(seconds * 1000))
      .str("error", std::string_view(o.error).substr(0, o.error_own_bytes));
  if (j->lease_lost) {
    finish_job(j);
  } else {
    j->result = std::move(o);
    deliver(j);
  }
  poll();
}

// ---- Results ----

void agent::deliver(job_slot* j) {
  std::string body = "{\"lease\":\"" + j->lease + "\",";
  std::string path = "/v1/jobs/" + j->input.id;
  if (j->result.ok) {
    path += "/complete";
    body += "\"result\":" + j->result.result + "}";
  } else {
    path += "/fail";
    body += "\"error\":";
    json::append_string(body, j->result.error);
    // A job stopped because this bunny is leaving should run elsewhere now.
    if (j->stopped_by_drain) body += ",\"retry_delay_ms\":0";
    body += "}";
  }
  std::string id = j->input.id;
  connection(_ctl_conn)->request(
      "POST", path, body,
      [this, id](const http::client_error& error, http::client_response& r) {
        auto it = _jobs.find(id);
        if (it == _jobs.end()) return;
        job_slot* js = it->second;
        bool retry = false;
        if (error) {
          transport_failed("result", error);
          if (drop(_ctl_conn)) _reconnects.inc();
          retry = true;
        } else if (r.status == 200) {
          _connected = true;
          log::info("result_delivered").str("job", id).boolean("ok", js->result.ok);
        } else if (r.status == 409) {
          log::warn("result_refused").str("job", id).str("reason", "lease lost; relay will deliver the job again");
        } else if (r.status == 401 || r.status == 429 || r.status >= 500) {
          // 401: the key was refused -- mid-rotation, or the file is being
          // fixed; the result is kept and retried until its lease runs out.
          if (r.status == 401) log::warn("api_key_refused").str("during", "result").str("job", id);
          retry = true;
        } else {
          log::error("result_refused").str("job", id).num("status", r.status).str("relay_said", r.body.substr(0, 300));
        }
        if (!retry) {
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
      },
      static_cast<uint32_t>(_cfg.poll.request_timeout_ms), _auth_header);
}

void agent::finish_job(job_slot* j) {
  _jobs.erase(j->input.id);
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
  log::info("tls_reloaded").str("cert", _cfg.tls.cert.value_or(""));
  // Connections switch to the new certificate at their next idle moment
  // (agent::connection); running jobs keep going.
}

bool agent::load_api_key(std::string& error) {
  std::ifstream in(*_cfg.api_key_file, std::ios::binary);
  if (!in) {
    error = *_cfg.api_key_file + ": cannot open the API key file";
    return false;
  }
  std::ostringstream ss;
  ss << in.rdbuf();
  std::string key = ss.str();
  while (!key.empty() && (key.back() == '\n' || key.back() == '\r' || key.back() == ' ' || key.back() == '\t'))
    key.pop_back();
  size_t start = key.find_first_not_of(" \t");
  key.erase(0, start == std::string::npos ? key.size() : start);
  // Checked as relay will check it, so a bad file is reported here, by
  // name, rather than as 401s; the key itself never appears in a message.
  std::string_view token;
  if (key.empty() || !auth::bearer_token("Bearer " + key, token)) {
    error = *_cfg.api_key_file + ": the API key file must hold one key on one line (RFC 6750 token characters)";
    return false;
  }
  _auth_header = "Authorization: Bearer " + key + "\r\n";
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
  drop(_poll_conn);  // relay forgets the parked lease when its connection closes
  uv_timer_start(
      &_drain_timer,
      [](uv_timer_t* t) {
        auto* a = static_cast<agent*>(t->data);
        if (a->_running > 0) {
          log::warn("drain_grace_over").num("running", static_cast<int64_t>(a->_running));
          for (auto& [id, j] : a->_jobs) {
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
  if (_draining && _jobs.empty()) stop();
}

void agent::stop() {
  if (_stopped) return;
  _stopped = true;
  if (!_jobs.empty()) log::warn("stopped_with_undelivered_results").num("jobs", static_cast<int64_t>(_jobs.size()));
  std::vector<job_slot*> left;
  for (auto& [id, j] : _jobs) left.push_back(j);
  for (job_slot* j : left) {
    j->lease_lost = true;  // an outcome that still arrives is dropped
    uv_timer_stop(&j->heartbeat);
    if (j->run) j->run->cancel("bunny stopped");  // finished when the run reports
    else finish_job(j);
  }
  drop(_poll_conn);
  drop(_ctl_conn);
  if (_handler) _handler->shutdown();
  if (_handles_open) {
    for (uv_timer_t* t : {&_poll_timer, &_drain_timer}) {
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
