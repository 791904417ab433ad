#include "relay/json.h"
#include "relay/ops.h"

namespace relay::ops {

void ops_handler::on_request(net::server_conn& conn, http::request& req) {
  std::string_view path = req.path();
  bool known = path == "/healthz" || path == "/readyz" || path == "/metrics";
  if (!known) {
    conn.respond_error(api_error::not_found, "no such route");
    return;
  }
  if (req.verb != http::method::get) {
    conn.respond(405, api_error_body(api_error::method_not_allowed), "Allow: GET\r\n");
    return;
  }
  if (path == "/healthz") {
    conn.respond(200, "{\"status\":\"ok\"}");
  } else if (path == "/readyz") {
    std::string why = _ready();
    if (why.empty()) {
      conn.respond(200, "{\"status\":\"ready\"}");
    } else {
      std::string body = "{\"status\":\"not_ready\",\"reason\":";
      json::append_string(body, why);
      body += '}';
      conn.respond(503, body);
    }
  } else {
    conn.respond(200, _metrics.render(), {}, "text/plain; version=0.0.4; charset=utf-8");
  }
}

}  // namespace relay::ops
