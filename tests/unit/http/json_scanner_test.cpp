#include <doctest/doctest.h>
#include <simdjson.h>

#include <chrono>
#include <cstdio>
#include <random>
#include <string>

#include "../../support/scanner_check.h"
#include "relay/json_scanner.h"

using namespace relay;
using relay::test::scan;
using status = http::json_scanner::status;

namespace {

bool simdjson_accepts(std::string_view s) {
  static simdjson::dom::parser p;
  simdjson::padded_string copy(s);
  simdjson::dom::element e;
  return !p.parse(copy).get(e);
}

// Every split into 1..3 pieces (at all points for short inputs) gives the
// same verdict, the same as simdjson's.
void check_all_splits(const std::string& s, uint64_t threshold = 4) {
  bool want = simdjson_accepts(s);
  auto whole = scan({s}, threshold);
  CHECK_MESSAGE((whole.status == status::ok) == want, s);
  if (whole.status == status::ok) {
    CHECK_EQ(whole.reassemble(), s);
    CHECK(whole.sink_ok);
  }
  for (size_t i = 0; i <= s.size(); ++i) {
    std::string_view v = s;
    auto r = scan({v.substr(0, i), v.substr(i)}, threshold);
    CHECK_MESSAGE((r.status == status::ok) == want, s << " split at " << i);
    if (r.status == status::ok) {
      CHECK_EQ(r.reassemble(), s);
      CHECK_EQ(r.skeleton, whole.skeleton);
    }
  }
}

}  // namespace

TEST_CASE("json_scanner: acceptance matches simdjson DOM, whatever the chunking") {
  const char* cases[] = {
      "{}", "[]", "1", "-0", "0.5", "1e5", "1E+2", "-1.5e-7", "01", "1.", ".5", "-", "1e", "+1", "1x",
      "18446744073709551615", "18446744073709551616", "-9223372036854775808", "-9223372036854775809",
      "123456789012345678901234567890", "1e400", "1e-400", "0e99999999999999999999", "true", "false", "null",
      "tru", "nul", "truex", "nulll", "\"abc\"", "\"a\\\"b\"", "\"\\ud800\\udc00\"", "\"\\ud800\"", "\"\\udc00\"",
      "\"\\ud800\\u0041\"", "\"\\ud800x\"", "\"\\ud800\\n\"", "\"\\uZZZZ\"", "\"\\x\"", "\"\x1f\"", "\"\x7f\"",
      "\"\xc3\xa9\"", "\"\xc3\"", "\"\xe2\x82\xac\"", "\"\xf0\x9f\x98\x80\"", "\"\xed\xa0\x80\"", "\"\xc0\xaf\"",
      "\"\xf4\x90\x80\x80\"", "\xc3\xa9", "[1,]", "{\"a\":1,}", "{\"a\" 1}", "{1:2}", "[1 2]", "1 2", " ", "",
      "\t\n\r 1 \t", "\f1", "[1]x", "{\"a\":[1,{\"b\":null}],\"c\":\"d\"}", "[[[]]]", "[{]", "{]", "[}",
      "{\"payload\":\"0123456789\"}", "{\"payload\" : [1,2,3] , \"x\":1}", "[{\"payload\":12345678},{\"result\":{\"a\":1}}]",
      "{\"payload\":123456789012}", "{\"payload\":1234567890123456789012}", "{\"pay\\u006coad\":\"0123456789\"}",
      "{\"payload\":true}", "{\"payload\":\"abc\",\"payload\":\"defghijk\"}", "\"\\u00e9\\/\\b\\f\\n\\r\\t\"",
  };
  for (const char* c : cases) check_all_splits(c);
  check_all_splits(std::string(1024, '[') + std::string(1024, ']'));
  std::string deep = std::string(1025, '[') + std::string(1025, ']');
  CHECK_EQ(scan({deep}, 0).status, status::invalid);
}

