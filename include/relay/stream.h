// One transport for every connection relay, bunny, relayctl and the bench
// open or accept: a libuv TCP handle, optionally a tls::session over memory
// buffers, plaintext in and out, a bounded view of what is not yet on the
// wire, one timer for its owner, and the close sequence (close_notify, FIN,
// a lingering read that discards input, then close).
//
// The owner (server_conn, client_conn) talks to the stream through a
// stream_handler. Contracts:
// - Every handler callback runs from a libuv callback of this stream (a
//   read, a write completion, its timer, a close), never from inside a
//   call the owner made on the stream. So the owner may call any stream
//   method from a callback, and no stream method calls back into the owner.
// - on_closed() is the last callback; the stream is freed right after it
//   returns. An owner that goes away first calls detach() and then close().
// - Nothing is written to the socket from write(): bytes wait in the stream
//   until flush(), so that a burst of pipelined answers becomes one TLS
//   record run and one system call.
#pragma once

#include <uv.h>

#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <string_view>

#include "relay/tls.h"

namespace relay::net {

// Why a stream stopped carrying data.
enum class stream_end : uint8_t {
  eof,           // the peer closed its side (FIN) or sent TLS close_notify
  reset,         // a read or write error (ECONNRESET, EPIPE...)
  tls_error,     // the TLS layer refused the peer (handshake or record)
  connect_failed,
};

class stream;

class stream_handler {
 public:
  virtual ~stream_handler() = default;
  // TCP is connected (client) or accepted (server) and, with TLS, the
  // handshake is complete and verified. Runs once.
  virtual void on_secure(stream& s) = 0;
  // Plaintext arrived; it was appended to s.input().
  virtual void on_input(stream& s) = 0;
  // Everything handed to flush() so far has been written to the socket.
  virtual void on_drained(stream& s) { (void)s; }
  // The timer armed with arm_timer() fired.
  virtual void on_timeout(stream& s) { (void)s; }
  // The stream can carry no more data: `detail` says why. The stream is
  // already closing (with TLS, an alert the library produced is still
  // sent); only on_closed() follows.
  virtual void on_end(stream& s, stream_end why, std::string_view detail) = 0;
  // Both libuv handles are closed; the stream is freed after this returns.
  virtual void on_closed(stream& s) { (void)s; }
};

struct linger_options {
  uint32_t total_ms = 30000;    // at most this long discarding the peer's input
  uint32_t between_ms = 5000;   // and at most this long between two of its reads
};

class stream {
 public:
  // Accepts a pending connection of `server`. With `tls` the stream runs
  // the server side of a TLS handshake first. Returns null (and nothing is
  // allocated) when accept fails.
  static stream* accept(uv_stream_t* server, stream_handler& h, std::shared_ptr<const tls::context> tls);
  // Connects to `addr`; `server_name` is verified in the server certificate
  // (TLS only). On an immediate failure returns null with `error` set; a
  // later failure is on_end(connect_failed).
  static stream* connect(uv_loop_t* loop, const sockaddr* addr, stream_handler& h,
                         std::shared_ptr<const tls::context> tls, std::string_view server_name,
                         std::string& error);

  stream(const stream&) = delete;
  stream& operator=(const stream&) = delete;

  // Received plaintext not yet consumed by the owner. The owner erases what
  // it used; the stream only appends.
  std::string& input() { return _input; }
  // Reading stops while false (backpressure); the peer's data waits in the
  // kernel. EOF and resets are seen only while reading.
  void set_reading(bool on);

  // Queues plaintext for the peer (see flush()). With TLS, a large piece
  // (an answer's body) is encrypted now, straight from `plain`, behind what
  // was queued before it, rather than copied into the queue; it still goes
  // to the socket only on flush().
  void write(std::string_view plain);
  // The same for a piece the stream takes over: with TLS a large one is
  // not encrypted at once but a chunk at a time as the socket takes the
  // previous chunk, so an answer of any size holds at most about one chunk
  // of ciphertext (and no copy of its plaintext). `keep` (may be null) is
  // released once the piece is wholly encrypted or the stream ends: what
  // was reserved for the answer (the blob store's read bound) is held
  // exactly as long as its bytes are.
  void write_owned(std::string&& plain, std::shared_ptr<void> keep = {});
  // The same queue, for serialising an answer straight into it (no copy).
  // Appending after finish() or close() has no effect on the wire.
  std::string& write_buffer() { return _plain_out; }
  // Encrypts what write() queued and hands it to the socket. A write that
  // fails ends the stream (on_end(reset) from the loop).
  void flush();
  // Bytes the peer can make this stream hold: plaintext queued, ciphertext
  // not yet handed to the socket, and bytes handed to it and not yet
  // written. What a connection's output bound compares against.
  size_t pending_output() const { return _plain_out.size() + _pieces_bytes + _out.size() + _in_flight; }

