#include <arpa/inet.h>

#include <charconv>

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

listener::listener(uv_loop_t* loop, listener_options o, request_handler& handler, ops::registry& metrics)
    : _loop(loop),
      _options(std::move(o)),
      _handler(handler),
      _read_buffer(new char[64 * 1024]),
      _accepted(metrics.get_counter("relay_connections_accepted_total", "TCP connections accepted.",
                                    label(_options.name))),
      _refused(metrics.get_counter("relay_connections_refused_total",
                                   "Connections closed at once because max_connections was reached.",
                                   label(_options.name))),
      _handshake_failures(metrics.get_counter("relay_tls_handshake_failures_total",
                                              "TLS handshakes that failed or timed out.", label(_options.name))),
      _timeouts(metrics.get_counter("relay_connection_timeouts_total",
                                    "Handshake, header, body or idle timeouts.", label(_options.name))),
      _open_gauge(metrics.get_gauge("relay_connections_open", "Connections currently open.", label(_options.name))) {}

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
  auto* c = new server_conn(*l, l->_next_id++);
  c->_next = l->_head;
  if (l->_head) l->_head->_prev = c;
  l->_head = c;
  ++l->_open;
  l->_open_gauge.set(static_cast<int64_t>(l->_open));
  if (!c->start(server)) {
    c->close();
    return;
  }
  l->_accepted.inc();
  if (l->_open > l->_options.max_connections) {
    l->_refused.inc();
    c->close();
  }
}

void listener::remove(server_conn* c) {
  if (c->_prev) c->_prev->_next = c->_next;
  else _head = c->_next;
  if (c->_next) c->_next->_prev = c->_prev;
  c->_prev = c->_next = nullptr;
  --_open;
  _open_gauge.set(static_cast<int64_t>(_open));
}

void listener::drain() {
  if (_listening && !_closed) {
    _closed = true;
    uv_close(reinterpret_cast<uv_handle_t*>(&_tcp), nullptr);
  }
  for (server_conn* c = _head; c;) {
    server_conn* next = c->_next;  // begin_drain may unlink c
    c->begin_drain();
    c = next;
  }
}

void listener::close() {
  if (_listening && !_closed) {
    _closed = true;
    uv_close(reinterpret_cast<uv_handle_t*>(&_tcp), nullptr);
  }
  while (_head) _head->close();
}

}  // namespace relay::net
