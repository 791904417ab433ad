#include "spool_upload.h"

#include <fcntl.h>


#include "relay/journal.h"
#include "relay/log.h"

namespace relay::http {

spool_upload* spool_upload::create(uv_loop_t* loop, std::string dir, uint64_t threshold,
                                   std::function<void()> on_event) {
  return new spool_upload(loop, std::move(dir), threshold, std::move(on_event));
}

spool_upload::spool_upload(uv_loop_t* loop, std::string dir, uint64_t threshold, std::function<void()> on_event)
    : _loop(loop),
      _dir(std::move(dir)),
      _scanner(*this, threshold, max_skeleton_bytes),
      _on_event(std::move(on_event)),
      _spool(std::make_shared<body_spool>()) {
  _spool->loop = loop;
  _req.data = this;
}

spool_upload::~spool_upload() = default;

bool spool_upload::feed(const char* data, size_t len) {
  if (failed()) return false;
  _scanner_status = _scanner.feed(data, len);
  if (_scanner_status != json_scanner::status::ok) return false;
  kick();
  return !failed();
}

bool spool_upload::finish() {
  if (failed()) return false;
  _scanner_status = _scanner.finish();
  if (_scanner_status != json_scanner::status::ok) return false;
  _finished = true;
  kick();
  return true;
}

void spool_upload::on_cut_begin(uint32_t item, std::string_view key) {
  // The file is made when the first value is cut, not for every large
  // body: one whose members are all small needs none.
  if (_fd < 0 && !_opening && _spool->dir.empty()) open_file();
  if (_fill.capacity() < buffer_bytes) {
    // Sized once, with room for the read that passes the mark, so that
    // appending never doubles a buffer (the budget counts capacity).
    _fill.reserve(buffer_bytes + buffer_slack);
    _flight.reserve(buffer_bytes + buffer_slack);
  }
  _spool->values.push_back({item, key, _spool->bytes, 0, 0});
  _crc = 0;
}

void spool_upload::on_cut_bytes(const char* data, size_t len) {
  _crc = journal::crc32c(data, len, _crc);
  _fill.append(data, len);
  _spool->bytes += len;
}

void spool_upload::on_cut_end(size_t, uint64_t length) {
  _spool->values.back().length = length;
  _spool->values.back().crc32c = _crc;
}

void spool_upload::open_file() {
  // A random name: no counter to persist, nothing to guess; O_EXCL turns a
  // collision (or a leftover) into a retry under another name.
  uint64_t id = 0;
  while (id == 0)
    if (uv_random(nullptr, nullptr, &id, sizeof id, 0, nullptr) != 0) id = uv_hrtime() ^ reinterpret_cast<uintptr_t>(this);
  _spool->file = id;
  _path = body_spool::path_of(_dir, id);
  _opening = true;
  _busy = true;
  int rc = uv_fs_open(_loop, &_req, _path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600, on_open);
  if (rc != 0) {
    // The callback never runs for a call that failed.
    _busy = false;
    _opening = false;
    fail_disk("cannot create a spool file", rc);
  }
}

void spool_upload::on_open(uv_fs_t* r) {
  auto* self = static_cast<spool_upload*>(r->data);
  auto result = static_cast<int>(r->result);
  uv_fs_req_cleanup(r);
  self->_busy = false;
  self->_opening = false;
  if (result >= 0) {
    self->_fd = result;
    // From here on the file exists: whoever drops the spool removes it.
    self->_spool->dir = self->_dir;
  }
  if (self->_abandoned) {
    self->maybe_free();
    return;
  }
  if (result == UV_EEXIST && ++self->_open_tries < 8) {
    self->open_file();
    return;
  }
  if (result < 0) {
    self->fail_disk("cannot create a spool file", result);
    self->notify();
    return;
  }
  self->kick();
  self->notify();
}

void spool_upload::kick() {
  if (_busy || _fd < 0 || failed() || _abandoned) return;
  if (_flight_done == _flight.size()) {
    _written += _flight.size();
    _flight.clear();
    _flight_done = 0;
    if (_fill.size() >= buffer_bytes || (_finished && !_fill.empty())) {
      _fill.swap(_flight);
    } else {
      if (_finished && _fill.empty()) close_file();
      return;
    }
  }
  uv_buf_t buf = uv_buf_init(_flight.data() + _flight_done, static_cast<unsigned>(_flight.size() - _flight_done));
  _busy = true;
  int rc = uv_fs_write(_loop, &_req, _fd, &buf, 1, static_cast<int64_t>(_written + _flight_done), on_write);
  if (rc != 0) {
    _busy = false;
    fail_disk("cannot write the spool file", rc);
  }
}

void spool_upload::on_write(uv_fs_t* r) {
  auto* self = static_cast<spool_upload*>(r->data);
  auto result = static_cast<ssize_t>(r->result);
  uv_fs_req_cleanup(r);
  self->_busy = false;
  if (self->_abandoned) {
    self->maybe_free();
    return;
  }
  if (result <= 0) {
    self->fail_disk("cannot write the spool file", result == 0 ? static_cast<ssize_t>(UV_EIO) : result);
    self->notify();
    return;
  }
  self->_flight_done += static_cast<size_t>(result);
  self->kick();
  self->notify();
}

void spool_upload::close_file() {
  _busy = true;
  _closing = true;
  if (uv_fs_close(_loop, &_req, _fd, on_close) != 0) {
    _busy = false;
    _closing = false;
    _fd = -1;
  }
}

void spool_upload::on_close(uv_fs_t* r) {
  auto* self = static_cast<spool_upload*>(r->data);
  uv_fs_req_cleanup(r);
  self->_busy = false;
  self->_closing = false;
  self->_fd = -1;
  if (self->_abandoned) {
    self->maybe_free();
    return;
  }
  self->notify();
}

void spool_upload::fail_disk(const char* what, ssize_t err) {
  int e = static_cast<int>(err);
  // The client is told what went wrong with the disk (no space, I/O
  // error), not where: the path is for the operator's log.
  _disk_error = std::string("cannot store the request body: ") + uv_strerror(e) + " (" + uv_err_name(e) +
                "); retry later";
  log::warn("spool_write_failed")
      .str("what", what)
      .str("dir", _dir)
      .str("file", _path)
      .str("error", uv_err_name(e));
}

void spool_upload::notify() {
  // Last thing a callback does: the handler may abandon (free) the upload.
  if (_on_event) _on_event();
}

void spool_upload::hand_over(request& req) {
  req.body = std::move(_scanner.skeleton());
  // Padded as every body is, for the decoder (simdjson reads past the end).
  req.body.reserve(req.body.size() + body_padding);
  if (has_values()) req.spool = _spool;
  delete this;
}

void spool_upload::abandon() {
  _abandoned = true;
  _on_event = nullptr;
  maybe_free();
}

void spool_upload::maybe_free() {
  if (_busy) return;  // the callback in flight comes back here
  if (_fd >= 0) {
    close_file();
    return;
  }
  // Dropping the spool unlinks the file (asynchronously) if it was made.
  delete this;
}

}  // namespace relay::http
