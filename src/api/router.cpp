#include "api/router.h"

#include <array>

namespace relay::api {
namespace {

// Splits "/a/b/c" into at most N segments; returns the count, or N+1 if
// there are more (which matches no route).
template <size_t N>
size_t split(std::string_view path, std::array<std::string_view, N>& seg) {
  if (path.empty() || path.front() != '/') return N + 1;
  path.remove_prefix(1);
  size_t n = 0;
  while (true) {
    auto slash = path.find('/');
    if (n == N) return N + 1;
    seg[n++] = path.substr(0, slash);
    if (slash == std::string_view::npos) break;
    path.remove_prefix(slash + 1);
  }
  return n;
}

route_match make(route r, http::method m, http::method want, std::string_view allow) {
  route_match rm;
  rm.which = r;
  rm.method_allowed = m == want;
  rm.allow = allow;
  return rm;
}

}  // namespace

std::string_view route_name(route r) {
  static constexpr std::array<std::string_view, route_count> names{
      "submit", "get_job", "cancel_job", "lease", "heartbeat", "complete", "fail",
      "results", "list_queues", "get_queue", "list_dead", "requeue_dead", "unknown"};
  return names[static_cast<size_t>(r)];
}

route_match match_route(http::method m, std::string_view path) {
  std::array<std::string_view, 5> s;
  size_t n = split(path, s);
  route_match none;
  if (n < 2 || n > 5 || s[0] != "v1") return none;
  using http::method;
  if (s[1] == "results" && n == 2) return make(route::results, m, method::post, "POST");
  if (s[1] == "queues") {
    if (n == 2) return make(route::list_queues, m, method::get, "GET");
    route_match r;
    if (n == 3) r = make(route::get_queue, m, method::get, "GET");
    else if (n == 4 && s[3] == "jobs") r = make(route::submit, m, method::post, "POST");
    else if (n == 4 && s[3] == "lease") r = make(route::lease, m, method::post, "POST");
    else if (n == 4 && s[3] == "dead") r = make(route::list_dead, m, method::get, "GET");
    else if (n == 5 && s[3] == "dead" && s[4] == "requeue") r = make(route::requeue_dead, m, method::post, "POST");
    else return none;
    r.queue = s[2];
    return r;
  }
  if (s[1] == "jobs" && n >= 3) {
    route_match r;
    if (n == 3) {
      if (m == method::del) r = make(route::cancel_job, m, method::del, "GET, DELETE");
      else r = make(route::get_job, m, method::get, "GET, DELETE");
    } else if (n == 4 && s[3] == "heartbeat") r = make(route::heartbeat, m, method::post, "POST");
    else if (n == 4 && s[3] == "complete") r = make(route::complete, m, method::post, "POST");
    else if (n == 4 && s[3] == "fail") r = make(route::fail, m, method::post, "POST");
    else return none;
    r.job = s[2];
    return r;
  }
  return none;
}

}  // namespace relay::api
