// One request body on its way to a spool file (issue 13): the scanner cuts
// its large payload/result values, whose bytes are written to
// <dir>/<16 hex> by libuv threadpool writes while the skeleton stays in RAM.
// Internal to the server connection.
#pragma once

#include <uv.h>

#include <functional>
#include <memory>
#include <string>

#include "relay/http.h"
#include "relay/json_scanner.h"

namespace relay::http {

class spool_upload final : public body_sink, private json_scanner::sink {
 public:
  // Bytes of value a buffer collects before it goes to the threadpool; one
  // buffer fills while the other is written, so an upload holds at most
  // about twice this (plus one read) of value bytes.
  static constexpr size_t buffer_bytes = 256 * 1024;
  static constexpr size_t buffer_slack = 64 * 1024;
  static constexpr size_t max_skeleton_bytes = 8u << 20;

  // `on_event` runs from a libuv callback (never from a call into this
  // object) when a write completed (room again), when the body is wholly on
  // disk after finish(), or when the disk failed.
  static spool_upload* create(uv_loop_t* loop, std::string dir, uint64_t threshold, std::function<void()> on_event);

  // Feeds body bytes. False once the body is refused (scanner_status()
  // says why, or disk_error()); further bytes are ignored.
  bool feed(const char* data, size_t len) override;
  // The body ended: checks it and starts the last write.
  bool finish();
  // True when reading must pause: a full buffer waits for the write ahead.
  bool full() const { return _fill.size() >= buffer_bytes; }
  // After finish(): every value is on disk and the file closed (or nothing
  // was cut: no file at all).
  bool done() const { return _finished && !_busy && _fd < 0 && _fill.empty() && _flight.empty() && !failed(); }
  bool failed() const { return !_disk_error.empty() || _scanner_status != json_scanner::status::ok; }
  json_scanner::status scanner_status() const { return _scanner_status; }
  const json_scanner& scanner() const { return _scanner; }
  const std::string& disk_error() const { return _disk_error; }
  // RAM this body holds: skeleton, undecided value, write buffers.
  size_t held_bytes() const { return _scanner.held_bytes() + _fill.capacity() + _flight.capacity(); }
  bool has_values() const { return !_spool->values.empty(); }

  // Once done(): the skeleton goes into the request, with the spool when a
  // value was cut; the upload is freed.
  void hand_over(request& req);
  // The request is abandoned (refused, timed out, connection gone): the
  // upload frees itself once no write is in flight, and removes its file.
  void abandon();

 private:
  spool_upload(uv_loop_t* loop, std::string dir, uint64_t threshold, std::function<void()> on_event);
  ~spool_upload() override;

  void on_cut_begin(uint32_t item, std::string_view key) override;
  void on_cut_bytes(const char* data, size_t len) override;
  void on_cut_end(size_t skeleton_offset, uint64_t length) override;

  void open_file();
  void kick();
  void close_file();
  static void on_open(uv_fs_t* r);
  static void on_write(uv_fs_t* r);
  static void on_close(uv_fs_t* r);
  void fail_disk(const char* what, ssize_t err);
  void notify();
  void maybe_free();

  uv_loop_t* _loop;
  std::string _dir;
  std::string _path;        // the file, once named
  json_scanner _scanner;
  json_scanner::status _scanner_status = json_scanner::status::ok;
  std::function<void()> _on_event;
  std::shared_ptr<body_spool> _spool;
  uv_fs_t _req{};
  bool _busy = false;       // _req is in flight
  bool _opening = false;
  uv_file _fd = -1;
  int _open_tries = 0;
  std::string _fill;        // value bytes collecting
  std::string _flight;      // value bytes being written
  size_t _flight_done = 0;  // of _flight, written
  uint64_t _written = 0;    // file offset of _flight
  uint32_t _crc = 0;
  bool _finished = false;
  bool _abandoned = false;
  bool _closing = false;
  std::string _disk_error;
};

}  // namespace relay::http
