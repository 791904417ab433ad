// A fault-injecting TCP proxy standing in for the wide-area link between the
// clouds in the cross-cloud scenario test (this kernel has no netem):
//
//   wan_proxy LISTEN_ADDR UPSTREAM_ADDR DELAY_MS
//
// Every byte is held DELAY_MS in each direction, in order. Signals drive the
// faults:
//   SIGUSR1  cut the link: nothing passes either way and new connections are
//            held unanswered — like a tunnel that went down; TCP on both ends
//            sees silence, not an error
//   SIGUSR2  restore it: what was held flows again
//   SIGHUP   reset every connection (RST to both ends)
//   SIGTERM  exit
// Log lines (JSON, stderr): proxy_listening, proxy_connection, link_cut,
// link_restored, link_reset.
#include <uv.h>

#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <list>
#include <memory>
#include <string>

#include "relay/log.h"

namespace {

constexpr size_t max_queued_bytes = 1 << 20;  // per direction, then reading pauses

struct proxy;
struct link;

struct chunk {
  uint64_t due_ms;
  std::string data;  // empty: end of stream
};

// One direction of a link: bytes read from `from` are written to `to` once
// they are due.
struct direction {
  link* owner = nullptr;
  uv_tcp_t* from = nullptr;
  uv_tcp_t* to = nullptr;
  std::deque<chunk> queue;
  size_t queued = 0;
  bool reading = false;
  bool eof_seen = false;
  bool shut = false;
  uv_timer_t timer{};
};

struct link {
  proxy* owner = nullptr;
  uint64_t id = 0;
  uv_tcp_t client{}, server{};
  uv_connect_t connect_req{};
  bool connecting = false, connected = false, closing = false;
  direction up, down;  // client → server, server → client
  int open_handles = 0;
};

struct proxy {
  uv_loop_t* loop = nullptr;
  sockaddr_storage upstream{};
  uint64_t delay_ms = 0;
  bool cut = false;
  uint64_t next_id = 1;
  std::list<std::unique_ptr<link>> links;
};

void close_link(link* l, bool reset);
void pump(direction& d);
void start_reading(direction& d);

// Every handle of a link (both sockets, both timers) carries its direction.
void on_handle_closed(uv_handle_t* h) {
  link* l = static_cast<direction*>(h->data)->owner;
  if (--l->open_handles > 0) return;
  auto& links = l->owner->links;
  for (auto it = links.begin(); it != links.end(); ++it)
    if (it->get() == l) {
      links.erase(it);
      break;
    }
}

void close_link(link* l, bool reset) {
  if (l->closing) return;
  l->closing = true;
  for (direction* d : {&l->up, &l->down}) {
    uv_timer_stop(&d->timer);
    uv_close(reinterpret_cast<uv_handle_t*>(&d->timer), on_handle_closed);
  }
  for (uv_tcp_t* t : {&l->client, &l->server}) {
    if (t == &l->server && !l->connected && !l->connecting) {
      uv_close(reinterpret_cast<uv_handle_t*>(t), on_handle_closed);
      continue;
    }
    // An RST where asked (and where the socket can still send one).
    if (reset && uv_tcp_close_reset(t, on_handle_closed) == 0) continue;
    uv_close(reinterpret_cast<uv_handle_t*>(t), on_handle_closed);
  }
}

void on_alloc(uv_handle_t*, size_t suggested, uv_buf_t* buf) {
  buf->base = static_cast<char*>(std::malloc(suggested));
  buf->len = buf->base ? suggested : 0;
}

void on_read(uv_stream_t* s, ssize_t n, const uv_buf_t* buf) {
  auto* d = static_cast<direction*>(s->data);
  link* l = d->owner;
  std::string data = n > 0 ? std::string(buf->base, static_cast<size_t>(n)) : std::string();
  std::free(buf->base);
  if (n == 0 || l->closing) return;
  if (n < 0 && n != UV_EOF) {
    close_link(l, true);  // a reset on one side is passed on as a reset
    return;
  }
  uint64_t due = uv_now(l->owner->loop) + l->owner->delay_ms;
  if (n == UV_EOF) {
    d->eof_seen = true;
    uv_read_stop(s);
    d->reading = false;
  } else {
    d->queued += data.size();
    if (d->queued >= max_queued_bytes) {
      uv_read_stop(s);
      d->reading = false;
    }
  }
  d->queue.push_back({due, std::move(data)});
  pump(*d);
}

void start_reading(direction& d) {
  link* l = d.owner;
  if (d.reading || d.eof_seen || l->closing || l->owner->cut || d.queued >= max_queued_bytes) return;
  if (d.from == &l->server && !l->connected) return;
  if (uv_read_start(reinterpret_cast<uv_stream_t*>(d.from), on_alloc, on_read) == 0) d.reading = true;
}

struct write_req {
  uv_write_t req;
  direction* d;
  std::string data;
};

void on_written(uv_write_t* w, int status) {
  std::unique_ptr<write_req> wr(reinterpret_cast<write_req*>(w));
  if (status == UV_ECANCELED) return;  // the link is closing
  direction& d = *wr->d;
  d.queued -= wr->data.size();
  if (status < 0) {
    close_link(d.owner, true);
    return;
  }
  start_reading(d);
}

void on_shutdown(uv_shutdown_t* req, int) {
  auto* d = static_cast<direction*>(req->data);
  delete req;
  link* l = d->owner;
  if (!l->closing && l->up.shut && l->down.shut) close_link(l, false);
}

// Writes every chunk that is due, then sleeps until the next one is.
void pump(direction& d) {
  link* l = d.owner;
  if (l->closing || l->owner->cut || !l->connected) return;
  uint64_t now = uv_now(l->owner->loop);
  while (!d.queue.empty() && d.queue.front().due_ms <= now) {
    chunk c = std::move(d.queue.front());
    d.queue.pop_front();
    if (c.data.empty()) {
      auto* req = new uv_shutdown_t;
      req->data = &d;
      d.shut = true;
      if (uv_shutdown(req, reinterpret_cast<uv_stream_t*>(d.to), on_shutdown) != 0) {
        delete req;
        close_link(l, false);
        return;
      }
      continue;
    }
    auto* wr = new write_req{{}, &d, std::move(c.data)};
    uv_buf_t buf = uv_buf_init(wr->data.data(), static_cast<unsigned>(wr->data.size()));
    if (uv_write(&wr->req, reinterpret_cast<uv_stream_t*>(d.to), &buf, 1, on_written) != 0) {
      delete wr;
      close_link(l, true);
      return;
    }
  }
  if (!d.queue.empty()) {
    uv_timer_start(&d.timer, [](uv_timer_t* t) { pump(*static_cast<direction*>(t->data)); },
                   d.queue.front().due_ms - now, 0);
  }
}

void on_connected(uv_connect_t* req, int status) {
  auto* l = static_cast<link*>(req->data);
  l->connecting = false;
  if (status == UV_ECANCELED || l->closing) return;
  if (status < 0) {
    close_link(l, true);  // upstream refused: so does the link
    return;
  }
  l->connected = true;
  start_reading(l->down);
  pump(l->up);
}

void connect_upstream(link* l) {
  if (l->connecting || l->connected || l->closing) return;
  l->connecting = true;
  l->connect_req.data = l;
  if (uv_tcp_connect(&l->connect_req, &l->server, reinterpret_cast<const sockaddr*>(&l->owner->upstream),
                     on_connected) != 0) {
    l->connecting = false;
    close_link(l, true);
  }
}

void on_accept(uv_stream_t* server, int status) {
  auto* p = static_cast<proxy*>(server->data);
  if (status < 0) return;
  auto owned = std::make_unique<link>();
  link* l = owned.get();
  l->owner = p;
  l->id = p->next_id++;
  uv_tcp_init(p->loop, &l->client);
  uv_tcp_init(p->loop, &l->server);
  l->open_handles = 4;
  for (direction* d : {&l->up, &l->down}) {
    d->owner = l;
    uv_timer_init(p->loop, &d->timer);
    d->timer.data = d;
  }
  l->up.from = l->down.to = &l->client;
  l->up.to = l->down.from = &l->server;
  l->client.data = &l->up;
  l->server.data = &l->down;
  p->links.push_back(std::move(owned));
  if (uv_accept(server, reinterpret_cast<uv_stream_t*>(&l->client)) != 0) {
    close_link(l, false);
    return;
  }
  uv_tcp_nodelay(&l->client, 1);
  uv_tcp_nodelay(&l->server, 1);
  relay::log::info("proxy_connection").num("id", static_cast<int64_t>(l->id)).str("held", p->cut ? "yes" : "no");
  if (p->cut) return;  // answered when the link is restored
  connect_upstream(l);
  start_reading(l->up);
}

void set_cut(proxy& p, bool cut) {
  if (p.cut == cut) return;
  p.cut = cut;
  relay::log::info(cut ? "link_cut" : "link_restored").num("connections", static_cast<int64_t>(p.links.size()));
  for (auto& owned : p.links) {
    link* l = owned.get();
    if (l->closing) continue;
    for (direction* d : {&l->up, &l->down}) {
      if (cut) {
        if (d->reading) uv_read_stop(reinterpret_cast<uv_stream_t*>(d->from));
        d->reading = false;
        uv_timer_stop(&d->timer);
      }
    }
    if (!cut) {
      connect_upstream(l);
      start_reading(l->up);
      start_reading(l->down);
      pump(l->up);
      pump(l->down);
    }
  }
}

bool parse_addr(const char* text, sockaddr_storage& out) {
  std::string s(text);
  size_t colon = s.rfind(':');
  if (colon == std::string::npos) return false;
  std::string host = s.substr(0, colon);
  int port = std::atoi(s.c_str() + colon + 1);
  if (host.size() > 2 && host.front() == '[') host = host.substr(1, host.size() - 2);
  if (uv_ip4_addr(host.c_str(), port, reinterpret_cast<sockaddr_in*>(&out)) == 0) return true;
  return uv_ip6_addr(host.c_str(), port, reinterpret_cast<sockaddr_in6*>(&out)) == 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::signal(SIGPIPE, SIG_IGN);
  if (argc != 4) {
    std::fprintf(stderr, "usage: wan_proxy LISTEN_ADDR UPSTREAM_ADDR DELAY_MS\n");
    return 2;
  }
  uv_loop_t loop;
  uv_loop_init(&loop);
  proxy p;
  p.loop = &loop;
  p.delay_ms = std::strtoull(argv[3], nullptr, 10);
  sockaddr_storage listen_addr{};
  if (!parse_addr(argv[1], listen_addr) || !parse_addr(argv[2], p.upstream)) {
    std::fprintf(stderr, "wan_proxy: addresses are IP:PORT\n");
    return 2;
  }
  uv_tcp_t listener;
  uv_tcp_init(&loop, &listener);
  listener.data = &p;
  int rc = uv_tcp_bind(&listener, reinterpret_cast<const sockaddr*>(&listen_addr), 0);
  if (rc == 0) rc = uv_listen(reinterpret_cast<uv_stream_t*>(&listener), 128, on_accept);
  if (rc != 0) {
    relay::log::error("start_failed").str("reason", uv_strerror(rc));
    return 1;
  }
  sockaddr_storage bound{};
  int len = sizeof bound;
  uv_tcp_getsockname(&listener, reinterpret_cast<sockaddr*>(&bound), &len);
  char host[64] = {};
  int port = 0;
  if (bound.ss_family == AF_INET) {
    uv_ip4_name(reinterpret_cast<sockaddr_in*>(&bound), host, sizeof host);
    port = ntohs(reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
  } else {
    uv_ip6_name(reinterpret_cast<sockaddr_in6*>(&bound), host, sizeof host);
    port = ntohs(reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port);
  }
  relay::log::info("proxy_listening").str("addr", std::string(host) + ":" + std::to_string(port)).str("upstream", argv[2]);

  uv_signal_t signals[4];
  const int nums[4] = {SIGUSR1, SIGUSR2, SIGHUP, SIGTERM};
  for (int i = 0; i < 4; ++i) {
    uv_signal_init(&loop, &signals[i]);
    signals[i].data = &p;
    uv_signal_start(&signals[i], [](uv_signal_t* s, int signum) {
      auto& px = *static_cast<proxy*>(s->data);
      if (signum == SIGUSR1) set_cut(px, true);
      else if (signum == SIGUSR2) set_cut(px, false);
      else if (signum == SIGHUP) {
        relay::log::info("link_reset").num("connections", static_cast<int64_t>(px.links.size()));
        for (auto& l : px.links) close_link(l.get(), true);
      } else {
        uv_stop(px.loop);
      }
    }, nums[i]);
  }
  uv_run(&loop, UV_RUN_DEFAULT);
  return 0;
}
