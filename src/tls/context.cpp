#include <openssl/pem.h>
#include <openssl/rand.h>

#include <cstdio>
#include <cstdlib>

#include "relay/tls.h"
#include "tls/compat.h"

namespace relay::tls {
namespace {

// TLS 1.2 is allowed only by choice, and then only with forward secrecy and
// AEAD ciphers. TLS 1.3's suites are all AEAD and need no list.
constexpr const char* tls12_ciphers =
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305";

bool set_min_version(SSL_CTX* ctx, const std::string& v, std::string& error) {
  uint16_t version;
  if (v == "1.3") version = TLS1_3_VERSION;
  else if (v == "1.2") version = TLS1_2_VERSION;
  else {
    error = "tls.min_version must be \"1.2\" or \"1.3\", not \"" + v + "\"";
    return false;
  }
  if (SSL_CTX_set_min_proto_version(ctx, version) != 1 ||
      SSL_CTX_set_max_proto_version(ctx, TLS1_3_VERSION) != 1) {
    error = "cannot set TLS versions: " + compat::drain_error_queue();
    return false;
  }
  return true;
}

bool load_file_exists(const std::string& path, const char* what, std::string& error) {
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) {
    error = std::string(what) + " " + path + ": cannot open";
    return false;
  }
  std::fclose(f);
  return true;
}

bool load_identity(SSL_CTX* ctx, const std::string& cert, const std::string& key, std::string& error) {
  if (!load_file_exists(cert, "certificate", error) || !load_file_exists(key, "private key", error))
    return false;
  if (SSL_CTX_use_certificate_chain_file(ctx, cert.c_str()) != 1) {
    error = "certificate " + cert + ": " + compat::drain_error_queue();
    return false;
  }
  if (SSL_CTX_use_PrivateKey_file(ctx, key.c_str(), SSL_FILETYPE_PEM) != 1) {
    error = "private key " + key + ": " + compat::drain_error_queue();
    return false;
  }
  if (SSL_CTX_check_private_key(ctx) != 1) {
    error = "private key " + key + " does not match certificate " + cert;
    compat::drain_error_queue();
    return false;
  }
  return true;
}

bool load_ca(SSL_CTX* ctx, const std::string& ca, std::string& error) {
  if (!load_file_exists(ca, "CA bundle", error)) return false;
  if (SSL_CTX_load_verify_locations(ctx, ca.c_str(), nullptr) != 1) {
    error = "CA bundle " + ca + ": " + compat::drain_error_queue();
    return false;
  }
  return true;
}

bool load_crl(SSL_CTX* ctx, const std::string& path, std::string& error) {
  BIO* bio = BIO_new_file(path.c_str(), "r");
  if (!bio) {
    error = "CRL " + path + ": cannot open";
    compat::drain_error_queue();
    return false;
  }
  X509_STORE* store = SSL_CTX_get_cert_store(ctx);
  int loaded = 0;
  while (X509_CRL* crl = PEM_read_bio_X509_CRL(bio, nullptr, nullptr, nullptr)) {
    int ok = X509_STORE_add_crl(store, crl);
    X509_CRL_free(crl);
    if (ok != 1) {
      BIO_free(bio);
      error = "CRL " + path + ": " + compat::drain_error_queue();
      return false;
    }
    ++loaded;
  }
  BIO_free(bio);
  // Reading stops with a "no start line" error at the end of the file.
  compat::drain_error_queue();
  if (loaded == 0) {
    error = "CRL " + path + ": no PEM X509 CRL found";
    return false;
  }
  X509_STORE_set_flags(store, X509_V_FLAG_CRL_CHECK);
  return true;
}

// A context with what servers and clients share: options, the lowest
// protocol version and the TLS 1.2 ciphers. Null (and `error`) on failure.
SSL_CTX* new_ctx(const std::string& min_version, std::string& error) {
  SSL_CTX* ctx = SSL_CTX_new(TLS_method());
  if (!ctx) {
    error = "SSL_CTX_new: " + compat::drain_error_queue();
    return nullptr;
  }
  SSL_CTX_set_options(ctx, SSL_OP_NO_COMPRESSION | SSL_OP_NO_RENEGOTIATION |
                               SSL_OP_CIPHER_SERVER_PREFERENCE);
  // Idle long-polling connections should not pin 32 KiB of record buffers.
  SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS);
  if (!set_min_version(ctx, min_version, error)) {
    SSL_CTX_free(ctx);
    return nullptr;
  }
  if (SSL_CTX_set_cipher_list(ctx, tls12_ciphers) != 1) {
    error = "cipher list: " + compat::drain_error_queue();
    SSL_CTX_free(ctx);
    return nullptr;
  }
  return ctx;
}

}  // namespace

context::~context() {
  if (_session) SSL_SESSION_free(_session);
  SSL_CTX_free(_ctx);
}

int context::on_new_session(SSL* ssl, SSL_SESSION* session) {
  auto* self = static_cast<context*>(SSL_CTX_get_app_data(SSL_get_SSL_CTX(ssl)));
  if (self->_session) SSL_SESSION_free(self->_session);
  self->_session = session;
  return 1;  // the context keeps the reference
}

std::shared_ptr<const context> context::make_server(const server_options& o, std::string& error) {
  SSL_CTX* ctx = new_ctx(o.min_version, error);
  if (!ctx) return nullptr;
  std::shared_ptr<const context> result(new context(ctx, true));
  if (!load_identity(ctx, o.cert_file, o.key_file, error)) return nullptr;
  if (!load_ca(ctx, o.client_ca_file, error)) return nullptr;
  if (o.crl_file && !load_crl(ctx, *o.crl_file, error)) return nullptr;
  // Mutual TLS is not optional on relay's API listener unless API keys
  // authenticate instead; a certificate that is presented is verified
  // either way.
  SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | (o.require_client_cert ? SSL_VERIFY_FAIL_IF_NO_PEER_CERT : 0), nullptr);
  // Resumed sessions must belong to this service; required for resumption
  // when client certificates are verified.
  static const unsigned char sid_ctx[] = "relay";
  SSL_CTX_set_session_id_context(ctx, sid_ctx, sizeof sid_ctx - 1);
  return result;
}

std::shared_ptr<const context> context::make_client(const client_options& o, std::string& error) {
  SSL_CTX* ctx = new_ctx(o.min_version, error);
  if (!ctx) return nullptr;
  std::shared_ptr<const context> result(new context(ctx, false));
  if (o.cert_file || o.key_file) {
    if (!o.cert_file || !o.key_file) {
      error = "a client certificate needs both a certificate and a key file";
      return nullptr;
    }
    if (!load_identity(ctx, *o.cert_file, *o.key_file, error)) return nullptr;
  }
  if (!load_ca(ctx, o.ca_file, error)) return nullptr;
  SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, nullptr);
  if (o.resume_sessions) {
    SSL_CTX_set_app_data(ctx, const_cast<context*>(result.get()));
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
    SSL_CTX_sess_set_new_cb(ctx, on_new_session);
  }
  return result;
}

std::string_view library_version() { return compat::library_name(); }

}  // namespace relay::tls

namespace relay::tls {
void random_bytes(uint8_t* out, size_t n) {
  // Both libraries abort rather than return weak bytes on failure in practice;
  // check anyway so that a failure is never silent.
  if (RAND_bytes(out, n) != 1) {
    std::fprintf(stderr, "relay: RAND_bytes failed\n");
    std::abort();
  }
}
}  // namespace relay::tls
