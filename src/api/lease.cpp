// Worker routes: lease (with long polling), heartbeat, complete, fail, and
// the batch of results.
#include <cassert>
#include <charconv>

#include "api/service.h"
#include "api/waits.h"
#include "relay/json.h"

namespace relay::api {

namespace {

// The lease answer, in pieces shared by the writer and the measure below,
// so that a byte bound counts exactly what is sent:
//   {"jobs":[{"id":"<16 hex>","attempt":N,"lease":"<32 hex>","lease_expires_ms":N,"payload":<as stored>},...]}
namespace answer {
constexpr std::string_view open = "{\"jobs\":[", close = "]}", separator = ",";
constexpr std::string_view id = "{\"id\":\"", attempt = "\",\"attempt\":", lease = ",\"lease\":\"",
                           expires = "\",\"lease_expires_ms\":", payload = ",\"payload\":", end = "}";
constexpr size_t id_digits = 16, lease_digits = 32;
}  // namespace answer

size_t decimal_digits(int64_t v) {
  char buf[24];
  return static_cast<size_t>(std::to_chars(buf, buf + sizeof buf, v).ptr - buf);
}

}  // namespace

size_t leased_job_bytes(const queue::job& j, uint32_t attempt, queue::time_ms expires, bool first) {
  return (first ? 0 : answer::separator.size()) + answer::id.size() + answer::id_digits + answer::attempt.size() +
         decimal_digits(attempt) + answer::lease.size() + answer::lease_digits + answer::expires.size() +
         decimal_digits(expires) + answer::payload.size() + j.payload.size() + answer::end.size();
}

const queue::answer_size lease_answer_size{answer::open.size() + answer::close.size(), leased_job_bytes};

journal::answer_template leased_jobs_json(const std::vector<queue::job*>& jobs) {
  // One allocation, of the exact size (less the referenced payloads, read
  // back into the answer's final buffer by the blob store).
  size_t size = lease_answer_size.empty;
  size_t refs = 0;
  for (size_t i = 0; i < jobs.size(); ++i) {
    size += leased_job_bytes(*jobs[i], jobs[i]->attempts, jobs[i]->due_ms, i == 0);
    if (jobs[i]->payload.is_ref()) refs += jobs[i]->payload.size();
  }
  journal::answer_template out;
  std::string& body = out.text;
  body.reserve(size - refs);
  body += answer::open;
  for (size_t i = 0; i < jobs.size(); ++i) {
    const queue::job& j = *jobs[i];
    if (i) body += answer::separator;
    body += answer::id;
    queue::append_job_id(body, j.id);
    body += answer::attempt;
    json::append_uint(body, j.attempts);
    body += answer::lease;
    j.lease.append_hex(body);
    body += answer::expires;
    json::append_int(body, j.due_ms);
    body += answer::payload;
    if (j.payload.is_ref()) out.hole(j.payload.ref());
    else body += j.payload.view();
    body += answer::end;
  }
  body += answer::close;
  // Ensures: the measure the broker bounded the lease by is the size sent.
  assert(out.size() == size);
  return out;
}

namespace {

// Maps a core result on a leased job to the API's answer.
api_error lease_error(queue::op_error e) {
  switch (e) {
    case queue::op_error::not_found: return api_error::not_found;
    case queue::op_error::wrong_owner: return api_error::forbidden;
    default: return api_error::lease_lost;
  }
}

std::string_view lease_error_detail(queue::op_error e) {
  switch (e) {
    case queue::op_error::not_found: return "no such job";
    case queue::op_error::wrong_owner: return "the lease belongs to another principal";
    default: return "the lease expired or was replaced; the result was not stored";
  }
}

}  // namespace

void service::lease(context& c) {
  std::string_view q = c.match.queue;
  if (!authorize(c, auth::permission::consume, q)) return;
  lease_args args;
  decode_error err;
  if (!_decoder.lease(c.req.body, args, err)) {
    respond_error(c, err.kind, err.message);
    return;
  }
  if (!c.conn.principal) {
    respond_error(c, api_error::forbidden, "leases need a client certificate identity");
    return;
  }
  std::vector<queue::job*> jobs;
  _broker.lease(q, args.max, args.max_bytes, lease_answer_size, args.lease_ms, c.conn.principal, now(), jobs);
  if (!jobs.empty() || args.wait_ms == 0 || _draining) {
    send_filled(c.conn, c.match.which, 200, leased_jobs_json(jobs));
    return;
  }
  auto* w = new lease_wait(*this, c.conn);
  w->max = args.max;
  w->max_bytes = args.max_bytes;
  w->size = lease_answer_size;
  w->lease_ms = args.lease_ms;
  w->owner = c.conn.principal;
  w->queue = q;
  if (c.policy_principal) w->policy_principal = *c.policy_principal;
  if (c.key) {
    w->keyed = true;
    w->key_digest = c.key->sha256;
  }
  _broker.park(q, *w);
  w->start(wait_limit(c, args.wait_ms));
}

void service::heartbeat(context& c) {
  const queue::job* j = job_for(c, auth::permission::consume);
  if (!j) return;
  heartbeat_args args;
  decode_error err;
  if (!_decoder.heartbeat(c.req.body, args, err)) {
    respond_error(c, err.kind, err.message);
    return;
  }
  auto r = _broker.heartbeat(j->id, args.lease, c.conn.principal, args.extend_ms, now());
  if (r.error != queue::op_error::none) {
    if (r.error == queue::op_error::wrong_owner) deny(c, auth::permission::consume, j->queue->name(), "lease of another principal");
    else respond_error(c, lease_error(r.error), lease_error_detail(r.error));
    return;
  }
  std::string body = "{\"id\":\"" + queue::format_job_id(j->id) + "\",\"lease_expires_ms\":" +
                     std::to_string(r.expires_ms) + "}";
  respond(c, 200, std::move(body));
}

void service::complete_or_fail(context& c, bool fail) {
  const queue::job* j = job_for(c, auth::permission::consume);
  if (!j) return;
  outcome_args args;
  decode_error err;
  bool ok = fail ? _decoder.fail(c.req.body, args, err) : _decoder.complete(c.req.body, args, err);
  if (!ok) {
    respond_error(c, err.kind, err.message);
    return;
  }
  queue::blob_ref result_ref;
  // A failure's body carries no result: a spooled one is refused.
  if (!take_spooled(c, 1, fail ? std::string_view() : "result",
                    [&](size_t, const queue::blob_ref& r) {
                      // `null` marks the cut; else a later duplicate key won.
                      if (args.result == "null") result_ref = r;
                    }))
    return;
  queue::time_ms t = now();
  queue::op_error e = fail ? _broker.fail(j->id, args.lease, c.conn.principal, args.error, args.retry_delay_ms, t)
                           : _broker.complete(j->id, args.lease, c.conn.principal,
                                              result_ref.valid() ? std::string_view() : std::string_view(args.result), t,
                                              result_ref);
  if (e != queue::op_error::none) {
    if (e == queue::op_error::wrong_owner) deny(c, auth::permission::consume, j->queue->name(), "lease of another principal");
    else respond_error(c, lease_error(e), lease_error_detail(e));
    return;
  }
  if (result_ref.valid()) c.spool->keep = true;  // the job names the file now
  std::string body = "{\"id\":\"" + queue::format_job_id(j->id) + "\",\"state\":\"" +
                     std::string(queue::to_string(j->state)) + "\"";
  if (j->state == queue::job_state::failed) body += ",\"retry_at_ms\":" + std::to_string(j->due_ms);
  body += '}';
  respond(c, 200, std::move(body));
}

void service::results(context& c) {
  if (!c.policy->allows_somewhere(c.policy_principal, auth::permission::consume)) {
    deny(c, auth::permission::consume, {}, c.policy_principal ? "no grant" : "unknown principal");
    return;
  }
  std::vector<outcome_args> items;
  decode_error err;
  if (!_decoder.results(c.req.body, items, err)) {
    respond_error(c, err.kind, err.message);
    return;
  }
  std::vector<queue::blob_ref> refs;
  if (c.spool) refs.resize(items.size());
  if (!take_spooled(c, items.size(), "result", [&](size_t i, const queue::blob_ref& r) {
        if (!items[i].failed && items[i].result == "null") refs[i] = r;  // see complete_or_fail()
      }))
    return;
  queue::time_ms t = now();
  std::string body;
  body.reserve(16 + items.size() * 64);  // {"id":"…","status":200,"state":"succeeded"}
  body += "{\"results\":[";
  for (size_t i = 0; i < items.size(); ++i) {
    const outcome_args& a = items[i];
    // As for a single result: a job on a queue the caller may not consume
    // is answered as one that does not exist, at the same cost.
    const queue::job* j = visible_job(c, auth::permission::consume, a.id);
    int status = 200;
    api_error e = api_error::internal;
    if (!j) {
      status = 404;
      e = api_error::not_found;
    } else {
      queue::blob_ref ref = refs.empty() ? queue::blob_ref{} : refs[i];
      queue::op_error r = a.failed ? _broker.fail(a.id, a.lease, c.conn.principal, a.error, a.retry_delay_ms, t)
                                   : _broker.complete(a.id, a.lease, c.conn.principal,
                                                      ref.valid() ? std::string_view() : std::string_view(a.result), t, ref);
      if (r == queue::op_error::none && ref.valid()) c.spool->keep = true;
      if (r != queue::op_error::none) {
        e = lease_error(r);
        status = describe(e).status;
        if (r == queue::op_error::wrong_owner)
          record_denial(c, auth::permission::consume, j->queue->name(), "lease of another principal");
      }
    }
    if (i) body += ',';
    body += "{\"id\":\"";
    queue::append_job_id(body, a.id);
    body += "\",\"status\":";
    json::append_int(body, status);
    if (status != 200) {
      body += ",\"error\":\"";
      body += describe(e).code;
      body += '"';
    } else {
      body += ",\"state\":\"";
      body += queue::to_string(j->state);
      body += '"';
    }
    body += '}';
  }
  body += "]}";
  respond(c, 200, std::move(body));
}

}  // namespace relay::api
