// A local HTTP service for bunny's http handler tests, built on relay's own
// listener: POST /run answers {"echo":<payload>}, POST /fail answers 500,
// POST /garbage answers 200 with a body that is not JSON.
#include <uv.h>

#include <csignal>
#include <string>

#include "relay/log.h"
#include "relay/metrics.h"
#include "relay/server.h"

namespace {

struct echo final : relay::net::request_handler {
  void on_request(relay::net::server_conn& conn, relay::http::request& req) override {
    std::string_view path = req.path();
    if (path == "/run") conn.respond(200, "{\"echo\":" + req.body + "}");
    else if (path == "/raw") conn.respond(200, req.body);  // the payload back, byte for byte (large-job tests)
    else if (path == "/fail") conn.respond(500, "{\"error\":\"the service is broken\"}");
    else if (path == "/garbage") conn.respond(200, "<html>not json</html>", {}, "text/html");
    else conn.respond(404, "{}");
  }
};

}  // namespace

int main(int argc, char** argv) {
  std::signal(SIGPIPE, SIG_IGN);
  uv_loop_t loop;
  uv_loop_init(&loop);
  relay::ops::registry metrics;
  echo handler;
  relay::net::listener_options o;
  o.name = "echo";
  o.address = argc > 1 ? argv[1] : "127.0.0.1:0";
  // Payloads up to relay's ceiling reach it through bunny's http handler.
  o.conn.http.max_body_bytes = size_t{256} << 20;
  o.max_pending_body_bytes = size_t{600} << 20;
  relay::net::listener l(&loop, o, handler, metrics);
  std::string error;
  if (!l.start(error)) {
    relay::log::error("start_failed").str("reason", error);
    return 1;
  }
  uv_signal_t term;
  uv_signal_init(&loop, &term);
  term.data = &l;
  uv_signal_start(&term, [](uv_signal_t* s, int) {
    static_cast<relay::net::listener*>(s->data)->close();
    uv_close(reinterpret_cast<uv_handle_t*>(s), nullptr);
  }, SIGTERM);
  uv_run(&loop, UV_RUN_DEFAULT);
  uv_loop_close(&loop);
  return 0;
}
