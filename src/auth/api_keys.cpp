#include "relay/api_keys.h"

#include <simdjson.h>

#include <ctime>

#include "relay/config.h"
#include "relay/tls.h"

namespace relay::auth {
namespace {

using namespace simdjson;

int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

bool parse_digest(std::string_view hex, std::array<uint8_t, 32>& out) {
  if (hex.size() != 64) return false;
  for (size_t i = 0; i < 32; ++i) {
    int hi = hex_value(hex[2 * i]), lo = hex_value(hex[2 * i + 1]);
    if (hi < 0 || lo < 0) return false;
    out[i] = static_cast<uint8_t>(hi << 4 | lo);
  }
  return true;
}

// Audit lines and error messages quote principals; a control byte in one
// could pass for a different name there.
bool printable(std::string_view s) {
  for (unsigned char c : s)
    if (c < 0x20 || c == 0x7f) return false;
  return true;
}

bool valid_id(std::string_view id) {
  if (id.empty() || id.size() > 64) return false;
  for (char c : id) {
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' || c == '_' ||
              c == ':' || c == '@' || c == '-';
    if (!ok) return false;
  }
  return true;
}

// RFC 6750 b64token: ALPHA DIGIT - . _ ~ + / then any '='.
bool b64token(std::string_view t) {
  size_t i = 0;
  for (; i < t.size(); ++i) {
    char c = t[i];
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' || c == '.' ||
              c == '_' || c == '~' || c == '+' || c == '/';
    if (!ok) break;
  }
  if (i == 0) return false;
  for (; i < t.size(); ++i)
    if (t[i] != '=') return false;
  return true;
}

uint64_t digest_prefix(const uint8_t* d) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v = v << 8 | d[i];
  return v;
}

bool digits(std::string_view s, size_t at, size_t n, int& out) {
  out = 0;
  for (size_t i = at; i < at + n; ++i) {
    if (i >= s.size() || s[i] < '0' || s[i] > '9') return false;
    out = out * 10 + (s[i] - '0');
  }
  return true;
}

}  // namespace

std::string_view to_string(key_failure f) {
  switch (f) {
    case key_failure::none: return "none";
    case key_failure::missing: return "missing";
    case key_failure::malformed: return "malformed";
    case key_failure::unknown: return "unknown";
    case key_failure::expired: return "expired";
  }
  return "?";
}

bool parse_utc_timestamp(std::string_view s, int64_t& ms) {
  // YYYY-MM-DDTHH:MM:SS[.fraction]Z
  int year, month, day, hour, minute, second;
  if (s.size() < 20 || !digits(s, 0, 4, year) || s[4] != '-' || !digits(s, 5, 2, month) || s[7] != '-' ||
      !digits(s, 8, 2, day) || (s[10] != 'T' && s[10] != 't') || !digits(s, 11, 2, hour) || s[13] != ':' ||
      !digits(s, 14, 2, minute) || s[16] != ':' || !digits(s, 17, 2, second))
    return false;
  size_t at = 19;
  int64_t fraction_ms = 0;
  if (s[at] == '.') {
    size_t first = ++at;
    int64_t scale = 100;
    while (at < s.size() && s[at] >= '0' && s[at] <= '9') {
      fraction_ms += (s[at] - '0') * scale;
      scale /= 10;
      ++at;
    }
    if (at == first || at - first > 9) return false;
  }
  if (at + 1 != s.size() || (s[at] != 'Z' && s[at] != 'z')) return false;
  static constexpr int month_days[] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
  bool leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
  if (month < 1 || month > 12) return false;
  int last_day = month_days[month - 1] + (month == 2 && leap ? 1 : 0);
  // A leap second (:60) is taken as the first instant of the next minute.
  if (day < 1 || day > last_day || hour > 23 || minute > 59 || second > 60) return false;
  std::tm tm{};
  tm.tm_year = year - 1900;
  tm.tm_mon = month - 1;
  tm.tm_mday = day;
  tm.tm_hour = hour;
  tm.tm_min = minute;
  tm.tm_sec = second;
  time_t t = timegm(&tm);
  ms = static_cast<int64_t>(t) * 1000 + fraction_ms;
  return true;
}

