#include "api/service.h"

#include <charconv>
#include <ctime>

#include "api/waits.h"
#include "relay/audit.h"
#include "relay/json.h"
#include "relay/log.h"

namespace relay::api {

service::service(uv_loop_t* loop, queue::broker& broker, policy_source policy, ops::registry& metrics,
                 journal::backend* journal, authn_options authn)
    : _loop(loop),
      _broker(broker),
      _journal(journal),
      _policy(std::move(policy)),
      _metrics(metrics),
      _denials(metrics.get_counter("relay_authz_denials_total", "Requests denied by the policy.")),
      _authn(std::move(authn)),
      _auth_failures(_authn.max_failures, _authn.failure_window_ms, _authn.max_failure_sources),
      _auth_limited(metrics.get_counter("relay_api_key_rate_limited_total",
                                        "Requests answered 429 because their source failed authentication too often.")),
      _rate(metrics) {
  uv_timer_init(loop, &_clock);
  _clock.data = this;
  metrics.add_collector([this](std::string& out) { collect_queue_metrics(out); });
}

service::~service() = default;

queue::time_ms service::now() {
  timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return static_cast<queue::time_ms>(ts.tv_sec) * 1000 + ts.tv_nsec / 1000000;
}

void service::on_connected(net::server_conn& conn) {
  // The certificate was verified in the handshake and cannot change on this
  // connection, so its principal is interned once here. The policy, which
  // can be reloaded, is consulted per request.
  const std::string& p = conn.peer().principal();
  conn.principal = p.empty() ? nullptr : _broker.intern(p);
  // In api_key mode the key names the principal, per request; a certificate
  // only had to verify. A certificate name in the key owners' namespace is
  // never an owner: it would hold the leases of that key's principal.
  if (_authn.mode == authn_options::auth_mode::api_key || p.starts_with(auth::key_owner_prefix)) conn.principal = nullptr;
}

void service::on_rejected(net::server_conn&, api_error e) { count(route::unknown, describe(e).status); }

void service::count(route r, int status) {
  uint32_t key = static_cast<uint32_t>(r) << 16 | static_cast<uint32_t>(status);
  auto it = _request_counters.find(key);
  if (it == _request_counters.end()) {
    std::string labels = "route=\"" + std::string(route_name(r)) + "\",status=\"" + std::to_string(status) + "\"";
    auto& c = _metrics.get_counter("relay_http_requests_total", "API requests answered, by route and status.", labels);
    it = _request_counters.emplace(key, &c).first;
  }
  it->second->inc();
}

void service::respond(context& c, int status, std::string body, std::string_view extra) {
  send(c.conn, c.match.which, status, std::move(body), extra);
}

namespace {

// An answer filled from blob files keeps its share of the read bound until
// its bytes are encrypted onto the wire, not merely queued: a client that
// never reads would otherwise make relay hold one answer per connection
// outside the bound (the attack review of issue 13).
std::shared_ptr<void> hold_until_sent(journal::blob_store::reservation& reserved) {
  return std::make_shared<journal::blob_store::reservation>(std::move(reserved));
}

}  // namespace

void service::send(net::server_conn& conn, route r, int status, std::string body, std::string_view extra,
                   journal::blob_store::reservation reserved) {
  // While the journal fails, changes are refused up front; reads go on
  // being served (they can show nothing that was acknowledged and lost).
  bool read = r == route::get_job || r == route::list_queues || r == route::get_queue || r == route::list_dead;
  if (!_journal || (read && !_journal->accepting() && _journal->serving())) {
    count(r, status);
    conn.respond_owned(status, std::move(body), extra, "application/json", hold_until_sent(reserved));
    return;
  }
  struct held {
    net::server_conn* conn;
    route r;
    int status;
    std::string body, extra;
    journal::blob_store::reservation reserved;  // given back with h
  };
  auto* h = new held{&conn, r, status, std::move(body), std::string(extra), std::move(reserved)};
  // If the client goes away first, the answer is dropped, not sent.
  conn.set_abandon_hook([h] { h->conn = nullptr; });
  _journal->when_durable([this, h](bool ok) {
    if (h->conn) {
      if (ok) {
        count(h->r, h->status);
        h->conn->respond_owned(h->status, std::move(h->body), h->extra, "application/json",
                               hold_until_sent(h->reserved));
      } else {
        count(h->r, describe(api_error::unavailable).status);
        h->conn->respond_error(api_error::unavailable,
                               "the change may not be durable: the journal write failed (" + _journal->failure() + ")");
      }
    }
    delete h;
  });
}

void service::send_filled(net::server_conn& conn, route r, int status, journal::answer_template answer) {
  if (answer.complete()) {
    send(conn, r, status, std::move(answer.text));
    return;
  }
  if (!_blobs) {
    // Only a relay with a blob store makes references: unreachable.
    send(conn, r, 500, api_error_body(api_error::internal, "a stored value is kept in a blob file, and no blob store is open"));
    return;
  }
  // The connection may go while the values are read: the answer is then
  // dropped (its reservation with it).
  auto alive = std::make_shared<net::server_conn*>(&conn);
  conn.set_abandon_hook([alive] { *alive = nullptr; });
  _blobs->fill(std::move(answer), [this, alive, r, status](std::string body, std::string error,
                                                            journal::blob_store::reservation reserved) {
    net::server_conn* c = *alive;
    if (!c) return;
    if (!error.empty()) {
      // The blob store logged the file and the problem; the client learns
      // that the value cannot be served, never wrong bytes.
      send(*c, r, 500,
           api_error_body(api_error::internal,
                          "a stored payload or result could not be read back intact (its blob file is missing, "
                          "short or corrupt; the relay log names it)"));
      return;
    }
    send(*c, r, status, std::move(body), {}, std::move(reserved));
  });
}

bool service::take_spooled(context& c, size_t items, std::string_view key,
                           const std::function<void(size_t item, const queue::blob_ref& r)>& take) {
  if (!c.spool) return true;
  const http::body_spool& sp = *c.spool;
  if (!_blobs || sp.dir != _blobs->dir()) {
    // The upload path spools only where the blob store keeps its files.
    respond_error(c, api_error::internal, "the body was spooled where no blob store keeps its files");
    return false;
  }
  for (const http::spooled_value& v : sp.values) {
    if (key.empty() || v.key != key || v.item >= items || v.length == 0 || v.offset + v.length > sp.bytes ||
        v.offset + v.length < v.offset) {
      respond_error(c, api_error::invalid_field,
                    key.empty() ? "this request takes no large value" : "a large value is not where this request takes one");
      return false;
    }
  }
  for (const http::spooled_value& v : sp.values) take(v.item, {sp.file, v.offset, v.length, v.crc32c});
  return true;
}

void service::respond_error(context& c, api_error e, std::string_view detail) {
  const auto& info = describe(e);
  respond(c, info.status, api_error_body(e, detail), api_error_headers(e));
}

bool service::authorize(context& c, auth::permission p, std::string_view queue) {
  if (c.policy->allows(c.policy_principal, p, queue)) return true;
  deny(c, p, queue, c.policy_principal ? "no grant" : "unknown principal");
  return false;
}

namespace {

// A rate as a policy writes it: "200", "0.5".
std::string format_rate(double v) {
  char buf[32];
  auto r = std::to_chars(buf, buf + sizeof buf, v);
  return std::string(buf, r.ptr);
}

// The parser stops at a request's headers, and on_headers() runs, exactly
// when a body follows (see http::request_parser): such a request was
// charged there.
bool charged_at_headers(const http::request& req) { return req.content_length > 0 || req.chunked; }

}  // namespace

bool service::within_request_rate(context& c) {
  auto v = _rate.ask(c.policy, c.policy_principal, rate_limiter::kind::requests, 1, uv_now(_loop), true);
  if (v.allowed) return true;
  refuse_rate(c, rate_limiter::kind::requests, v);
  return false;
}

bool service::has_job_token(context& c) {
  auto v = _rate.ask(c.policy, c.policy_principal, rate_limiter::kind::jobs, 1, uv_now(_loop), false);
  if (v.allowed) return true;
  refuse_rate(c, rate_limiter::kind::jobs, v);
  return false;
}

void service::refuse_rate(context& c, rate_limiter::kind k, const rate_limiter::verdict& v, size_t jobs) {
  _rate.count(c.policy_principal, k);
  bool requests = k == rate_limiter::kind::requests;
  // Repeats from one source collapse into a count (relay/log.h), so a
  // flood costs a line a second, not a line a request.
  log::warn("rate_limited")
      .str("policy_principal", c.policy_principal ? *c.policy_principal : "")
      .str("reason", rate_limiter::to_string(k))
      .str("route", route_name(c.match.which))
      .str("remote", c.conn.remote_address());
  std::string burst = std::to_string(static_cast<uint64_t>(v.burst));
  if (v.never) {
    respond_error(c, api_error::batch_too_large,
                  "a batch of " + std::to_string(jobs) + " jobs can never pass: the principal's jobs_burst is " +
                      burst + "; send at most " + burst + " jobs per request");
    return;
  }
  std::string msg = "the principal's ";
  msg += requests ? "request rate limit (" : "job rate limit (";
  msg += format_rate(v.rate) + (requests ? " requests/s, burst " : " jobs/s, jobs_burst ") + burst;
  msg += ") is reached; retry in " + std::to_string(v.retry_after_s) + " s";
  std::string retry = "Retry-After: " + std::to_string(v.retry_after_s) + "\r\n";
  respond(c, describe(api_error::rate_limited).status, api_error_body(api_error::rate_limited, msg), retry);
}

void service::record_denial(context& c, auth::permission p, std::string_view queue, std::string_view why) {
  _denials.inc();
  audit::event("authz_denied")
      .str("principal", c.conn.principal ? *c.conn.principal : "")
      .str("policy_principal", c.policy_principal ? *c.policy_principal : "")
      .str("permission", auth::to_string(p))
      .str("queue", queue)
      .str("route", route_name(c.match.which))
      .str("reason", why)
      .str("remote", c.conn.remote_address());
}

void service::audit_admin_action(context& c, std::string_view action, std::string_view queue, std::string_view job,
                                 size_t count) {
  auto line = audit::event("admin_action", log::level::info);
  // Every admin action keeps its own line (no collapsing by source): the
  // rate of these is the caller's grant's to bound, and each names a job.
  line.source({});
  line.str("principal", c.conn.principal ? *c.conn.principal : "")
      .str("policy_principal", c.policy_principal ? *c.policy_principal : "")
      .str("action", action)
      .str("queue", queue)
      .str("route", route_name(c.match.which))
      .str("remote", c.conn.remote_address());
  if (!job.empty()) line.str("job", job);
  else line.num("count", static_cast<int64_t>(count));
}

void service::deny(context& c, auth::permission p, std::string_view queue, std::string_view why) {
  record_denial(c, p, queue, why);
  // The queue is in the audit line, never in the answer: the answer must
  // not tell a caller the name of a queue it may not see.
  std::string msg = "principal is not allowed to ";
  msg += auth::to_string(p);
  if (!queue.empty()) msg += " on this queue";
  respond_error(c, api_error::forbidden, msg);
}

const queue::job* service::visible_job(context& c, auth::permission p, queue::job_id id) {
  const queue::job* j = _broker.find(id);
  // The same work whether the job exists or not: the policy is asked about
  // the job's queue or about none, and either way one audit line is
  // written (a denial naming the real queue, or a miss), so neither the
  // answer nor its timing tells a caller that a job it may not see exists.
  std::string_view queue = j ? std::string_view(j->queue->name()) : std::string_view();
  bool allowed = c.policy->allows(c.policy_principal, p, queue);
  if (j && allowed) return j;
  if (j) record_denial(c, p, queue, "no grant on the job's queue");
  else record_miss(c, p, id);
  return nullptr;
}

void service::record_miss(context& c, auth::permission p, queue::job_id id) {
  // Looking up ids that do not exist is how enumeration looks; the line
  // has a denial's shape so that writing it costs what a denial costs.
  audit::event("job_not_found", log::level::info)
      .str("principal", c.conn.principal ? *c.conn.principal : "")
      .str("policy_principal", c.policy_principal ? *c.policy_principal : "")
      .str("permission", auth::to_string(p))
      .str("queue", "")
      .str("route", route_name(c.match.which))
      .str("reason", id ? "no such job" : "not a job id")
      .str("remote", c.conn.remote_address());
}

const queue::job* service::job_for(context& c, auth::permission p) {
  // Denied or missing, the answer depends only on the caller's grants and
  // never on whether the job exists: ids are sequential, so anything else
  // would let a caller enumerate every job and the name of its queue.
  if (!c.policy->allows_somewhere(c.policy_principal, p)) {
    auto id = queue::parse_job_id(c.match.job);
    const queue::job* j = id ? _broker.find(*id) : nullptr;
    record_denial(c, p, j ? std::string_view(j->queue->name()) : std::string_view(),
                  c.policy_principal ? "no grant" : "unknown principal");
    respond_error(c, api_error::forbidden, "principal is not allowed to " + std::string(auth::to_string(p)));
    return nullptr;
  }
  auto id = queue::parse_job_id(c.match.job);
  const queue::job* j = visible_job(c, p, id.value_or(0));
  if (!j) respond_error(c, api_error::not_found, "no such job");
  return j;
}

namespace {

// The permission a route needs, and whether its queue is named in the path
// (else it is the job's queue, known only once the job is found).
struct route_permission {
  auth::permission p;
  bool queue_in_path;
};

route_permission permission_of(route r) {
  switch (r) {
    case route::submit: return {auth::permission::submit, true};
    case route::get_job: return {auth::permission::read, false};
    case route::cancel_job: return {auth::permission::submit, false};
    case route::lease: return {auth::permission::consume, true};
    case route::heartbeat:
    case route::complete:
    case route::fail:
    case route::results: return {auth::permission::consume, false};
    case route::list_queues: return {auth::permission::admin, false};
    case route::get_queue:
    case route::list_dead:
    case route::requeue_dead:
    case route::unknown: return {auth::permission::admin, true};
  }
  return {auth::permission::admin, true};
}

}  // namespace

bool service::admit(context& c) {
  // Who asks comes before what is asked: an unauthenticated peer learns
  // nothing, not even which routes exist.
  if (!authenticate(c)) return false;
  if (c.match.which == route::unknown) {
    respond_error(c, api_error::not_found, "no such route");
    return false;
  }
  if (!c.match.method_allowed) {
    std::string allow = "Allow: " + std::string(c.match.allow) + "\r\n";
    respond(c, 405, api_error_body(api_error::method_not_allowed), allow);
    return false;
  }
  if (!c.match.queue.empty() && !auth::valid_queue_name(c.match.queue)) {
    respond_error(c, api_error::invalid_field, "queue names are 1-128 characters of A-Z a-z 0-9 . _ -");
    return false;
  }
  if (!c.policy) {
    respond_error(c, api_error::internal, "no policy loaded");
    return false;
  }
  // In the key modes authenticate() resolved it from the key.
  if (_authn.mode == authn_options::auth_mode::mtls) c.policy_principal = c.policy->match(c.conn.peer());
  return true;
}

bool service::on_headers(net::server_conn& conn, http::request& req) {
  // A body is announced: decide from method, path and principal before one
  // byte of it is held. The full check (the job's queue) follows with the
  // request; this one only refuses what could never be allowed.
  context c{conn, req, match_route(req.verb, req.path()), _policy(), nullptr};
  if (!admit(c)) return false;
  // Before the grants: a principal over its rate is refused cheaply, even
  // for what it may not do.
  if (!within_request_rate(c)) return false;
  route_permission need = permission_of(c.match.which);
  if (need.queue_in_path)
    return authorize(c, need.p, c.match.queue) && (c.match.which != route::submit || has_job_token(c));
  if (!c.policy->allows_somewhere(c.policy_principal, need.p)) {
    deny(c, need.p, {}, "no grant");
    return false;
  }
  return true;
}

void service::on_request(net::server_conn& conn, http::request& req) {
  context c{conn, req, match_route(req.verb, req.path()), _policy(), nullptr, nullptr, std::move(req.spool)};
  if (!admit(c)) return;
  if (!charged_at_headers(req) && !within_request_rate(c)) return;
  bool changes = c.match.which != route::get_job && c.match.which != route::list_queues &&
                 c.match.which != route::get_queue && c.match.which != route::list_dead;
  if (_journal && !_journal->serving()) {
    respond_error(c, api_error::unavailable, "this relay no longer leads its journal: " + _journal->failure());
    return;
  }
  if (changes && _journal && !_journal->accepting()) {
    respond_error(c, api_error::unavailable,
                  _journal->failure().empty() ? "the journal is behind; retry later"
                                              : "the journal cannot be written: " + _journal->failure());
    return;
  }
  switch (c.match.which) {
    case route::submit: submit(c); break;
    case route::get_job: get_job(c); break;
    case route::cancel_job: cancel_job(c); break;
    case route::lease: lease(c); break;
    case route::heartbeat: heartbeat(c); break;
    case route::complete: complete_or_fail(c, false); break;
    case route::fail: complete_or_fail(c, true); break;
    case route::results: results(c); break;
    case route::list_queues: list_queues(c); break;
    case route::get_queue: get_queue(c); break;
    case route::list_dead: list_dead(c); break;
    case route::requeue_dead: requeue_dead(c); break;
    case route::unknown: break;
  }
  reschedule();
}

// ---- The core's clock ----

void service::reschedule() {
  if (_closed) return;
  auto due = _broker.next_deadline();
  if (!due) {
    if (_clock_due) uv_timer_stop(&_clock);
    _clock_due.reset();
    return;
  }
  if (_clock_due && *_clock_due == *due) return;
  queue::time_ms delay = *due - now();
  uv_timer_start(&_clock, on_clock, delay > 0 ? static_cast<uint64_t>(delay) : 0, 0);
  _clock_due = due;
}

void service::on_clock(uv_timer_t* t) {
  auto* s = static_cast<service*>(t->data);
  s->_clock_due.reset();
  s->_broker.advance(now());
  s->reschedule();
}

// ---- Parked requests ----

void service::finish_lease_wait(lease_wait* w) {
  _lease_waits.erase(w);
  w->close();
}

void service::finish_job_wait(job_wait* w) {
  _job_waits.erase(w);
  w->close();
}

void service::drain() {
  _draining = true;
  // Copy: answering removes entries.
  for (lease_wait* w : std::vector<lease_wait*>(_lease_waits.begin(), _lease_waits.end())) w->expire();
  for (job_wait* w : std::vector<job_wait*>(_job_waits.begin(), _job_waits.end())) w->expire();
}

void service::policy_changed() {
  std::shared_ptr<const auth::policy> pol = _policy();
  if (!pol) return;
  // Who each waiter is under the new policy: its certificate matched anew,
  // or with API keys alone the principal its key named.
  auto principal_of = [&](net::server_conn& conn, const std::string& named) -> const std::string* {
    if (_authn.mode == authn_options::auth_mode::api_key) return pol->principal_named(named);
    return pol->match(conn.peer());
  };
  // Copies: answering removes entries.
  for (lease_wait* w : std::vector<lease_wait*>(_lease_waits.begin(), _lease_waits.end())) {
    const std::string* who = principal_of(w->conn, w->policy_principal);
    if (!pol->allows(who, auth::permission::consume, w->queue)) w->expire();
  }
  for (job_wait* w : std::vector<job_wait*>(_job_waits.begin(), _job_waits.end())) {
    const std::string* who = principal_of(w->conn, w->policy_principal);
    const queue::job* j = _broker.find(w->id);
    if (j && pol->allows(who, auth::permission::read, j->queue->name())) continue;
    if (!pol->allows_somewhere(who, auth::permission::read))
      w->refuse(describe(api_error::forbidden).status,
                api_error_body(api_error::forbidden, "principal is not allowed to read"));
    else
      w->refuse(describe(api_error::not_found).status, api_error_body(api_error::not_found, "no such job"));
  }
}

uint32_t service::wait_limit(const context& c, uint32_t asked) const {
  uint64_t limit = asked;
  if (uint64_t retire = c.conn.ms_until_retired()) limit = std::min(limit, retire);
  if (c.key && c.key->not_after_ms) {
    int64_t left = *c.key->not_after_ms - now();
    limit = std::min<uint64_t>(limit, left > 0 ? static_cast<uint64_t>(left) : 1);
  }
  return static_cast<uint32_t>(std::max<uint64_t>(limit, 1));
}

template <typename Wait>
bool service::key_still_valid(const Wait& w) const {
  if (!w.keyed) return true;
  std::shared_ptr<const auth::api_keys> keys = _authn.keys ? _authn.keys() : nullptr;
  const auth::api_key* k = keys ? keys->find(w.key_digest) : nullptr;
  return k && !(k->not_after_ms && now() > *k->not_after_ms);
}

void service::credentials_changed() {
  // Copies: answering removes entries.
  for (lease_wait* w : std::vector<lease_wait*>(_lease_waits.begin(), _lease_waits.end()))
    if (!key_still_valid(*w)) w->expire();
  for (job_wait* w : std::vector<job_wait*>(_job_waits.begin(), _job_waits.end()))
    if (!key_still_valid(*w))
      w->refuse(describe(api_error::unauthenticated).status,
                api_error_body(api_error::unauthenticated, "the API key is not valid"));
}

void service::close() {
  if (_closed) return;
  drain();
  _closed = true;
  uv_timer_stop(&_clock);
  uv_close(reinterpret_cast<uv_handle_t*>(&_clock), nullptr);
}

// ---- Metrics computed at scrape time ----

void service::collect_queue_metrics(std::string& out) const {
  using reg = ops::registry;
  std::string jobs, waiting, age;
  std::string counters[8];
  static constexpr std::string_view counter_names[8] = {
      "relay_jobs_submitted_total", "relay_jobs_leased_total", "relay_jobs_completed_total",
      "relay_jobs_failed_total",    "relay_jobs_expired_total", "relay_jobs_dead_total",
      "relay_jobs_cancelled_total", "relay_jobs_requeued_total"};
  static constexpr std::string_view counter_help[8] = {
      "Jobs submitted.", "Leases granted.", "Jobs completed.", "Failures reported by workers.",
      "Leases that expired.", "Jobs that went dead.", "Jobs cancelled.", "Dead jobs requeued."};
  queue::time_ms t = now();
  _broker.for_each_queue([&](const queue::job_queue& q) {
    std::string label = "queue=\"" + reg::label_value(q.name()) + "\"";
    for (size_t s = 0; s < queue::job_state_count; ++s) {
      jobs += "relay_queue_jobs{" + label + ",state=\"" + std::string(queue::to_string(queue::job_state(s))) +
              "\"} " + std::to_string(q.count(queue::job_state(s))) + "\n";
    }
    waiting += "relay_queue_waiting_workers{" + label + "} " + std::to_string(q.waiting_workers()) + "\n";
    queue::time_ms since = q.oldest_ready_since();
    double age_s = since ? static_cast<double>(t - since) / 1000.0 : 0.0;
    age += "relay_queue_oldest_ready_age_seconds{" + label + "} " + std::to_string(age_s) + "\n";
    const auto& k = q.counters();
    const uint64_t values[8] = {k.submitted, k.leased, k.completed, k.failed, k.expired, k.dead, k.cancelled, k.requeued};
    for (int i = 0; i < 8; ++i)
      counters[i] += std::string(counter_names[i]) + "{" + label + "} " + std::to_string(values[i]) + "\n";
  });
  reg::write_header(out, "relay_queue_jobs", "Jobs held, by queue and state.", "gauge");
  out += jobs;
  reg::write_header(out, "relay_queue_waiting_workers", "Lease requests parked on the queue.", "gauge");
  out += waiting;
  reg::write_header(out, "relay_queue_oldest_ready_age_seconds", "Age of the oldest ready job.", "gauge");
  out += age;
  for (int i = 0; i < 8; ++i) {
    reg::write_header(out, counter_names[i], counter_help[i], "counter");
    out += counters[i];
  }
  // Waits on queues that hold no job are in no per-queue series.
  reg::write_header(out, "relay_parked_requests", "Long polls parked, by kind.", "gauge");
  out += "relay_parked_requests{kind=\"lease\"} " + std::to_string(_lease_waits.size()) + "\n";
  out += "relay_parked_requests{kind=\"job\"} " + std::to_string(_job_waits.size()) + "\n";
  reg::write_header(out, "relay_queues", "Queues holding at least one job (limits.max_queues bounds it).", "gauge");
  out += "relay_queues " + std::to_string(_broker.queue_count()) + "\n";
  reg::write_header(out, "relay_jobs_held", "Jobs held in memory, all queues and states.", "gauge");
  out += "relay_jobs_held " + std::to_string(_broker.job_count()) + "\n";
  reg::write_header(out, "relay_job_bytes_held", "Payload, result and error bytes held.", "gauge");
  out += "relay_job_bytes_held " + std::to_string(_broker.held_bytes()) + "\n";
}

}  // namespace relay::api