TEST_CASE("json_scanner: cuts only top-level or array-element payload/result of threshold length") {
  std::string big(100, 'x');
  std::string body = "{\"priority\":1,\"payload\":\"" + big + "\",\"delay_ms\":0}";
  auto r = scan({body}, 64);
  REQUIRE_EQ(r.status, status::ok);
  CHECK_EQ(r.skeleton, "{\"priority\":1,\"payload\":null,\"delay_ms\":0}");
  REQUIRE_EQ(r.cuts.size(), 1u);
  CHECK_EQ(r.cuts[0].bytes, "\"" + big + "\"");
  CHECK_EQ(r.cuts[0].key, "payload");
  CHECK_EQ(r.cuts[0].item, 0u);

  // Below the threshold: kept inline.
  auto small = scan({body}, 200);
  CHECK_EQ(small.skeleton, body);
  CHECK(small.cuts.empty());

  // Nested deeper: never cut. Escaped key: never cut.
  std::string nested = "{\"x\":{\"payload\":\"" + big + "\"},\"pay\\u006coad\":\"" + big + "\"}";
  auto n = scan({nested}, 64);
  CHECK_EQ(n.skeleton, nested);
  CHECK(n.cuts.empty());

  // Batch: item indexes, both keys, values of every kind.
  std::string arr = "[1,2]";
  std::string obj = "{\"k\":\"" + big + "\"}";
  std::string batch = "[{\"payload\":" + obj + "},{\"id\":\"a\",\"result\":" + obj + "},{\"result\":[" + obj + "," +
                      arr + "]}]";
  auto b = scan({batch}, 64);
  REQUIRE_EQ(b.status, status::ok);
  REQUIRE_EQ(b.cuts.size(), 3u);
  CHECK_EQ(b.cuts[0].item, 0u);
  CHECK_EQ(b.cuts[1].item, 1u);
  CHECK_EQ(b.cuts[1].key, "result");
  CHECK_EQ(b.cuts[2].item, 2u);
  CHECK_EQ(b.skeleton, "[{\"payload\":null},{\"id\":\"a\",\"result\":null},{\"result\":null}]");
  CHECK_EQ(b.reassemble(), batch);

  // A number payload ending at the end of a chunk, then the delimiter.
  std::string num = "{\"payload\":" + std::string(70, '1') + ".5}";
  auto nr = scan({std::string_view(num).substr(0, num.size() - 1), std::string_view(num).substr(num.size() - 1)}, 64);
  REQUIRE_EQ(nr.status, status::ok);
  CHECK_EQ(nr.reassemble(), num);
  // A top-level scalar is never cut.
  auto top = scan({"\"" + big + "\""}, 8);
  CHECK(top.cuts.empty());
}

TEST_CASE("json_scanner: UTF-8 split across chunks at every point") {
  std::string s = "{\"payload\":\"\xf0\x9f\x98\x80\xe2\x82\xac\xc3\xa9 abc\"}";
  for (size_t i = 0; i <= s.size(); ++i)
    for (size_t j = i; j <= s.size(); ++j) {
      std::string_view v = s;
      auto r = scan({v.substr(0, i), v.substr(i, j - i), v.substr(j)}, 4);
      REQUIRE_EQ(r.status, status::ok);
      CHECK_EQ(r.reassemble(), s);
    }
  std::string bad = "{\"payload\":\"\xf0\x9f\x98 abc\"}";
  for (size_t i = 0; i <= bad.size(); ++i) {
    std::string_view v = bad;
    CHECK_EQ(scan({v.substr(0, i), v.substr(i)}, 4).status, status::invalid);
  }
  // Truncated at the very end.
  CHECK_EQ(scan({"\"\xe2\x82"}, 4).status, status::invalid);
}

TEST_CASE("json_scanner: the skeleton is bounded, the cut values are not") {
  std::string big(5000, 'y');
  std::string ok = "{\"payload\":\"" + big + "\"}";
  CHECK_EQ(scan({ok}, 100, 1000).status, status::ok);
  std::string bad = "{\"other\":\"" + big + "\"}";
  auto r = scan({bad}, 100, 1000);
  CHECK_EQ(r.status, status::skeleton_large);
  CHECK(r.error.find("only payload and result may be large") != std::string::npos);
}

