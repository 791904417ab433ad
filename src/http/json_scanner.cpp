#include "relay/json_scanner.h"

#include <simdjson.h>

#include <cstring>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace relay::http {
namespace {

constexpr uint8_t k_object = 1;
constexpr uint8_t k_array = 0;

bool is_ws(unsigned char c) { return c == ' ' || c == '\n' || c == '\r' || c == '\t'; }
bool is_digit(unsigned char c) { return c >= '0' && c <= '9'; }
bool is_number_char(unsigned char c) {
  return is_digit(c) || c == '-' || c == '+' || c == '.' || c == 'e' || c == 'E';
}
int hex_value(unsigned char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// The first '"', '\\' or control character (< 0x20) in [p, end), or end.
// This is where nearly all the bytes of a large string payload go, so it
// looks at 32 bytes per step (SSE2 is in every x86-64); bytes >= 0x80 are
// left to the UTF-8 validator, which sees the whole chunk at once.
const char* scan_string(const char* p, const char* end) {
#if defined(__SSE2__)
  const __m128i quote = _mm_set1_epi8('"');
  const __m128i backslash = _mm_set1_epi8('\\');
  const __m128i ctl = _mm_set1_epi8(0x1f);
  auto special = [&](__m128i x) {
    __m128i m = _mm_or_si128(_mm_cmpeq_epi8(x, quote), _mm_cmpeq_epi8(x, backslash));
    // x <= 0x1f (unsigned) exactly when max(x, 0x1f) == 0x1f.
    return _mm_or_si128(m, _mm_cmpeq_epi8(_mm_max_epu8(x, ctl), ctl));
  };
  while (end - p >= 32) {
    __m128i a = special(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    __m128i b = special(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16)));
    unsigned mask = static_cast<unsigned>(_mm_movemask_epi8(a)) |
                    (static_cast<unsigned>(_mm_movemask_epi8(b)) << 16);
    if (mask != 0) return p + __builtin_ctz(mask);
    p += 32;
  }
#endif
  while (p < end) {
    auto c = static_cast<unsigned char>(*p);
    if (c == '"' || c == '\\' || c < 0x20) return p;
    ++p;
  }
  return end;
}

// How many bytes the UTF-8 sequence led by `c` has (1 for ASCII and for
// bytes that cannot lead: the validator rejects those).
uint8_t utf8_length(unsigned char c) {
  if (c >= 0xf0) return 4;
  if (c >= 0xe0) return 3;
  if (c >= 0xc0) return 2;
  return 1;
}

simdjson::dom::parser& number_parser() {
  thread_local simdjson::dom::parser p;
  return p;
}

}  // namespace

json_scanner::json_scanner(sink& out, uint64_t threshold, size_t max_skeleton_bytes)
    : _out(out), _threshold(threshold), _max_skeleton(max_skeleton_bytes) {}

json_scanner::status json_scanner::fail(uint64_t at, std::string why) {
  _state = st::done_error;
  _failed = status::invalid;
  _error = std::move(why);
  _error_offset = at;
  return status::invalid;
}

// simdjson enters only a container that holds something (an empty `[]` or
// `{}` is one value to it) and refuses to enter one at depth max_depth:
// so a container may open at max_depth but must close there empty. The
// check is made where a container's first member begins; counting every
// open bracket instead accepted a value 1024 levels deep that simdjson
// refuses -- cut out as a payload, one the decoder never sees.
json_scanner::status json_scanner::fail_depth(uint64_t at) {
  return fail(at, "nesting deeper than " + std::to_string(max_depth) + " at byte " + std::to_string(at));
}

json_scanner::status json_scanner::fail_large() {
  _state = st::done_error;
  _failed = status::skeleton_large;
  _error = "the body without its payload/result values is larger than " + std::to_string(_max_skeleton) +
           " bytes (only payload and result may be large)";
  _error_offset = _offset;
  return status::skeleton_large;
}

