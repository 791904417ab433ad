// relay::auth::policy::parse, the policy file relay loads and reloads, then
// the decisions the parsed policy makes.
//
// Input: [policy JSON] NUL [uri SAN] LF [DNS SAN] LF [CN] LF [queue]. Without
// a NUL the whole input is the policy and the names are fixed ones.
//
// Invariants: a refused policy comes with an error naming its origin; an
// accepted one answers for any identity and queue without crashing, a
// principal it matches is one of its own, nothing is allowed to no
// principal, and allowing on a queue implies allowing somewhere.
#include <string>
#include <vector>

#include "fuzz_input.h"
#include "relay/auth.h"

using namespace relay;

namespace {

std::vector<std::string_view> lines(std::string_view s) {
  std::vector<std::string_view> out;
  while (true) {
    auto nl = s.find('\n');
    out.push_back(s.substr(0, nl));
    if (nl == std::string_view::npos) break;
    s.remove_prefix(nl + 1);
  }
  return out;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view all(reinterpret_cast<const char*>(data), size);
  auto nul = all.find('\0');
  std::string_view json = all.substr(0, nul);
  std::vector<std::string_view> names = nul == std::string_view::npos
                                            ? std::vector<std::string_view>{"spiffe://azure.example/ns/jobs/sa/bunny",
                                                                            "producer.aws.internal", "ops-admin", "render"}
                                            : lines(all.substr(nul + 1));
  names.resize(4);

  std::string error;
  auto p = auth::policy::parse(json, "policy.json", error);
  if (!p) {
    FUZZ_CHECK(error.rfind("policy.json: ", 0) == 0);
    return 0;
  }
  tls::identity id;
  id.uri_san = names[0];
  id.dns_san = names[1];
  id.cn = names[2];
  std::string_view queue = names[3];
  // Each kind of name alone, then all together (the URI SAN decides).
  std::vector<tls::identity> ids(4);
  ids[0].uri_san = id.uri_san;
  ids[1].dns_san = id.dns_san;
  ids[2].cn = id.cn;
  ids[3] = id;
  for (const auto& who : ids) {
    const std::string* principal = p->match(who);
    // A name the policy file gave (so no longer than it).
    if (principal) FUZZ_CHECK(principal->size() <= json.size());
    for (auto perm : {auth::permission::submit, auth::permission::read, auth::permission::consume,
                      auth::permission::admin}) {
      FUZZ_CHECK(!p->allows(nullptr, perm, queue));
      bool here = p->allows(principal, perm, queue);
      if (here) FUZZ_CHECK(p->allows_somewhere(principal, perm));
    }
  }
  FUZZ_CHECK(p->principal_count() > 0 || p->match(id) == nullptr);
  // Exactly one name decides: the identity with every name matches as its
  // first non-empty name alone would.
  const std::string* by_all = p->match(id);
  if (!id.uri_san.empty()) FUZZ_CHECK(by_all == p->match(ids[0]));
  else if (!id.dns_san.empty()) FUZZ_CHECK(by_all == p->match(ids[1]));
  else FUZZ_CHECK(by_all == p->match(ids[2]));
  (void)auth::valid_queue_name(queue);
  return 0;
}