TEST_CASE("json_scanner: random documents in random chunks agree with simdjson") {
  std::mt19937_64 rng(13);
  const char* atoms[] = {"{", "}", "[", "]", ",", ":", "\"payload\"", "\"result\"", "\"k\"", "\"abcdefghij\"",
                         "1", "-0.5e3", "true", "null", " ", "\\", "\"", "\xc3", "\xa9", "1e999", "\\u00e9"};
  for (int n = 0; n < 20000; ++n) {
    std::string s;
    int len = static_cast<int>(rng() % 12);
    if (rng() % 2) s = "{\"payload\":";
    for (int i = 0; i < len; ++i) s += atoms[rng() % std::size(atoms)];
    if (rng() % 2) s += "}";
    bool want = simdjson_accepts(s);
    std::vector<std::string_view> pieces;
    std::string_view v = s;
    while (!v.empty()) {
      size_t k = std::min<size_t>(v.size(), rng() % 5);
      pieces.push_back(v.substr(0, k));
      v.remove_prefix(k);
    }
    auto r = scan(pieces, rng() % 8);
    REQUIRE_MESSAGE((r.status == status::ok) == want, s);
    if (want) REQUIRE_EQ(r.reassemble(), s);
  }
}

TEST_CASE("json_scanner: throughput on a large string payload" * doctest::skip(false)) {
  // Base64-like bytes: what a large payload usually is.
  std::string body = "{\"payload\":\"";
  std::mt19937 rng(1);
  const char* b64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  body.reserve(64u << 20);
  while (body.size() < (64u << 20)) body += b64[rng() % 64];
  body += "\"}";
  struct null_sink : http::json_scanner::sink {
    size_t bytes = 0;
    void on_cut_begin(uint32_t, std::string_view) override {}
    void on_cut_bytes(const char*, size_t n) override { bytes += n; }
    void on_cut_end(size_t, uint64_t) override {}
  } sink;
  http::json_scanner sc(sink, 65536, 8u << 20);
  auto t0 = std::chrono::steady_clock::now();
  for (size_t off = 0; off < body.size(); off += 16384) {
    size_t n = std::min<size_t>(16384, body.size() - off);
    REQUIRE_EQ(sc.feed(body.data() + off, n), status::ok);
  }
  REQUIRE_EQ(sc.finish(), status::ok);
  double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  CHECK_EQ(sink.bytes, body.size() - 12);
  std::printf("json_scanner: %.0f MB/s, %.3f us/KB (64 MiB string payload, 16 KiB chunks)\n",
              body.size() / s / 1e6, s * 1e6 / (body.size() / 1024.0));
}

TEST_CASE("json_scanner: throughput on a structured payload (objects, numbers, short strings)") {
  std::string body = "{\"payload\":[";
  for (int i = 0; body.size() < (16u << 20); ++i)
    body += "{\"id\":" + std::to_string(i * 7919) + ",\"name\":\"item-" + std::to_string(i) +
            "\",\"score\":-12.5e-3,\"ok\":true,\"tags\":[\"a\",\"b\"]},";
  body += "null]}";
  struct null_sink : http::json_scanner::sink {
    void on_cut_begin(uint32_t, std::string_view) override {}
    void on_cut_bytes(const char*, size_t) override {}
    void on_cut_end(size_t, uint64_t) override {}
  } sink;
  http::json_scanner sc(sink, 65536, 8u << 20);
  auto t0 = std::chrono::steady_clock::now();
  for (size_t off = 0; off < body.size(); off += 16384)
    REQUIRE_EQ(sc.feed(body.data() + off, std::min<size_t>(16384, body.size() - off)), status::ok);
  REQUIRE_EQ(sc.finish(), status::ok);
  double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  CHECK_EQ(sc.skeleton(), "{\"payload\":null}");
  std::printf("json_scanner: %.0f MB/s, %.3f us/KB (16 MiB structured payload, 16 KiB chunks)\n",
              body.size() / s / 1e6, s * 1e6 / (body.size() / 1024.0));
}
