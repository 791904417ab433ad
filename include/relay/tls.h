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
struct x509_store_ctx_st;
struct stack_st_X509;

namespace relay::tls {
namespace compat {
struct ticket_keys;
}

struct server_options {
  std::string cert_file;       // PEM chain, leaf first
  std::string key_file;        // PEM private key
  std::string client_ca_file;  // PEM bundle that client certificates must chain to
  std::optional<std::string> crl_file;  // PEM CRL(s) checked against client leaves
  std::string min_version = "1.3";      // "1.2" or "1.3"
  // How long a session may be resumed after the full handshake that made
  // it (rounded up to whole seconds). A resumed handshake skips certificate
  // verification, so this bounds how long a client can be served on the
  // strength of an old verification; the peer is verified again after each
  // resumption anyway (see session::read). 0: no resumption at all.
  uint64_t session_lifetime_ms = 300000;
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

// The certificates a peer presented in its handshake, the leaf and the
// intermediates it sent, held by reference (the TLS library's own objects,
// not copies). A connection keeps them so that it can be verified again
// after a reload (context::verify_peer) even once its TLS session and
// buffers are gone. Movable, not copyable.
class peer_chain {
 public:
  peer_chain() = default;
  peer_chain(peer_chain&& o) noexcept;
  peer_chain& operator=(peer_chain&& o) noexcept;
  peer_chain(const peer_chain&) = delete;
  peer_chain& operator=(const peer_chain&) = delete;
  ~peer_chain();

  bool empty() const { return _leaf == nullptr; }
  x509_st* leaf() const { return _leaf; }
  // What the peer sent besides the leaf; may be null. After an OpenSSL
  // resumption only the leaf is known (its sessions do not keep the rest).
  stack_st_X509* intermediates() const { return _rest; }
  // Milliseconds from now until the leaf's notAfter, negative once it has
  // passed; nullopt without a leaf or a readable date.
  std::optional<int64_t> ms_until_expiry() const;

 private:
  friend class session;
  void reset();
  x509_st* _leaf = nullptr;
  stack_st_X509* _rest = nullptr;
};

// An SSL_CTX built from files. Immutable once built: reloading certificates
// means building a new context and swapping the shared_ptr that new
// connections take theirs from; live connections keep the one they started
// with until they close.
// What the audit stream says of a certificate a peer presented, so that a
// refused one can be found again: its subject (RFC 2253, control bytes
// escaped), the SHA-256 of its DER encoding and its serial number, both in
// hex. All empty when no certificate was presented.
struct certificate_summary {
  std::string subject;
  std::string sha256;
  std::string serial;
  bool empty() const { return sha256.empty(); }
};
certificate_summary summarize_certificate(x509_st* cert);

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
  // The context's own certificate (for the audit line of a reload).
  certificate_summary own_certificate() const;
  // Client contexts with resume_sessions: the session to offer, or null.
  // Loop-thread state (the cache is the context's only mutable part).
  ssl_session_st* cached_session() const { return _session; }

  // Verifies `chain` again, now, as a handshake with this context would:
  // against this context's CA bundle and CRL, with the same flags and
  // purpose (a client certificate for a server context), at the current
  // time. Empty when it verifies, else why not ("certificate revoked",
  // "certificate has expired"...). Loop thread.
  std::string verify_peer(const peer_chain& chain) const;

  // Server contexts with resumption: new tickets are encrypted with a fresh
  // random key from now on; tickets of the key in use until now still
  // resume (and are renewed), older ones no longer do (those clients make a
  // full handshake, verified). So a ticket resumes for at most two
  // rotation periods. False, with `error`, for a context without tickets.
  // Loop thread.
  bool rotate_ticket_keys(std::string& error) const;

  // Increases with every context made in this process: a connection
  // accepted with a context of a lower generation than the current one was
  // verified against older TLS material.
  uint64_t generation() const { return _generation; }

