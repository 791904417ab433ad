#include <simdjson.h>

#include <charconv>
#include <fstream>
#include <functional>
#include <sstream>

#include "relay/config.h"
#include "relay/json.h"

namespace relay::config {
namespace {

using namespace simdjson;

enum class kind { string, path, optional_path, choice, number };

struct key_spec {
  std::string_view name;  // dotted
  kind type;
  std::function<void*(relay_config&)> field;
  std::vector<std::string_view> choices;  // kind::choice
  uint64_t min = 0, max = 0;              // kind::number
};

const std::vector<key_spec>& schema() {
  static const std::vector<key_spec> keys = {
      {"listen", kind::string, [](relay_config& c) -> void* { return &c.listen; }, {}},
      {"ops_listen", kind::string, [](relay_config& c) -> void* { return &c.ops_listen; }, {}},
      {"tls.cert", kind::path, [](relay_config& c) -> void* { return &c.tls.cert; }, {}},
      {"tls.key", kind::path, [](relay_config& c) -> void* { return &c.tls.key; }, {}},
      {"tls.client_ca", kind::path, [](relay_config& c) -> void* { return &c.tls.client_ca; }, {}},
      {"tls.crl", kind::optional_path, [](relay_config& c) -> void* { return &c.tls.crl; }, {}},
      {"tls.min_version", kind::choice, [](relay_config& c) -> void* { return &c.tls.min_version; }, {"1.2", "1.3"}},
      {"auth.mode", kind::choice, [](relay_config& c) -> void* { return &c.auth.mode; }, {"mtls"}},
      {"auth.api_keys", kind::optional_path, [](relay_config& c) -> void* { return &c.auth.api_keys; }, {}},
      {"policy", kind::path, [](relay_config& c) -> void* { return &c.policy; }, {}},
      {"journal.dir", kind::path, [](relay_config& c) -> void* { return &c.journal.dir; }, {}},
      {"journal.fsync", kind::choice, [](relay_config& c) -> void* { return &c.journal.fsync; }, {"always", "batch", "off"}},
      {"limits.max_body_bytes", kind::number, [](relay_config& c) -> void* { return &c.limits.max_body_bytes; }, {}, 1, 64ull << 20},
      {"limits.max_connections", kind::number, [](relay_config& c) -> void* { return &c.limits.max_connections; }, {}, 1, 1000000},
      {"limits.header_timeout_ms", kind::number, [](relay_config& c) -> void* { return &c.limits.header_timeout_ms; }, {}, 100, 600000},
      {"limits.idle_timeout_ms", kind::number, [](relay_config& c) -> void* { return &c.limits.idle_timeout_ms; }, {}, 100, 3600000},
      {"limits.max_header_bytes", kind::number, [](relay_config& c) -> void* { return &c.limits.max_header_bytes; }, {}, 1024, 1 << 20},
      {"limits.max_uri_bytes", kind::number, [](relay_config& c) -> void* { return &c.limits.max_uri_bytes; }, {}, 256, 1 << 20},
      {"limits.max_jobs", kind::number, [](relay_config& c) -> void* { return &c.limits.max_jobs; }, {}, 1, 1ull << 32},
      {"limits.max_held_bytes", kind::number, [](relay_config& c) -> void* { return &c.limits.max_held_bytes; }, {}, 1 << 20, 1ull << 40},
      {"limits.max_queues", kind::number, [](relay_config& c) -> void* { return &c.limits.max_queues; }, {}, 1, 1000000},
      {"limits.result_ttl_ms", kind::number, [](relay_config& c) -> void* { return &c.limits.result_ttl_ms; }, {}, 1000, 365ull * 86400000},
      {"limits.drain_timeout_ms", kind::number, [](relay_config& c) -> void* { return &c.limits.drain_timeout_ms; }, {}, 0, 3600000},
      {"log.level", kind::choice, [](relay_config& c) -> void* { return &c.log.level; }, {"debug", "info", "warn", "error"}},
  };
  return keys;
}

const key_spec* find_key(std::string_view name) {
  for (const auto& k : schema())
    if (k.name == name) return &k;
  return nullptr;
}

bool is_section(std::string_view prefix) {
  for (const auto& k : schema())
    if (k.name.size() > prefix.size() && k.name.substr(0, prefix.size()) == prefix && k.name[prefix.size()] == '.')
      return true;
  return false;
}

std::string join_path(const std::string& base_dir, std::string_view p) {
  if (p.empty() || p.front() == '/' || base_dir.empty()) return std::string(p);
  return base_dir + "/" + std::string(p);
}

std::string describe(const key_spec& k) {
  switch (k.type) {
    case kind::string: return "a string";
    case kind::path: return "a file path (string)";
    case kind::optional_path: return "a file path (string) or null";
    case kind::number: return "an integer from " + std::to_string(k.min) + " to " + std::to_string(k.max);
    case kind::choice: {
      std::string s = "one of";
      for (auto c : k.choices) s += " \"" + std::string(c) + "\"";
      return s;
    }
  }
  return "?";
}

// Sets a key from a JSON value (file) — `text` holds the raw string for
// strings, `number` for integers, `is_null` for null.
struct value_in {
  enum { str, num, null, other } what = other;
  std::string_view text;
  uint64_t number = 0;
  bool negative_or_fraction = false;
};

bool assign(relay_config& c, const key_spec& k, const value_in& v, const std::string& base_dir, std::string& why) {
  void* f = k.field(c);
  switch (k.type) {
    case kind::string:
    case kind::path:
      if (v.what != value_in::str || v.text.empty()) break;
      *static_cast<std::string*>(f) = k.type == kind::path ? join_path(base_dir, v.text) : std::string(v.text);
      return true;
    case kind::optional_path:
      if (v.what == value_in::null) {
        static_cast<std::optional<std::string>*>(f)->reset();
        return true;
      }
      if (v.what != value_in::str || v.text.empty()) break;
      *static_cast<std::optional<std::string>*>(f) = join_path(base_dir, v.text);
      return true;
    case kind::choice:
      if (v.what != value_in::str) break;
      for (auto choice : k.choices) {
        if (choice == v.text) {
          *static_cast<std::string*>(f) = std::string(v.text);
          return true;
        }
      }
      if (k.name == "auth.mode" && (v.text == "api_key" || v.text == "mtls+api_key")) {
        why = "\"" + std::string(v.text) + "\" is not supported by this version (only \"mtls\")";
        return false;
      }
      break;
    case kind::number:
      if (v.what != value_in::num || v.negative_or_fraction || v.number < k.min || v.number > k.max) break;
      *static_cast<uint64_t*>(f) = v.number;
      return true;
  }
  why = "must be " + describe(k);
  return false;
}

bool walk(dom::object obj, const std::string& prefix, relay_config& c, const std::string& base_dir,
          const std::string& origin, std::string& error) {
  for (auto [key, value] : obj) {
    std::string name = prefix.empty() ? std::string(key) : prefix + "." + std::string(key);
    if (value.type() == dom::element_type::OBJECT && is_section(name)) {
      if (!walk(value.get_object().value_unsafe(), name, c, base_dir, origin, error)) return false;
      continue;
    }
    const key_spec* k = find_key(name);
    if (!k) {
      error = origin + ": unknown key \"" + name + "\"";
      return false;
    }
    value_in v;
    switch (value.type()) {
      case dom::element_type::STRING:
        v.what = value_in::str;
        v.text = value.get_string().value_unsafe();
        break;
      case dom::element_type::UINT64:
        v.what = value_in::num;
        v.number = value.get_uint64().value_unsafe();
        break;
      case dom::element_type::INT64:
        v.what = value_in::num;
        v.negative_or_fraction = value.get_int64().value_unsafe() < 0;
        v.number = static_cast<uint64_t>(value.get_int64().value_unsafe());
        break;
      case dom::element_type::NULL_VALUE: v.what = value_in::null; break;
      default: break;
    }
    std::string why;
    if (!assign(c, *k, v, base_dir, why)) {
      error = origin + ": \"" + name + "\" " + why;
      return false;
    }
  }
  return true;
}

bool override_value(relay_config& c, const std::string& key, const std::string& text, std::string& error) {
  const key_spec* k = find_key(key);
  if (!k) {
    error = "--set: unknown key \"" + key + "\"";
    return false;
  }
  value_in v;
  if (text == "null") {
    v.what = value_in::null;
  } else if (k->type == kind::number) {
    auto [ptr, ec] = std::from_chars(text.data(), text.data() + text.size(), v.number);
    v.what = (ec == std::errc() && ptr == text.data() + text.size()) ? value_in::num : value_in::other;
  } else {
    v.what = value_in::str;
    v.text = text;
  }
  std::string why;
  if (!assign(c, *k, v, "", why)) {
    error = "--set " + key + ": " + why;
    return false;
  }
  return true;
}

}  // namespace

bool load(const std::optional<std::string>& file, const override_list& overrides, relay_config& out,
          std::string& error) {
  relay_config c;
  if (file) {
    std::ifstream in(*file, std::ios::binary);
    if (!in) {
      error = *file + ": cannot open";
      return false;
    }
    std::ostringstream ss;
    ss << in.rdbuf();
    padded_string text(ss.str());
    dom::parser parser;
    dom::element root;
    if (auto e = parser.parse(text).get(root)) {
      error = *file + ": not valid JSON: " + error_message(e);
      return false;
    }
    dom::object obj;
    if (root.get_object().get(obj)) {
      error = *file + ": the configuration must be a JSON object";
      return false;
    }
    std::string base_dir;
    if (auto slash = file->rfind('/'); slash != std::string::npos) base_dir = file->substr(0, slash);
    if (!walk(obj, "", c, base_dir, *file, error)) return false;
  }
  for (const auto& [key, value] : overrides)
    if (!override_value(c, key, value, error)) return false;
  out = std::move(c);
  return true;
}

std::string to_json(const relay_config& cfg) {
  relay_config c = cfg;
  std::string out = "{";
  std::string section;
  bool first_in_section = true;
  bool first = true;
  for (const auto& k : schema()) {
    std::string_view name = k.name;
    auto dot = name.find('.');
    std::string sec = dot == std::string_view::npos ? "" : std::string(name.substr(0, dot));
    std::string leaf(dot == std::string_view::npos ? name : name.substr(dot + 1));
    if (sec != section) {
      if (!section.empty()) out += "\n  }";
      section = sec;
      if (!sec.empty()) {
        out += first ? "\n  " : ",\n  ";
        json::append_key(out, sec);
        out += " {";
        first_in_section = true;
        first = false;
      }
    }
    const char* indent = sec.empty() ? "\n  " : "\n    ";
    if (sec.empty()) {
      out += first ? "" : ",";
      first = false;
    } else {
      out += first_in_section ? "" : ",";
      first_in_section = false;
    }
    out += indent;
    json::append_key(out, leaf);
    out += ' ';
    void* f = k.field(c);
    switch (k.type) {
      case kind::string:
      case kind::path:
      case kind::choice: json::append_string(out, *static_cast<std::string*>(f)); break;
      case kind::optional_path: {
        auto* o = static_cast<std::optional<std::string>*>(f);
        if (*o) json::append_string(out, **o);
        else out += "null";
        break;
      }
      case kind::number: json::append_uint(out, *static_cast<uint64_t*>(f)); break;
    }
  }
  if (!section.empty()) out += "\n  }";
  out += "\n}\n";
  return out;
}

}  // namespace relay::config
