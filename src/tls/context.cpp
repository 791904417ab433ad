#include <openssl/pem.h>
#include <openssl/rand.h>

#include <atomic>
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

// Every context made in this process gets the next number, so that a
// connection can tell whether the TLS material was reloaded since it was
// accepted (contexts are made on several threads only in tests).
std::atomic<uint64_t> next_generation{1};

// TLS 1.3 resumption with a lifetime of tls.session_lifetime_ms, or none.
bool set_resumption(SSL_CTX* ctx, uint64_t lifetime_ms, std::string& error) {
  if (lifetime_ms == 0) {
    SSL_CTX_set_options(ctx, SSL_OP_NO_TICKET);
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    if (SSL_CTX_set_num_tickets(ctx, 0) != 1) {
      error = "cannot turn session tickets off: " + compat::drain_error_queue();
      return false;
    }
    return true;
  }
  if (lifetime_ms > 7ull * 24 * 3600 * 1000) {
    error = "tls.session_lifetime_ms must be at most 7 days";
    return false;
  }
  compat::set_session_lifetime(ctx, static_cast<uint32_t>((lifetime_ms + 999) / 1000));
  return true;
}

}  // namespace

context::context(SSL_CTX* ctx, bool server)
    : _ctx(ctx), _server(server), _generation(next_generation.fetch_add(1, std::memory_order_relaxed)) {}

std::string context::verify_peer(const peer_chain& chain) const {
  if (chain.empty()) return "no peer certificate";
  X509_STORE_CTX* v = X509_STORE_CTX_new();
  if (!v) return "cannot allocate a verification context: " + compat::drain_error_queue();
  std::string why;
  // What the library does for a handshake: the context's store (CA bundle,
  // CRLs and the CRL_CHECK flag it carries), the purpose a peer of this
  // side must have, then the context's own verify parameters on top.
  if (X509_STORE_CTX_init(v, SSL_CTX_get_cert_store(_ctx), chain.leaf(), chain.intermediates()) != 1 ||
      X509_STORE_CTX_set_default(v, _server ? "ssl_client" : "ssl_server") != 1 ||
      X509_VERIFY_PARAM_set1(X509_STORE_CTX_get0_param(v), SSL_CTX_get0_param(_ctx)) != 1) {
    why = "cannot set up verification: " + compat::drain_error_queue();
  } else if (X509_verify_cert(v) != 1) {
    why = X509_verify_cert_error_string(X509_STORE_CTX_get_error(v));
    compat::drain_error_queue();
  }
  X509_STORE_CTX_free(v);
  return why;
}

bool context::rotate_ticket_keys(std::string& error) const {
  if (!_ticket_keys) {
    error = "this context issues no session tickets";
    return false;
  }
  // Keys of this context alone, in its app data: the callback reads them
  // on the loop thread, where rotation happens too.
  compat::ticket_keys& k = *_ticket_keys;
  k.previous = k.current;
  k.has_previous = true;
  random_bytes(reinterpret_cast<uint8_t*>(&k.current), sizeof k.current);
  return true;
}

context::~context() {
  if (_session) SSL_SESSION_free(_session);
  SSL_CTX_free(_ctx);
  if (_ticket_keys) OPENSSL_cleanse(_ticket_keys.get(), sizeof *_ticket_keys);
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
  if (!set_resumption(ctx, o.session_lifetime_ms, error)) return nullptr;
  if (o.session_lifetime_ms > 0) {
    // Keys of our own rather than the library's (BoringSSL rotates its own
    // every two days, OpenSSL never): relay_server rotates them every
    // tls.session_lifetime_ms.
    auto* self = const_cast<context*>(result.get());
    self->_ticket_keys = std::make_unique<compat::ticket_keys>();
    random_bytes(reinterpret_cast<uint8_t*>(&self->_ticket_keys->current), sizeof(compat::ticket_key));
    if (!compat::use_ticket_keys(ctx, self->_ticket_keys.get())) {
      error = "cannot install the session ticket key callback: " + compat::drain_error_queue();
      return nullptr;
    }
  }
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
    // A client context's app data is its context (a server's holds its
    // ticket keys).
    SSL_CTX_set_app_data(ctx, const_cast<context*>(result.get()));
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
    SSL_CTX_sess_set_new_cb(ctx, on_new_session);
  }
  return result;
}

std::string_view library_version() { return compat::library_name(); }

certificate_summary context::own_certificate() const { return summarize_certificate(SSL_CTX_get0_certificate(_ctx)); }

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
