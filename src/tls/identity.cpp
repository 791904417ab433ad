#include "relay/tls.h"
#include "tls/compat.h"

namespace relay::tls {
namespace {

// URI and DNS SANs are IA5Strings naming a URI or a host: visible ASCII
// only. A control byte (an embedded NUL above all), a space or a byte above
// 0x7e could make two different certificates look like one principal, or
// one look like another in a log.
bool visible_ascii(const unsigned char* p, int len) {
  if (len <= 0) return false;
  for (int i = 0; i < len; ++i)
    if (p[i] < 0x21 || p[i] > 0x7e) return false;
  return true;
}

// A CN is text (UTF-8 once converted): valid UTF-8 with no C0 or C1
// control, no line or paragraph separator, and no invisible formatting
// character (bidi overrides, zero-width characters, soft hyphen, BOM), which
// could make "ops-admin" and a look-alike print the same.
bool printable_utf8(const unsigned char* p, int len) {
  if (len <= 0) return false;
  int i = 0;
  while (i < len) {
    uint32_t c = p[i];
    int extra = c < 0x80 ? 0 : (c >> 5) == 0x6 ? 1 : (c >> 4) == 0xe ? 2 : (c >> 3) == 0x1e ? 3 : -1;
    if (extra < 0 || i + extra >= len) return false;  // not a lead byte, or cut short
    if (extra > 0) c &= 0x3fu >> extra;
    for (int k = 1; k <= extra; ++k) {
      if ((p[i + k] & 0xc0) != 0x80) return false;
      c = c << 6 | (p[i + k] & 0x3fu);
    }
    static constexpr uint32_t min_for[4] = {0, 0x80, 0x800, 0x10000};
    if (c < min_for[extra] || c > 0x10ffff || (c >= 0xd800 && c <= 0xdfff)) return false;  // overlong, surrogate
    bool control = c < 0x20 || (c >= 0x7f && c <= 0x9f);
    bool separator = c == 0x2028 || c == 0x2029;
    bool format = c == 0xad || c == 0x61c || c == 0x180e || (c >= 0x200b && c <= 0x200f) ||
                  (c >= 0x202a && c <= 0x202e) || (c >= 0x2060 && c <= 0x2064) || (c >= 0x2066 && c <= 0x206f) ||
                  c == 0xfeff || (c >= 0xfff9 && c <= 0xfffb) || (c >= 0xe0000 && c <= 0xe007f);
    if (control || separator || format) return false;
    i += extra + 1;
  }
  return true;
}

// The name, or a reason in `refused` (the first one found is kept).
std::string read_name(const ASN1_STRING* s, const char* what, std::string& refused) {
  const unsigned char* p = s ? ASN1_STRING_get0_data(s) : nullptr;
  int len = s ? ASN1_STRING_length(s) : 0;
  if (!p || !visible_ascii(p, len)) {
    if (refused.empty())
      refused = std::string("a ") + what + (len <= 0 ? " is empty" : " holds a byte that is not visible ASCII");
    return {};
  }
  return std::string(reinterpret_cast<const char*>(p), static_cast<size_t>(len));
}

}  // namespace

identity session::peer_identity() const {
  if (!_ssl) return {};
  X509* cert = compat::peer_certificate(_ssl);
  if (!cert) return {};
  identity id = identity_from_certificate(cert);
  X509_free(cert);
  return id;
}

certificate_summary session::presented_certificate() const {
  if (!_refused_certificate.empty()) return _refused_certificate;
  if (!_ssl) return {};
  X509* cert = compat::peer_certificate(_ssl);
  if (!cert) return {};
  certificate_summary s = summarize_certificate(cert);
  X509_free(cert);
  return s;
}

certificate_summary summarize_certificate(X509* cert) {
  certificate_summary s;
  if (!cert) return s;
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int md_len = 0;
  if (X509_digest(cert, EVP_sha256(), md, &md_len) == 1) s.sha256 = to_hex(md, md_len);
  if (const ASN1_INTEGER* serial = X509_get_serialNumber(cert))
    s.serial = to_hex(ASN1_STRING_get0_data(serial), static_cast<size_t>(ASN1_STRING_length(serial)));
  if (BIO* bio = BIO_new(BIO_s_mem())) {
    // RFC 2253 with control and non-ASCII bytes escaped: a crafted subject
    // cannot forge a line or hide in one.
    if (X509_NAME_print_ex(bio, X509_get_subject_name(cert), 0, XN_FLAG_RFC2253) >= 0) {
      s.subject.resize(BIO_ctrl_pending(bio));
      int n = BIO_read(bio, s.subject.data(), static_cast<int>(s.subject.size()));
      s.subject.resize(n > 0 ? static_cast<size_t>(n) : 0);
    }
    BIO_free(bio);
  }
  return s;
}

identity identity_from_certificate(X509* cert) {
  identity id;
  auto* names = static_cast<GENERAL_NAMES*>(X509_get_ext_d2i(cert, NID_subject_alt_name, nullptr, nullptr));
  if (names) {
    // The count is size_t in BoringSSL and int in OpenSSL.
    auto count = sk_GENERAL_NAME_num(names);
    for (decltype(count) i = 0; i < count; ++i) {
      const GENERAL_NAME* gn = sk_GENERAL_NAME_value(names, i);
      // Every URI and DNS name is read, not only the first of each: a bad
      // one anywhere refuses the certificate.
      if (gn->type == GEN_URI) {
        std::string name = read_name(gn->d.uniformResourceIdentifier, "URI SAN", id.refused);
        if (id.uri_san.empty()) id.uri_san = std::move(name);
      } else if (gn->type == GEN_DNS) {
        std::string name = read_name(gn->d.dNSName, "DNS SAN", id.refused);
        if (id.dns_san.empty()) id.dns_san = std::move(name);
      }
    }
    GENERAL_NAMES_free(names);
  }
  X509_NAME* subject = X509_get_subject_name(cert);
  int idx = subject ? X509_NAME_get_index_by_NID(subject, NID_commonName, -1) : -1;
  if (idx >= 0) {
    if (X509_NAME_get_index_by_NID(subject, NID_commonName, idx) >= 0 && id.refused.empty())
      id.refused = "the subject has more than one CN";
    ASN1_STRING* data = X509_NAME_ENTRY_get_data(X509_NAME_get_entry(subject, idx));
    unsigned char* utf8 = nullptr;
    int len = ASN1_STRING_to_UTF8(&utf8, data);
    if (len > 0 && printable_utf8(utf8, len)) id.cn.assign(reinterpret_cast<char*>(utf8), static_cast<size_t>(len));
    else if (id.refused.empty())
      id.refused = len < 0    ? "the subject CN is not a string"
                   : len == 0 ? "the subject CN is empty"
                              : "the subject CN holds a control, separator or invisible formatting character, or is not UTF-8";
    if (utf8) OPENSSL_free(utf8);
  }
  if (!id.refused.empty()) {
    // Nothing of a refused certificate is used as a name.
    identity none;
    none.refused = std::move(id.refused);
    return none;
  }
  return id;
}

}  // namespace relay::tls
