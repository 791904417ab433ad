#include <arpa/inet.h>

#include <charconv>
#include <cstring>

#include "relay/audit.h"
#include "relay/log.h"
#include "relay/server.h"

namespace relay::net {

bool parse_address(std::string_view text, sockaddr_storage& out, std::string& error) {
  std::string_view host, port;
  if (!text.empty() && text.front() == '[') {
    auto close = text.find(']');
    if (close == std::string_view::npos || close + 1 >= text.size() || text[close + 1] != ':') {
      error = "address \"" + std::string(text) + "\" is not of the form [IPv6]:port";
      return false;
    }
    host = text.substr(1, close - 1);
    port = text.substr(close + 2);
  } else {
    auto colon = text.rfind(':');
    if (colon == std::string_view::npos) {
      error = "address \"" + std::string(text) + "\" has no port (want IP:port)";
      return false;
    }
    host = text.substr(0, colon);
    port = text.substr(colon + 1);
  }
  unsigned p = 0;
  auto [ptr, ec] = std::from_chars(port.data(), port.data() + port.size(), p);
  if (ec != std::errc() || ptr != port.data() + port.size() || p > 65535) {
    error = "address \"" + std::string(text) + "\" has an invalid port";
    return false;
  }
  std::string h(host);
  out = {};
  if (uv_ip4_addr(h.c_str(), static_cast<int>(p), reinterpret_cast<sockaddr_in*>(&out)) == 0) return true;
  if (uv_ip6_addr(h.c_str(), static_cast<int>(p), reinterpret_cast<sockaddr_in6*>(&out)) == 0) return true;
  error = "address \"" + std::string(text) + "\": \"" + h + "\" is not an IP address";
  return false;
}

std::string format_address(const sockaddr* sa) {
  char host[INET6_ADDRSTRLEN] = "";
  if (sa->sa_family == AF_INET) {
    auto* in = reinterpret_cast<const sockaddr_in*>(sa);
    uv_ip4_name(in, host, sizeof host);
    return std::string(host) + ":" + std::to_string(ntohs(in->sin_port));
  }
  if (sa->sa_family == AF_INET6) {
    auto* in6 = reinterpret_cast<const sockaddr_in6*>(sa);
    uv_ip6_name(in6, host, sizeof host);
    return "[" + std::string(host) + "]:" + std::to_string(ntohs(in6->sin6_port));
  }
  return "?";
}

namespace {

std::string label(const std::string& name) { return "listener=\"" + ops::registry::label_value(name) + "\""; }

}  // namespace

std::string source_key(std::string_view ip) {
  std::string text(ip);
  in6_addr a{};
  if (inet_pton(AF_INET6, text.c_str(), &a) != 1) return text;
  static constexpr uint8_t mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
  if (std::memcmp(a.s6_addr, mapped, sizeof mapped) == 0) {
    char v4[INET_ADDRSTRLEN] = "";
    inet_ntop(AF_INET, a.s6_addr + 12, v4, sizeof v4);
    return v4;
  }
  std::memset(a.s6_addr + 8, 0, 8);
  char v6[INET6_ADDRSTRLEN] = "";
  inet_ntop(AF_INET6, &a, v6, sizeof v6);
  return std::string(v6) + "/64";
}

listener::listener(uv_loop_t* loop, listener_options o, request_handler& handler, ops::registry& metrics)
    : _loop(loop),
      _options(std::move(o)),
      _handler(handler),
      _accepted(metrics.get_counter("relay_connections_accepted_total", "TCP connections accepted.",
                                    label(_options.name))),
      _refused(metrics.get_counter("relay_connections_refused_total",
                                   "Connections closed at once because max_connections was reached.",
                                   label(_options.name))),
      _refused_per_ip(metrics.get_counter("relay_connections_refused_per_ip_total",
                                          "Connections closed at once because their source address had "
                                          "max_connections_per_ip open.",
                                          label(_options.name))),
      _evicted(metrics.get_counter("relay_connections_evicted_total",
                                   "Connections owed no answer (the one served longest ago) closed to "
                                   "admit a new one when the listener was full.",
                                   label(_options.name))),
      _handshake_failures(metrics.get_counter("relay_tls_handshake_failures_total",
                                              "TLS handshakes that failed or timed out.", label(_options.name))),
      _timeouts(metrics.get_counter("relay_connection_timeouts_total",
                                    "Handshake, header, body or idle timeouts.", label(_options.name))),
      _body_refused(metrics.get_counter("relay_request_bodies_refused_total",
                                        "Requests refused because limits.max_pending_body_bytes was reached.",
                                        label(_options.name))),
      _revoked(metrics.get_counter("relay_connections_revoked_total",
                                   "Live connections closed because their peer certificate no longer verified "
                                   "after a reload of the TLS material (revoked, expired, or no longer trusted).",
                                   label(_options.name))),
      _retired_age(metrics.get_counter("relay_connections_retired_total",
                                       "Connections closed between requests because of their age.",
                                       label(_options.name) + ",reason=\"max_age\"")),
      _retired_expiry(metrics.get_counter("relay_connections_retired_total",
                                          "Connections closed between requests because of their age.",
                                          label(_options.name) + ",reason=\"certificate_expired\"")),
      _open_gauge(metrics.get_gauge("relay_connections_open", "Connections currently open.", label(_options.name))) {
  // Initialised here, before anything can fail, so that close() is always legal.
  uv_idle_init(loop, &_resume);
  _resume.data = this;
  uv_idle_init(loop, &_recheck);
  _recheck.data = this;
}

listener::~listener() = default;

bool listener::start(std::string& error) {
  sockaddr_storage addr;
  if (!parse_address(_options.address, addr, error)) {
    error = _options.name + " listener: " + error;
    return false;
  }
  uv_tcp_init(_loop, &_tcp);
  _tcp.data = this;
  _listening = true;
  int rc = uv_tcp_bind(&_tcp, reinterpret_cast<sockaddr*>(&addr), 0);
  if (rc == 0) rc = uv_listen(reinterpret_cast<uv_stream_t*>(&_tcp), 1024, on_connection);
  if (rc != 0) {
    error = _options.name + " listener: cannot listen on " + _options.address + ": " + uv_strerror(rc);
    return false;
  }
  sockaddr_storage bound{};
  int len = sizeof bound;
  uv_tcp_getsockname(&_tcp, reinterpret_cast<sockaddr*>(&bound), &len);
  _bound = format_address(reinterpret_cast<sockaddr*>(&bound));
  log::info("listening")
      .str("listener", _options.name)
      .str("addr", _bound)
      .boolean("tls", static_cast<bool>(_options.tls));
  return true;
}

void listener::on_connection(uv_stream_t* server, int status) {
  auto* l = static_cast<listener*>(server->data);
  if (status < 0) {
    log::warn("accept_failed").str("listener", l->_options.name).str("reason", uv_strerror(status));
    return;
  }
  std::shared_ptr<const tls::context> ctx;
  if (l->_options.tls) {
    ctx = l->_options.tls();
    if (!ctx) return;  // no TLS material: the pending connection stays in the backlog
  }
  // The stream is made first, with no owner yet, so that a refused
  // connection is accepted and closed rather than left in the backlog.
  struct refuse final : stream_handler {
    void on_secure(stream&) override {}
    void on_input(stream&) override {}
    void on_end(stream&, stream_end, std::string_view) override {}
  };
  static refuse nobody;
  stream* s = stream::accept(server, nobody, ctx);
  if (!s) return;
  std::string ip = source_key(s->remote_ip());
  // A full listener makes room by closing the evictable connection served
  // longest ago, so that sockets that never finish a request (silent,
  // slow, not reading) cannot lock out clients that do.
  auto refuse = [&](ops::counter& counted, const char* reason) {
    counted.inc();
    log::info("connection_refused").str("listener", l->_options.name).str("remote", s->remote_address())
        .str("reason", reason);
    s->detach();
    s->close();
  };
  const bool full = l->_open >= l->_options.max_connections;
  server_conn* victim = full ? l->_evictable_head : nullptr;
  if (full && !victim) return refuse(l->_refused, "limits.max_connections reached, every connection busy");
  auto known = l->_per_ip.find(ip);
  size_t from_source = known == l->_per_ip.end() ? 0 : known->second;
  if (victim && victim->_ip == ip) --from_source;  // it makes room for its own source
  if (from_source >= l->_options.max_connections_per_ip)
    return refuse(l->_refused_per_ip, "limits.max_connections_per_ip reached");
  if (victim) {
    l->_evicted.inc();
    victim->close();
  }
  // Looked up again: evicting may have erased this source's entry.
  ++l->_per_ip[ip];
  auto* c = new server_conn(*l, l->_next_id++, s);
  c->_ip = std::move(ip);
  if (ctx) c->_tls_generation = ctx->generation();
  if (l->_options.conn.max_age_ms) c->_retire_at = uv_now(l->_loop) + l->_options.conn.max_age_ms;
  s->set_handler(*c);
  c->_next = l->_head;
  if (l->_head) l->_head->_prev = c;
  l->_head = c;
  ++l->_open;
  l->_open_gauge.set(static_cast<int64_t>(l->_open));
  l->_accepted.inc();
  l->evictable_insert(c);
  s->arm_timer(l->_options.conn.handshake_timeout_ms);
  if (l->_closed) c->begin_drain();
}

void listener::remove(server_conn* c) {
  if (_recheck_next == c) _recheck_next = c->_next;
  evictable_remove(c);
  unschedule(c);
  if (c->_prev) c->_prev->_next = c->_next;
  else if (_head == c) _head = c->_next;
  if (c->_next) c->_next->_prev = c->_prev;
  c->_prev = c->_next = nullptr;
  --_open;
  _open_gauge.set(static_cast<int64_t>(_open));
  auto it = _per_ip.find(c->_ip);
  if (it != _per_ip.end() && --it->second == 0) _per_ip.erase(it);
  c->release_body_budget();
}

void listener::evictable_insert(server_conn* c) {
  if (c->_evictable) return;
  c->_evictable = true;
  c->_evictable_prev = _evictable_tail;
  c->_evictable_next = nullptr;
  if (_evictable_tail) _evictable_tail->_evictable_next = c;
  else _evictable_head = c;
  _evictable_tail = c;
}

void listener::evictable_remove(server_conn* c) {
  if (!c->_evictable) return;
  c->_evictable = false;
  if (c->_evictable_prev) c->_evictable_prev->_evictable_next = c->_evictable_next;
  else _evictable_head = c->_evictable_next;
  if (c->_evictable_next) c->_evictable_next->_evictable_prev = c->_evictable_prev;
  else _evictable_tail = c->_evictable_prev;
  c->_evictable_prev = c->_evictable_next = nullptr;
}

void listener::schedule(server_conn* c) {
  if (c->_scheduled) return;
  c->_scheduled = true;
  _to_resume.push_back(c);
  // An idle handle keeps the loop from blocking in poll while it is active,
  // so the pipeline continues in the next iteration whatever phase asked.
  if (_to_resume.size() == 1) uv_idle_start(&_resume, on_resume);
}

void listener::unschedule(server_conn* c) {
  if (!c->_scheduled) return;
  c->_scheduled = false;
  for (auto& p : _to_resume)
    if (p == c) p = nullptr;
  if (_resuming)
    for (auto& p : *_resuming)
      if (p == c) p = nullptr;
}

void listener::on_resume(uv_idle_t* h) {
  auto* l = static_cast<listener*>(h->data);
  std::vector<server_conn*> batch;
  batch.swap(l->_to_resume);
  uv_idle_stop(&l->_resume);
  // A connection of this batch may be closed by an earlier one's request;
  // unschedule() clears it from the batch then.
  l->_resuming = &batch;
  for (server_conn*& c : batch) {
    if (!c) continue;
    server_conn* conn = c;
    c = nullptr;
    conn->_scheduled = false;
    conn->resume();
  }
  l->_resuming = nullptr;
}

namespace {

// Loop time one iteration of the re-verification sweep may take. One
// verification (chain build, signatures of the leaf and of the CRL) costs
// about 0.1-0.4 ms, so 10,000 connections take one to four seconds of loop
// time, spread over iterations that each leave the loop to serve I/O.
constexpr uint64_t recheck_slice_ns = 4'000'000;

}  // namespace

void listener::recheck_peers() {
  if (!_options.tls || uv_is_closing(reinterpret_cast<uv_handle_t*>(&_recheck))) return;
  // From the newest connection on: one accepted during the sweep already
  // has the new context, and a later reload starts over from the top.
  _recheck_next = _head;
  if (!_rechecking) {
    _rechecking = true;
    _recheck_verified = _recheck_revoked = 0;
    uv_idle_start(&_recheck, on_recheck);
  }
}

void listener::on_recheck(uv_idle_t* h) {
  auto* l = static_cast<listener*>(h->data);
  std::shared_ptr<const tls::context> ctx = l->_options.tls();
  const uint64_t until = uv_hrtime() + recheck_slice_ns;
  while (ctx && l->_recheck_next && uv_hrtime() < until) {
    server_conn* c = l->_recheck_next;
    l->_recheck_next = c->_next;
    // One still in its handshake is checked when that completes
    // (server_conn::on_secure); a closed one is past caring.
    if (c->_state != server_conn::state::handshake && c->_state != server_conn::state::closed) l->recheck(*c, *ctx);
  }
  if (ctx && l->_recheck_next) return;  // more next iteration
  uv_idle_stop(&l->_recheck);
  l->_rechecking = false;
  log::info("peers_reverified")
      .str("listener", l->_options.name)
      .num("verified", static_cast<int64_t>(l->_recheck_verified))
      .num("revoked", static_cast<int64_t>(l->_recheck_revoked));
}

bool listener::recheck(server_conn& c, const tls::context& ctx) {
  if (c._tls_generation == 0 || c._tls_generation >= ctx.generation()) return true;
  const tls::peer_chain& chain = c._stream->peer_certificates();
  if (chain.empty()) return true;
  std::string why = ctx.verify_peer(chain);
  ++_recheck_verified;
  if (why.empty()) {
    c._tls_generation = ctx.generation();
    return true;
  }
  ++_recheck_revoked;
  _revoked.inc();
  audit::event("connection_revoked")
      .str("remote", c.remote_address())
      .str("principal", c.peer().principal())
      .str("reason", why);
  // No answer of any kind: an answer being prepared or parked is
  // abandoned, and unsent bytes are dropped.
  c.close();
  return false;
}

void listener::drain() {
  if (_listening && !_closed) {
    uv_close(reinterpret_cast<uv_handle_t*>(&_tcp), nullptr);
  }
  _closed = true;
  for (server_conn* c = _head; c;) {
    server_conn* next = c->_next;  // begin_drain may unlink c
    c->begin_drain();
    c = next;
  }
}

void listener::close() {
  if (_listening && !_closed) uv_close(reinterpret_cast<uv_handle_t*>(&_tcp), nullptr);
  _closed = true;
  while (_head) _head->close();
  if (!uv_is_closing(reinterpret_cast<uv_handle_t*>(&_resume)))
    uv_close(reinterpret_cast<uv_handle_t*>(&_resume), nullptr);
  _recheck_next = nullptr;
  if (!uv_is_closing(reinterpret_cast<uv_handle_t*>(&_recheck)))
    uv_close(reinterpret_cast<uv_handle_t*>(&_recheck), nullptr);
}

}  // namespace relay::net
