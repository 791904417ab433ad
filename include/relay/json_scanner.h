// A streaming JSON validator that cuts large values out of a request body as
// it arrives (issue 13: bodies above limits.spill_threshold_bytes are not
// held in RAM).
//
// Fed a body in chunks of any size, it accepts exactly the documents that
// simdjson::dom::parser accepts (UTF-8 validated with a carry across chunks,
// unescaped control characters, escapes and surrogate pairs, number grammar
// and range, literals, depth <= 1024, trailing garbage) -- with one
// deliberate exception: a single number longer than max_number_bytes is
// refused (simdjson would take a 64 KiB run of digits; no producer sends
// one, and holding it would unbound the memory of an upload).
//
// The `"payload"` and `"result"` members (raw key bytes exactly `payload` or
// `result`, no escapes) of the top-level object, or of each object that is
// an element of a top-level array, are cut when their raw length is at
// least `threshold`: their bytes go to the sink as they arrive, and the
// skeleton (everything else, byte for byte) gets `null` in their place.
// Memory: the skeleton (bounded by max_skeleton_bytes), the depth stack,
// one value below the threshold while it is still unknown whether it will be
// cut, and a number's digits.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace relay::http {

class json_scanner {
 public:
  static constexpr size_t max_depth = 1024;  // simdjson's DEFAULT_MAX_DEPTH
  static constexpr size_t max_number_bytes = 64 * 1024;

  // Receives the bytes of cut values. A cut value's bytes arrive between
  // on_cut_begin() and on_cut_end(), in order, possibly in many pieces.
  class sink {
   public:
    virtual ~sink() = default;
    virtual void on_cut_begin(uint32_t item, std::string_view key) = 0;
    virtual void on_cut_bytes(const char* data, size_t len) = 0;
    // `skeleton_offset`: where the `null` that stands for the value starts
    // in the skeleton; `length`: the value's raw bytes.
    virtual void on_cut_end(size_t skeleton_offset, uint64_t length) = 0;
  };

  enum class status : uint8_t {
    ok,
    invalid,         // not JSON simdjson would accept: error() and error_offset() say where
    skeleton_large,  // the skeleton passed max_skeleton_bytes
  };

  // threshold 0: nothing is cut (validation only, the skeleton is the body).
  json_scanner(sink& out, uint64_t threshold, size_t max_skeleton_bytes);
  json_scanner(const json_scanner&) = delete;
  json_scanner& operator=(const json_scanner&) = delete;

  // Feeds the next bytes of the body. Once a call returns something other
  // than ok, the scanner stays failed.
  status feed(const char* data, size_t len);
  // The body ended: checks that it was one whole document.
  status finish();

  // The body with each cut value replaced by `null`; complete after
  // finish() returned ok.
  std::string& skeleton() { return _skeleton; }
  // Bytes held in RAM (skeleton, the undecided value, a number's digits):
  // what the connection counts against the body budget.
  size_t held_bytes() const { return _skeleton.capacity() + _pending.capacity() + _number.capacity(); }
  uint64_t consumed() const { return _offset; }
  const std::string& error() const { return _error; }
  uint64_t error_offset() const { return _error_offset; }

 private:
  enum class st : uint8_t {
    value,        // a value is expected (after ':' or ',' in an array, or at the start)
    array_first,  // after '[': a value or ']'
    object_first, // after '{': a key or '}'
    object_key,   // after ',' in an object: a key
    colon,        // after a key
    after_value,  // ',' or a closing bracket (or the end, at the top)
    string,       // inside a string (a key when _in_key)
    escape,       // after a backslash
    unicode,      // inside \uXXXX (_hex_left digits to go)
    low_backslash,// after a high surrogate: its '\' (then 'u', via escape) must follow
    number,
    literal,
    done_error,
  };

  status fail(uint64_t at, std::string why);
  status fail_depth(uint64_t at);
  status fail_large();
  bool utf8_feed(const char* data, size_t len);
  // Routing of bytes: everything goes to the skeleton except a candidate
  // value's, which go to _pending (undecided) or the sink (cut).
  void flush_span(const char* from, const char* to);
  void begin_value(const char* at);
  void end_value(const char* end);  // `end` is one past the value's last byte
  bool close_container(const char* p);
  bool number_end(const char* p);
  bool check_number();
  bool skeleton_over() const { return _skeleton.size() > _max_skeleton; }

  sink& _out;
  uint64_t _threshold;
  size_t _max_skeleton;
  std::string _skeleton;
  std::vector<uint8_t> _stack;  // 1: object, 0: array
  st _state = st::value;
  bool _in_key = false;
  bool _after_colon = false;    // the value expected is an object member's
  status _failed = status::ok;  // what feed() answers once failed
  bool _seen_value = false;     // the top-level value has started
  uint64_t _offset = 0;         // bytes fed before the current chunk
  // Key tracking: the raw bytes of the current key, up to 8.
  char _key[8] = {};
  uint8_t _key_len = 0;
  bool _key_long = false;
  std::string_view _member;     // "payload"/"result" when the key at a cut depth is one
  uint32_t _item = 0;           // top-level array index of the current element
  // \u escapes.
  uint8_t _hex_left = 0;
  uint32_t _code = 0;
  bool _want_low = false;       // the \u just read must be a low surrogate
  // Literals.
  std::string_view _literal;
  uint8_t _literal_pos = 0;
  // Numbers: their text, checked by simdjson when not plainly in range.
  std::string _number;
  // The candidate value (a payload/result being received).
  bool _cand = false;
  bool _cut = false;            // committed: its bytes go to the sink
  size_t _cand_depth = 0;       // stack depth at which it started
  std::string_view _cand_key;   // its member name (keys inside it change _member)
  uint64_t _cand_length = 0;    // bytes of it sent to the sink
  std::string _pending;         // bytes of it while undecided
  const char* _span = nullptr;  // start of the bytes not yet routed in this chunk
  // UTF-8 carried across chunks: an incomplete sequence.
  char _carry[4] = {};
  uint8_t _carry_len = 0;
  uint8_t _carry_need = 0;
  std::string _error;
  uint64_t _error_offset = 0;
};

}  // namespace relay::http
