// Issue 13, attack review: the streaming scanner must accept exactly what
// simdjson's DOM parser accepts. simdjson counts only containers that hold
// something toward its depth limit of 1024 (an empty `[]` or `{}` is not
// entered): 1024 nested arrays are accepted when the innermost is empty,
// refused when it holds a value. The scanner counted every open bracket,
// allowing 1024, so it accepted 1024 levels with a value inside. Cut out
// as a large payload, such a value left a skeleton (`{"payload":null}`)
// that the decoder accepts: relay stored and acknowledged a payload that
// its own parser -- and every worker's -- refuses, a job no lease answer
// can carry to a worker that parses it.
#include <doctest/doctest.h>
#include <simdjson.h>

#include <string>

#include "../support/scanner_check.h"

using relay::test::scan;
using status = relay::http::json_scanner::status;

namespace {

bool simdjson_accepts(const std::string& s) {
  simdjson::dom::parser p;
  simdjson::padded_string copy(s);
  simdjson::dom::element e;
  return !p.parse(copy).get(e);
}

std::string arrays(size_t n, const std::string& inner) { return std::string(n, '[') + inner + std::string(n, ']'); }

std::string objects(size_t n, const std::string& inner) {
  std::string s;
  for (size_t i = 0; i < n; ++i) s += "{\"a\":";
  s.pop_back();
  s.pop_back();
  s.pop_back();
  s.pop_back();
  s.pop_back();  // the innermost level is `inner` itself
  s += inner;
  s += std::string(n - 1, '}');
  return s;
}

}  // namespace

TEST_CASE("issue 13: the scanner's depth limit is simdjson's (only non-empty containers count)") {
  for (size_t n : {1022u, 1023u, 1024u, 1025u}) {
    for (const std::string& inner : {std::string(), std::string("1"), std::string("[]"), std::string("{}")}) {
      std::string a = arrays(n, inner);
      bool want = simdjson_accepts(a);
      CHECK_MESSAGE((scan({a}, 0).status == status::ok) == want, n << " arrays around '" << inner << "'");
      // In pieces too: the state carries across chunks.
      CHECK_MESSAGE((scan({std::string_view(a).substr(0, n), std::string_view(a).substr(n)}, 0).status == status::ok) ==
                        want,
                    n << " arrays around '" << inner << "', split");
    }
    for (const std::string& inner : {std::string("{}"), std::string("{\"b\":1}"), std::string("[]"), std::string("[2]")}) {
      std::string o = objects(n, inner);
      CHECK_MESSAGE((scan({o}, 0).status == status::ok) == simdjson_accepts(o), n << " objects around '" << inner << "'");
    }
  }
}

TEST_CASE("issue 13: a payload too deep for simdjson is refused, not cut and stored") {
  // 1 (the body's object) + 1023 arrays, the innermost holding a value:
  // simdjson refuses the body; its skeleton alone it would accept.
  std::string body = "{\"payload\":" + arrays(1023, "1") + "}";
  REQUIRE_FALSE(simdjson_accepts(body));
  auto r = scan({body}, 64);
  CHECK_EQ(r.status, status::invalid);
}