bool bearer_token(std::string_view value, std::string_view& token) {
  // The scheme is case-insensitive (RFC 9110 11.1); then one or more spaces.
  constexpr std::string_view scheme = "bearer";
  if (value.size() <= scheme.size() || value[scheme.size()] != ' ') return false;
  for (size_t i = 0; i < scheme.size(); ++i) {
    char c = value[i];
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
    if (c != scheme[i]) return false;
  }
  std::string_view rest = value.substr(scheme.size());
  while (!rest.empty() && rest.front() == ' ') rest.remove_prefix(1);
  while (!rest.empty() && (rest.back() == ' ' || rest.back() == '\t')) rest.remove_suffix(1);
  if (rest.size() > api_keys::max_token_bytes || !b64token(rest)) return false;
  token = rest;
  return true;
}

std::shared_ptr<const api_keys> api_keys::load(const std::string& path, std::string& error) {
  std::string text;
  if (!config::read_file(path, text, error)) return nullptr;
  return parse(text, path, error);
}

std::shared_ptr<const api_keys> api_keys::parse(std::string_view json, const std::string& origin, std::string& error) {
  auto fail = [&](const std::string& msg) -> std::shared_ptr<const api_keys> {
    error = origin + ": " + msg;
    return nullptr;
  };
  dom::parser parser;
  dom::element root;
  padded_string padded(json);
  if (auto e = parser.parse(padded).get(root)) return fail(std::string("not valid JSON: ") + error_message(e));
  dom::object top;
  if (root.get_object().get(top)) return fail("the API keys file must be a JSON object {\"keys\": [...]}");
  dom::array list;
  bool have_keys = false;
  for (auto [key, value] : top) {
    if (key != "keys") return fail("unknown key \"" + std::string(key) + "\" (want \"keys\")");
    if (value.get_array().get(list)) return fail("\"keys\" must be an array");
    have_keys = true;
  }
  if (!have_keys) return fail("\"keys\" is required");

  auto out = std::make_shared<api_keys>();
  // Digest → index, id → index: duplicates are named with both indexes.
  std::unordered_map<std::string, size_t> by_digest, by_id;
  size_t index = 0;
  for (dom::element e : list) {
    std::string where = "keys[" + std::to_string(index) + "]";
    if (index >= max_keys) return fail("more than " + std::to_string(max_keys) + " keys");
    dom::object obj;
    if (e.get_object().get(obj)) return fail(where + " must be an object");
    api_key k;
    bool have_principal = false, have_digest = false, have_id = false;
    for (auto [field, value] : obj) {
      std::string_view s;
      if (field == "principal") {
        if (value.get_string().get(s) || s.empty() || s.size() > 256 || !printable(s))
          return fail(where + ".principal must be a policy principal name (1-256 printable characters)");
        k.principal = std::string(s);
        have_principal = true;
      } else if (field == "sha256") {
        if (value.get_string().get(s) || !parse_digest(s, k.sha256))
          return fail(where + ".sha256 must be 64 hex digits (the SHA-256 of the key)");
        have_digest = true;
      } else if (field == "id") {
        if (value.get_string().get(s) || !valid_id(s))
          return fail(where + ".id must be 1-64 characters of A-Z a-z 0-9 . _ : @ -");
        k.id = std::string(s);
        have_id = true;
      } else if (field == "not_after") {
        int64_t ms = 0;
        if (value.get_string().get(s) || !parse_utc_timestamp(s, ms))
          return fail(where + ".not_after must be an RFC 3339 UTC time such as \"2027-01-31T00:00:00Z\"");
        k.not_after_ms = ms;
      } else {
        return fail(where + ": unknown key \"" + std::string(field) +
                    "\" (want principal, sha256, id, not_after; never the key itself)");
      }
    }
    if (!have_principal) return fail(where + ".principal is required");
    if (!have_digest) return fail(where + ".sha256 is required");
    std::string digest = tls::to_hex(k.sha256.data(), k.sha256.size());
    if (auto [it, inserted] = by_digest.emplace(digest, index); !inserted)
      return fail(where + ".sha256 is the same key as keys[" + std::to_string(it->second) + "]");
    if (!have_id) k.id = "sha256:" + digest.substr(0, 12);
    if (auto [it, inserted] = by_id.emplace(k.id, index); !inserted)
      return fail(where + ".id \"" + k.id + "\" is already used by keys[" + std::to_string(it->second) + "]");
    k.owner = std::string(key_owner_prefix) + k.principal;
    out->_index.emplace(digest_prefix(k.sha256.data()), static_cast<uint32_t>(out->_keys.size()));
    out->_keys.push_back(std::move(k));
    ++index;
  }
  uint8_t file_digest[32];
  tls::sha256(json, file_digest);
  out->_file_sha256 = tls::to_hex(file_digest, sizeof file_digest);
  return out;
}

