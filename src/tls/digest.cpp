// Digests and comparisons for secrets that are not TLS's own (API keys).
// Both libraries declare these in the same headers with the same meaning.
#include <openssl/crypto.h>
#include <openssl/sha.h>

#include "relay/tls.h"

namespace relay::tls {

void sha256(std::string_view data, uint8_t out[32]) {
  SHA256(reinterpret_cast<const uint8_t*>(data.data()), data.size(), out);
}

std::string sha256_hex(std::string_view data) {
  uint8_t md[32];
  sha256(data, md);
  return to_hex(md, sizeof md);
}

std::string to_hex(const uint8_t* data, size_t n) {
  static constexpr char digit[] = "0123456789abcdef";
  std::string out(2 * n, '0');
  for (size_t i = 0; i < n; ++i) {
    out[2 * i] = digit[data[i] >> 4];
    out[2 * i + 1] = digit[data[i] & 15];
  }
  return out;
}

bool equal_constant_time(const void* a, const void* b, size_t n) { return CRYPTO_memcmp(a, b, n) == 0; }

}  // namespace relay::tls
