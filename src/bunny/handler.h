// How bunny runs one job: a handler starts a run per job; the run reports
// its outcome exactly once, always from a later loop callback (never from
// inside start() or cancel()), and frees itself afterwards.
#pragma once

#include <uv.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace relay::bunny {

struct job_input {
  std::string id;
  std::string queue;
  uint32_t attempt = 0;
  // Raw JSON: a view into relay's lease answer, which `keep` holds, so that
  // a payload of hundreds of MiB is never copied on its way to the handler.
  std::string_view payload;
  std::shared_ptr<const void> keep;
};

struct outcome {
  bool ok = false;
  // When ok: v1::complete_room bytes of room, then the result's JSON (with
  // at most whitespace around it): the body of the complete request, built
  // where the handler's output landed (see v1::fill_complete_body).
  std::string result;
  std::string error;   // why not, when !ok
  // How much of `error` bunny wrote itself; the rest (a stderr tail, the
  // local service's answer) is the handler's and may echo the payload, so
  // it goes to relay but never to bunny's log.
  size_t error_own_bytes = std::string::npos;
  bool timed_out = false;
  bool cancelled = false;
};

class handler_run {
 public:
  virtual ~handler_run() = default;
  // Stops the run (the process is signalled, the request dropped); the
  // outcome still arrives, with cancelled = true.
  virtual void cancel(std::string_view why) = 0;
};

using done_fn = std::function<void(outcome)>;

class handler {
 public:
  virtual ~handler() = default;
  // The returned run is valid until `done` has been called.
  virtual handler_run* start(const job_input& job, done_fn done) = 0;
  // No run will be started any more: lets go of what the handler keeps
  // between runs (the http handler's idle connections) so that the loop can
  // end. Runs under way are not touched; they still report.
  virtual void shutdown() {}
};

struct exec_options {
  std::vector<std::string> argv;
  uint64_t timeout_ms = 600000;
  uint64_t kill_grace_ms = 5000;
  size_t max_output_bytes = 16 << 20;
};

// The http handler keeps the connections of finished runs open (HTTP/1.1
// keep-alive) and gives them to the next runs, one request at a time each:
// never more than the number of runs under way at once, which the agent
// bounds by `concurrency`. An idle connection is closed after
// min(30 s, timeout_ms), or when the service closes it.
struct http_options {
  std::string host;
  uint16_t port = 0;
  std::string path;
  uint64_t timeout_ms = 600000;
  size_t max_output_bytes = 16 << 20;
};

std::unique_ptr<handler> make_exec_handler(uv_loop_t* loop, exec_options o);
std::unique_ptr<handler> make_http_handler(uv_loop_t* loop, http_options o);

// Whether `out` past its first `from` bytes is one JSON value (whitespace
// around it allowed), checked in place: `out` may gain capacity (simdjson's
// padding) but keeps its bytes. A large result is read once, not copied.
bool check_json_result(std::string& out, size_t from, std::string& why);

}  // namespace relay::bunny
