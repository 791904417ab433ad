#include "api/decode.h"

#include "relay/http.h"
#include "relay/json_read.h"

namespace relay::api {
namespace {

using namespace simdjson;

bool set_error(decode_error& err, api_error kind, std::string message) {
  err.kind = kind;
  err.message = std::move(message);
  return false;
}

bool field_error(decode_error& err, std::string_view name, std::string_view what) {
  return set_error(err, api_error::invalid_field, "\"" + std::string(name) + "\" " + std::string(what));
}

using json::raw_value;

bool get_int(ondemand::value v, std::string_view name, int64_t min, int64_t max, int64_t& out,
             decode_error& err) {
  int64_t x;
  if (v.get_int64().get(x) || x < min || x > max)
    return field_error(err, name, "must be an integer from " + std::to_string(min) + " to " + std::to_string(max));
  out = x;
  return true;
}

bool get_string(ondemand::value v, std::string_view name, size_t max_bytes, std::string_view& out,
                decode_error& err) {
  if (v.get_string().get(out)) return field_error(err, name, "must be a string");
  if (out.size() > max_bytes)
    return field_error(err, name, "must be at most " + std::to_string(max_bytes) + " bytes");
  return true;
}

bool get_lease(ondemand::value v, queue::lease_token& out, decode_error& err) {
  std::string_view s;
  if (v.get_string().get(s)) return field_error(err, "lease", "must be a string");
  auto t = queue::lease_token::parse(s);
  if (!t) return field_error(err, "lease", "is not a lease token (32 hex digits)");
  out = *t;
  return true;
}

bool unknown(decode_error& err, std::string_view key) {
  return set_error(err, api_error::invalid_field, "unknown field \"" + std::string(key) + "\"");
}

// Calls fn(key, value) for each field of an object; fn returns false to stop.
template <class Fn>
bool each_field(ondemand::object obj, decode_error& err, Fn fn) {
  for (auto f : obj) {
    ondemand::field field;
    std::string_view key;
    if (std::move(f).get(field) || field.unescaped_key().get(key)) return set_error(err, api_error::invalid_json, {});
    if (!fn(key, field.value())) return false;
  }
  return true;
}

bool submit_object(ondemand::object obj, queue::submit_params& item, decode_error& err) {
  bool has_payload = false;
  bool ok = each_field(obj, err, [&](std::string_view key, ondemand::value v) {
    int64_t n;
    if (key == "payload") {
      has_payload = true;
      return raw_value(v, item.payload) || field_error(err, key, "is not valid JSON");
    }
    if (key == "priority") {
      if (!get_int(v, key, 0, queue::priority_levels - 1, n, err)) return false;
      item.priority = static_cast<uint8_t>(n);
      return true;
    }
    if (key == "delay_ms") return get_int(v, key, 0, value_limits::max_delay_ms, item.delay_ms, err);
    if (key == "max_attempts") {
      if (!get_int(v, key, 1, 1000, n, err)) return false;
      item.max_attempts = static_cast<uint16_t>(n);
      return true;
    }
    if (key == "lease_ms") {
      if (!get_int(v, key, value_limits::min_lease_ms, value_limits::max_lease_ms, n, err)) return false;
      item.lease_ms = static_cast<uint32_t>(n);
      return true;
    }
    if (key == "idempotency_key") {
      if (!get_string(v, key, value_limits::max_idempotency_key, item.idempotency_key, err)) return false;
      return !item.idempotency_key.empty() || field_error(err, key, "must not be empty");
    }
    return unknown(err, key);
  });
  if (!ok) return false;
  if (!has_payload) return field_error(err, "payload", "is required");
  return true;
}

bool outcome_object(ondemand::object obj, outcome_args& out, bool in_batch, bool want_fail, decode_error& err) {
  bool has_lease = false, has_result = false, has_error = false, has_id = false;
  bool ok = each_field(obj, err, [&](std::string_view key, ondemand::value v) {
    if (key == "lease") {
      has_lease = true;
      return get_lease(v, out.lease, err);
    }
    if (key == "id" && in_batch) {
      has_id = true;
      std::string_view s;
      if (v.get_string().get(s)) return field_error(err, key, "must be a string");
      auto id = queue::parse_job_id(s);
      if (!id) return field_error(err, key, "is not a job id");
      out.id = *id;
      return true;
    }
    if (key == "result" && (in_batch || !want_fail)) {
      has_result = true;
      return raw_value(v, out.result) || field_error(err, key, "is not valid JSON");
    }
    if (key == "error" && (in_batch || want_fail)) {
      has_error = true;
      std::string_view s;
      if (!get_string(v, key, value_limits::max_error_bytes, s, err)) return false;
      out.error.assign(s);
      return true;
    }
    if (key == "retry_delay_ms" && (in_batch || want_fail)) {
      int64_t n;
      if (!get_int(v, key, 0, value_limits::max_retry_delay_ms, n, err)) return false;
      out.retry_delay_ms = static_cast<uint32_t>(n);
      return true;
    }
    return unknown(err, key);
  });
  if (!ok) return false;
  if (in_batch && !has_id) return field_error(err, "id", "is required");
  if (!has_lease) return field_error(err, "lease", "is required");
  if (in_batch) {
    if (has_result == has_error) return set_error(err, api_error::invalid_field, "each item needs exactly one of \"result\" and \"error\"");
    out.failed = has_error;
  } else if (want_fail) {
    out.failed = true;
  } else if (!has_result) {
    return field_error(err, "result", "is required");
  }
  return true;
}

// Decodes a JSON array of objects into `out`, one decode_one(obj, item)
// per element, prefixing errors with the item's index.
template <class Item, class Fn>
bool each_item(ondemand::array arr, std::vector<Item>& out, std::string_view noun, decode_error& err, Fn decode_one) {
  for (auto el : arr) {
    ondemand::object obj;
    if (el.get_object().get(obj))
      return set_error(err, api_error::invalid_field, "item " + std::to_string(out.size()) + " is not an object");
    if (out.size() >= value_limits::max_batch_items)
      return set_error(err, api_error::invalid_field, "a batch holds at most " +
                                                          std::to_string(value_limits::max_batch_items) + " " +
                                                          std::string(noun));
    out.emplace_back();
    if (!decode_one(obj, out.back())) {
      err.message = "item " + std::to_string(out.size() - 1) + ": " + err.message;
      return false;
    }
  }
  return true;
}

}  // namespace

bool decoder::validate(const std::string& body, decode_error& err) {
  // The request parser reserved padding after every body.
  if (body.capacity() < body.size() + http::body_padding) return set_error(err, api_error::internal, "unpadded body");
  dom::element root;
  auto error = _dom.parse(body.data(), body.size(), false).get(root);
  if (error) {
    return set_error(err, api_error::invalid_json, std::string("the body is not valid JSON: ") + error_message(error));
  }
  return true;
}

bool decoder::start(const std::string& body, decode_error& err) {
  if (!validate(body, err)) return false;
  padded_string_view view(body.data(), body.size(), body.capacity());
  if (_ondemand.iterate(view).get(_doc)) return set_error(err, api_error::invalid_json, {});
  return true;
}

bool decoder::submit(const std::string& body, std::vector<queue::submit_params>& out, bool& batch, decode_error& err) {
  if (!start(body, err)) return false;
  ondemand::json_type t;
  if (_doc.type().get(t)) return set_error(err, api_error::invalid_json, {});
  if (t == ondemand::json_type::object) {
    batch = false;
    ondemand::object obj;
    if (_doc.get_object().get(obj)) return set_error(err, api_error::invalid_json, {});
    out.emplace_back();
    return submit_object(obj, out.back(), err);
  }
  if (t != ondemand::json_type::array)
    return set_error(err, api_error::invalid_field, "the body must be a job object or an array of them");
  batch = true;
  ondemand::array arr;
  if (_doc.get_array().get(arr)) return set_error(err, api_error::invalid_json, {});
  if (!each_item(arr, out, "jobs", err, [&](ondemand::object obj, queue::submit_params& item) {
        return submit_object(obj, item, err);
      }))
    return false;
  if (out.empty()) return set_error(err, api_error::invalid_field, "the batch is empty");
  return true;
}

bool decoder::lease(const std::string& body, lease_args& out, decode_error& err) {
  if (body.empty()) return true;  // all defaults
  if (!start(body, err)) return false;
  ondemand::object obj;
  if (_doc.get_object().get(obj)) return set_error(err, api_error::invalid_field, "the body must be an object");
  return each_field(obj, err, [&](std::string_view key, ondemand::value v) {
    int64_t n;
    if (key == "max") {
      if (!get_int(v, key, 1, value_limits::max_lease_batch, n, err)) return false;
      out.max = static_cast<size_t>(n);
      return true;
    }
    if (key == "max_bytes") {
      if (!get_int(v, key, 1, value_limits::max_lease_answer_bytes, n, err)) return false;
      out.max_bytes = static_cast<size_t>(n);
      return true;
    }
    if (key == "wait_ms") {
      if (!get_int(v, key, 0, value_limits::max_wait_ms, n, err)) return false;
      out.wait_ms = static_cast<uint32_t>(n);
      return true;
    }
    if (key == "lease_ms") {
      if (!get_int(v, key, value_limits::min_lease_ms, value_limits::max_lease_ms, n, err)) return false;
      out.lease_ms = static_cast<uint32_t>(n);
      return true;
    }
    return unknown(err, key);
  });
}

bool decoder::heartbeat(const std::string& body, heartbeat_args& out, decode_error& err) {
  if (!start(body, err)) return false;
  ondemand::object obj;
  if (_doc.get_object().get(obj)) return set_error(err, api_error::invalid_field, "the body must be an object");
  bool has_lease = false;
  bool ok = each_field(obj, err, [&](std::string_view key, ondemand::value v) {
    if (key == "lease") {
      has_lease = true;
      return get_lease(v, out.lease, err);
    }
    if (key == "extend_ms") {
      int64_t n;
      if (!get_int(v, key, value_limits::min_lease_ms, value_limits::max_lease_ms, n, err)) return false;
      out.extend_ms = static_cast<uint32_t>(n);
      return true;
    }
    return unknown(err, key);
  });
  return ok && (has_lease || field_error(err, "lease", "is required"));
}

bool decoder::complete(const std::string& body, outcome_args& out, decode_error& err) {
  if (!start(body, err)) return false;
  ondemand::object obj;
  if (_doc.get_object().get(obj)) return set_error(err, api_error::invalid_field, "the body must be an object");
  return outcome_object(obj, out, false, false, err);
}

bool decoder::fail(const std::string& body, outcome_args& out, decode_error& err) {
  if (!start(body, err)) return false;
  ondemand::object obj;
  if (_doc.get_object().get(obj)) return set_error(err, api_error::invalid_field, "the body must be an object");
  return outcome_object(obj, out, false, true, err);
}

bool decoder::results(const std::string& body, std::vector<outcome_args>& out, decode_error& err) {
  if (!start(body, err)) return false;
  ondemand::array arr;
  if (_doc.get_array().get(arr)) return set_error(err, api_error::invalid_field, "the body must be an array");
  return each_item(arr, out, "results", err, [&](ondemand::object obj, outcome_args& item) {
    return outcome_object(obj, item, true, false, err);
  });
}

bool decoder::requeue(const std::string& body, requeue_args& out, decode_error& err) {
  if (body.empty()) return true;
  if (!start(body, err)) return false;
  ondemand::object obj;
  if (_doc.get_object().get(obj)) return set_error(err, api_error::invalid_field, "the body must be an object");
  return each_field(obj, err, [&](std::string_view key, ondemand::value v) {
    if (key == "max") {
      int64_t n;
      if (!get_int(v, key, 1, 100000, n, err)) return false;
      out.max = static_cast<size_t>(n);
      return true;
    }
    if (key == "ids") {
      ondemand::array arr;
      if (v.get_array().get(arr)) return field_error(err, key, "must be an array of job ids");
      for (auto el : arr) {
        std::string_view s;
        std::optional<queue::job_id> id;
        if (el.get_string().get(s) || !(id = queue::parse_job_id(s)))
          return field_error(err, key, "must be an array of job ids");
        if (out.ids.size() >= value_limits::max_batch_items) return field_error(err, key, "is too long");
        out.ids.push_back(*id);
      }
      return true;
    }
    return unknown(err, key);
  });
}

}  // namespace relay::api
