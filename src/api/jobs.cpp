// Producer routes: submit, read (with long polling) and cancel jobs.
#include <cassert>
#include <charconv>

#include "api/service.h"
#include "api/waits.h"
#include "relay/json.h"

namespace relay::api {

void append_job_json(std::string& out, const queue::job& j) {
  out += "{\"id\":\"";
  queue::append_job_id(out, j.id);
  out += "\",\"queue\":";
  json::append_string(out, j.queue->name());
  out += ",\"state\":\"";
  out += queue::to_string(j.state);
  out += "\",\"attempts\":";
  json::append_uint(out, j.attempts);
  out += ",\"max_attempts\":";
  json::append_uint(out, j.max_attempts);
  out += ",\"priority\":";
  json::append_uint(out, j.priority);
  out += ",\"payload\":";
  out += j.payload;
  out += ",\"result\":";
  if (j.state == queue::job_state::succeeded) out += j.outcome;
  else out += "null";
  out += ",\"error\":";
  if (j.state != queue::job_state::succeeded && !j.outcome.empty()) json::append_string(out, j.outcome);
  else out += "null";
  out += ",\"created_ms\":";
  json::append_int(out, j.created_ms);
  out += ",\"updated_ms\":";
  json::append_int(out, j.updated_ms);
  out += '}';
}

void service::submit(context& c) {
  std::string_view q = c.match.queue;
  if (!authorize(c, auth::permission::submit, q)) return;
  std::vector<queue::submit_params> items;
  bool batch = false;
  decode_error err;
  if (!_decoder.submit(c.req.body, items, batch, err)) {
    respond_error(c, err.kind, err.message);
    return;
  }
  // A batch is accepted whole or not at all: every limit is checked for
  // all of it before the first job goes in.
  size_t n = items.size();
  uint64_t clock = uv_now(_loop);
  auto rate = _rate.ask(c.policy, c.policy_principal, rate_limiter::kind::jobs, static_cast<double>(n), clock, false);
  if (!rate.allowed) {
    refuse_rate(c, rate_limiter::kind::jobs, rate, n);
    return;
  }
  size_t bytes = 0;
  for (const auto& it : items) bytes += it.payload.size();
  if (!_broker.has_room(n, bytes)) {
    respond_error(c, api_error::queue_full);
    return;
  }
  uint64_t max_depth = c.policy->max_depth(q);
  if (!_broker.has_depth_room(q, n, max_depth)) {
    _rate.count(c.policy_principal, rate_limiter::kind::queue_full);
    size_t cap = max_depth ? max_depth : _broker.limits().max_queue_depth;
    respond_error(c, api_error::queue_full,
                  "the queue holds its cap of " + std::to_string(cap) + " unfinished jobs (" +
                      (max_depth ? "the policy's max_depth" : "limits.max_queue_depth") +
                      "); retry once workers have taken some");
    return;
  }
  // Job tokens pay for jobs that go in: a submit refused for room costs
  // none. Nothing ran since the check above, so they are there.
  [[maybe_unused]] auto paid =
      _rate.ask(c.policy, c.policy_principal, rate_limiter::kind::jobs, static_cast<double>(n), clock, true);
  assert(paid.allowed);
  queue::time_ms t = now();
  std::string body;
  bool all_created = true;
  if (batch) body = "{\"ids\":[";
  // Idempotency keys belong to the principal that submits: scoped only by
  // queue, a principal allowed to submit there could claim another's key
  // ahead of it (its job silently replaced) or learn the id and state of
  // another's job from a guessed key. The broker keeps the key opaque; the
  // principal travels in it, journal and snapshots included.
  std::vector<std::string> scoped_keys;
  scoped_keys.reserve(items.size());
  for (auto& it : items) {
    if (it.idempotency_key.empty()) continue;
    std::string k = c.conn.principal ? *c.conn.principal : std::string();
    k += '\0';
    k += it.idempotency_key;
    scoped_keys.push_back(std::move(k));
    it.idempotency_key = scoped_keys.back();
  }
  for (size_t i = 0; i < items.size(); ++i) {
    queue::submit_params& p = items[i];
    p.queue = q;
    p.max_depth = max_depth;
    auto r = _broker.submit(p, t);
    if (r.error == queue::op_error::too_many_queues) {
      respond_error(c, api_error::too_many_queues);
      return;
    }
    if (r.error != queue::op_error::none) {
      respond_error(c, api_error::queue_full);
      return;
    }
    all_created = all_created && r.created;
    if (batch) {
      if (i) body += ',';
      body += '"';
      queue::append_job_id(body, r.j->id);
      body += '"';
    } else {
      body = "{\"id\":\"" + queue::format_job_id(r.j->id) + "\",\"state\":\"" +
             std::string(queue::to_string(r.j->state)) + "\"}";
    }
  }
  if (batch) body += "]}";
  // A repeated idempotency key answers 200 with the first job, not 201.
  respond(c, batch || all_created ? 201 : 200, std::move(body));
}

void service::get_job(context& c) {
  const queue::job* j = job_for(c, auth::permission::read);
  if (!j) return;
  uint32_t wait_ms = 0;
  if (auto w = c.req.query_param("wait_ms")) {
    auto [ptr, ec] = std::from_chars(w->data(), w->data() + w->size(), wait_ms);
    if (ec != std::errc() || ptr != w->data() + w->size() || wait_ms > value_limits::max_wait_ms) {
      respond_error(c, api_error::invalid_field, "wait_ms must be an integer from 0 to 60000");
      return;
    }
  }
  if (wait_ms > 0 && !queue::is_terminal(j->state) && !_draining) {
    auto* w = new job_wait(*this, c.conn, j->id);
    if (c.policy_principal) w->policy_principal = *c.policy_principal;
    if (c.key) {
      w->keyed = true;
      w->key_digest = c.key->sha256;
    }
    w->start(wait_limit(c, wait_ms));
    return;
  }
  // While the journal fails, reads are answered at once rather than after
  // the failing write: a job whose latest change is not durable would show
  // what may yet be lost (and its id may be handed out again).
  if (_journal && !_journal->accepting() && j->record_no > _journal->durable_records()) {
    respond_error(c, api_error::unavailable, "the job's latest change is not durable yet; retry later");
    return;
  }
  std::string body;
  // Room for the payload and result up front: appended to an empty string
  // they were copied again at every doubling (a 1 MiB GET: 3 copies, not 1).
  body.reserve(j->payload.size() + j->outcome.size() + 512);
  append_job_json(body, *j);
  respond(c, 200, std::move(body));
}

void service::cancel_job(context& c) {
  const queue::job* j = job_for(c, auth::permission::submit);
  if (!j) return;
  switch (_broker.cancel(j->id, now())) {
    case queue::op_error::none: {
      std::string id = queue::format_job_id(j->id);
      audit_admin_action(c, "cancel", j->queue->name(), id);
      respond(c, 200, "{\"id\":\"" + id + "\",\"state\":\"cancelled\"}");
      return;
    }
    case queue::op_error::not_cancellable:
      respond_error(c, api_error::not_cancellable,
                    "the job is " + std::string(queue::to_string(j->state)) + " and cannot be cancelled");
      return;
    default:
      respond_error(c, api_error::not_found, "no such job");
      return;
  }
}

}  // namespace relay::api
