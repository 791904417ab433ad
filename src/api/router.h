// Method + path → route. Paths are matched segment by segment; a path that
// names a resource with the wrong method is a 405 with an Allow header.
#pragma once

#include <cstdint>
#include <string_view>

#include "relay/http.h"

namespace relay::api {

enum class route : uint8_t {
  submit,        // POST /v1/queues/{q}/jobs
  get_job,       // GET /v1/jobs/{id}
  cancel_job,    // DELETE /v1/jobs/{id}
  lease,         // POST /v1/queues/{q}/lease
  heartbeat,     // POST /v1/jobs/{id}/heartbeat
  complete,      // POST /v1/jobs/{id}/complete
  fail,          // POST /v1/jobs/{id}/fail
  results,       // POST /v1/results
  list_queues,   // GET /v1/queues
  get_queue,     // GET /v1/queues/{q}
  list_dead,     // GET /v1/queues/{q}/dead
  requeue_dead,  // POST /v1/queues/{q}/dead/requeue
  unknown,
};
inline constexpr size_t route_count = static_cast<size_t>(route::unknown) + 1;

std::string_view route_name(route r);

struct route_match {
  route which = route::unknown;
  bool method_allowed = false;
  std::string_view allow;  // methods the path accepts, for 405
  std::string_view queue;
  std::string_view job;
};

route_match match_route(http::method m, std::string_view path);

}  // namespace relay::api
