// Parked long-poll requests. Each owns a timer for its wait_ms and is freed
// from that timer's close callback. Exactly one of three things ends a wait:
// the core delivers (jobs leased / job finished), the timer fires, or the
// client goes away (the connection's abandon hook).
#pragma once

#include <array>
#include <vector>

#include "api/service.h"

namespace relay::api {

// {"jobs":[{"id","attempt","lease","lease_expires_ms","payload"},...]}
// Referenced payloads are holes to fill from the blob store.
journal::answer_template leased_jobs_json(const std::vector<queue::job*>& jobs);
// The bytes one job adds to that answer, leased as `attempt` until
// `expires`; `first`: no separator before it. lease_answer_size is this and
// the empty answer's size, the measure lease requests' max_bytes bounds.
size_t leased_job_bytes(const queue::job& j, uint32_t attempt, queue::time_ms expires, bool first);
extern const queue::answer_size lease_answer_size;

struct service::lease_wait final : queue::lease_waiter {
  lease_wait(service& s, net::server_conn& c) : svc(s), conn(c) {}

  void start(uint32_t wait_ms) {
    uv_timer_init(svc._loop, &timer);
    timer.data = this;
    uv_timer_start(&timer, on_timeout, wait_ms, 0);
    conn.set_abandon_hook([this] { abandon(); });
    svc._lease_waits.insert(this);
  }
  void on_leased(const std::vector<queue::job*>& jobs) override {
    svc.finish_lease_wait(this);
    // Starts the reads of referenced payloads at most; the answer itself
    // goes out from the loop later (send_filled, when_durable).
    svc.send_filled(conn, route::lease, 200, leased_jobs_json(jobs));
  }
  void expire() {
    svc._broker.unpark(*this);
    svc.finish_lease_wait(this);
    svc.send(conn, route::lease, 200, "{\"jobs\":[]}");
  }
  void abandon() {
    svc._broker.unpark(*this);
    svc.finish_lease_wait(this);
  }
  void close() {
    uv_timer_stop(&timer);
    uv_close(reinterpret_cast<uv_handle_t*>(&timer),
             [](uv_handle_t* h) { delete static_cast<lease_wait*>(h->data); });
  }
  static void on_timeout(uv_timer_t* t) { static_cast<lease_wait*>(t->data)->expire(); }

  service& svc;
  net::server_conn& conn;
  std::string queue;
  std::string policy_principal;  // as the request was authorised
  bool keyed = false;            // authorised by an API key, with this digest
  std::array<uint8_t, 32> key_digest{};
  uv_timer_t timer{};
};

struct service::job_wait final : queue::job_watcher {
  job_wait(service& s, net::server_conn& c, queue::job_id j) : svc(s), conn(c), id(j) {}

  void start(uint32_t wait_ms) {
    uv_timer_init(svc._loop, &timer);
    timer.data = this;
    uv_timer_start(&timer, on_timeout, wait_ms, 0);
    conn.set_abandon_hook([this] { abandon(); });
    svc._job_waits.insert(this);
    svc._broker.watch(id, *this);
  }
  void on_terminal(const queue::job& j) override { answer(&j); }
  void expire() {
    svc._broker.unwatch(*this);
    answer(svc._broker.find(id));
  }
  void answer(const queue::job* j) {
    svc.finish_job_wait(this);
    if (j) {
      journal::answer_template body;
      append_job_json(body, *j);
      svc.send_filled(conn, route::get_job, 200, std::move(body));
    } else {
      svc.send(conn, route::get_job, 404, api_error_body(api_error::not_found, "no such job"));
    }
  }
  // The caller lost its read grant while it waited: answered as job_for()
  // answers it now.
  void refuse(int status, std::string body) {
    svc._broker.unwatch(*this);
    svc.finish_job_wait(this);
    svc.send(conn, route::get_job, status, std::move(body));
  }
  void abandon() {
    svc._broker.unwatch(*this);
    svc.finish_job_wait(this);
  }
  void close() {
    uv_timer_stop(&timer);
    uv_close(reinterpret_cast<uv_handle_t*>(&timer),
             [](uv_handle_t* h) { delete static_cast<job_wait*>(h->data); });
  }
  static void on_timeout(uv_timer_t* t) { static_cast<job_wait*>(t->data)->expire(); }

  service& svc;
  net::server_conn& conn;
  queue::job_id id;
  std::string policy_principal;  // as the request was authorised
  bool keyed = false;            // authorised by an API key, with this digest
  std::array<uint8_t, 32> key_digest{};
  uv_timer_t timer{};
};

}  // namespace relay::api
