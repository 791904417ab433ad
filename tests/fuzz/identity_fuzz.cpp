// Peer identity from arbitrary DER certificates: d2i_X509 and then
// tls::identity_from_certificate, what relay runs on every verified client
// certificate (and bunny on relay's).
//
// Invariants: extraction never crashes or leaks whatever the names hold;
// every name it returns is printable (SANs visible ASCII, a CN free of control bytes), so that two
// different certificates cannot look like one principal; a certificate with
// a malformed name is refused with no name left; the principal is the first
// non-empty of URI SAN, DNS SAN and CN.
#include <openssl/err.h>
#include <openssl/x509.h>

#include "fuzz_input.h"
#include "relay/tls.h"

using namespace relay;

namespace {

bool printable(const std::string& s) {
  for (unsigned char c : s)
    if (c < 0x20 || c == 0x7f) return false;
  return true;
}

// SANs name URIs and hosts: visible ASCII only.
bool visible_ascii(const std::string& s) {
  for (unsigned char c : s)
    if (c < 0x21 || c > 0x7e) return false;
  return true;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const unsigned char* p = data;
  X509* cert = d2i_X509(nullptr, &p, static_cast<long>(size));
  // The thread's error queue holds allocations; left filled, every input
  // would look like a leak to libFuzzer and be re-run under LeakSanitizer.
  ERR_clear_error();
  if (!cert) return 0;
  FUZZ_CHECK(p > data && p <= data + size);
  tls::identity id = tls::identity_from_certificate(cert);
  X509_free(cert);
  ERR_clear_error();
  FUZZ_CHECK(visible_ascii(id.uri_san) && visible_ascii(id.dns_san) && printable(id.cn));
  // A refused certificate yields no name at all; an accepted one a name.
  if (!id.refused.empty()) FUZZ_CHECK(id.uri_san.empty() && id.dns_san.empty() && id.cn.empty());
  const std::string& principal = id.principal();
  if (!id.uri_san.empty()) FUZZ_CHECK(&principal == &id.uri_san);
  else if (!id.dns_san.empty()) FUZZ_CHECK(&principal == &id.dns_san);
  else FUZZ_CHECK(&principal == &id.cn);
  return 0;
}
