// Digests and comparisons for secrets that are not TLS's own (API keys).
// Both libraries declare these in the same headers with the same meaning.
#include <openssl/crypto.h>
#include <openssl/sha.h>

#include "relay/tls.h"

namespace relay::tls {

void sha256(std::string_view data, uint8_t out[32]) {
  SHA256(reinterpret_cast<const uint8_t*>(data.data()), data.size(), out);
}

bool equal_constant_time(const void* a, const void* b, size_t n) { return CRYPTO_memcmp(a, b, n) == 0; }

}  // namespace relay::tls