// UTF-8 over the whole body, chunk by chunk. A chunk is cut before a
// sequence that it does not hold whole; those bytes are carried and checked
// with the bytes that complete them. Validating at sequence boundaries is
// exactly validating the whole: every rule of UTF-8 is local to a sequence.
bool json_scanner::utf8_feed(const char* data, size_t len) {
  if (_carry_len > 0) {
    size_t take = std::min<size_t>(len, _carry_need - _carry_len);
    std::memcpy(_carry + _carry_len, data, take);
    _carry_len = static_cast<uint8_t>(_carry_len + take);
    data += take;
    len -= take;
    if (_carry_len < _carry_need) return true;
    if (!simdjson::validate_utf8(_carry, _carry_len)) return false;
    _carry_len = 0;
  }
  size_t whole = len;
  for (size_t back = 1; back <= 3 && back <= len; ++back) {
    auto c = static_cast<unsigned char>(data[len - back]);
    if ((c & 0xc0) == 0x80) continue;  // a continuation byte: look further back
    uint8_t need = utf8_length(c);
    if (need > back) {
      whole = len - back;
      _carry_need = need;
    }
    break;
  }
  if (whole > 0 && !simdjson::validate_utf8(data, whole)) return false;
  if (whole < len) {
    _carry_len = static_cast<uint8_t>(len - whole);
    std::memcpy(_carry, data + whole, _carry_len);
  }
  return true;
}

void json_scanner::flush_span(const char* from, const char* to) {
  if (from == to) return;
  size_t n = static_cast<size_t>(to - from);
  if (!_cand) {
    _skeleton.append(from, n);
    return;
  }
  if (_cut) {
    _out.on_cut_bytes(from, n);
    _cand_length += n;
    return;
  }
  _pending.append(from, n);
  if (_pending.size() >= _threshold) {
    // Long enough to be cut whatever follows: from here on its bytes stream
    // to the sink, and the buffer that held its start is given back.
    _cut = true;
    _out.on_cut_begin(_item, _cand_key);
    _out.on_cut_bytes(_pending.data(), _pending.size());
    _cand_length = _pending.size();
    std::string().swap(_pending);
  }
}

void json_scanner::begin_value(const char* at) {
  bool top = _stack.empty();
  if (top) _seen_value = true;
  bool after_colon = _after_colon;
  _after_colon = false;
  if (_threshold == 0 || !after_colon || _member.empty()) return;
  // Only members of the top-level object, or of an object that is an
  // element of a top-level array, are cut: what the API decodes as a job's
  // payload or an outcome's result.
  bool cut_depth = (_stack.size() == 1 && _stack[0] == k_object) ||
                   (_stack.size() == 2 && _stack[0] == k_array && _stack[1] == k_object);
  if (!cut_depth) return;
  flush_span(_span, at);
  _span = at;
  _cand = true;
  _cut = false;
  _cand_depth = _stack.size();
  _cand_key = _member;
  _cand_length = 0;
  _pending.clear();
}

void json_scanner::end_value(const char* end) {
  if (!_cand || _stack.size() != _cand_depth) return;
  if (end != nullptr) {
    flush_span(_span, end);
    _span = end;
  }
  if (_cut) {
    _out.on_cut_end(_skeleton.size(), _cand_length);
    _skeleton += "null";
  } else {
    _skeleton += _pending;
    if (_pending.capacity() > 4096) std::string().swap(_pending);
    else _pending.clear();
  }
  _cand = false;
  _cut = false;
}

