// The project's HTTP client (http::client_conn) on a private loop, one
// request at a time, for the few tests that need the HTTP layer under the
// typed v1 client (relay/v1_client.h, which every other test uses):
//   - the client side of TLS itself (mtls_test: a handshake refused, relay's
//     name checked, the server identity client_conn saw);
//   - a different Authorization header (or two, or none) on each request of
//     one keep-alive connection, and the WWW-Authenticate header of a 401,
//     which relay::v1::error does not carry (api_key_test).
#pragma once

#include <doctest/doctest.h>
#include <uv.h>

#include <string>

#include "relay/http_client.h"
#include "relay_fixture.h"

namespace test {

class raw_client {
 public:
  raw_client(uint16_t port, const std::string& who, const std::string& server_name = "localhost") {
    uv_loop_init(&_loop);
    relay::http::client_conn::options o;
    o.host = "127.0.0.1";
    o.port = port;
    o.server_name = server_name;
    o.tls = client_tls(who);
    _conn = relay::http::client_conn::create(&_loop, o);
  }
  raw_client(const raw_client&) = delete;
  raw_client& operator=(const raw_client&) = delete;
  ~raw_client() {
    _conn->close();
    uv_run(&_loop, UV_RUN_DEFAULT);
    CHECK_EQ(uv_loop_close(&_loop), 0);
  }

  struct result {
    relay::http::client_error error;
    relay::http::client_response response;
  };
  // `headers`: whole lines ending in CRLF (an Authorization header).
  result call(const std::string& method, const std::string& path, const std::string& body = {},
              const std::string& headers = {}) {
    result r;
    bool done = false;
    _conn->request(method, path, body,
                   [&](const relay::http::client_error& e, relay::http::client_response& resp) {
                     r.error = e;
                     r.response = std::move(resp);
                     done = true;
                   },
                   10000, headers);
    while (!done) uv_run(&_loop, UV_RUN_ONCE);
    return r;
  }

  relay::http::client_conn& conn() { return *_conn; }

 private:
  uv_loop_t _loop;
  relay::http::client_conn* _conn;
};

}  // namespace test
