#include <simdjson.h>

#include <algorithm>
#include <cmath>
#include <optional>

#include "relay/auth.h"
#include "relay/config.h"

namespace relay::auth {
namespace {

using namespace simdjson;

bool parse_permission(std::string_view s, uint8_t& bits) {
  if (s == "submit") bits |= static_cast<uint8_t>(permission::submit);
  else if (s == "read") bits |= static_cast<uint8_t>(permission::read);
  else if (s == "consume") bits |= static_cast<uint8_t>(permission::consume);
  else if (s == "admin") bits |= static_cast<uint8_t>(permission::admin);
  else return false;
  return true;
}

// A queue list entry: "*" (every queue: prefix ""), "prefix*", or a name.
// False when it is none of them.
bool parse_queue_pattern(std::string_view s, std::string& text, bool& prefix) {
  prefix = !s.empty() && s.back() == '*';
  text = prefix ? s.substr(0, s.size() - 1) : s;
  if (s == "*") return true;
  return valid_queue_name(text);
}

// Bounds of the numbers in "limits" and "queue_limits": far beyond what one
// relay can serve, and small enough that the bucket arithmetic (doubles)
// stays exact to well under one token.
constexpr double max_rate = 1e9;
constexpr uint64_t max_burst = 1'000'000'000;
constexpr uint64_t max_depth_limit = 1'000'000'000'000;

// One "limits" entry's rate and burst pair ("requests_per_s" and "burst",
// or "jobs_per_s" and "jobs_burst"), filled in as the keys are met.
struct rate_field {
  std::optional<double> rate;
  std::optional<uint64_t> burst;
};

}  // namespace

std::string_view to_string(permission p) {
  switch (p) {
    case permission::submit: return "submit";
    case permission::read: return "read";
    case permission::consume: return "consume";
    case permission::admin: return "admin";
  }
  return "?";
}

bool valid_queue_name(std::string_view name) {
  if (name.empty() || name.size() > 128 || name.front() == '.') return false;
  for (char c : name) {
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
              c == '_' || c == '-';
    if (!ok) return false;
  }
  return true;
}

std::shared_ptr<const policy> policy::load(const std::string& path, std::string& error) {
  std::string text;
  if (!config::read_file(path, text, error)) return nullptr;
  return parse(text, path, error);
}

std::shared_ptr<const policy> policy::parse(std::string_view json, const std::string& origin, std::string& error) {
  auto fail = [&](const std::string& msg) -> std::shared_ptr<const policy> {
    error = origin + ": " + msg;
    return nullptr;
  };
  dom::parser parser;
  dom::element root;
  padded_string padded(json);
  if (auto e = parser.parse(padded).get(root)) return fail(std::string("not valid JSON: ") + error_message(e));
  dom::object top;
  if (root.get_object().get(top)) return fail("the policy must be a JSON object");

  auto p = std::shared_ptr<policy>(new policy());
  std::unordered_map<std::string, const std::string*> names;
  dom::object principals;
  dom::array grants, limits, queue_limits;
  bool have_principals = false, have_grants = false, have_limits = false, have_queue_limits = false;
  for (auto [key, value] : top) {
    if (key == "principals") {
      if (value.get_object().get(principals)) return fail("\"principals\" must be an object");
      have_principals = true;
    } else if (key == "grants") {
      if (value.get_array().get(grants)) return fail("\"grants\" must be an array");
      have_grants = true;
    } else if (key == "limits") {
      if (value.get_array().get(limits)) return fail("\"limits\" must be an array");
      have_limits = true;
    } else if (key == "queue_limits") {
      if (value.get_array().get(queue_limits)) return fail("\"queue_limits\" must be an array");
      have_queue_limits = true;
    } else {
      return fail("unknown key \"" + std::string(key) + "\"");
    }
  }
  if (!have_principals) return fail("\"principals\" is required");
  if (!have_grants) return fail("\"grants\" is required");

  for (auto [name, matcher] : principals) {
    std::string where = "principals." + std::string(name);
    dom::object m;
    if (matcher.get_object().get(m)) return fail(where + " must be an object");
    p->_names.push_back(std::make_unique<std::string>(name));
    const std::string* ref = p->_names.back().get();
    names[*ref] = ref;
    size_t keys = 0;
    for (auto [kind, v] : m) {
      std::string_view value;
      if (v.get_string().get(value) || value.empty())
        return fail(where + "." + std::string(kind) + " must be a non-empty string");
      std::unordered_map<std::string, const std::string*>* index;
      if (kind == "uri_san") index = &p->_by_uri;
      else if (kind == "dns_san") index = &p->_by_dns;
      else if (kind == "cn") index = &p->_by_cn;
      else return fail(where + ": unknown key \"" + std::string(kind) + "\" (want uri_san, dns_san or cn)");
      auto [it, inserted] = index->emplace(std::string(value), ref);
      if (!inserted)
        return fail(where + "." + std::string(kind) + " \"" + std::string(value) + "\" is already used by principal \"" +
                    *it->second + "\"");
      ++keys;
    }
    if (keys == 0) return fail(where + " needs one of uri_san, dns_san or cn");
  }

  size_t index = 0;
  for (dom::element g : grants) {
    std::string where = "grants[" + std::to_string(index++) + "]";
    dom::object obj;
    if (g.get_object().get(obj)) return fail(where + " must be an object");
    const std::string* who = nullptr;
    grant gr;
    bool has_allow = false, has_queues = false;
    for (auto [key, value] : obj) {
      if (key == "principal") {
        std::string_view n;
        if (value.get_string().get(n)) return fail(where + ".principal must be a string");
        auto it = names.find(std::string(n));
        if (it == names.end()) return fail(where + ".principal \"" + std::string(n) + "\" is not defined in \"principals\"");
        who = it->second;
      } else if (key == "allow") {
        dom::array a;
        if (value.get_array().get(a)) return fail(where + ".allow must be an array");
        for (dom::element e : a) {
          std::string_view s;
          if (e.get_string().get(s) || !parse_permission(s, gr.permissions))
            return fail(where + ".allow: unknown permission (want submit, read, consume or admin)");
        }
        has_allow = true;
      } else if (key == "queues") {
        dom::array a;
        if (value.get_array().get(a)) return fail(where + ".queues must be an array");
        for (dom::element e : a) {
          std::string_view s;
          if (e.get_string().get(s)) return fail(where + ".queues must hold strings");
          std::string text;
          bool prefix;
          if (!parse_queue_pattern(s, text, prefix))
            return fail(where + ".queues: \"" + std::string(s) + "\" is not a valid " + (prefix ? "pattern" : "queue name"));
          (prefix ? gr.prefixes : gr.exact).push_back(std::move(text));
        }
        has_queues = true;
      } else {
        return fail(where + ": unknown key \"" + std::string(key) + "\"");
      }
    }
    if (!who) return fail(where + ".principal is required");
    if (!has_allow || gr.permissions == 0) return fail(where + ".allow must name at least one permission");
    if (!has_queues || (gr.exact.empty() && gr.prefixes.empty())) return fail(where + ".queues must name at least one queue");
    p->_grants[who].push_back(std::move(gr));
  }

  if (have_limits) {
    // Where each principal's limits were set, to name both entries of a
    // repeat.
    std::unordered_map<std::string, std::string> seen;
    index = 0;
    for (dom::element l : limits) {
      std::string where = "limits[" + std::to_string(index++) + "]";
      dom::object obj;
      if (l.get_object().get(obj)) return fail(where + " must be an object");
      std::optional<std::string> who;
      rate_field requests, jobs;
      for (auto [key, value] : obj) {
        std::string at = where + "." + std::string(key);
        if (key == "principal") {
          std::string_view n;
          if (value.get_string().get(n)) return fail(at + " must be a string");
          if (n != "*" && !names.count(std::string(n)))
            return fail(at + " \"" + std::string(n) + "\" is not defined in \"principals\" (or \"*\" for everyone else)");
          who = n;
        } else if (key == "requests_per_s" || key == "jobs_per_s") {
          double rate;
          if (value.get_double().get(rate) || !std::isfinite(rate) || rate <= 0 || rate > max_rate)
            return fail(at + " must be a number above 0 and at most 1e9");
          (key == "requests_per_s" ? requests : jobs).rate = rate;
        } else if (key == "burst" || key == "jobs_burst") {
          uint64_t burst;
          if (value.get_uint64().get(burst) || burst < 1 || burst > max_burst)
            return fail(at + " must be a whole number from 1 to 1000000000");
          (key == "burst" ? requests : jobs).burst = burst;
        } else {
          return fail(where + ": unknown key \"" + std::string(key) +
                      "\" (want principal, requests_per_s, burst, jobs_per_s or jobs_burst)");
        }
      }
      if (!who) return fail(where + ".principal is required");
      if (requests.burst && !requests.rate) return fail(where + ".burst needs requests_per_s");
      if (jobs.burst && !jobs.rate) return fail(where + ".jobs_burst needs jobs_per_s");
      if (!requests.rate && !jobs.rate) return fail(where + " needs requests_per_s or jobs_per_s");
      auto [it, fresh] = seen.emplace(*who, where);
      if (!fresh) return fail(where + ".principal \"" + *who + "\" already has limits in " + it->second);
      // A burst below one token would refuse everything; the rate rounded
      // up lets a full second's worth through at once.
      auto burst_of = [](const rate_field& f) {
        if (!f.rate) return 0.0;
        return f.burst ? static_cast<double>(*f.burst) : std::max(1.0, std::ceil(*f.rate));
      };
      rate_limits r{requests.rate.value_or(0), burst_of(requests), jobs.rate.value_or(0), burst_of(jobs)};
      if (*who == "*") p->_default_limits = r;
      else p->_limits.emplace(*who, r);
    }
  }

  if (have_queue_limits) {
    std::unordered_map<std::string, std::string> seen;  // pattern as written → where
    index = 0;
    for (dom::element l : queue_limits) {
      std::string where = "queue_limits[" + std::to_string(index++) + "]";
      dom::object obj;
      if (l.get_object().get(obj)) return fail(where + " must be an object");
      std::vector<std::string_view> patterns;
      std::optional<uint64_t> depth;
      bool has_queues = false;
      for (auto [key, value] : obj) {
        if (key == "queues") {
          dom::array a;
          if (value.get_array().get(a)) return fail(where + ".queues must be an array");
          for (dom::element e : a) {
            std::string_view s;
            if (e.get_string().get(s)) return fail(where + ".queues must hold strings");
            patterns.push_back(s);
          }
          has_queues = true;
        } else if (key == "max_depth") {
          uint64_t d;
          if (value.get_uint64().get(d) || d < 1 || d > max_depth_limit)
            return fail(where + ".max_depth must be a whole number from 1 to 1000000000000");
          depth = d;
        } else {
          return fail(where + ": unknown key \"" + std::string(key) + "\" (want queues or max_depth)");
        }
      }
      if (!has_queues || patterns.empty()) return fail(where + ".queues must name at least one queue");
      if (!depth) return fail(where + ".max_depth is required");
      for (std::string_view s : patterns) {
        std::string text;
        bool prefix;
        if (!parse_queue_pattern(s, text, prefix))
          return fail(where + ".queues: \"" + std::string(s) + "\" is not a valid " + (prefix ? "pattern" : "queue name"));
        auto [it, fresh] = seen.emplace(std::string(s), where);
        if (!fresh) return fail(where + ".queues: \"" + std::string(s) + "\" already has a max_depth in " + it->second);
        if (prefix) p->_depth_prefixes.emplace_back(std::move(text), *depth);
        else p->_depth_exact.emplace(std::move(text), *depth);
      }
    }
    // Longest first, so that the first pattern that matches is the most
    // specific one.
    std::sort(p->_depth_prefixes.begin(), p->_depth_prefixes.end(),
              [](const auto& a, const auto& b) { return a.first.size() > b.first.size(); });
  }
  return p;
}

const std::string* policy::match(const tls::identity& id) const {
  // One name, matched only against matchers of its own kind: never a
  // second chance through another field of the certificate.
  const std::unordered_map<std::string, const std::string*>* index = nullptr;
  switch (id.kind()) {
    case tls::identity::kind::uri_san: index = &_by_uri; break;
    case tls::identity::kind::dns_san: index = &_by_dns; break;
    case tls::identity::kind::cn: index = &_by_cn; break;
    case tls::identity::kind::none: return nullptr;
  }
  if (!id.refused.empty()) return nullptr;
  auto it = index->find(id.principal());
  return it == index->end() ? nullptr : it->second;
}

bool policy::allows(const std::string* principal, permission p, std::string_view queue) const {
  if (!principal) return false;
  auto it = _grants.find(principal);
  if (it == _grants.end()) return false;
  auto bit = static_cast<uint8_t>(p);
  for (const grant& g : it->second) {
    if (!(g.permissions & bit)) continue;
    for (const auto& q : g.exact)
      if (q == queue) return true;
    for (const auto& prefix : g.prefixes)
      if (queue.substr(0, prefix.size()) == prefix) return true;
  }
  return false;
}

const rate_limits* policy::limits_for(const std::string& name) const {
  auto it = _limits.find(name);
  if (it != _limits.end()) return &it->second;
  return _default_limits ? &*_default_limits : nullptr;
}

uint64_t policy::max_depth(std::string_view queue) const {
  if (_depth_exact.empty() && _depth_prefixes.empty()) return 0;
  auto it = _depth_exact.find(queue);
  if (it != _depth_exact.end()) return it->second;
  for (const auto& [prefix, depth] : _depth_prefixes)
    if (queue.substr(0, prefix.size()) == prefix) return depth;
  return 0;
}

bool policy::allows_somewhere(const std::string* principal, permission p) const {
  if (!principal) return false;
  auto it = _grants.find(principal);
  if (it == _grants.end()) return false;
  for (const grant& g : it->second)
    if (g.permissions & static_cast<uint8_t>(p)) return true;
  return false;
}

const std::string* policy::principal_named(std::string_view name) const {
  // A handful of principals: a scan costs less than keeping another index
  // in step with the parser.
  for (const auto& n : _names)
    if (*n == name) return n.get();
  return nullptr;
}

}  // namespace relay::auth
