#include <bit>
#include <cstring>

#include "relay/journal.h"

namespace relay::journal {
namespace {

// CRC32C (Castagnoli), reflected polynomial 0x82F63B78.
struct crc_table {
  uint32_t t[256];
  constexpr crc_table() : t() {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1u)));
      t[i] = c;
    }
  }
};
constexpr crc_table table;

uint32_t crc_soft(const uint8_t* p, size_t n, uint32_t crc) {
  for (size_t i = 0; i < n; ++i) crc = table.t[(crc ^ p[i]) & 0xff] ^ (crc >> 8);
  return crc;
}

#if defined(__x86_64__)
__attribute__((target("sse4.2"))) uint32_t crc_hw(const uint8_t* p, size_t n, uint32_t crc) {
  uint64_t c = crc;
  while (n >= 8) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    c = __builtin_ia32_crc32di(c, v);
    p += 8;
    n -= 8;
  }
  uint32_t c32 = static_cast<uint32_t>(c);
  while (n--) c32 = __builtin_ia32_crc32qi(c32, *p++);
  return c32;
}
const bool have_sse42 = __builtin_cpu_supports("sse4.2");
#endif

// Little-endian writes into a buffer sized up front (one resize per record).
struct writer_cursor {
  char* p;
  template <class T>
  void put(T v) {
    for (size_t i = 0; i < sizeof(T); ++i) *p++ = static_cast<char>(static_cast<uint64_t>(v) >> (8 * i));
  }
  void put_bytes(std::string_view s) {
    put(static_cast<uint32_t>(s.size()));
    if (s.empty()) return;  // an empty view may hold a null pointer; memcpy must not see it
    std::memcpy(p, s.data(), s.size());
    p += s.size();
  }
};

// Bounds-checked little-endian reader over a record body.
struct reader {
  std::string_view in;
  size_t pos = 0;
  bool ok = true;
  uint64_t get(int bytes) {
    if (pos + static_cast<size_t>(bytes) > in.size()) {
      ok = false;
      return 0;
    }
    uint64_t v = 0;
    for (int i = 0; i < bytes; ++i) v |= static_cast<uint64_t>(static_cast<uint8_t>(in[pos + static_cast<size_t>(i)])) << (8 * i);
    pos += static_cast<size_t>(bytes);
    return v;
  }
  std::string_view bytes() {
    auto n = static_cast<size_t>(get(4));
    if (!ok || pos + n > in.size()) {
      ok = false;
      return {};
    }
    std::string_view s = in.substr(pos, n);
    pos += n;
    return s;
  }
};

}  // namespace

uint32_t crc32c(const void* data, size_t n, uint32_t crc) {
  auto* p = static_cast<const uint8_t*>(data);
  crc = ~crc;
#if defined(__x86_64__)
  crc = have_sse42 ? crc_hw(p, n, crc) : crc_soft(p, n, crc);
#else
  crc = crc_soft(p, n, crc);
#endif
  return ~crc;
}

namespace {
constexpr size_t ref_bytes = 8 + 8 + 8 + 4;
constexpr uint8_t has_payload_ref = 1, has_text_ref = 2;
}  // namespace

void encode(const queue::record& r, std::string& out) {
  constexpr size_t fixed = 1 + 8 + 8 + 8 + 8 + 1 + 1 + 2 + 2 + 4 + 16 + 5 * 4;
  // Version 3's references follow the version 2 body only when there are
  // any: a record without them is byte for byte what version 2 wrote, so
  // small jobs pay nothing for the format change.
  uint8_t refs = static_cast<uint8_t>((r.payload_ref.valid() ? has_payload_ref : 0) | (r.text_ref.valid() ? has_text_ref : 0));
  size_t len = fixed + r.queue.size() + r.owner.size() + r.idempotency_key.size() + r.payload.size() + r.text.size() +
               (refs ? 1 + ref_bytes * static_cast<size_t>(std::popcount(refs)) : 0);
  size_t start = out.size();
  out.resize(start + record_header_bytes + len);
  writer_cursor w{out.data() + start + record_header_bytes};
  w.put(static_cast<uint8_t>(r.type));
  w.put(r.id);
  w.put(static_cast<uint64_t>(r.at));
  w.put(static_cast<uint64_t>(r.due));
  w.put(static_cast<uint64_t>(r.created));
  w.put(r.priority);
  w.put(static_cast<uint8_t>(r.state));
  w.put(r.max_attempts);
  w.put(r.attempts);
  w.put(r.lease_ms);
  std::memcpy(w.p, r.lease.bytes.data(), r.lease.bytes.size());
  w.p += r.lease.bytes.size();
  w.put_bytes(r.queue);
  w.put_bytes(r.owner);
  w.put_bytes(r.idempotency_key);
  w.put_bytes(r.payload);
  w.put_bytes(r.text);
  if (refs) {
    w.put(refs);
    for (const queue::blob_ref* ref : {&r.payload_ref, &r.text_ref}) {
      if (!ref->valid()) continue;
      w.put(ref->file);
      w.put(ref->offset);
      w.put(ref->length);
      w.put(ref->crc32c);
    }
  }
  uint32_t crc = crc32c(out.data() + start + record_header_bytes, len);
  writer_cursor h{out.data() + start};
  h.put(static_cast<uint32_t>(len));
  h.put(crc);
  // The header checksum: over the length and the body checksum.
  h.put(crc32c(out.data() + start, 8));
}

