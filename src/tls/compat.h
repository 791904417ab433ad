// The only place that knows which TLS library relay was built with. Code
// elsewhere uses the API BoringSSL and OpenSSL 3 share, plus these shims.
#pragma once

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include <string>

namespace relay::tls::compat {

// The peer's leaf certificate with a reference the caller must X509_free.
inline X509* peer_certificate(const SSL* ssl) {
#if defined(OPENSSL_IS_BORINGSSL)
  return SSL_get_peer_certificate(ssl);
#else
  return SSL_get1_peer_certificate(ssl);
#endif
}

// SNI. OpenSSL implements this as a macro with a C-style cast.
inline void set_server_name(SSL* ssl, const char* name) {
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wold-style-cast"
  SSL_set_tlsext_host_name(ssl, name);
#pragma GCC diagnostic pop
}

inline const char* library_name() {
#if defined(OPENSSL_IS_BORINGSSL)
  return "BoringSSL";
#else
  return OpenSSL_version(OPENSSL_VERSION);
#endif
}

// Empties the thread's error queue into one "; "-separated reason string, so
// that a failure is logged once with all of its causes and no stale error is
// left behind to confuse the next connection (Envoy's drainErrorQueue()).
inline std::string drain_error_queue() {
  std::string reason;
  while (unsigned long e = ERR_get_error()) {
    char buf[256];
    ERR_error_string_n(e, buf, sizeof buf);
    if (!reason.empty()) reason += "; ";
    reason += buf;
  }
  return reason;
}

}  // namespace relay::tls::compat
