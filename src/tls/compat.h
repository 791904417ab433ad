// The only place that knows which TLS library relay was built with. Code
// elsewhere uses the API BoringSSL and OpenSSL 3 share, plus these shims.
#pragma once

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>
#if !defined(OPENSSL_IS_BORINGSSL)
#include <openssl/core_names.h>
#include <openssl/params.h>
#endif

#include <cstddef>
#include <cstdint>
#include <cstring>
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

// Session ticket keys, rotated by relay: tickets are made with the current
// key and still read with the previous one, so that a ticket stays
// resumable for its whole lifetime (up to one rotation period) and no
// longer than two. AES-256-CBC with HMAC-SHA256, as both libraries' own
// ticket keys. The key callback is the one part of ticket handling whose
// signature differs: an HMAC_CTX in BoringSSL, an EVP_MAC_CTX in OpenSSL 3
// (where the HMAC_CTX form is deprecated).
struct ticket_key {
  unsigned char name[16];
  unsigned char hmac[32];
  unsigned char aes[32];
};
struct ticket_keys {
  ticket_key current;
  ticket_key previous;
  bool has_previous = false;
};

#if defined(OPENSSL_IS_BORINGSSL)
using ticket_mac_ctx = HMAC_CTX;
inline bool init_ticket_mac(HMAC_CTX* mac, const ticket_key& k) {
  return HMAC_Init_ex(mac, k.hmac, sizeof k.hmac, EVP_sha256(), nullptr) == 1;
}
#else
using ticket_mac_ctx = EVP_MAC_CTX;
inline bool init_ticket_mac(EVP_MAC_CTX* mac, const ticket_key& k) {
  OSSL_PARAM params[] = {
      OSSL_PARAM_construct_octet_string(OSSL_MAC_PARAM_KEY, const_cast<unsigned char*>(k.hmac), sizeof k.hmac),
      OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, const_cast<char*>("SHA256"), 0),
      OSSL_PARAM_construct_end()};
  return EVP_MAC_CTX_set_params(mac, params) == 1;
}
#endif

// The libraries' contract: encrypting, write the key name and a fresh IV
// and return 1 (-1: error); decrypting, return 0 for an unknown key name
// (the client gets a full handshake), 1 for the current key, 2 for an older
// one (the client is sent a new ticket), -1 for an error.
inline int on_ticket_key(SSL* ssl, unsigned char* name, unsigned char* iv, EVP_CIPHER_CTX* cipher,
                         ticket_mac_ctx* mac, int encrypt) {
  const auto* keys = static_cast<const ticket_keys*>(SSL_CTX_get_app_data(SSL_get_SSL_CTX(ssl)));
  if (!keys) return encrypt ? -1 : 0;
  if (encrypt) {
    const ticket_key& k = keys->current;
    std::memcpy(name, k.name, sizeof k.name);
    if (RAND_bytes(iv, EVP_CIPHER_iv_length(EVP_aes_256_cbc())) != 1) return -1;
    if (EVP_EncryptInit_ex(cipher, EVP_aes_256_cbc(), nullptr, k.aes, iv) != 1) return -1;
    return init_ticket_mac(mac, k) ? 1 : -1;
  }
  const ticket_key* k = nullptr;
  int found = 0;
  if (std::memcmp(name, keys->current.name, sizeof keys->current.name) == 0) {
    k = &keys->current;
    found = 1;
  } else if (keys->has_previous && std::memcmp(name, keys->previous.name, sizeof keys->previous.name) == 0) {
    k = &keys->previous;
    found = 2;
  }
  if (!k) return 0;
  if (EVP_DecryptInit_ex(cipher, EVP_aes_256_cbc(), nullptr, k->aes, iv) != 1) return -1;
  return init_ticket_mac(mac, *k) ? found : -1;
}

// Makes `ctx` encrypt and read its tickets with `keys` (kept by the caller
// for the context's life, in the context's app data).
inline bool use_ticket_keys(SSL_CTX* ctx, ticket_keys* keys) {
  SSL_CTX_set_app_data(ctx, keys);
#if defined(OPENSSL_IS_BORINGSSL)
  return SSL_CTX_set_tlsext_ticket_key_cb(ctx, on_ticket_key) == 1;
#else
  return SSL_CTX_set_tlsext_ticket_key_evp_cb(ctx, on_ticket_key) == 1;
#endif
}

// How long a new session may be resumed, in seconds. OpenSSL uses the
// session timeout for TLS 1.2 and 1.3 alike; BoringSSL gives TLS 1.3
// sessions a timeout of their own (48 hours unless set).
inline void set_session_lifetime(SSL_CTX* ctx, uint32_t seconds) {
#if defined(OPENSSL_IS_BORINGSSL)
  SSL_CTX_set_timeout(ctx, seconds);
  SSL_CTX_set_session_psk_dhe_timeout(ctx, seconds);
#else
  SSL_CTX_set_timeout(ctx, static_cast<long>(seconds));
#endif
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
