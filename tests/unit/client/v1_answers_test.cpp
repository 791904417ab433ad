// What the v1 client accepts from relay: every field of a lease answer is
// checked, and a bad entry is refused on its own without its bytes.
#include <doctest/doctest.h>

#include "relay/v1_client.h"

using namespace relay;

namespace {

const std::string lease_token = "0123456789abcdef0123456789abcdef";

std::string job(std::string_view id, std::string_view attempt = "1", std::string_view lease = lease_token,
                std::string_view expiry = "1796591610220", std::string_view payload = R"({"n":1})") {
  return R"({"id":")" + std::string(id) + R"(","attempt":)" + std::string(attempt) + R"(,"lease":")" +
         std::string(lease) + R"(","lease_expires_ms":)" + std::string(expiry) + R"(,"payload":)" +
         std::string(payload) + "}";
}

v1::lease_answer parse_ok(const std::string& body) {
  v1::lease_answer a;
  std::string why;
  REQUIRE_MESSAGE(v1::parse_lease_answer(body, a, why), why);
  return a;
}

}  // namespace

TEST_CASE("v1 lease answer: a well-formed answer yields its jobs with their exact payload bytes") {
  // The answer's fields are views into the body: it must outlive them.
  std::string body = R"({"jobs":[)" + job("00000000000000a1", "3", lease_token, "42", R"( {"x" : [1, 2.5e3, "é"]} )") + "]}";
  auto a = parse_ok(body);
  REQUIRE_EQ(a.jobs.size(), 1u);
  CHECK(a.rejected.empty());
  CHECK_EQ(a.jobs[0].id, "00000000000000a1");
  CHECK_EQ(a.jobs[0].attempt, 3u);
  CHECK_EQ(a.jobs[0].lease, lease_token);
  CHECK_EQ(a.jobs[0].lease_expires_ms, 42);
  CHECK_EQ(a.jobs[0].payload, R"({"x" : [1, 2.5e3, "é"]})");
  CHECK(parse_ok(R"({"jobs":[]})").jobs.empty());
}

TEST_CASE("v1 lease answer: each bad field refuses that job alone, by name, without its bytes") {
  struct bad {
    std::string entry, reason_has;
  };
  const std::vector<bad> cases{
      // Escaped in JSON: valid JSON, but not an id (raw control characters
      // make the whole answer invalid; see below).
      {job(R"(0000000000000001\r\nContent-Length: 0\r\n\r\nDELETE /x HTTP/1.1)"), "\"id\""},
      {job("00000000000000A1"), "\"id\""},
      {job("000000000000001"), "\"id\""},
      {job("../../etc/passwd"), "\"id\""},
      {job("0000000000000001", "\"zz\""), "\"attempt\""},
      {job("0000000000000001", "0"), "\"attempt\""},
      {job("0000000000000001", "1001"), "\"attempt\""},
      {job("0000000000000001", "1.5"), "\"attempt\""},
      {job("0000000000000001", "1", "not-a-token"), "\"lease\""},
      {job("0000000000000001", "1", lease_token + "00"), "\"lease\""},
      {job("0000000000000001", "1", lease_token, "-5"), "\"lease_expires_ms\""},
      {job("0000000000000001", "1", lease_token, "\"soon\""), "\"lease_expires_ms\""},
      {job("0000000000000001", "1", lease_token, "18446744073709551615"), "\"lease_expires_ms\""},
      {R"({"id":"0000000000000001","attempt":1,"lease":")" + lease_token + R"(","lease_expires_ms":5})", "\"payload\" is missing"},
      {R"({"id":"0000000000000001","id":"0000000000000002","attempt":1,"lease":")" + lease_token +
           R"(","lease_expires_ms":5,"payload":1})", "twice"},
      {R"("0000000000000001")", "not an object"},
  };
  for (const auto& c : cases) {
    CAPTURE(c.entry);
    std::string body = R"({"jobs":[)" + c.entry + "," + job("00000000000000ff") + "]}";
    auto a = parse_ok(body);
    REQUIRE_EQ(a.rejected.size(), 1u);
    CHECK_NE(a.rejected[0].reason.find(c.reason_has), std::string::npos);
    CHECK_EQ(a.rejected[0].reason.find("Content-Length"), std::string::npos);
    CHECK((a.rejected[0].id.empty() || v1::valid_job_id(a.rejected[0].id)));
    // The good job beside it still runs.
    REQUIRE_EQ(a.jobs.size(), 1u);
    CHECK_EQ(a.jobs[0].id, "00000000000000ff");
  }
}