bool json_scanner::check_number() {
  // The grammar: -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?
  const std::string& s = _number;
  size_t i = 0, n = s.size();
  if (i < n && s[i] == '-') ++i;
  size_t int_start = i;
  if (i < n && s[i] == '0') ++i;
  else if (i < n && s[i] >= '1' && s[i] <= '9')
    while (i < n && is_digit(static_cast<unsigned char>(s[i]))) ++i;
  else return false;
  size_t int_digits = i - int_start;
  bool frac = false, exp = false;
  size_t exp_digits = 0;
  if (i < n && s[i] == '.') {
    frac = true;
    size_t f = ++i;
    while (i < n && is_digit(static_cast<unsigned char>(s[i]))) ++i;
    if (i == f) return false;
  }
  if (i < n && (s[i] == 'e' || s[i] == 'E')) {
    exp = true;
    ++i;
    if (i < n && (s[i] == '+' || s[i] == '-')) ++i;
    size_t e = i;
    while (i < n && is_digit(static_cast<unsigned char>(s[i]))) ++i;
    exp_digits = i - e;
    if (exp_digits == 0) return false;
  }
  if (i != n) return false;
  // Plainly in range: no need to ask. Integers of up to 18 digits fit in
  // 64 bits; a float below 1e200 times at most 1e99 is finite (and
  // underflow to zero is accepted by simdjson).
  if (!frac && !exp) {
    if (int_digits <= 18) return true;
    if (int_digits > 20) return false;
  } else if (!exp) {
    if (int_digits <= 300) return true;
  } else if (exp_digits <= 2 && int_digits <= 200) {
    return true;
  }
  // The rest (near the limits of 64-bit integers or doubles) is decided by
  // simdjson itself, so that the answer is exactly the DOM parser's.
  simdjson::padded_string copy(s);
  simdjson::dom::element e;
  return !number_parser().parse(copy).get(e);
}

bool json_scanner::close_container(const char* p) {
  _stack.pop_back();
  _state = st::after_value;
  end_value(p + 1);
  return true;
}

// The state machine is direct-threaded: each state's code jumps straight to
// the next state's label instead of going back through one `switch`, so
// that the processor predicts each transition from where it is made (a
// shared dispatch on every token costs ~5 us/KB on dense structured JSON
// through mispredicted indirect jumps). The `switch` is only the entry, to
// resume the state saved at the end of the previous chunk.
#define RELAY_SCAN_GO(S, L) \
  do {                      \
    _state = st::S;         \
    if (p == end) goto out; \
    goto L;                 \
  } while (0)

