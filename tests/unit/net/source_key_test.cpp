// The per-source connection cap counts by source_key(): a peer must not
// escape it by using many addresses of one IPv6 /64, or by connecting to a
// dual-stack socket as an IPv4-mapped address.
#include <doctest/doctest.h>

#include "relay/server.h"

using relay::net::source_key;

TEST_CASE("source_key counts an IPv4 address as itself") {
  CHECK_EQ(source_key("127.0.0.1"), "127.0.0.1");
  CHECK_EQ(source_key("10.1.2.3"), "10.1.2.3");
  CHECK_NE(source_key("10.1.2.3"), source_key("10.1.2.4"));
}

TEST_CASE("source_key counts every address of one IPv6 /64 as one source") {
  CHECK_EQ(source_key("2001:db8:1:2::1"), "2001:db8:1:2::/64");
  CHECK_EQ(source_key("2001:db8:1:2:ffff:ffff:ffff:ffff"), "2001:db8:1:2::/64");
  CHECK_EQ(source_key("2001:db8:1:2:dead:beef:0:1"), source_key("2001:db8:1:2::2"));
  CHECK_NE(source_key("2001:db8:1:2::1"), source_key("2001:db8:1:3::1"));
  CHECK_EQ(source_key("::1"), "::/64");
}

TEST_CASE("source_key counts an IPv4-mapped IPv6 address as the IPv4 address") {
  CHECK_EQ(source_key("::ffff:192.0.2.7"), "192.0.2.7");
  CHECK_EQ(source_key("::ffff:192.0.2.7"), source_key("192.0.2.7"));
}

TEST_CASE("source_key leaves what is not an address unchanged") {
  CHECK_EQ(source_key(""), "");
  CHECK_EQ(source_key("?"), "?");
  CHECK_EQ(source_key("2001:db8::1%eth0"), "2001:db8::1%eth0");
}