std::string_view invalid_reason(const queue::record& r) {
  if (r.type == queue::record_type::meta) {
    if (r.id == 0 || r.id > queue::max_job_id + 1) return "an id counter outside 1..2^63";
    return {};
  }
  if (r.id == 0 || r.id > queue::max_job_id) return "a job id outside 1..2^63-1";
  // A value longer than any body relay takes was never spooled; read back,
  // it would make relay allocate that length (a sparse file passes the
  // start-up size check).
  if (r.payload_ref.length > max_referenced_bytes || r.text_ref.length > max_referenced_bytes)
    return "a blob reference longer than any request body relay takes (256 MiB)";
  return {};
}

bool decode(std::string_view body, queue::record& r, uint32_t version) {
  reader in{body};
  auto type = static_cast<uint8_t>(in.get(1));
  if (type < static_cast<uint8_t>(queue::record_type::submit) || type > static_cast<uint8_t>(queue::record_type::meta))
    return false;
  r.type = static_cast<queue::record_type>(type);
  r.id = in.get(8);
  r.at = static_cast<queue::time_ms>(in.get(8));
  r.due = static_cast<queue::time_ms>(in.get(8));
  r.created = static_cast<queue::time_ms>(in.get(8));
  r.priority = static_cast<uint8_t>(in.get(1));
  r.state = static_cast<queue::job_state>(in.get(1));
  r.max_attempts = static_cast<uint16_t>(in.get(2));
  r.attempts = static_cast<uint16_t>(in.get(2));
  r.lease_ms = static_cast<uint32_t>(in.get(4));
  for (auto& b : r.lease.bytes) b = static_cast<uint8_t>(in.get(1));
  r.queue = in.bytes();
  r.owner = in.bytes();
  r.idempotency_key = in.bytes();
  r.payload = in.bytes();
  r.text = in.bytes();
  r.payload_ref = {};
  r.text_ref = {};
  if (in.ok && version >= 3 && in.pos < body.size()) {
    auto refs = static_cast<uint8_t>(in.get(1));
    // Only the bits the writer sets, never none (it writes no byte then),
    // and only on the records that can carry each.
    if (refs == 0 || (refs & ~(has_payload_ref | has_text_ref))) return false;
    bool snapshot = r.type == queue::record_type::snapshot;
    if ((refs & has_payload_ref) && (!r.payload.empty() || !(snapshot || r.type == queue::record_type::submit)))
      return false;
    if ((refs & has_text_ref) && (!r.text.empty() || !(snapshot || r.type == queue::record_type::complete)))
      return false;
    for (queue::blob_ref* ref : {&r.payload_ref, &r.text_ref}) {
      if (!(refs & (ref == &r.payload_ref ? has_payload_ref : has_text_ref))) continue;
      ref->file = in.get(8);
      ref->offset = in.get(8);
      ref->length = in.get(8);
      ref->crc32c = static_cast<uint32_t>(in.get(4));
      // A value has at least one byte, and its range must not wrap.
      if (ref->length == 0 || ref->offset + ref->length < ref->offset) return false;
    }
  }
  return in.ok && in.pos == body.size();
}

}  // namespace relay::journal

namespace relay::journal {

bool for_each_record(std::string_view framed, const std::function<bool(const queue::record&)>& apply,
                     record_run& run, std::string& problem) {
  auto le32 = [](const char* p) {
    uint32_t v = 0;
    for (int i = 0; i < 4; ++i) v |= static_cast<uint32_t>(static_cast<uint8_t>(p[i])) << (8 * i);
    return v;
  };
  size_t pos = 0;
  while (pos < framed.size()) {
    const char* p = framed.data() + pos;
    size_t left = framed.size() - pos;
    auto bad = [&](std::string what) {
      problem = std::move(what) + " at offset " + std::to_string(pos);
      return false;
    };
    if (left < record_header_bytes) return bad("a record header cut short");
    if (crc32c(p, 8) != le32(p + 8)) return bad("a record header whose checksum does not match");
    uint32_t len = le32(p);
    if (record_header_bytes + len > left) return bad("a record that runs past the end of its batch");
    std::string_view body(p + record_header_bytes, len);
    if (crc32c(body.data(), body.size()) != le32(p + 4)) return bad("a record whose checksum does not match");
    queue::record r;
    if (!decode(body, r)) return bad("a record whose checksum holds but which does not decode");
    if (std::string_view why = invalid_reason(r); !why.empty()) return bad("a record with " + std::string(why));
    ++run.records;
    if (!apply(r)) ++run.skipped;
    pos += record_header_bytes + len;
  }
  return true;
}

}  // namespace relay::journal
