// relay::api::decoder, the JSON request bodies of every route.
//
// Input: [body type byte] [body]. The type byte picks, modulo 8: submit (a
// job object or a batch array), lease, heartbeat, complete, fail, results
// (batch of outcomes), requeue, and every decoder in turn on the same body.
//
// Invariants, on success: every value the decoder accepted lies within the
// bounds the queue core trusts it to (value_limits); `payload` and `result`
// are views into the body and are, on their own, valid JSON (relay stores
// and returns them byte for byte). One decoder serves every input, as one
// serves every request in relay.
#include <string>
#include <vector>

#include "api/decode.h"
#include "fuzz_input.h"
#include "relay/http.h"

using namespace relay;
using namespace relay::api;

namespace {

simdjson::dom::parser& validator() {
  static simdjson::dom::parser p;
  return p;
}

// `v` points into `body` and parses as one JSON value.
void check_raw(std::string_view v, const std::string& body) {
  FUZZ_CHECK(!v.empty());
  FUZZ_CHECK(v.data() >= body.data() && v.data() + v.size() <= body.data() + body.size());
  simdjson::padded_string copy(v);
  simdjson::dom::element e;
  FUZZ_CHECK(!validator().parse(copy).get(e));
}

void check_outcome(const outcome_args& o, const std::string& body, bool batch) {
  FUZZ_CHECK(o.error.size() <= value_limits::max_error_bytes);
  FUZZ_CHECK(o.retry_delay_ms <= value_limits::max_retry_delay_ms);
  if (batch || !o.failed) {
    if (!o.failed) check_raw(o.result, body);
  }
  if (!batch && o.failed) FUZZ_CHECK(o.result.empty());
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static decoder d;
  fuzz::input in(data, size);
  uint8_t type = in.byte() % 8;
  std::string body(in.rest());
  // As the request parser leaves it: the padding simdjson may read into.
  body.reserve(body.size() + http::body_padding);
  decode_error err;
  bool ok = false;
  switch (type) {
    case 0: {
      std::vector<queue::submit_params> items;
      bool batch = false;
      ok = d.submit(body, items, batch, err);
      if (ok) {
        FUZZ_CHECK(!items.empty() && items.size() <= value_limits::max_batch_items);
        FUZZ_CHECK(batch || items.size() == 1);
        for (const auto& i : items) {
          check_raw(i.payload, body);
          FUZZ_CHECK(i.priority < queue::priority_levels);
          FUZZ_CHECK(i.delay_ms >= 0 && i.delay_ms <= value_limits::max_delay_ms);
          FUZZ_CHECK(i.max_attempts >= 1 && i.max_attempts <= 1000);
          FUZZ_CHECK(i.lease_ms >= value_limits::min_lease_ms && i.lease_ms <= value_limits::max_lease_ms);
          FUZZ_CHECK(i.idempotency_key.size() <= value_limits::max_idempotency_key);
        }
      }
      break;
    }
    case 1: {
      lease_args a;
      ok = d.lease(body, a, err);
      if (ok) {
        FUZZ_CHECK(a.max >= 1 && a.max <= value_limits::max_lease_batch);
        FUZZ_CHECK(a.wait_ms <= value_limits::max_wait_ms);
        FUZZ_CHECK(a.lease_ms == 0 || (a.lease_ms >= value_limits::min_lease_ms && a.lease_ms <= value_limits::max_lease_ms));
      }
      break;
    }
    case 2: {
      heartbeat_args a;
      ok = d.heartbeat(body, a, err);
      if (ok) FUZZ_CHECK(a.extend_ms == 0 || (a.extend_ms >= value_limits::min_lease_ms && a.extend_ms <= value_limits::max_lease_ms));
      break;
    }
    case 3:
    case 4: {
      outcome_args a;
      ok = type == 3 ? d.complete(body, a, err) : d.fail(body, a, err);
      if (ok) {
        FUZZ_CHECK(a.failed == (type == 4));
        check_outcome(a, body, false);
      }
      break;
    }
    case 5: {
      std::vector<outcome_args> items;
      ok = d.results(body, items, err);
      if (ok) {
        FUZZ_CHECK(items.size() <= value_limits::max_batch_items);
        for (const auto& i : items) check_outcome(i, body, true);
      }
      break;
    }
    case 6: {
      requeue_args a;
      ok = d.requeue(body, a, err);
      if (ok) {
        FUZZ_CHECK(a.ids.size() <= value_limits::max_batch_items);
        FUZZ_CHECK(a.max >= 1 && a.max <= 100000);
      }
      break;
    }
    case 7: {
      // Every decoder on one body, in turn: one decoder's state must not
      // leak into the next parse.
      std::vector<queue::submit_params> items;
      bool batch = false;
      lease_args l;
      heartbeat_args h;
      outcome_args c, f;
      std::vector<outcome_args> r;
      requeue_args q;
      ok = d.submit(body, items, batch, err);
      ok = d.lease(body, l, err) || ok;
      ok = d.heartbeat(body, h, err) || ok;
      ok = d.complete(body, c, err) || ok;
      ok = d.fail(body, f, err) || ok;
      ok = d.results(body, r, err) || ok;
      ok = d.requeue(body, q, err) || ok;
      break;
    }
  }
  (void)ok;
  return 0;
}