TEST_CASE("v1 lease answer: an id twice in one answer runs once") {
  std::string body = R"({"jobs":[)" + job("0000000000000007") + "," + job("0000000000000007", "2") + "]}";
  auto a = parse_ok(body);
  REQUIRE_EQ(a.jobs.size(), 1u);
  CHECK_EQ(a.jobs[0].attempt, 1u);
  REQUIRE_EQ(a.rejected.size(), 1u);
  CHECK_EQ(a.rejected[0].id, "0000000000000007");
  CHECK_EQ(a.rejected[0].index, 1u);
}

TEST_CASE("v1 lease answer: an answer that is not {\"jobs\":[...]} of valid JSON is refused whole") {
  for (std::string body : {std::string(""), std::string("null"), std::string("[]"), std::string(R"({"jobs":{}})"),
                           std::string(R"({"nojobs":[]})"), std::string(R"({"jobs":[],"jobs":[]})"),
                           R"({"jobs":[)" + job("0000000000000001", "1", lease_token, "5", "[1,2") + "]}",
                           R"({"jobs":[)" + job("0000000000000001", "1", lease_token, "5", "\"\xff\"") + "]}",
                           std::string(R"({"jobs":[]} trailing)"),
                           R"({"jobs":[)" + job("0000000000000001\r\nX-Smuggled: 1") + "]}"}) {
    CAPTURE(body);
    v1::lease_answer a;
    std::string why;
    CHECK_FALSE(v1::parse_lease_answer(body, a, why));
    CHECK_FALSE(why.empty());
    CHECK(a.jobs.empty());
  }
}

TEST_CASE("v1 answers: heartbeat, job, submit and error bodies are read with their bounds") {
  int64_t exp = 0;
  std::string why;
  CHECK(v1::parse_heartbeat_answer(R"({"lease_expires_ms":77})", exp, why));
  CHECK_EQ(exp, 77);
  CHECK_FALSE(v1::parse_heartbeat_answer(R"({"lease_expires_ms":"77"})", exp, why));
  CHECK_FALSE(v1::parse_heartbeat_answer(R"({"lease_expires_ms":0})", exp, why));

  v1::job_view j;
  CHECK(v1::parse_job_view(R"({"id":"0000000000000001","queue":"q","state":"succeeded","attempts":2,"payload":{"a":1},"result":[1, 2],"error":null,"created_ms":1,"updated_ms":2})", j, why));
  CHECK_EQ(j.state, "succeeded");
  CHECK_EQ(j.attempts, 2u);
  CHECK_EQ(j.result, "[1, 2]");
  CHECK(j.terminal());
  CHECK_FALSE(v1::parse_job_view(R"({"id":"1","state":"queued"})", j, why));

  v1::submitted s;
  CHECK(v1::parse_submitted(R"({"ids":["0000000000000001","0000000000000002"]})", s, why));
  CHECK_EQ(s.ids.size(), 2u);
  CHECK_FALSE(v1::parse_submitted(R"({"ids":["0000000000000001","x"]})", s, why));

  std::string code, message;
  v1::parse_error_body(R"({"error":{"code":"lease_lost","message":"gone\r\nX-Evil: 1"}})", code, message);
  CHECK_EQ(code, "lease_lost");
  CHECK_EQ(message, "gone??X-Evil: 1");
  v1::parse_error_body(R"({"error":{"code":"Not Snake","message":1}})", code, message);
  CHECK(code.empty());
  CHECK(message.empty());
}

TEST_CASE("v1 lease answer: payload bytes are found exactly around escaped quotes, whitespace and nesting, in place or copied") {
  const std::string tricky = R"({"k\"ey" : "a\"b\\", "n":[1,-2.5e3,"\\\"]}"], "z":"\u00e9\\"})";
  std::string body = R"({ "x":"\"}", "jobs" : [ )" + job("00000000000000a1", "1", lease_token, "5", " " + tricky + " ") +
                     " , " + job("00000000000000a2", "1", lease_token, "5", R"("\\")") + " ] }";
  for (bool in_place : {false, true}) {
    CAPTURE(in_place);
    std::string copy = body;
    copy.reserve(copy.size() + 64);
    v1::lease_answer a;
    std::string why;
    REQUIRE_MESSAGE(v1::parse_lease_answer(copy, a, why, in_place), why);
    REQUIRE_EQ(a.jobs.size(), 2u);
    CHECK_EQ(a.jobs[0].payload, tricky);
    CHECK_EQ(a.jobs[1].payload, R"("\\")");
  }
}

TEST_CASE("v1 complete body: the envelope fills the room before the result; a bad lease changes nothing") {
  std::string body(v1::complete_room, ' ');
  body += " [1,2]\n";
  std::string before = body;
  CHECK_FALSE(v1::fill_complete_body(body, "not-a-lease"));
  CHECK_EQ(body, before);
  REQUIRE(v1::fill_complete_body(body, lease_token));
  CHECK_EQ(body, R"({"lease":")" + lease_token + R"(","result": [1,2])" + "\n}");
}
