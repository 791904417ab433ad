#include <simdjson.h>

#include <fstream>
#include <sstream>

#include "relay/auth.h"

namespace relay::auth {
namespace {

using namespace simdjson;

bool read_file(const std::string& path, std::string& out, std::string& error) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    error = path + ": cannot open";
    return false;
  }
  std::ostringstream ss;
  ss << in.rdbuf();
  out = ss.str();
  return true;
}

bool parse_permission(std::string_view s, uint8_t& bits) {
  if (s == "submit") bits |= static_cast<uint8_t>(permission::submit);
  else if (s == "read") bits |= static_cast<uint8_t>(permission::read);
  else if (s == "consume") bits |= static_cast<uint8_t>(permission::consume);
  else if (s == "admin") bits |= static_cast<uint8_t>(permission::admin);
  else return false;
  return true;
}

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
  if (!read_file(path, text, error)) return nullptr;
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
  dom::array grants;
  bool have_principals = false, have_grants = false;
  for (auto [key, value] : top) {
    if (key == "principals") {
      if (value.get_object().get(principals)) return fail("\"principals\" must be an object");
      have_principals = true;
    } else if (key == "grants") {
      if (value.get_array().get(grants)) return fail("\"grants\" must be an array");
      have_grants = true;
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
          if (s == "*") {
            gr.prefixes.emplace_back();
          } else if (!s.empty() && s.back() == '*') {
            std::string_view prefix = s.substr(0, s.size() - 1);
            if (!valid_queue_name(prefix)) return fail(where + ".queues: \"" + std::string(s) + "\" is not a valid pattern");
            gr.prefixes.emplace_back(prefix);
          } else {
            if (!valid_queue_name(s)) return fail(where + ".queues: \"" + std::string(s) + "\" is not a valid queue name");
            gr.exact.emplace_back(s);
          }
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