json_scanner::status json_scanner::feed(const char* data, size_t len) {
  if (_state == st::done_error) return _failed;
  if (!utf8_feed(data, len)) return fail(_offset, "invalid UTF-8 within bytes " + std::to_string(_offset) + "-" +
                                                       std::to_string(_offset + len));
  const char* p = data;
  const char* const end = data + len;
  _span = data;
  auto at = [&](const char* q) { return _offset + static_cast<uint64_t>(q - data); };
  unsigned char c = 0;
  if (p == end) goto out;
  switch (_state) {
    case st::string: goto l_string;
    case st::escape: goto l_escape;
    case st::unicode: goto l_unicode;
    case st::low_backslash: goto l_low_backslash;
    case st::number: goto l_number;
    case st::literal: goto l_literal;
    case st::value:
    case st::array_first: goto l_value;
    case st::object_first:
    case st::object_key: goto l_key;
    case st::colon: goto l_colon;
    case st::after_value: goto l_after_value;
    case st::done_error: return _failed;
  }
  return _failed;  // not reached: every state is listed

l_string: {
  const char* q = scan_string(p, end);
  if (_in_key) {
    size_t n = static_cast<size_t>(q - p);
    if (!_key_long && _key_len + n <= sizeof _key) {
      std::memcpy(_key + _key_len, p, n);
      _key_len = static_cast<uint8_t>(_key_len + n);
    } else {
      _key_long = true;
    }
  }
  p = q;
  if (p == end) goto out;
  c = static_cast<unsigned char>(*p);
  if (c == '"') {
    ++p;
    if (_in_key) {
      _in_key = false;
      std::string_view k(_key, _key_len);
      _member = {};
      if (!_key_long) {
        if (k == "payload") _member = "payload";
        else if (k == "result") _member = "result";
      }
      RELAY_SCAN_GO(colon, l_colon);
    }
    _state = st::after_value;
    end_value(p);
    RELAY_SCAN_GO(after_value, l_after_value);
  }
  if (c == '\\') {
    ++p;
    // An escaped key is never `payload`/`result`: the raw bytes decide.
    if (_in_key) _key_long = true;
    RELAY_SCAN_GO(escape, l_escape);
  }
  return fail(at(p), "unescaped control character in a string at byte " + std::to_string(at(p)));
}

l_escape:
  c = static_cast<unsigned char>(*p);
  ++p;
  if (c == 'u') {
    _hex_left = 4;
    _code = 0;
    RELAY_SCAN_GO(unicode, l_unicode);
  }
  if (_want_low)
    return fail(at(p) - 1, "a high surrogate escape without its low surrogate at byte " + std::to_string(at(p) - 1));
  if (c == '"' || c == '\\' || c == '/' || c == 'b' || c == 'f' || c == 'n' || c == 'r' || c == 't')
    RELAY_SCAN_GO(string, l_string);
  return fail(at(p) - 1, "invalid escape in a string at byte " + std::to_string(at(p) - 1));

l_unicode: {
  int h = hex_value(static_cast<unsigned char>(*p));
  if (h < 0) return fail(at(p), "invalid \\u escape at byte " + std::to_string(at(p)));
  _code = (_code << 4) | static_cast<uint32_t>(h);
  ++p;
  if (--_hex_left > 0) RELAY_SCAN_GO(unicode, l_unicode);
  bool high = _code >= 0xd800 && _code <= 0xdbff;
  bool low = _code >= 0xdc00 && _code <= 0xdfff;
  if (_want_low) {
    if (!low)
      return fail(at(p) - 1, "a high surrogate escape without its low surrogate at byte " + std::to_string(at(p) - 1));
    _want_low = false;
    RELAY_SCAN_GO(string, l_string);
  }
  if (high) {
    _want_low = true;
    RELAY_SCAN_GO(low_backslash, l_low_backslash);
  }
  if (low) return fail(at(p) - 1, "a lone low surrogate escape at byte " + std::to_string(at(p) - 1));
  RELAY_SCAN_GO(string, l_string);
}

l_low_backslash:
  if (*p != '\\')
    return fail(at(p), "a high surrogate escape without its low surrogate at byte " + std::to_string(at(p)));
  ++p;
  RELAY_SCAN_GO(escape, l_escape);

l_number: {
  // Digits run until a delimiter; the run is checked as a whole.
  const char* q = p;
  while (q < end && is_number_char(static_cast<unsigned char>(*q))) ++q;
  if (_number.size() + static_cast<size_t>(q - p) > max_number_bytes)
    return fail(at(p), "a number longer than " + std::to_string(max_number_bytes) + " bytes");
  _number.append(p, q);
  p = q;
  if (p == end) goto out;
  if (!check_number()) return fail(at(p) - _number.size(), "invalid number ending at byte " + std::to_string(at(p)));
  if (_number.capacity() > 256) std::string().swap(_number);
  _state = st::after_value;
  end_value(p);
  goto l_after_value;  // the delimiter is looked at as what follows the value
}

l_literal:
  while (p < end && _literal_pos < _literal.size()) {
    if (static_cast<unsigned char>(*p) != static_cast<unsigned char>(_literal[_literal_pos]))
      return fail(at(p), "invalid literal at byte " + std::to_string(at(p)));
    ++p;
    ++_literal_pos;
  }
  if (_literal_pos < _literal.size()) goto out;
  _state = st::after_value;
  end_value(p);
  RELAY_SCAN_GO(after_value, l_after_value);

l_value:
  while (is_ws(static_cast<unsigned char>(*p)))
    if (++p == end) goto out;
  c = static_cast<unsigned char>(*p);
  if (c == ']' && _state == st::array_first) {
    close_container(p);
    ++p;
    RELAY_SCAN_GO(after_value, l_after_value);
  }
  if (_stack.size() >= max_depth) return fail_depth(at(p));
  if (_seen_value && _stack.empty()) return fail(at(p), "more than one JSON value at byte " + std::to_string(at(p)));
  begin_value(p);
  switch (c) {
    case '{':
    case '[':
      if (_stack.size() >= max_depth) return fail_depth(at(p));
      if (c == '[' && _stack.empty()) _item = 0;
      ++p;
      if (c == '{') {
        _stack.push_back(k_object);
        RELAY_SCAN_GO(object_first, l_key);
      }
      _stack.push_back(k_array);
      RELAY_SCAN_GO(array_first, l_value);
    case '"':
      _in_key = false;
      ++p;
      RELAY_SCAN_GO(string, l_string);
    case 't':
      _literal = "true";
      break;
    case 'f':
      _literal = "false";
      break;
    case 'n':
      _literal = "null";
      break;
    default:
      if (c == '-' || is_digit(c)) {
        _number.clear();
        _state = st::number;
        goto l_number;  // the number state takes this byte
      }
      return fail(at(p), "a value was expected at byte " + std::to_string(at(p)));
  }
  _literal_pos = 1;
  ++p;
  RELAY_SCAN_GO(literal, l_literal);

l_key:
  while (is_ws(static_cast<unsigned char>(*p)))
    if (++p == end) goto out;
  c = static_cast<unsigned char>(*p);
  if (c == '}' && _state == st::object_first) {
    close_container(p);
    ++p;
    RELAY_SCAN_GO(after_value, l_after_value);
  }
  if (_stack.size() >= max_depth) return fail_depth(at(p));
  if (c != '"') return fail(at(p), "an object key was expected at byte " + std::to_string(at(p)));
  _in_key = true;
  _key_len = 0;
  _key_long = false;
  ++p;
  RELAY_SCAN_GO(string, l_string);

l_colon:
  while (is_ws(static_cast<unsigned char>(*p)))
    if (++p == end) goto out;
  if (*p != ':') return fail(at(p), "':' was expected at byte " + std::to_string(at(p)));
  _after_colon = true;
  ++p;
  RELAY_SCAN_GO(value, l_value);

l_after_value:
  while (is_ws(static_cast<unsigned char>(*p)))
    if (++p == end) goto out;
  c = static_cast<unsigned char>(*p);
  if (_stack.empty()) return fail(at(p), "more than one JSON value at byte " + std::to_string(at(p)));
  if (c == ',') {
    ++p;
    if (_stack.back() == k_object) RELAY_SCAN_GO(object_key, l_key);
    if (_stack.size() == 1) ++_item;
    RELAY_SCAN_GO(value, l_value);
  }
  if ((c == '}' && _stack.back() == k_object) || (c == ']' && _stack.back() == k_array)) {
    close_container(p);
    ++p;
    RELAY_SCAN_GO(after_value, l_after_value);
  }
  return fail(at(p), "',' or a closing bracket was expected at byte " + std::to_string(at(p)));

out:
  flush_span(_span, end);
  _span = nullptr;
  _offset += len;
  if (skeleton_over()) return fail_large();
  return status::ok;
}

#undef RELAY_SCAN_GO

json_scanner::status json_scanner::finish() {
  if (_state == st::done_error) return _failed;
  if (_carry_len > 0) return fail(_offset, "invalid UTF-8 at the end of the body");
  if (_state == st::number) {
    if (!check_number()) return fail(_offset - _number.size(), "invalid number ending at byte " + std::to_string(_offset));
    _state = st::after_value;
    end_value(nullptr);
  }
  if (!_seen_value) return fail(_offset, "the body holds no JSON value");
  if (_state != st::after_value || !_stack.empty())
    return fail(_offset, "the JSON document ends early at byte " + std::to_string(_offset));
  if (skeleton_over()) return fail_large();
  return status::ok;
}

}  // namespace relay::http
