#include "config/schema.h"

#include <fcntl.h>
#include <simdjson.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>

#include "relay/json.h"

namespace relay::config {
namespace {

using namespace simdjson;

const key_spec* find_key(const schema& keys, std::string_view name) {
  for (const auto& k : keys)
    if (k.name == name) return &k;
  return nullptr;
}

bool is_section(const schema& keys, std::string_view prefix) {
  for (const auto& k : keys)
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
    case kind::string: return "a non-empty string";
    case kind::optional_string: return "a non-empty string or null";
    case kind::path: return "a file path (string)";
    case kind::optional_path: return "a file path (string) or null";
    case kind::number: return "an integer from " + std::to_string(k.min) + " to " + std::to_string(k.max);
    case kind::string_list: return "an array of non-empty strings";
    case kind::choice: {
      std::string s = "one of";
      for (auto c : k.choices) s += " \"" + std::string(c) + "\"";
      return s;
    }
  }
  return "?";
}

// A value from the file or from --set, reduced to what the kinds need.
struct value_in {
  enum { str, num, null, list, other } what = other;
  std::string_view text;
  uint64_t number = 0;
  bool negative = false;
  std::vector<std::string> items;
  bool bad_item = false;
};

bool assign(const key_spec& k, const value_in& v, void* cfg, const std::string& base_dir, std::string& why) {
  void* f = k.field(cfg);
  switch (k.type) {
    case kind::string:
    case kind::path:
      if (v.what != value_in::str || v.text.empty()) break;
      *static_cast<std::string*>(f) = k.type == kind::path ? join_path(base_dir, v.text) : std::string(v.text);
      return true;
    case kind::optional_string:
    case kind::optional_path:
      if (v.what == value_in::null) {
        static_cast<std::optional<std::string>*>(f)->reset();
        return true;
      }
      if (v.what != value_in::str || v.text.empty()) break;
      *static_cast<std::optional<std::string>*>(f) =
          k.type == kind::optional_path ? join_path(base_dir, v.text) : std::string(v.text);
      return true;
    case kind::choice:
      if (v.what != value_in::str) break;
      for (auto choice : k.choices) {
        if (choice == v.text) {
          *static_cast<std::string*>(f) = std::string(v.text);
          return true;
        }
      }
      if (!k.unsupported.empty() && k.unsupported.find(v.text) != std::string_view::npos) {
        why = "\"" + std::string(v.text) + "\" is not supported by this version";
        return false;
      }
      break;
    case kind::number:
      if (v.what != value_in::num || v.negative || v.number < k.min || v.number > k.max) break;
      *static_cast<uint64_t*>(f) = v.number;
      return true;
    case kind::string_list:
      if (v.what != value_in::list || v.bad_item) break;
      *static_cast<std::vector<std::string>*>(f) = v.items;
      return true;
  }
  why = "must be " + describe(k);
  return false;
}

value_in from_element(dom::element value) {
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
      v.negative = value.get_int64().value_unsafe() < 0;
      v.number = static_cast<uint64_t>(value.get_int64().value_unsafe());
      break;
    case dom::element_type::NULL_VALUE: v.what = value_in::null; break;
    case dom::element_type::ARRAY: {
      v.what = value_in::list;
      dom::array arr = value.get_array().value_unsafe();  // a named array, not a temporary
      for (dom::element e : arr) {
        std::string_view s;
        if (e.get_string().get(s) || s.empty()) v.bad_item = true;
        else v.items.emplace_back(s);
      }
      break;
    }
    default: break;
  }
  return v;
}

bool walk(const schema& keys, dom::object obj, const std::string& prefix, void* cfg, const std::string& base_dir,
          const std::string& origin, std::string& error) {
  for (auto [key, value] : obj) {
    std::string name = prefix.empty() ? std::string(key) : prefix + "." + std::string(key);
    if (value.type() == dom::element_type::OBJECT && is_section(keys, name)) {
      if (!walk(keys, value.get_object().value_unsafe(), name, cfg, base_dir, origin, error)) return false;
      continue;
    }
    const key_spec* k = find_key(keys, name);
    if (!k) {
      error = origin + ": unknown key \"" + name + "\"";
      return false;
    }
    std::string why;
    if (!assign(*k, from_element(value), cfg, base_dir, why)) {
      error = origin + ": \"" + name + "\" " + why;
      return false;
    }
  }
  return true;
}

// --set KEY=VALUE: numbers are decimal, lists are JSON arrays or
// comma-separated, "null" clears an optional key, anything else is text.
bool override_value(const schema& keys, void* cfg, const std::string& key, const std::string& text,
                    std::string& error) {
  const key_spec* k = find_key(keys, key);
  if (!k) {
    error = "--set: unknown key \"" + key + "\"";
    return false;
  }
  value_in v;
  dom::parser parser;
  if (text == "null") {
    v.what = value_in::null;
  } else if (k->type == kind::number) {
    auto [ptr, ec] = std::from_chars(text.data(), text.data() + text.size(), v.number);
    v.what = (ec == std::errc() && ptr == text.data() + text.size()) ? value_in::num : value_in::other;
  } else if (k->type == kind::string_list) {
    dom::element e;
    if (!text.empty() && text.front() == '[') {
      padded_string p(text);
      if (parser.parse(p).get(e) == SUCCESS && e.is_array()) v = from_element(e);
    } else {
      v.what = value_in::list;
      std::string_view rest = text;
      while (true) {
        auto comma = rest.find(',');
        std::string item(rest.substr(0, comma));
        if (item.empty()) v.bad_item = true;
        v.items.push_back(item);
        if (comma == std::string_view::npos) break;
        rest.remove_prefix(comma + 1);
      }
    }
  } else {
    v.what = value_in::str;
    v.text = text;
  }
  std::string why;
  if (!assign(*k, v, cfg, "", why)) {
    error = "--set " + key + ": " + why;
    return false;
  }
  return true;
}

