// relay's v1 API: authorises each request against the policy, decodes it,
// drives the queue core and answers. Long polls (lease with wait_ms, GET job
// with wait_ms) park a waiter and answer later; the core's clock (delays,
// lease expiry, result retention) runs on one libuv timer armed for the
// core's next deadline.
#pragma once

#include <uv.h>

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <unordered_set>

#include "api/decode.h"
#include "api/rate_limit.h"
#include "api/router.h"
#include "relay/api_keys.h"
#include "relay/auth.h"
#include "relay/blob_store.h"
#include "relay/journal.h"
#include "relay/metrics.h"
#include "relay/queue.h"
#include "relay/server.h"

namespace relay::api {

// How requests are authenticated (auth.* in the configuration).
struct authn_options {
  enum class auth_mode : uint8_t {
    mtls,              // the client certificate names the principal
    api_key,           // a Bearer key does; a certificate, if any, is not used
    mtls_and_api_key,  // both, naming the same policy principal
  };
  auth_mode mode = auth_mode::mtls;
  // The keys in force (reloadable); required by the key modes.
  std::function<std::shared_ptr<const auth::api_keys>()> keys;
  uint32_t max_failures = 10;  // per source and window; 0: no limit
  uint64_t failure_window_ms = 60000;
  size_t max_failure_sources = 16384;  // sources tracked at once (bounded memory)
};

class service final : public net::request_handler {
 public:
  using policy_source = std::function<std::shared_ptr<const auth::policy>()>;

  // `journal` may be null (no durability, as in unit tests).
  service(uv_loop_t* loop, queue::broker& broker, policy_source policy, ops::registry& metrics,
          journal::backend* journal = nullptr, authn_options authn = {});
  service(const service&) = delete;
  service& operator=(const service&) = delete;
  ~service() override;

  void on_connected(net::server_conn& conn) override;
  bool on_headers(net::server_conn& conn, http::request& req) override;
  void on_request(net::server_conn& conn, http::request& req) override;
  void on_rejected(net::server_conn& conn, api_error e) override;

  // After a policy reload: a parked request whose caller no longer holds
  // the grant it was parked under is answered now -- a lease with no jobs
  // (its next lease is refused), a job wait as a job it may not see -- so
  // that a grant revoked while a long poll waits cannot still deliver a
  // job or a payload.
  void policy_changed();
  // After the API keys file was reloaded: a parked request authorised by a
  // key that is gone or expired is answered now (no jobs; 401 for a job
  // wait), never handed a job or a payload.
  void credentials_changed();
  // Answers every parked request now (leases with no jobs, job waits with
  // the job's current state) and answers new long polls at once.
  void drain();
  // Stops the clock; the loop must then run to close its handle.
  void close();
  // Where referenced payloads and results are read back from (file
  // backend); without one, no request may carry spooled values.
  void set_blob_store(journal::blob_store* blobs) { _blobs = blobs; }
  size_t parked() const { return _lease_waits.size() + _job_waits.size(); }

  static queue::time_ms now();

 private:
  struct lease_wait;
  struct job_wait;
  struct context {
    net::server_conn& conn;
    http::request& req;
    route_match match;
    std::shared_ptr<const auth::policy> policy;
    const std::string* policy_principal;  // the policy's name for the peer
    // The API key that authenticated the request (key modes), valid while
    // the request is handled.
    const auth::api_key* key = nullptr;
    // The request's spooled values, taken from it: the spool lives exactly
    // as long as the request is handled, so a file no job came to name
    // (a refused or stale request) is removed at once, not when the
    // connection reuses or frees the request.
    std::shared_ptr<http::body_spool> spool;
  };
  // How long a long poll of `c` may wait: `asked`, cut short where the
  // credentials it was authorised by end first (the key's not_after, the
  // connection's retirement at its certificate's notAfter or max age).
  uint32_t wait_limit(const context& c, uint32_t asked) const;
  // Whether a parked request's key (key modes) still authenticates.
  template <typename Wait>
  bool key_still_valid(const Wait& w) const;

