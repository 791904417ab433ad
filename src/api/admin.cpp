// Operator routes: queue statistics and the dead-letter list.
#include <charconv>

#include "api/service.h"
#include "relay/json.h"

namespace relay::api {
namespace {

void append_queue_json(std::string& out, const queue::job_queue& q, queue::time_ms now) {
  out += "{\"name\":";
  json::append_string(out, q.name());
  out += ",\"counts\":{";
  for (size_t s = 0; s < queue::job_state_count; ++s) {
    if (s) out += ',';
    out += '"';
    out += queue::to_string(queue::job_state(s));
    out += "\":";
    json::append_uint(out, q.count(queue::job_state(s)));
  }
  out += "},\"oldest_ready_age_ms\":";
  queue::time_ms since = q.oldest_ready_since();
  json::append_int(out, since ? now - since : 0);
  out += ",\"waiting_workers\":";
  json::append_uint(out, q.waiting_workers());
  out += '}';
}

}  // namespace

void service::list_queues(context& c) {
  if (!c.policy->allows_somewhere(c.policy_principal, auth::permission::admin)) {
    deny(c, auth::permission::admin, {}, c.policy_principal ? "no grant" : "unknown principal");
    return;
  }
  queue::time_ms t = now();
  std::string body = "{\"queues\":[";
  bool first = true;
  _broker.for_each_queue([&](const queue::job_queue& q) {
    if (!c.policy->allows(c.policy_principal, auth::permission::admin, q.name())) return;
    if (!first) body += ',';
    first = false;
    append_queue_json(body, q, t);
  });
  body += "]}";
  respond(c, 200, std::move(body));
}

void service::get_queue(context& c) {
  if (!authorize(c, auth::permission::admin, c.match.queue)) return;
  const queue::job_queue* q = _broker.find_queue(c.match.queue);
  if (!q) {
    respond_error(c, api_error::not_found, "no such queue");
    return;
  }
  std::string body;
  append_queue_json(body, *q, now());
  respond(c, 200, std::move(body));
}

void service::list_dead(context& c) {
  if (!authorize(c, auth::permission::admin, c.match.queue)) return;
  size_t limit = 100;
  if (auto l = c.req.query_param("limit")) {
    auto [ptr, ec] = std::from_chars(l->data(), l->data() + l->size(), limit);
    if (ec != std::errc() || ptr != l->data() + l->size() || limit == 0 || limit > 1000) {
      respond_error(c, api_error::invalid_field, "limit must be an integer from 1 to 1000");
      return;
    }
  }
  std::string body = "{\"jobs\":[";
  bool first = true;
  for (const queue::job* j : _broker.dead_jobs(c.match.queue, limit)) {
    if (!first) body += ',';
    first = false;
    body += "{\"id\":\"" + queue::format_job_id(j->id) + "\",\"attempts\":" + std::to_string(j->attempts) +
            ",\"error\":";
    json::append_string(body, j->outcome);
    body += ",\"created_ms\":" + std::to_string(j->created_ms) + ",\"updated_ms\":" + std::to_string(j->updated_ms) + "}";
  }
  body += "]}";
  respond(c, 200, std::move(body));
}

void service::requeue_dead(context& c) {
  if (!authorize(c, auth::permission::admin, c.match.queue)) return;
  requeue_args args;
  decode_error err;
  if (!_decoder.requeue(c.req.body, args, err)) {
    respond_error(c, err.kind, err.message);
    return;
  }
  auto done = _broker.requeue_dead(c.match.queue, args.ids, args.max, now());
  audit_admin_action(c, "requeue_dead", c.match.queue, {}, done.size());
  std::string body = "{\"requeued\":[";
  for (size_t i = 0; i < done.size(); ++i) {
    if (i) body += ',';
    body += '"' + queue::format_job_id(done[i]) + '"';
  }
  body += "]}";
  respond(c, 200, std::move(body));
}

}  // namespace relay::api