  // No more output: after what is queued, TLS close_notify, then FIN, then
  // read and discard the peer's input until its EOF or `linger` runs out,
  // then close. Reading and handler input callbacks stop; on_closed()
  // follows (on_end() does not). The TLS session and the input buffer are
  // freed once the last bytes are taken: a lingering connection holds only
  // its unsent output.
  void finish(const linger_options& linger);
  // Closes now; queued output is dropped. on_closed() follows from the loop.
  void close();
  // The owner is gone: no handler callback runs from now on.
  void detach() { _handler = nullptr; }
  // Hands the stream to its owner (the listener accepts before it knows
  // whether a connection is admitted).
  void set_handler(stream_handler& h) { _handler = &h; }

  // One timer for the owner (handshake, header, body, idle deadlines).
  // 0 stops it. Not available after finish().
  void arm_timer(uint32_t ms);

  // Gives back the TLS input buffer, which otherwise keeps the size of the
  // largest burst it was fed (for an idle connection; the handler releases
  // input() itself).
  void release_tls_input_buffer();

  bool is_tls() const { return _is_tls; }
  // The peer ended its TLS stream with close_notify (on_end(eof) follows).
  // A TLS EOF without it may be a truncation by whoever sits on the path,
  // which matters to a body delimited by the end of the stream.
  bool peer_sent_close_notify() const { return _close_notify; }
  bool secure() const { return _secure; }
  bool closing() const { return _closing; }
  // Null after finish().
  const tls::session* tls() const { return _tls.get(); }
  // The verified peer certificate's names (TLS, once secure).
  const tls::identity& peer() const { return _peer; }
  // The certificates the peer presented (TLS, once secure), kept for the
  // stream's whole life -- also after finish() frees the TLS session -- so
  // that the connection can be verified again after a reload.
  const tls::peer_chain& peer_certificates() const { return _peer_chain; }
  // "IP:port" of the peer, and the IP alone.
  const std::string& remote_address() const { return _remote; }
  std::string_view remote_ip() const;
  uv_loop_t* loop() const { return _tcp.loop; }

 private:
  stream(uv_loop_t* loop, stream_handler& h);
  ~stream() = default;

  void start_reading();
  void received(const char* data, size_t len);
  void became_secure();
  void end(stream_end why, std::string_view detail);
  void send_bytes();
  void encrypt_pieces();
  void pump();
  void maybe_finish_write_side();
  void note_remote();

  static void on_alloc(uv_handle_t* h, size_t suggested, uv_buf_t* buf);
  static void on_read(uv_stream_t* s, ssize_t nread, const uv_buf_t* buf);
  static void on_connect(uv_connect_t* req, int status);
  static void on_write_done(uv_write_t* req, int status);
  static void on_shutdown(uv_shutdown_t* req, int status);
  static void on_timer(uv_timer_t* t);
  static void on_handle_closed(uv_handle_t* h);

  stream_handler* _handler;
  uv_tcp_t _tcp{};
  uv_timer_t _timer{};
  uv_connect_t _connect{};
  uv_shutdown_t _shutdown{};
  std::unique_ptr<tls::session> _tls;
  tls::identity _peer;
  tls::peer_chain _peer_chain;
  std::string _remote;
  std::string _input;
  // Output order: bytes in flight, _out, _pieces front to back, _plain_out.
  struct piece {
    std::string data;
    size_t offset = 0;  // data[0, offset) is encrypted
    std::shared_ptr<void> keep;
  };
  std::deque<piece> _pieces;  // large plaintext taken over, encrypted as _out drains
  size_t _pieces_bytes = 0;   // not yet encrypted
  std::string _plain_out;  // written, not yet encrypted/sent
  std::string _out;        // bytes for the socket
  size_t _in_flight = 0;   // handed to uv_write, not yet done
  int _open_handles = 0;
  int _pending_reqs = 0;   // connect/shutdown requests that pin the object
  linger_options _linger;
  uint64_t _linger_deadline = 0;
  bool _reading_wanted = true;
  bool _reading = false;
  bool _secure = false;
  bool _is_tls = false;
  bool _finishing = false;  // finish() called: output ends, then linger
  bool _shut = false;       // FIN sent
  bool _lingering = false;
  bool _ended = false;      // on_end() delivered or finish() taken over
  bool _close_notify = false;
  bool _closing = false;
};

}  // namespace relay::net
