// Request bodies → plain structs. Every body is first validated as a whole
// (simdjson DOM: grammar, UTF-8, depth), then its fields are read with the
// on-demand API so that `payload` and `result` can be kept as the exact bytes
// the client sent. Unknown fields are rejected by name. The string views in
// the results point into the request body.
#pragma once

#include <simdjson.h>

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "relay/api_error.h"
#include "relay/queue.h"

namespace relay::api {

struct decode_error {
  api_error kind = api_error::invalid_field;
  std::string message;
};

struct lease_args {
  size_t max = 1;
  // The answer's body at most this many bytes, but always at least one job
  // (a job alone fits limits.max_body_bytes). SIZE_MAX: no bound.
  size_t max_bytes = SIZE_MAX;
  uint32_t wait_ms = 0;
  uint32_t lease_ms = 0;  // 0: each job's own
};

struct heartbeat_args {
  queue::lease_token lease;
  uint32_t extend_ms = 0;  // 0: the job's lease_ms
};

// complete (error empty, result set) or fail (result empty).
struct outcome_args {
  queue::job_id id = 0;  // set only in a /v1/results batch
  queue::lease_token lease;
  bool failed = false;
  std::string_view result;
  std::string error;  // unescaped
  uint32_t retry_delay_ms = 1000;
};

struct requeue_args {
  std::vector<queue::job_id> ids;
  size_t max = 1000;
};

// Bounds on client-chosen values; the queue core trusts what passes here.
struct value_limits {
  static constexpr int64_t max_delay_ms = 30LL * 24 * 3600 * 1000;
  static constexpr uint32_t min_lease_ms = 100;
  static constexpr uint32_t max_lease_ms = 24 * 3600 * 1000;
  static constexpr uint32_t max_wait_ms = 60000;
  static constexpr size_t max_lease_batch = 1000;
  // JSON integers beyond 2^53 are not exact in every client's parser.
  static constexpr int64_t max_lease_answer_bytes = (int64_t{1} << 53) - 1;
  static constexpr size_t max_batch_items = 10000;
  static constexpr size_t max_idempotency_key = 256;
  static constexpr size_t max_error_bytes = 64 * 1024;
  static constexpr uint32_t max_retry_delay_ms = 24 * 3600 * 1000;
};

class decoder {
 public:
  // Single object → one item, batch=false; array of objects → batch=true.
  // The items' queue is left for the caller to set.
  bool submit(const std::string& body, std::vector<queue::submit_params>& out, bool& batch, decode_error& err);
  bool lease(const std::string& body, lease_args& out, decode_error& err);
  bool heartbeat(const std::string& body, heartbeat_args& out, decode_error& err);
  bool complete(const std::string& body, outcome_args& out, decode_error& err);
  bool fail(const std::string& body, outcome_args& out, decode_error& err);
  bool results(const std::string& body, std::vector<outcome_args>& out, decode_error& err);
  bool requeue(const std::string& body, requeue_args& out, decode_error& err);

 private:
  bool validate(const std::string& body, decode_error& err);
  bool start(const std::string& body, decode_error& err);
  simdjson::dom::parser _dom;
  simdjson::ondemand::parser _ondemand;
  simdjson::ondemand::document _doc;
};

}  // namespace relay::api
