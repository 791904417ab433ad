#include <array>

#include "relay/api_error.h"
#include "relay/json.h"

namespace relay {
namespace {

// Indexed by api_error; keep in enum order.
constexpr std::array<api_error_info, 22> table{{
    {400, "bad_request", "the request is malformed"},
    {400, "invalid_json", "the body is not valid JSON"},
    {400, "invalid_field", "a field has the wrong type or value"},
    {401, "unauthenticated", "no valid credentials"},
    {429, "too_many_auth_failures", "too many failed authentications from this address; retry later"},
    {403, "forbidden", "the policy does not allow this"},
    {404, "not_found", "no such resource"},
    {405, "method_not_allowed", "method not allowed on this resource"},
    {408, "request_timeout", "the request was not received in time"},
    {409, "lease_lost", "the lease expired or belongs to another lease"},
    {409, "not_cancellable", "the job is leased or finished"},
    {411, "length_required", "a request body needs Content-Length or chunked encoding"},
    {413, "payload_too_large", "the request body is too large"},
    {414, "uri_too_long", "the request URI is too long"},
    {431, "headers_too_large", "the request headers are too large"},
    {429, "queue_full", "relay holds as many jobs (or job bytes) as it may; retry later"},
    {429, "too_many_queues", "relay holds as many queues as it may"},
    {429, "rate_limited", "the principal's rate limit is reached; retry after Retry-After seconds"},
    // Retrying cannot help, so not 429: the client must split the batch.
    {413, "batch_too_large", "the batch holds more jobs than the principal's jobs_burst; split it"},
    {503, "draining", "relay is shutting down"},
    {503, "unavailable", "relay cannot make changes durable right now; retry later"},
    {500, "internal", "internal error"},
}};

static_assert(table.size() == static_cast<size_t>(api_error::internal) + 1);

}  // namespace

const api_error_info& describe(api_error e) { return table[static_cast<size_t>(e)]; }

std::string api_error_body(api_error e, std::string_view detail) {
  const auto& info = describe(e);
  std::string body;
  body.reserve(64 + info.message.size() + detail.size());
  body += "{\"error\":{\"code\":\"";
  body += info.code;
  body += "\",\"message\":";
  json::append_string(body, detail.empty() ? info.message : detail);
  body += "}}";
  return body;
}

std::string_view api_error_headers(api_error e) {
  switch (e) {
    // RFC 6750: a 401 names the scheme it wants. The same challenge for a
    // missing and a refused key: the answer does not say which it was.
    case api_error::unauthenticated: return "WWW-Authenticate: Bearer realm=\"relay\"\r\n";
    // The caller sends the real wait; this is the floor if it does not.
    case api_error::too_many_auth_failures: return "Retry-After: 1\r\n";
    case api_error::queue_full:
    case api_error::too_many_queues:
    case api_error::rate_limited: return "Retry-After: 1\r\n";
    case api_error::draining: return "Retry-After: 1\r\nConnection: close\r\n";
    case api_error::unavailable: return "Retry-After: 1\r\n";
    default: return {};
  }
}

}  // namespace relay
