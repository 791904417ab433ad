// TLS for relay, bunny and relayctl: one immutable configuration (`context`)
// shared by many connections, and one `session` per connection that runs the
// protocol over memory buffers. Sockets never touch the TLS library: the
// connection feeds received ciphertext in, takes plaintext out, and sends the
// ciphertext the session produces (the shape of h2o's socket layer).
//
// Written only against the API that BoringSSL and OpenSSL 3 share; the few
// differences live in src/tls/compat.h.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

struct ssl_ctx_st;
struct ssl_st;
struct ssl_session_st;
struct bio_st;
struct x509_st;

namespace relay::tls {

struct server_options {
  std::string cert_file;       // PEM chain, leaf first
  std::string key_file;        // PEM private key
  std::string client_ca_file;  // PEM bundle that client certificates must chain to
  std::optional<std::string> crl_file;  // PEM CRL(s) checked against client leaves
  std::string min_version = "1.3";      // "1.2" or "1.3"
  // False (auth.mode "api_key"): a client may connect without a certificate;
  // one it does present must still verify against the CA bundle and CRL.
  bool require_client_cert = true;
};

struct client_options {
  std::optional<std::string> cert_file;  // client certificate for mutual TLS
  std::optional<std::string> key_file;
  std::string ca_file;  // PEM bundle the server's certificate must chain to
  std::string min_version = "1.3";
  // Keep the latest session ticket and offer it on the next connection
  // (TLS resumption: no certificate exchange, no signatures).
  bool resume_sessions = false;
};

// An SSL_CTX built from files. Immutable once built: reloading certificates
// means building a new context and swapping the shared_ptr that new
// connections take theirs from; live connections keep the one they started
// with until they close.
class context {
 public:
  // On failure returns null and sets `error` to a message naming the file.
  static std::shared_ptr<const context> make_server(const server_options& o, std::string& error);
  static std::shared_ptr<const context> make_client(const client_options& o, std::string& error);

  context(const context&) = delete;
  context& operator=(const context&) = delete;
  ~context();

  ssl_ctx_st* native() const { return _ctx; }
  bool is_server() const { return _server; }
  // Client contexts with resume_sessions: the session to offer, or null.
  // Loop-thread state (the cache is the context's only mutable part).
  ssl_session_st* cached_session() const { return _session; }

 private:
  context(ssl_ctx_st* ctx, bool server) : _ctx(ctx), _server(server) {}
  static int on_new_session(ssl_st* ssl, ssl_session_st* session);
  ssl_ctx_st* _ctx;
  bool _server;
  mutable ssl_session_st* _session = nullptr;
};

// Who the peer's verified certificate says it is: exactly one name, the
// principal. It is the first URI SAN (e.g. a SPIFFE id) if there is one,
// else the first DNS SAN, else the subject CN, and it is matched only
// against policy matchers of its own kind: a certificate whose URI SAN is
// unknown is not recognised by its DNS SAN or CN.
//
// A certificate whose names cannot be read as exactly one principal -- a
// URI or DNS SAN or a CN that is empty or holds control bytes or NUL, or
// more than one CN -- is refused (`refused` says why; stream ends such a
// connection as a TLS failure once the handshake completes). Such a name
// is never skipped in favour of the next one.
struct identity {
  enum class kind : uint8_t { none, uri_san, dns_san, cn };
  std::string uri_san;  // the first URI SAN, if any
  std::string dns_san;  // the first DNS SAN, if any
  std::string cn;       // the subject CN, if any
  std::string refused;  // non-empty: why these names are not an identity
  enum kind kind() const {
    return !uri_san.empty() ? kind::uri_san : !dns_san.empty() ? kind::dns_san : !cn.empty() ? kind::cn : kind::none;
  }
  const std::string& principal() const {
    return !uri_san.empty() ? uri_san : !dns_san.empty() ? dns_san : cn;
  }
};

// The identity `cert` names (what peer_identity() returns for a peer that
// presented it). Safe on any parsed certificate, however odd its names.
identity identity_from_certificate(x509_st* cert);

class session {
 public:
  enum class status {
    ok,      // progress made, or more input needed
    closed,  // the peer sent close_notify
    error,   // protocol, verification or library error; see error()
  };

  // Server side.
  explicit session(std::shared_ptr<const context> ctx);
  // Client side: `server_name` is sent as SNI (unless it is an IP address)
  // and must match the server certificate's SAN.
  session(std::shared_ptr<const context> ctx, std::string_view server_name);
  session(const session&) = delete;
  session& operator=(const session&) = delete;
  ~session();

  // Client side: produce the ClientHello (see take_output).
  status start();
  // Hands ciphertext received from the peer to the session.
  void feed(const char* data, size_t len);
  // Advances the handshake and appends all plaintext now available to `out`.
  status read(std::string& out);
  // Encrypts `plain` for the peer (see take_output).
  status write(std::string_view plain);
  // Queues a close_notify alert.
  void shutdown();

  bool has_output() const;
  // If all fed input has been read, replaces the input buffer with a new,
  // empty one: a memory BIO keeps the capacity of the largest burst.
  void release_input_buffer();
  // Moves the ciphertext waiting to be sent to the end of `out`.
  void take_output(std::string& out);

  bool handshake_complete() const;
  bool resumed() const;
  // The verified peer certificate's names; empty if the peer sent none.
  identity peer_identity() const;
  // Why the last call returned status::error.
  const std::string& error() const { return _error; }

 private:
  void init(bool server);
  status fail(int ret);

  std::shared_ptr<const context> _ctx;
  ssl_st* _ssl = nullptr;
  bio_st* _in = nullptr;   // ciphertext from the peer, owned by _ssl
  bio_st* _out = nullptr;  // ciphertext for the peer, owned by _ssl
  std::string _error;
};

// The TLS library's name and version, for logs.
std::string_view library_version();

}  // namespace relay::tls

namespace relay::tls {
// Cryptographically secure random bytes from the TLS library's generator.
void random_bytes(uint8_t* out, size_t n);
// The SHA-256 digest of `data` (API keys are stored and looked up by it).
void sha256(std::string_view data, uint8_t out[32]);
// Whether the n bytes at a and b are equal, in a time that depends on n
// only, never on where they differ (CRYPTO_memcmp).
bool equal_constant_time(const void* a, const void* b, size_t n);
}  // namespace relay::tls
