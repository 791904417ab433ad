// relay::http::json_scanner, the streaming validator and cutter of spooled
// request bodies (issue 13).
//
// Input: [threshold byte] [split bytes, see fuzz::split] [body]. The body is
// fed in the pieces the input chooses, with a cut threshold of 0 (off) to
// 255 bytes.
//
// Invariants: the scanner accepts exactly what simdjson::dom::parser
// accepts; when it accepts, the skeleton with each `null` placeholder
// replaced by its cut value is the body, byte for byte, every cut value is
// at least the threshold long and is itself one JSON value, the sink saw
// begin/bytes/end in order, and with the threshold off nothing is cut.
#include <simdjson.h>

#include "../support/scanner_check.h"
#include "fuzz_input.h"

using namespace relay;
using status = http::json_scanner::status;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static simdjson::dom::parser parser;
  fuzz::input in(data, size);
  uint64_t threshold = in.byte();
  std::vector<std::string_view> pieces = fuzz::split(in);
  std::string body(in.rest());

  simdjson::padded_string copy(body);
  simdjson::dom::element e;
  bool want = !parser.parse(copy).get(e);

  test::scan_result r = test::scan(pieces, threshold);
  FUZZ_CHECK(r.status != status::skeleton_large);  // 8 MiB: more than any input
  FUZZ_CHECK((r.status == status::ok) == want);
  if (r.status != status::ok) {
    FUZZ_CHECK(!r.error.empty());
    return 0;
  }
  FUZZ_CHECK(r.sink_ok);
  FUZZ_CHECK(r.reassemble() == body);
  if (threshold == 0) FUZZ_CHECK(r.cuts.empty());
  for (const auto& c : r.cuts) {
    FUZZ_CHECK(c.bytes.size() >= threshold);
    FUZZ_CHECK(c.key == "payload" || c.key == "result");
    FUZZ_CHECK(r.skeleton.compare(c.skeleton_offset, 4, "null") == 0);
    simdjson::padded_string v(c.bytes);
    FUZZ_CHECK(!parser.parse(v).get(e));
  }
  return 0;
}