  // Route, method, queue name and policy present; resolves the policy's
  // principal. False when an answer was sent.
  bool admit(context& c);
  // In the key modes: the request's key (and, with mtls+api_key, its
  // agreement with the certificate) or a 401; a source over its failure
  // budget gets 429 before its key is looked at. Sets the request's policy
  // principal and, in api_key mode, conn.principal. False when answered.
  bool authenticate(context& c);
  bool authorize(context& c, auth::permission p, std::string_view queue);
  // Charges the request to the peer's request bucket (policy "limits");
  // false when refused, with 429 rate_limited sent. Once per request: at
  // its headers when a body follows, else when it is complete.
  bool within_request_rate(context& c);
  // At a submit's headers: whether the peer has a job token left, so that
  // a principal over its job rate is refused before its body is held.
  // Takes none: how many jobs the body holds is known once it is decoded.
  bool has_job_token(context& c);
  // Answers a rate limit's refusal (429 with Retry-After, or 413 for a
  // batch that can never pass), counted per principal and logged.
  void refuse_rate(context& c, rate_limiter::kind k, const rate_limiter::verdict& v, size_t jobs = 1);
  // Audits a denial (log line and counter) without answering.
  void record_denial(context& c, auth::permission p, std::string_view queue, std::string_view why);
  // The audit line of a change made on someone's authority beyond their own
  // jobs' lifecycle: a dead-job requeue, a cancellation. `job` or `count`.
  void audit_admin_action(context& c, std::string_view action, std::string_view queue, std::string_view job,
                          size_t count = 0);
  // record_denial() and a 403 that names no queue.
  void deny(context& c, auth::permission p, std::string_view queue, std::string_view why);
  // Takes the body by value: an answer built by the handler is moved, not
  // copied, into the journal wait.
  void respond(context& c, int status, std::string body, std::string_view extra = {});
  // Every answer goes out through here: while records appended so far are
  // not yet durable, the answer waits for them (so that no client ever sees
  // a change a crash could undo), and becomes a 503 if writing them failed.
  // `held`: the share of the blob store's read bound this answer's bytes
  // took, given back once the answer is handed to its connection.
  void send(net::server_conn& conn, route r, int status, std::string body, std::string_view extra = {},
            journal::blob_store::reservation held = {});
  // send() for an answer that shows referenced values: they are read back
  // on the threadpool (CRC checked) first; a read that fails answers 500
  // and is logged with its file. An answer without holes is sent at once.
  void send_filled(net::server_conn& conn, route r, int status, journal::answer_template answer);
  // The values of a spooled request body cut out under `key`, handed to
  // `take(item, ref)` for items below `items`: each a reference into the
  // spool file. False, with 400 sent, if a value names an item the body
  // does not have (the decoder's items and the scanner's disagree), or a
  // key the route does not take.
  bool take_spooled(context& c, size_t items, std::string_view key,
                    const std::function<void(size_t item, const queue::blob_ref& r)>& take);
  void respond_error(context& c, api_error e, std::string_view detail = {});
  void count(route r, int status);
  // The job a /v1/jobs/{id} route names, after checking `p` on its queue;
  // null when an answer was already sent. A job on a queue the caller lacks
  // `p` on is answered exactly as one that does not exist (and audited).
  const queue::job* job_for(context& c, auth::permission p);
  // The job `id` if the caller holds `p` on its queue, else null with an
  // audit line: the same work for a job it may not see as for none.
  const queue::job* visible_job(context& c, auth::permission p, queue::job_id id);
  void record_miss(context& c, auth::permission p, queue::job_id id);

  void submit(context& c);
  void get_job(context& c);
  void cancel_job(context& c);
  void lease(context& c);
  void heartbeat(context& c);
  void complete_or_fail(context& c, bool fail);
  void results(context& c);
  void list_queues(context& c);
  void get_queue(context& c);
  void list_dead(context& c);
  void requeue_dead(context& c);

  void finish_lease_wait(lease_wait* w);
  void finish_job_wait(job_wait* w);
  void reschedule();
  static void on_clock(uv_timer_t* t);
  void collect_queue_metrics(std::string& out) const;

  uv_loop_t* _loop;
  queue::broker& _broker;
  journal::backend* _journal;
  journal::blob_store* _blobs = nullptr;
  policy_source _policy;
  ops::registry& _metrics;
  decoder _decoder;
  uv_timer_t _clock{};
  std::optional<queue::time_ms> _clock_due;
  bool _draining = false;
  bool _closed = false;
  std::unordered_set<lease_wait*> _lease_waits;
  std::unordered_set<job_wait*> _job_waits;
  std::unordered_map<uint32_t, ops::counter*> _request_counters;
  ops::counter& _denials;
  authn_options _authn;
  auth::failure_limiter _auth_failures;
  ops::counter& _auth_limited;
  // Token buckets per principal; outlive policy reloads (see rate_limit.h).
  rate_limiter _rate;
};

// JSON for a job as GET /v1/jobs/{id} returns it; referenced values are
// holes to fill from the blob store.
void append_job_json(journal::answer_template& out, const queue::job& j);

}  // namespace relay::api
