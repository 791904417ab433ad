#include "relay/blob_store.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cassert>
#include <cerrno>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <unordered_set>

#include "relay/journal.h"
#include "relay/log.h"

namespace relay::journal {

struct blob_store_state {
  uv_loop_t* loop = nullptr;
  std::string dir;
  size_t max_reading = 0;
  size_t reading = 0;  // bytes of fills started and not yet answered
  bool closed = false;
  // Reads in flight per file; a file released meanwhile is deleted after.
  std::unordered_map<uint64_t, uint32_t> pins;
  std::unordered_set<uint64_t> doomed;
  std::deque<std::unique_ptr<struct fill_op>> waiting;
  ops::counter* reads = nullptr;
  ops::counter* read_errors = nullptr;
  ops::counter* read_bytes = nullptr;
  ops::counter* deleted = nullptr;
  ops::gauge* reading_gauge = nullptr;

  void admit();
  void unlink(uint64_t file);
  void unpin(uint64_t file);
};

struct fill_op {
  uv_work_t req{};
  std::shared_ptr<blob_store_state> s;
  answer_template t;
  blob_store::fill_done done;
  size_t bytes = 0;
  blob_store::reservation held;
  std::string body, error;
};

namespace {

// Reads exactly `n` bytes at `off`; false with `error` set otherwise.
bool read_range(int fd, const std::string& path, char* out, uint64_t off, uint64_t n, std::string& error) {
  uint64_t done = 0;
  while (done < n) {
    ssize_t r = ::pread(fd, out + done, n - done, static_cast<off_t>(off + done));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) {
      error = "reading " + path + ": " + std::strerror(errno);
      return false;
    }
    if (r == 0) {
      error = path + " is shorter than a value it holds (" + std::to_string(n) + " bytes at offset " +
              std::to_string(off) + ")";
      return false;
    }
    done += static_cast<uint64_t>(r);
  }
  return true;
}

// On the threadpool: the answer, built once at its final size; each value
// is read straight into its place and checked there (no second copy).
void fill_work(uv_work_t* req) {
  auto* op = static_cast<fill_op*>(req->data);
  const answer_template& t = op->t;
  std::string& body = op->body;
  body.resize(t.size());
  std::unordered_map<uint64_t, int> fds;
  size_t from = 0, at = 0;
  for (const auto& [pos, ref] : t.holes) {
    std::memcpy(body.data() + at, t.text.data() + from, pos - from);
    at += pos - from;
    from = pos;
    std::string path = op->s->dir + "/" + blob_store::name(ref.file);
    auto it = fds.find(ref.file);
    if (it == fds.end()) {
      int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
      if (fd < 0) {
        op->error = "opening " + path + ": " + std::strerror(errno);
        break;
      }
      it = fds.emplace(ref.file, fd).first;
    }
    if (!read_range(it->second, path, body.data() + at, ref.offset, ref.length, op->error)) break;
    // Never answer with bytes other than those stored: a flipped bit on
    // disk becomes an error answer, not a wrong payload.
    if (crc32c(body.data() + at, ref.length) != ref.crc32c) {
      op->error = path + " is corrupt: the " + std::to_string(ref.length) + " bytes at offset " +
                  std::to_string(ref.offset) + " do not match their checksum";
      break;
    }
    at += ref.length;
  }
  for (auto& [file, fd] : fds) ::close(fd);
  if (!op->error.empty()) {
    body.clear();
    body.shrink_to_fit();
    return;
  }
  std::memcpy(body.data() + at, t.text.data() + from, t.text.size() - from);
  assert(at + t.text.size() - from == body.size());
}

void fill_after(uv_work_t* req, int status) {
  std::unique_ptr<fill_op> op(static_cast<fill_op*>(req->data));
  auto s = op->s;
  for (const auto& h : op->t.holes) s->unpin(h.second.file);
  if (status != 0 && op->error.empty()) op->error = std::string("the read was cancelled: ") + uv_strerror(status);
  s->reads->inc();
  if (!op->error.empty()) {
    s->read_errors->inc();
    log::error("blob_read_failed").str("error", op->error);
  } else {
    s->read_bytes->inc(op->bytes);
  }
  if (s->closed) return;  // the reservation goes with op
  op->t = {};  // the template's text is not needed any more
  op->done(std::move(op->body), std::move(op->error), std::move(op->held));
}

}  // namespace

void blob_store_state::admit() {
  // FIFO: only the front may start, so a large fill is never passed over
  // for ever by small ones behind it. One is always allowed.
  while (!waiting.empty() && !closed) {
    fill_op& op = *waiting.front();
    if (reading != 0 && reading + op.bytes > max_reading) return;
    reading += op.bytes;
    reading_gauge->set(static_cast<int64_t>(reading));
    std::unique_ptr<fill_op> p = std::move(waiting.front());
    waiting.pop_front();
    p->held._store = p->s;
    p->held._bytes = p->bytes;
    p->req.data = p.get();
    [[maybe_unused]] int rc = uv_queue_work(loop, &p->req, fill_work, fill_after);
    assert(rc == 0 && "uv_queue_work fails only on bad arguments");
    p.release();  // freed by fill_after
  }
}

