// relay::http::response_parser (the client side: bunny, relayctl) over a
// stream of pipelined responses read in pieces the input chooses, then the
// end of the stream.
//
// Input: [limit byte] [cut count] [u16 cut]... [stream]. The limit byte sets
// the body limit (0-255 bytes) so that it is reachable in a short input.
//
// Invariants: a call never consumes more than it was given; need_more means
// everything was taken; a delivered response is final (never 1xx) and within
// the body limit; and what comes out does not depend on where the stream was
// cut (the same responses, the same keep-alive answers, the same failure).
#include <cstdio>
#include <string>
#include <vector>

#include "fuzz_input.h"
#include "relay/http.h"

using namespace relay::http;

namespace {

struct outcome {
  std::vector<std::string> responses;  // one digest per complete response
  bool failed = false;
  size_t consumed = 0;
};

void take(response_parser& p, size_t limit, outcome& o) {
  const response& r = p.current();
  if (r.status < 200 || r.status > 999) std::fprintf(stderr, "delivered a response with status %d\n", r.status);
  FUZZ_CHECK(r.status >= 200 && r.status <= 999);
  FUZZ_CHECK(r.body.size() <= limit);
  FUZZ_CHECK(r.retry_after.size() <= 8192);
  o.responses.push_back(std::to_string(r.status) + (p.keep_alive() ? "k|" : "c|") + r.retry_after + "|" + r.body);
  p.next();
}

outcome run(size_t limit, const std::vector<std::string_view>& pieces) {
  response_parser p(limit);
  outcome o;
  for (std::string_view piece : pieces) {
    size_t off = 0;
    size_t budget = 2 * piece.size() + 8;
    while (!o.failed) {
      FUZZ_CHECK(budget-- > 0);
      response_parser::result r = p.execute(piece.data() + off, piece.size() - off);
      FUZZ_CHECK(r.consumed <= piece.size() - off);
      off += r.consumed;
      o.consumed += r.consumed;
      if (r.what == response_parser::event::need_more) {
        FUZZ_CHECK(off == piece.size());
        break;
      } else if (r.what == response_parser::event::response_complete) {
        take(p, limit, o);
      } else {
        FUZZ_CHECK(!p.error().empty());
        o.failed = true;
      }
    }
    if (o.failed) break;
  }
  if (!o.failed) {
    response_parser::event e = p.finish();
    if (e == response_parser::event::response_complete) {
      FUZZ_CHECK(!p.keep_alive());
      take(p, limit, o);
    } else if (e == response_parser::event::error) {
      FUZZ_CHECK(!p.error().empty());
      o.failed = true;
    }
    // Nothing parses after the end of the stream.
    FUZZ_CHECK(p.execute("H", 1).what == response_parser::event::error);
  }
  return o;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  relay::fuzz::input in(data, size);
  size_t limit = in.byte();
  std::vector<std::string_view> pieces = relay::fuzz::split(in);
  std::string_view stream = in.rest();

  outcome split = run(limit, pieces);
  outcome whole = run(limit, {stream});
  FUZZ_CHECK(split.responses == whole.responses);
  FUZZ_CHECK(split.failed == whole.failed);
  if (!split.failed) FUZZ_CHECK(split.consumed == stream.size() && whole.consumed == stream.size());
  return 0;
}
