// The blob store: payloads and results too large to hold in memory, kept
// in files beside the journal, <journal.dir>/blobs/<16 hex>.
//
// A file is written once, by the upload that spooled it (http::body_spool:
// every large value of one request body, back to back), and never changed.
// Jobs name a range of it (queue::blob_ref: file, offset, length, CRC32C);
// so do the journal's records (format version 3). Its life:
//   - made durable by the journal writer, in `always` mode, before the
//     batch holding the first record that names it (journal::writer);
//   - read back on the libuv threadpool, CRC checked, whenever an answer
//     shows a value it holds (fill(); the loop never blocks on it);
//   - deleted, asynchronously, once no held job names it (release(), from
//     queue::broker::on_blob_unreferenced), but never while a read has it
//     pinned;
//   - at start, after replay: references of held jobs are checked
//     (check()), and files no held job names are deleted before serving
//     (sweep()): uploads cut off by a crash, jobs forgotten while down.
//
// Memory: bytes read back and not yet answered are bounded
// (max_reading_bytes). A fill that does not fit waits, FIFO, for earlier
// ones to be answered; one is always allowed, however large, so a single
// value larger than the bound is still served.
//
// Every method runs on the loop thread.
#pragma once

#include <uv.h>

#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "relay/metrics.h"
#include "relay/queue.h"

namespace relay::journal {

// An answer with holes: `text` is the answer without the referenced
// values; each hole inserts a value's bytes at a position of `text`
// (positions in ascending order, several may share one).
struct answer_template {
  std::string text;
  std::vector<std::pair<size_t, queue::blob_ref>> holes;
  bool complete() const { return holes.empty(); }
  // Appends a hole for `r` at the current end of `text`.
  void hole(const queue::blob_ref& r) { holes.emplace_back(text.size(), r); }
  // The size of the answer once filled.
  size_t size() const {
    size_t n = text.size();
    for (const auto& h : holes) n += h.second.length;
    return n;
  }
};

struct blob_store_state;

class blob_store {
 public:
  // A share of the bound on bytes read and not yet answered; gives it back
  // when destroyed (move only). Held by an answer until it is handed to its
  // connection, or dropped.
  class reservation {
   public:
    reservation() = default;
    reservation(const reservation&) = delete;
    reservation& operator=(const reservation&) = delete;
    reservation(reservation&& o) noexcept : _store(std::exchange(o._store, {})), _bytes(o._bytes) {}
    reservation& operator=(reservation&& o) noexcept {
      std::swap(_store, o._store);
      std::swap(_bytes, o._bytes);
      return *this;
    }
    ~reservation();

   private:
    friend struct blob_store_state;
    std::weak_ptr<blob_store_state> _store;
    size_t _bytes = 0;
  };

  // `error` empty: `body` is the filled answer, every value's checksum
  // held. Otherwise it names the file and the problem, and body is empty.
  using fill_done = std::function<void(std::string body, std::string error, reservation held)>;

  blob_store(uv_loop_t* loop, std::string dir, size_t max_reading_bytes, ops::registry& metrics);
  blob_store(const blob_store&) = delete;
  blob_store& operator=(const blob_store&) = delete;
  ~blob_store();

  const std::string& dir() const;
  static std::string name(uint64_t file);
  std::string path(uint64_t file) const { return dir() + "/" + name(file); }

  // Start-up, before serving (these block: the loop is not serving yet).
  // Why `r` cannot be read (empty if it can): its file is missing or
  // shorter than the range.
  std::string check(const queue::blob_ref& r) const;
  // Deletes every file named like a blob that `referenced` says no held
  // job names. Returns how many were deleted.
  size_t sweep(const std::function<bool(uint64_t file)>& referenced);

  // Fills `t`'s holes from the blob files on the threadpool, checking each
  // value's CRC32C, then calls `done` from the loop -- never inside fill().
  // The files are pinned (not deleted) from this call until the read ends.
  void fill(answer_template t, fill_done done);
  // Nothing held names `file` any more: deletes it (asynchronously), or
  // once the last read that pins it ends. After close(), nothing (the next
  // start's sweep deletes it).
  void release(uint64_t file);
  // Stops: fills not yet done never call back.
  void close();

  size_t reading_bytes() const;
  size_t waiting() const;

 private:
  std::shared_ptr<blob_store_state> _s;
};

}  // namespace relay::journal