 private:
  context(ssl_ctx_st* ctx, bool server);
  static int on_new_session(ssl_st* ssl, ssl_session_st* session);
  ssl_ctx_st* _ctx;
  bool _server;
  uint64_t _generation;
  mutable ssl_session_st* _session = nullptr;
  // Server contexts with resumption: the ticket keys (rotation mutates them).
  std::unique_ptr<compat::ticket_keys> _ticket_keys;
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
  // Hands ciphertext received from the peer to the session (copied).
  void feed(const char* data, size_t len);
  // feed() + read() without the copy: the session reads records straight
  // out of `data` and keeps only what it has not taken when this returns
  // (a partial record, or anything after an error or close_notify).
  status receive(const char* data, size_t len, std::string& out);
  // Advances the handshake and appends all plaintext now available to `out`.
  // Server side: when the handshake completes as a resumption, which skips
  // certificate verification, the peer's certificates are verified again
  // against this session's context at the current time before any
  // plaintext is read; if they no longer verify (expired, revoked, no longer
  // chaining to the CA bundle) this returns status::error and error() says
  // "resumed session refused: <why>", as for a failed full handshake.
  status read(std::string& out);
  // Encrypts `plain` for the peer (see take_output).
  status write(std::string_view plain);
  // Queues a close_notify alert.
  void shutdown();

  bool has_output() const;
  // If all fed input has been read, frees the buffer that holds ciphertext
  // not yet read, which otherwise keeps the capacity of the largest burst.
  void release_input_buffer();
  // Moves the ciphertext waiting to be sent to the end of `out` (without a
  // copy when `out` is empty).
  void take_output(std::string& out);

  bool handshake_complete() const;
  bool resumed() const;
  // The verified peer certificate's names; empty if the peer sent none.
  identity peer_identity() const;
  // The certificate the peer presented, verified or not (a handshake that
  // failed verification still has it): for audit lines.
  certificate_summary presented_certificate() const;
  // The certificates the peer presented (references); empty if none.
  peer_chain peer_certificates() const;
  // Why the last call returned status::error.
  const std::string& error() const { return _error; }

 private:
  void init(bool server);
  status fail(int ret);
  // Server side: remembers the leaf a failed verification was about, which
  // OpenSSL does not keep once the handshake has failed.
  static int on_verify(int ok, x509_store_ctx_st* store);

  std::shared_ptr<const context> _ctx;
  ssl_st* _ssl = nullptr;
  bool _resumption_checked = false;
  // The session's own BIO pair, not memory BIOs: a memory BIO zero-fills
  // what it grows by, copies the ciphertext in and out again and (in
  // BoringSSL) moves the unread rest to the front on every read, which was
  // half of relay's instructions on a 1 MiB body (callgrind).
  static int on_bio_read(bio_st* b, char* out, int len);
  static int on_bio_write(bio_st* b, const char* in, int len);
  static long on_bio_ctrl(bio_st* b, int cmd, long num, void* ptr);
  size_t input_pending() const { return _in_saved.size() - _in_saved_off + _in_span_len; }

  bio_st* _in = nullptr;   // reads _in_saved, then _in_span; owned by _ssl
  bio_st* _out = nullptr;  // appends to _out_buf; owned by _ssl
  // Ciphertext from the peer: the caller's buffer during receive(), and
  // what was fed or left over, read from _in_saved_off on.
  const char* _in_span = nullptr;
  size_t _in_span_len = 0;
  std::string _in_saved;
  size_t _in_saved_off = 0;
  std::string _out_buf;  // ciphertext for the peer
  std::string _error;
  certificate_summary _refused_certificate;
};

// The TLS library's name and version, for logs.
std::string_view library_version();

}  // namespace relay::tls

namespace relay::tls {
// Cryptographically secure random bytes from the TLS library's generator.
void random_bytes(uint8_t* out, size_t n);
// SHA-256 of `data`, lowercase hex.
std::string sha256_hex(std::string_view data);
// Lowercase hex of `n` bytes.
std::string to_hex(const uint8_t* data, size_t n);
// The SHA-256 digest of `data` (API keys are stored and looked up by it).
void sha256(std::string_view data, uint8_t out[32]);
// Whether the n bytes at a and b are equal, in a time that depends on n
// only, never on where they differ (CRYPTO_memcmp).
bool equal_constant_time(const void* a, const void* b, size_t n);
}  // namespace relay::tls