key_check api_keys::check(std::string_view authorization, int64_t now_ms) const {
  key_check r;
  if (authorization.empty()) {
    r.failure = key_failure::missing;
    return r;
  }
  std::string_view token;
  if (!bearer_token(authorization, token)) {
    r.failure = key_failure::malformed;
    return r;
  }
  std::array<uint8_t, 32> digest;
  tls::sha256(token, digest.data());
  const api_key* match = find(digest);
  if (!match) {
    r.failure = key_failure::unknown;
    r.digest_prefix = tls::to_hex(digest.data(), 4);
    return r;
  }
  r.key = match;
  // not_after is the last instant the key is good (as in X.509).
  if (match->not_after_ms && now_ms > *match->not_after_ms) r.failure = key_failure::expired;
  return r;
}

const api_key* api_keys::find(const std::array<uint8_t, 32>& digest) const {
  // The whole digest decides, compared in constant time; the index only
  // narrows the candidates (see the header on what its timing can tell).
  const api_key* match = nullptr;
  auto [first, last] = _index.equal_range(digest_prefix(digest.data()));
  for (auto it = first; it != last; ++it) {
    const api_key& k = _keys[it->second];
    if (tls::equal_constant_time(digest.data(), k.sha256.data(), digest.size())) match = &k;
  }
  return match;
}

size_t api_keys::expired_at(int64_t now_ms) const {
  size_t n = 0;
  for (const api_key& k : _keys)
    if (k.not_after_ms && now_ms > *k.not_after_ms) ++n;
  return n;
}

// ---- Failures per source ----

failure_limiter::failure_limiter(uint32_t max_failures, uint64_t window_ms, size_t max_sources)
    : _max_failures(max_failures), _window_ms(window_ms), _max_sources(max_sources) {}

uint64_t failure_limiter::blocked_for(const std::string& source, uint64_t now_ms) {
  if (_max_failures == 0) return 0;
  auto it = _by_source.find(source);
  if (it == _by_source.end()) return 0;
  entry& e = it->second;
  uint64_t ends = e.window_start + _window_ms;
  if (now_ms >= ends) {
    // The window is over: the source starts afresh.
    _order.erase(e.order);
    _by_source.erase(it);
    return 0;
  }
  return e.failures >= _max_failures ? ends - now_ms : 0;
}

void failure_limiter::failed(const std::string& source, uint64_t now_ms) {
  if (_max_failures == 0) return;
  auto it = _by_source.find(source);
  if (it != _by_source.end() && now_ms >= it->second.window_start + _window_ms) {
    _order.erase(it->second.order);
    _by_source.erase(it);
    it = _by_source.end();
  }
  if (it == _by_source.end()) {
    // Make room first: the least recently failing source goes. Sources whose
    // window is over are among the oldest, so they go before live ones.
    while (_by_source.size() >= _max_sources && !_order.empty()) {
      _by_source.erase(_order.front());
      _order.pop_front();
    }
    _order.push_back(source);
    it = _by_source.emplace(source, entry{now_ms, 0, std::prev(_order.end())}).first;
  } else {
    _order.splice(_order.end(), _order, it->second.order);
  }
  ++it->second.failures;
}

}  // namespace relay::auth
