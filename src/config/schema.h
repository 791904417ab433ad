// The engine behind relay's and bunny's configuration: a table of dotted
// keys, each with a type and an accessor into the config struct. Reading a
// file, applying --set overrides, naming unknown keys and printing the
// effective configuration are all driven by the table.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "relay/config.h"

namespace relay::config {

enum class kind {
  string,           // std::string, non-empty
  optional_string,  // std::optional<std::string>; null clears
  path,             // std::string; relative to the config file's directory
  optional_path,    // std::optional<std::string>
  choice,           // std::string, one of `choices`
  number,           // uint64_t in [min, max]
  string_list,      // std::vector<std::string>, non-empty strings
};

struct key_spec {
  std::string_view name;  // dotted: "limits.max_body_bytes"
  kind type;
  std::function<void*(void*)> field;  // config struct → member
  std::vector<std::string_view> choices = {};
  uint64_t min = 0, max = 0;
  std::string_view unsupported = {};  // for a choice value that is known but not built yet
};

using schema = std::vector<key_spec>;

// Reads `file` into `cfg` (defaults already in place), then applies
// `overrides`. Errors name the file or flag and the key.
bool load(const schema& keys, const std::optional<std::string>& file, const override_list& overrides, void* cfg,
          std::string& error);

// The configuration as indented JSON, in schema order.
std::string to_json(const schema& keys, void* cfg);

// An accessor for `member` of Config: [](void* c) { return &static_cast<Config*>(c)->...; }
template <class Config, class Fn>
std::function<void*(void*)> field(Fn fn) {
  return [fn](void* c) -> void* { return fn(*static_cast<Config*>(c)); };
}

}  // namespace relay::config