void append_value(std::string& out, const key_spec& k, void* cfg) {
  void* f = k.field(cfg);
  switch (k.type) {
    case kind::string:
    case kind::path:
    case kind::choice: json::append_string(out, *static_cast<std::string*>(f)); break;
    case kind::optional_string:
    case kind::optional_path: {
      auto* o = static_cast<std::optional<std::string>*>(f);
      if (*o) json::append_string(out, **o);
      else out += "null";
      break;
    }
    case kind::number: json::append_uint(out, *static_cast<uint64_t*>(f)); break;
    case kind::string_list: {
      out += '[';
      bool first = true;
      for (const auto& s : *static_cast<std::vector<std::string>*>(f)) {
        if (!first) out += ", ";
        first = false;
        json::append_string(out, s);
      }
      out += ']';
      break;
    }
  }
}

}  // namespace

bool readable_file(std::string_view key, const std::string& path, std::string& error) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    error = std::string(key) + " " + path + ": " + std::strerror(errno);
    return false;
  }
  struct stat st{};
  bool dir = ::fstat(fd, &st) == 0 && S_ISDIR(st.st_mode);
  ::close(fd);
  if (dir) {
    error = std::string(key) + " " + path + ": is a directory, not a file";
    return false;
  }
  return true;
}

bool read_file(const std::string& path, std::string& out, std::string& error) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    error = path + ": cannot open: " + std::strerror(errno);
    return false;
  }
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) {
    error = path + ": read failed";
    return false;
  }
  out = std::move(ss).str();
  return true;
}

bool exposed_secret(std::string_view key, const std::string& path, std::string& warning) {
  struct stat st{};
  // Group read is how a Kubernetes pod's fsGroup reaches a Secret (0440);
  // anyone-may-read, or a group that may write, is exposure.
  if (::stat(path.c_str(), &st) != 0 || (st.st_mode & (S_IRWXO | S_IWGRP)) == 0) return false;
  char mode[8];
  std::snprintf(mode, sizeof mode, "%04o", static_cast<unsigned>(st.st_mode & 07777));
  warning = std::string(key) + " " + path + " is mode " + mode +
            ": readable by any user, or writable by its group (chmod 600, or defaultMode 0440 with fsGroup on a Secret volume)";
  return true;
}

bool add_set_override(const std::string& arg, override_list& out, std::string& error) {
  auto eq = arg.find('=');
  if (eq == std::string::npos || eq == 0) {
    error = "--set wants KEY=VALUE, got \"" + arg + "\"";
    return false;
  }
  out.emplace_back(arg.substr(0, eq), arg.substr(eq + 1));
  return true;
}

bool load(const schema& keys, const std::optional<std::string>& file, const override_list& overrides, void* cfg,
          std::string& error) {
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
    if (!walk(keys, obj, "", cfg, base_dir, *file, error)) return false;
  }
  for (const auto& [key, value] : overrides)
    if (!override_value(keys, cfg, key, value, error)) return false;
  return true;
}

std::string to_json(const schema& keys, void* cfg) {
  // Keys are nested by their dotted names, in table order (a table keeps
  // the keys of one section together).
  std::string out = "{";
  std::vector<std::string> open;  // the sections we are inside
  bool first = true;              // no member yet at this level
  auto indent = [&](size_t depth) { out += "\n" + std::string(2 * (depth + 1), ' '); };
  for (const auto& k : keys) {
    std::vector<std::string> path;
    for (size_t at = 0;;) {
      size_t dot = k.name.find('.', at);
      path.emplace_back(k.name.substr(at, dot == std::string_view::npos ? std::string_view::npos : dot - at));
      if (dot == std::string_view::npos) break;
      at = dot + 1;
    }
    size_t common = 0;
    while (common < open.size() && common + 1 < path.size() && open[common] == path[common]) ++common;
    while (open.size() > common) {
      open.pop_back();
      indent(open.size());
      out += '}';
      first = false;
    }
    for (; open.size() + 1 < path.size(); first = true) {
      if (!first) out += ',';
      indent(open.size());
      json::append_key(out, path[open.size()]);
      out += " {";
      open.push_back(path[open.size()]);
    }
    if (!first) out += ',';
    indent(open.size());
    json::append_key(out, path.back());
    out += ' ';
    append_value(out, k, cfg);
    first = false;
  }
  while (!open.empty()) {
    open.pop_back();
    indent(open.size());
    out += '}';
  }
  out += "\n}\n";
  return out;
}

}  // namespace relay::config
