// The one table of API errors: every handler, and the HTTP parser's early
// rejects, answer through it, so a given problem always has the same status,
// code and default message. Bodies have the shape
//   {"error":{"code":"<snake_case>","message":"..."}}
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace relay {

enum class api_error : uint8_t {
  bad_request,
  invalid_json,
  invalid_field,
  unauthenticated,
  too_many_auth_failures,
  forbidden,
  not_found,
  method_not_allowed,
  request_timeout,
  lease_lost,
  not_cancellable,
  length_required,
  payload_too_large,
  uri_too_long,
  headers_too_large,
  queue_full,
  too_many_queues,
  rate_limited,     // a principal's request or job rate (policy "limits")
  batch_too_large,  // a batch with more jobs than the principal's jobs_burst
  draining,
  unavailable,
  internal,
};

struct api_error_info {
  int status;
  std::string_view code;
  std::string_view message;  // used when the caller gives no detail
};

const api_error_info& describe(api_error e);

// The JSON body for `e`; `detail` replaces the default message when given.
std::string api_error_body(api_error e, std::string_view detail = {});

// Extra response headers that go with `e` (Retry-After for 429 and 503,
// the Bearer challenge for 401), each ending in CRLF. For rate_limited the
// Retry-After is the floor, one second; the API sends the time until the
// bucket holds what was asked instead.
std::string_view api_error_headers(api_error e);

}  // namespace relay