void blob_store_state::unpin(uint64_t file) {
  auto it = pins.find(file);
  if (it == pins.end() || --it->second > 0) return;
  pins.erase(it);
  if (doomed.erase(file)) unlink(file);
}

void blob_store_state::unlink(uint64_t file) {
  std::string p = dir + "/" + blob_store::name(file);
  auto* req = new uv_fs_t;
  req->data = deleted;
  int rc = uv_fs_unlink(loop, req, p.c_str(), [](uv_fs_t* r) {
    if (r->result == 0) static_cast<ops::counter*>(r->data)->inc();
    else log::warn("blob_delete_failed").str("path", r->path ? r->path : "").str("error", uv_strerror(static_cast<int>(r->result)));
    uv_fs_req_cleanup(r);
    delete r;
  });
  if (rc != 0) {
    log::warn("blob_delete_failed").str("path", p).str("error", uv_strerror(rc));
    delete req;
  }
}

blob_store::reservation::~reservation() {
  if (_bytes == 0) return;
  if (auto s = _store.lock()) {
    s->reading -= _bytes;
    s->reading_gauge->set(static_cast<int64_t>(s->reading));
    s->admit();
  }
}

blob_store::blob_store(uv_loop_t* loop, std::string dir, size_t max_reading_bytes, ops::registry& metrics)
    : _s(std::make_shared<blob_store_state>()) {
  _s->loop = loop;
  _s->dir = std::move(dir);
  _s->max_reading = max_reading_bytes;
  _s->reads = &metrics.get_counter("relay_blob_reads_total", "Answers filled from blob files.");
  _s->read_errors = &metrics.get_counter("relay_blob_read_errors_total",
                                         "Blob reads that failed: a missing or short file, an I/O error, a checksum mismatch.");
  _s->read_bytes = &metrics.get_counter("relay_blob_read_bytes_total", "Bytes of answers filled from blob files.");
  _s->deleted = &metrics.get_counter("relay_blob_files_deleted_total", "Blob files deleted once nothing held them.");
  _s->reading_gauge = &metrics.get_gauge("relay_blob_reading_bytes", "Bytes read back from blob files and not yet answered.");
}

blob_store::~blob_store() { close(); }

const std::string& blob_store::dir() const { return _s->dir; }

std::string blob_store::name(uint64_t file) {
  char name[17];
  std::snprintf(name, sizeof name, "%016" PRIx64, file);
  return name;
}

std::string blob_store::check(const queue::blob_ref& r) const {
  std::string p = path(r.file);
  struct stat st;
  if (::stat(p.c_str(), &st) != 0) return p + ": " + std::strerror(errno);
  if (!S_ISREG(st.st_mode)) return p + " is not a regular file";
  if (static_cast<uint64_t>(st.st_size) < r.offset + r.length)
    return p + " holds " + std::to_string(st.st_size) + " bytes; a job's value ends at " +
           std::to_string(r.offset + r.length);
  return {};
}

size_t blob_store::sweep(const std::function<bool(uint64_t)>& referenced) {
  size_t n = 0;
  DIR* d = ::opendir(_s->dir.c_str());
  if (!d) return 0;
  while (dirent* e = ::readdir(d)) {
    // Exactly what name() writes: 16 lowercase hex digits. Anything else
    // in the directory is not ours to delete.
    std::string_view nm(e->d_name);
    if (nm.size() != 16) continue;
    uint64_t file = 0;
    bool hex = true;
    for (char c : nm) {
      int v = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
      if (v < 0) {
        hex = false;
        break;
      }
      file = file << 4 | static_cast<uint64_t>(v);
    }
    if (!hex || referenced(file)) continue;
    std::string p = _s->dir + "/" + std::string(nm);
    if (::unlink(p.c_str()) == 0) {
      ++n;
      _s->deleted->inc();
    } else {
      log::warn("blob_delete_failed").str("path", p).str("error", std::strerror(errno));
    }
  }
  ::closedir(d);
  return n;
}

void blob_store::fill(answer_template t, fill_done done) {
  auto op = std::make_unique<fill_op>();
  op->s = _s;
  op->bytes = t.size();
  for (const auto& h : t.holes) ++_s->pins[h.second.file];
  op->t = std::move(t);
  op->done = std::move(done);
  _s->waiting.push_back(std::move(op));
  // Starting work here is fine: `done` runs from the work's after-callback,
  // on a later turn of the loop, never on this stack.
  _s->admit();
}

void blob_store::release(uint64_t file) {
  // Stopping: the file stays, and the next start's sweep deletes it.
  if (_s->closed) return;
  if (_s->pins.count(file)) {
    _s->doomed.insert(file);
    return;
  }
  _s->unlink(file);
}

void blob_store::close() {
  if (_s->closed) return;
  _s->closed = true;
  for (auto& op : _s->waiting)
    for (const auto& h : op->t.holes) _s->unpin(h.second.file);
  _s->waiting.clear();
}

size_t blob_store::reading_bytes() const { return _s->reading; }
size_t blob_store::waiting() const { return _s->waiting.size(); }

}  // namespace relay::journal
