#include <algorithm>
#include <cassert>
#include <utility>

#include "relay/audit.h"
#include "relay/log.h"
#include "relay/server.h"
#include "spool_upload.h"

namespace relay::net {
namespace {

// How often a body in progress is checked against the minimum rate.
constexpr uint32_t body_check_ms = 1000;
// Loop time one connection's pipelined requests may take in one turn
// (at least one request is taken). Without a slice, eight connections
// pipelining GET /metrics held every other client for over a second; with
// it, a turn of the loop costs at most this per busy connection, and a new
// client (accept, handshake, request: a few turns) waits a few of those.
// Small requests take 5-20 us, so a slice still answers dozens per turn.
constexpr uint64_t pipeline_turn_ns = 250'000;

}  // namespace

server_conn::server_conn(listener& owner, uint64_t id, stream* s)
    : _owner(owner), _id(id), _stream(s), _parser(owner._options.conn.http) {}

// ---- Connection set-up ----

void server_conn::on_secure(stream&) {
  // A handshake that began before a reload was verified against the old CA
  // bundle and CRL, and the reload's sweep skipped it: check it now.
  if (std::shared_ptr<const tls::context> current = _owner._options.tls ? _owner._options.tls() : nullptr)
    if (!_owner.recheck(*this, *current)) return;
  // Served no longer than its certificate is valid: retired between
  // requests once notAfter has passed (a reload's sweep would close it
  // too, but a reload may not come).
  if (std::optional<int64_t> left = _stream->peer_certificates().ms_until_expiry()) {
    uint64_t now = uv_now(_stream->loop());
    uint64_t at = now + static_cast<uint64_t>(std::max<int64_t>(*left, 0));
    if (_retire_at == 0 || at < _retire_at) {
      _retire_at = at;
      _retire_for_expiry = true;
    }
  }
  connected();
}

void server_conn::connected() {
  // Out of the handshake: requeued as the newest evictable one.
  _owner.evictable_remove(this);
  _state = state::idle;
  _owner.evictable_insert(this);
  _stream->arm_timer(idle_timer_ms());
  _owner._handler.on_connected(*this);
}

// ---- Requests ----

void server_conn::on_input(stream&) {
  if (_state == state::handshake) {
    // Plaintext: the first byte ends the "not yet serving" phase.
    connected();
  }
  process();
}

void server_conn::process() {
  if (_in_process || _state == state::closed) return;
  // A reload's sweep verifies live peers a slice at a time; a connection it
  // has not reached yet is verified here, before it is served again, so a
  // revoked peer gets nothing more whatever the sweep's order.
  if (std::shared_ptr<const tls::context> current = _owner._options.tls ? _owner._options.tls() : nullptr)
    if (!_owner.recheck(*this, *current)) return;
  _in_process = true;
  const conn_options& o = _owner._options.conn;
  std::string& in = _stream->input();
  bool held_back = false;  // stopped by the output bound, not by a lack of input
  bool yielded = false;    // stopped by the turn's time slice
  const uint64_t turn_start = uv_hrtime();
  while ((_state == state::idle || _state == state::reading_headers || _state == state::reading_body) &&
         _in_offset < in.size()) {
    if (output_full()) {
      held_back = true;
      break;
    }
    // A spooled body waits for the disk: its next bytes stay unparsed (and
    // reading pauses, update_reading) until a write completes.
    if (_upload && _upload->full()) break;
    if (_state == state::idle) {
      // Still evictable, and no younger: a request that is never finished
      // must not protect its slot.
      _state = state::reading_headers;
      _stream->arm_timer(o.header_timeout_ms);
    }
    auto r = _parser.execute(in.data() + _in_offset, in.size() - _in_offset);
    _in_offset += r.consumed;
    http::request& req = _parser.current();
    if (r.what == http::request_parser::event::error) {
      _owner._handler.on_rejected(*this, _parser.error());
      reject(_parser.error(), _parser.error_detail());
      break;
    }
    if (r.what == http::request_parser::event::headers_complete) {
      // Method, path and peer decide before one body byte is held.
      _state = state::handling;
      _owner.evictable_remove(this);
      _stream->arm_timer(0);
      if (!_owner._handler.on_headers(*this, req)) {
        // Answered, now or later (an answer may wait for the journal); the
        // body stays unread and the answer closes the connection.
        break;
      }
      // The budget counts bytes as they arrive, not what is announced: a
      // trickle of many announced-large bodies must not reserve it all.
      if (_owner._body_bytes >= _owner._options.max_pending_body_bytes) {
        _owner._body_refused.inc();
        reject(api_error::unavailable, "too many request bodies in progress; retry later");
        break;
      }
      _state = state::reading_body;
      _owner.evictable_insert(this);  // waiting on the peer again
      _body_started = uv_now(_stream->loop());
      _body_seen = 0;
      _body_last_progress = _body_started;
      _stream->arm_timer(body_check_ms);
      if (o.spill_threshold > 0 && !o.spool_dir.empty() && req.content_length > o.spill_threshold) start_upload();
      if (req.expect_continue) _stream->write("HTTP/1.1 100 Continue\r\n\r\n");
      continue;
    }
    if (_state == state::reading_body) {
      if (_parser.body_received() > _body_seen) {
        _body_seen = _parser.body_received();
        _body_last_progress = uv_now(_stream->loop());
      }
      if (!_upload && req.chunked && o.spill_threshold > 0 && !o.spool_dir.empty() &&
          req.body.size() > o.spill_threshold) {
        // A chunked body announces no length: it is spooled once it passes
        // the threshold, starting with what it holds so far.
        start_upload();
        _upload->feed(req.body.data(), req.body.size());
        std::string().swap(req.body);
      }
      if (_upload) {
        if (_upload->failed()) {
          refuse_upload();
          break;
        }
        if (!set_body_budget(_upload->held_bytes())) {
          _owner._body_refused.inc();
          reject(api_error::unavailable, "too many request bodies in progress; retry later");
          break;
        }
      } else if (req.body.size() > _body_reserved && !reserve_body_budget(req.body.size())) {
        _owner._body_refused.inc();
        reject(api_error::unavailable, "too many request bodies in progress; retry later");
        break;
      }
    }
    if (r.what == http::request_parser::event::need_more) break;
    if (_upload) {
      if (!_upload->finish()) {
        refuse_upload();
        break;
      }
      if (!_upload->done()) {
        // Answered once the last value bytes are on disk (on_upload_event).
        _state = state::spooling;
        _owner.evictable_remove(this);
        _stream->arm_timer(0);
        break;
      }
      _parser.set_body_sink(nullptr);
      auto* u = std::exchange(_upload, nullptr);
      u->hand_over(req);
    }
    release_body_budget();
    _state = state::handling;
    _owner.evictable_remove(this);
    _stream->arm_timer(0);
    _owner._handler.on_request(*this, req);  // may answer now
    // One connection's pipeline must not hold the loop: a slice of it per
    // turn, then every other connection gets its turn before the rest.
    if (uv_hrtime() - turn_start >= pipeline_turn_ns) {
      yielded = true;
      break;
    }
  }
  // Drop consumed input; keep any partial next request. An empty buffer is
  // released, so that an idle connection costs little.
  if (_in_offset == in.size()) {
    std::string().swap(in);
    _in_offset = 0;
  } else if (_in_offset > 0 && _in_offset >= in.size() / 2) {
    in.erase(0, _in_offset);
    _in_offset = 0;
  }
  _in_process = false;
  if (_state != state::closed) {
    _stream->flush();
    update_reading();
    if (_state == state::idle && in.empty()) _stream->release_tls_input_buffer();
    // The socket may have taken everything at once (no write completion
    // will follow): requests held back by the bound continue from the loop.
    if ((held_back && !output_full()) || (yielded && _in_offset < in.size())) _owner.schedule(this);
  }
}

void server_conn::respond(int status, std::string_view body, std::string_view extra_headers,
                          std::string_view content_type) {
  answer(status, body, nullptr, extra_headers, content_type);
}

void server_conn::respond_owned(int status, std::string&& body, std::string_view extra_headers,
                                std::string_view content_type, std::shared_ptr<void> keep) {
  answer(status, body, &body, extra_headers, content_type, std::move(keep));
}

void server_conn::answer(int status, std::string_view body, std::string* owned, std::string_view extra_headers,
                         std::string_view content_type, std::shared_ptr<void> keep) {
  if (_state != state::handling) return;
  _abandon = nullptr;
  // A request whose body was refused unread leaves the stream mid-message.
  bool body_unread = _parser.headers_complete() && !_parser.request_done();
  bool close_after = !_parser.current().keep_alive || _draining || body_unread;
  if (!close_after && retire_due()) {
    // Too old to be kept: this answer is its last.
    count_retired();
    close_after = true;
  }
  // The body is handed over apart from the head: a large one is encrypted
  // from where it lies, not copied behind the head first.
  http::write_response_head(_stream->write_buffer(), status, content_type, body.size(), extra_headers, close_after);
  if (owned) _stream->write_owned(std::move(*owned), std::move(keep));
  else _stream->write(body);
  finish_response(close_after);
}

void server_conn::respond_error(api_error e, std::string_view detail) {
  const auto& info = describe(e);
  respond(info.status, api_error_body(e, detail), api_error_headers(e));
}

void server_conn::finish_response(bool close_after) {
  _parser.next();
  release_body_budget();
  if (close_after) {
    end_with_final_answer();
    return;
  }
  _state = state::idle;
  // Owed nothing: evictable again, as the newest (what it was last served
  // decides its place, not when it connected).
  _owner.evictable_insert(this);
  _stream->arm_timer(idle_timer_ms());
  // Answered from outside this connection's own request callback (a long
  // poll, a journal acknowledgement): the pipeline continues from the loop.
  if (!_in_process) _owner.schedule(this);
}

void server_conn::resume() {
  if (_state == state::closed) return;
  process();
}

void server_conn::reject(api_error e, std::string_view detail) {
  // The stream can no longer be trusted: answer, then close.
  const auto& info = describe(e);
  http::write_response(_stream->write_buffer(), info.status, "application/json", api_error_body(e, detail),
                       api_error_headers(e), true);
  drop_upload();
  _parser.next();
  release_body_budget();
  end_with_final_answer();
}

void server_conn::end_with_final_answer() {
  _state = state::closing_after_write;
  _abandon = nullptr;
  // Owed nothing more: a full listener may cut the lingering short.
  _owner.evictable_insert(this);
  // The stream sends what is queued, close_notify and FIN, then discards
  // input for a bounded time so that the answer is not lost to a reset.
  _stream->finish(_owner._options.conn.linger);
}

void server_conn::update_reading() {
  if (_state == state::closed || _state == state::closing_after_write) return;
  // Keep reading while a request is handled, so that a client who hangs up
  // on a parked long poll is noticed at once; stop only when too much input
  // or output is waiting.
  size_t held = _stream->input().size() - _in_offset;
  _stream->set_reading(held < _owner._options.conn.max_pending_input && !output_full() &&
                       !(_upload && _upload->full()));
}

void server_conn::on_drained(stream&) {
  // Output went out: requests held back by the output bound may proceed.
  process();
}

bool server_conn::output_full() const {
  return _stream->pending_output() >= _owner._options.conn.max_pending_output;
}

// ---- Body budget ----

bool server_conn::reserve_body_budget(size_t bytes) {
  if (bytes <= _body_reserved) return true;
  size_t more = bytes - _body_reserved;
  if (_owner._body_bytes + more > _owner._options.max_pending_body_bytes) return false;
  _owner._body_bytes += more;
  _body_reserved = bytes;
  return true;
}

bool server_conn::set_body_budget(size_t bytes) {
  if (bytes >= _body_reserved) return reserve_body_budget(bytes);
  _owner._body_bytes -= _body_reserved - bytes;
  _body_reserved = bytes;
  return true;
}

// ---- Spooled bodies ----

void server_conn::start_upload() {
  const conn_options& o = _owner._options.conn;
  _upload = http::spool_upload::create(_stream->loop(), o.spool_dir, o.spill_threshold, [this] { on_upload_event(); });
  _parser.set_body_sink(_upload);
}

void server_conn::on_upload_event() {
  // From a threadpool completion on the loop, this connection's own
  // callback: a write made room, the body is wholly on disk, or the disk
  // failed.
  if (!_upload) return;
  if (_upload->failed()) {
    refuse_upload();
    return;
  }
  if (_state == state::spooling) {
    if (_upload->done()) deliver_spooled();
    return;
  }
  if (_state == state::reading_body) {
    // Time spent waiting on the disk is not the peer's stall: the stall and
    // rate checks measure from here.
    _body_last_progress = uv_now(_stream->loop());
    process();
  }
}

void server_conn::refuse_upload() {
  api_error e = api_error::invalid_json;
  std::string detail;
  if (!_upload->disk_error().empty()) {
    e = api_error::unavailable;
    detail = _upload->disk_error();
  } else if (_upload->scanner_status() == http::json_scanner::status::skeleton_large) {
    e = api_error::payload_too_large;
    detail = _upload->scanner().error();
  } else {
    // What the decoder says of an in-memory body, with where it went wrong.
    detail = "the body is not valid JSON: " + _upload->scanner().error();
  }
  _owner._handler.on_rejected(*this, e);
  reject(e, detail);  // drops the upload: its file is removed
}

void server_conn::deliver_spooled() {
  http::request& req = _parser.current();
  _parser.set_body_sink(nullptr);
  auto* u = std::exchange(_upload, nullptr);
  u->hand_over(req);
  release_body_budget();
  _state = state::handling;
  _owner._handler.on_request(*this, req);  // may answer now; the pipeline then continues from the loop
}

void server_conn::drop_upload() {
  if (!_upload) return;
  _parser.set_body_sink(nullptr);
  std::exchange(_upload, nullptr)->abandon();
}

void server_conn::release_body_budget() {
  _owner._body_bytes -= _body_reserved;
  _body_reserved = 0;
}

// ---- Time ----

uint64_t server_conn::ms_until_retired() const {
  if (_retire_at == 0) return 0;
  uint64_t now = uv_now(_stream->loop());
  return _retire_at > now ? _retire_at - now : 1;
}

bool server_conn::retire_due() const { return _retire_at != 0 && uv_now(_stream->loop()) >= _retire_at; }

void server_conn::count_retired() { (_retire_for_expiry ? _owner._retired_expiry : _owner._retired_age).inc(); }

uint32_t server_conn::idle_timer_ms() const {
  uint64_t ms = _owner._options.conn.idle_timeout_ms;
  if (_retire_at != 0) {
    uint64_t now = uv_now(_stream->loop());
    // At least 1: 0 would stop the timer.
    ms = std::min<uint64_t>(ms, _retire_at > now ? _retire_at - now : 1);
  }
  return static_cast<uint32_t>(std::max<uint64_t>(ms, 1));
}

void server_conn::on_timeout(stream&) {
  const conn_options& o = _owner._options.conn;
  switch (_state) {
    case state::handshake:
      _owner._timeouts.inc();
      _owner._handshake_failures.inc();
      // Audited like any refused handshake: it held a connection slot. (A
      // peer that closes before finishing, a TCP health check, is not an
      // authentication attempt and is not audited.)
      audit::event("tls_handshake_failed")
          .str("listener", _owner._options.name)
          .str("remote", remote_address())
          .str("reason", "no TLS handshake within limits.handshake_timeout_ms");
      close();
      break;
    case state::reading_headers:
      _owner._timeouts.inc();
      log::info("request_timeout").str("listener", _owner._options.name).str("remote", remote_address());
      _owner._handler.on_rejected(*this, api_error::request_timeout);
      reject(api_error::request_timeout, {});
      break;
    case state::reading_body: {
      // A body must keep moving, and after a grace of header_timeout_ms keep
      // up the minimum rate: a trickle cannot hold a connection and its
      // budget for long.
      uint64_t now = uv_now(_stream->loop());
      uint64_t elapsed = now - _body_started;
      bool stalled = now - _body_last_progress >= o.header_timeout_ms;
      bool slow = o.min_body_rate > 0 && elapsed > o.header_timeout_ms &&
                  _body_seen * 1000 < (elapsed - o.header_timeout_ms) * o.min_body_rate;
      if (stalled || slow) {
        _owner._timeouts.inc();
        log::info("request_body_timeout")
            .str("listener", _owner._options.name)
            .str("remote", remote_address())
            .num("received", static_cast<int64_t>(_body_seen))
            .str("reason", stalled ? "no progress" : "below limits.min_body_rate_bytes_per_s");
        _owner._handler.on_rejected(*this, api_error::request_timeout);
        reject(api_error::request_timeout, stalled ? "the request body stalled" : "the request body is too slow");
        break;
      }
      _stream->arm_timer(body_check_ms);
      break;
    }
    case state::idle:
      if (retire_due()) {
        // Between requests: close_notify and FIN, a clean end to the client.
        count_retired();
        end_with_final_answer();
        break;
      }
      close();
      break;
    case state::spooling:  // the disk's writes, not the peer, decide
    case state::handling:
    case state::closing_after_write:
    case state::closed:
      break;  // the handler owns the timing of its answer; the stream its close
  }
}

// ---- The end ----

void server_conn::begin_drain() {
  _draining = true;
  if (_state == state::idle) end_with_final_answer();
  else if (_state == state::handshake) close();
}

void server_conn::close() {
  if (_state == state::closed) return;
  mark_closed();
  _stream->close();
}

void server_conn::mark_closed() {
  _state = state::closed;
  // An unfinished spooled body: its file goes (once no write is in flight).
  drop_upload();
  _owner.remove(this);
  // The handler forgets the request now, not at on_closed(): a waiter woken
  // in between would lease jobs to a connection that can no longer answer.
  if (_abandon) {
    auto hook = std::move(_abandon);
    _abandon = nullptr;
    hook();
  }
}

void server_conn::on_end(stream& s, stream_end why, std::string_view detail) {
  if (_state == state::handshake && why != stream_end::eof) {
    _owner._handshake_failures.inc();
    // An audit event: who tried, with what certificate, and why it was
    // refused (a silent peer or a timeout is refused too). The session is
    // still there while on_end runs.
    tls::certificate_summary cert;
    if (const tls::session* t = s.tls()) cert = t->presented_certificate();
    auto line = audit::event("tls_handshake_failed");
    line.str("listener", _owner._options.name).str("remote", remote_address()).str("reason", detail);
    if (!cert.empty()) line.str("subject", cert.subject).str("sha256", cert.sha256).str("serial", cert.serial);
  } else if (why == stream_end::tls_error) {
    log::info("tls_error").str("listener", _owner._options.name).str("remote", remote_address()).str("reason", detail);
  }
  // A half-closed client cannot read an answer either (HTTP/1.1 clients do
  // not half-close), so the connection ends here.
  if (_state != state::closed) mark_closed();
}

void server_conn::on_closed(stream&) {
  if (_state != state::closed) mark_closed();
  delete this;
}

}  // namespace relay::net
