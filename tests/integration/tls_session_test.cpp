// tls::session without sockets: a client and a server session joined in
// memory, ciphertext handed across in chunks of every size, so that what
// the session keeps of a partial record between receive() calls (issue 13:
// its own BIOs read records straight from the caller's buffer) is checked
// byte for byte, large writes included. The PKI comes from pki.sh.
#include <doctest/doctest.h>

#include <random>
#include <string>

#include "relay/tls.h"
#include "../support/relay_fixture.h"

namespace {

using relay::tls::session;

struct pair {
  std::shared_ptr<const relay::tls::context> server_ctx, client_ctx;
  std::unique_ptr<session> server, client;
  std::string server_plain, client_plain;  // what each side has read
  std::mt19937_64 rng{13};
  size_t max_chunk = 1;
  bool use_feed = false;  // feed() + read() rather than receive()

  pair() {
    const std::string& dir = test::pki();
    relay::tls::server_options so;
    so.cert_file = dir + "/server.crt";
    so.key_file = dir + "/server.key";
    so.client_ca_file = dir + "/ca.crt";
    std::string error;
    server_ctx = relay::tls::context::make_server(so, error);
    REQUIRE_MESSAGE(server_ctx, error);
    relay::tls::client_options co;
    co.cert_file = dir + "/producer.crt";
    co.key_file = dir + "/producer.key";
    co.ca_file = dir + "/ca.crt";
    client_ctx = relay::tls::context::make_client(co, error);
    REQUIRE_MESSAGE(client_ctx, error);
    server = std::make_unique<session>(server_ctx);
    client = std::make_unique<session>(client_ctx, "localhost");
  }

  // Moves all pending ciphertext from `from` to `to`, in random chunks, each
  // from a buffer that is overwritten right after the call (as the stream's
  // shared read buffer is).
  void carry(session& from, session& to, std::string& plain) {
    std::string wire;
    from.take_output(wire);
    size_t at = 0;
    std::string scratch;
    while (at < wire.size()) {
      size_t n = std::min(wire.size() - at, 1 + static_cast<size_t>(rng() % max_chunk));
      scratch.assign(wire, at, n);
      session::status st;
      if (use_feed) {
        to.feed(scratch.data(), scratch.size());
        st = to.read(plain);
      } else {
        st = to.receive(scratch.data(), scratch.size(), plain);
      }
      REQUIRE_MESSAGE(st == session::status::ok, to.error());
      scratch.assign(scratch.size(), 'X');  // the caller's buffer is reused
      at += n;
    }
  }

  void handshake() {
    REQUIRE(client->start() == session::status::ok);
    for (int i = 0; i < 10 && !(client->handshake_complete() && server->handshake_complete()); ++i) {
      carry(*client, *server, server_plain);
      carry(*server, *client, client_plain);
    }
    REQUIRE(client->handshake_complete());
    REQUIRE(server->handshake_complete());
  }
};

std::string pattern(size_t n, uint64_t seed) {
  std::mt19937_64 r(seed);
  std::string s(n, '\0');
  for (auto& c : s) c = static_cast<char>('A' + r() % 58);
  return s;
}

}  // namespace

TEST_CASE("tls session: records split anywhere between receive() calls arrive whole and in order") {
  for (size_t max_chunk : {size_t{1}, size_t{7}, size_t{5000}, size_t{70000}, size_t{1} << 20}) {
    for (bool use_feed : {false, true}) {
      CAPTURE(max_chunk);
      CAPTURE(use_feed);
      pair p;
      p.max_chunk = max_chunk;
      p.use_feed = use_feed;
      p.handshake();
      // A large request and a large answer, with small ones around them (a
      // head before a body, as the server writes them).
      size_t big = max_chunk == 1 ? 100000 : (3u << 20) + 12345;
      std::string request = pattern(big, 1), head = "HTTP/1.1 200 OK\r\n\r\n", answer = pattern(big + 1, 2);
      REQUIRE(p.client->write(request) == session::status::ok);
      p.carry(*p.client, *p.server, p.server_plain);
      REQUIRE(p.server->write(head) == session::status::ok);
      REQUIRE(p.server->write(answer) == session::status::ok);
      REQUIRE(p.server->write("tail") == session::status::ok);
      p.carry(*p.server, *p.client, p.client_plain);
      CHECK_EQ(p.server_plain.size(), request.size());
      CHECK(p.server_plain == request);
      CHECK_EQ(p.client_plain.size(), head.size() + answer.size() + 4);
      CHECK(p.client_plain == head + answer + "tail");
    }
  }
}

TEST_CASE("tls session: a partial record survives release_input_buffer(), and close_notify ends the stream") {
  pair p;
  p.max_chunk = 1 << 20;
  p.handshake();
  std::string msg = pattern(40000, 3);
  REQUIRE(p.client->write(msg) == session::status::ok);
  std::string wire;
  p.client->take_output(wire);
  // Everything but the last 10 bytes: the last record is incomplete.
  REQUIRE(p.server->receive(wire.data(), wire.size() - 10, p.server_plain) == session::status::ok);
  CHECK(p.server_plain.size() < msg.size());
  p.server->release_input_buffer();  // must keep the partial record
  REQUIRE(p.server->receive(wire.data() + wire.size() - 10, 10, p.server_plain) == session::status::ok);
  CHECK(p.server_plain == msg);
  p.server->release_input_buffer();
  // close_notify: reported as closed, not as an error, even in a chunk that
  // carries data before it.
  REQUIRE(p.client->write("last") == session::status::ok);
  p.client->shutdown();
  wire.clear();
  p.client->take_output(wire);
  std::string plain;
  CHECK(p.server->receive(wire.data(), wire.size(), plain) == session::status::closed);
  CHECK_EQ(plain, "last");
}

TEST_CASE("tls session: garbage after the handshake is a TLS error, not data") {
  pair p;
  p.handshake();
  // An application-data record of the right version whose tag cannot verify.
  std::string junk = std::string("\x17\x03\x03\x00\x20", 5) + std::string(32, 'j');
  std::string plain;
  CHECK(p.server->receive(junk.data(), junk.size(), plain) == session::status::error);
  CHECK(plain.empty());
  CHECK_FALSE(p.server->error().empty());
}
