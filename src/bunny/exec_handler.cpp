// The exec handler: one process per job, no shell. The payload goes to
// stdin, stdout (JSON) is the result; the environment holds JOB_ID,
// JOB_QUEUE, JOB_ATTEMPT and a fixed PATH, and nothing of bunny's own.
//
// The handler is started through the guard (guard.h), bunny's own binary
// in another mode, which makes it die with bunny; the guard leads the
// process group bunny signals, passes every signal on to the handler by
// being in its group, and exits as the handler did, so what is written
// here about "the handler" holds for the guard and the handler together.
#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

#include "bunny/guard.h"
#include "bunny/handler.h"
#include "relay/v1_client.h"

namespace relay::bunny {
namespace {

constexpr size_t stderr_tail_bytes = 2048;
// The kernel buffer of the stdin and stdout pipes (F_SETPIPE_SZ; Linux's
// default ceiling, /proc/sys/fs/pipe-max-size, is 1 MiB): a large payload
// or result moves in 1 MiB steps rather than 64 KiB ones, a sixteenth of
// the wake-ups and system calls, and the memory stays bounded by it.
constexpr int pipe_bytes = 1 << 20;
// How much stdout one read takes at most.
constexpr size_t stdout_read_bytes = 1 << 20;
constexpr uint64_t pipe_drain_ms = 2000;  // after exit, how long a grandchild may hold the pipes

class exec_run;

struct exec_handler final : handler {
  exec_handler(uv_loop_t* l, exec_options o) : loop(l), options(std::move(o)) {}
  handler_run* start(const job_input& job, done_fn done) override;
  uv_loop_t* loop;
  exec_options options;
};

class exec_run final : public handler_run {
 public:
  exec_run(exec_handler& h, const job_input& job, done_fn done)
      : _h(h), _payload(job.payload), _keep(job.keep), _done(std::move(done)) {
    // stdout lands behind room for the complete request's envelope, so the
    // result goes to relay from where the handler wrote it.
    _stdout.assign(v1::complete_room, ' ');
    // Room for a result as large as the payload (what transforms mostly
    // give back), within the output limit: growing to it by doubling would
    // copy the result over itself. Only reserved: pages never written cost
    // nothing.
    _stdout.reserve(v1::complete_room + std::min(job.payload.size(), h.options.max_output_bytes) + 64);
    uv_timer_init(h.loop, &_timer);
    _timer.data = this;
    ++_handles;
    spawn(job);
  }

  void cancel(std::string_view why) override {
    if (_finished || _cancelled) return;
    _cancelled = true;
    _why = why;
    // Already on its way out after a timeout: the SIGKILL due is not pushed
    // back (a lost lease, the drain's end and the stop each cancel).
    if (_timed_out) return;
    signal_group(SIGTERM);
    uv_timer_start(&_timer, on_kill_timer, _h.options.kill_grace_ms, 0);
  }

 private:
  void spawn(const job_input& job) {
    uv_pipe_init(_h.loop, &_in, 0);
    uv_pipe_init(_h.loop, &_out, 0);
    uv_pipe_init(_h.loop, &_err, 0);
    uv_pipe_init(_h.loop, &_report, 0);
    _in.data = _out.data = _err.data = _report.data = this;
    _handles += 4;
    uv_stdio_container_t stdio[guard_report_fd + 1];
    stdio[0].flags = static_cast<uv_stdio_flags>(UV_CREATE_PIPE | UV_READABLE_PIPE);
    stdio[0].data.stream = reinterpret_cast<uv_stream_t*>(&_in);
    stdio[1].flags = static_cast<uv_stdio_flags>(UV_CREATE_PIPE | UV_WRITABLE_PIPE);
    stdio[1].data.stream = reinterpret_cast<uv_stream_t*>(&_out);
    stdio[2].flags = static_cast<uv_stdio_flags>(UV_CREATE_PIPE | UV_WRITABLE_PIPE);
    stdio[2].data.stream = reinterpret_cast<uv_stream_t*>(&_err);
    stdio[guard_report_fd].flags = static_cast<uv_stdio_flags>(UV_CREATE_PIPE | UV_WRITABLE_PIPE);
    stdio[guard_report_fd].data.stream = reinterpret_cast<uv_stream_t*>(&_report);

    std::vector<std::string> env_strings = {
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "JOB_ID=" + job.id,
        "JOB_QUEUE=" + job.queue,
        "JOB_ATTEMPT=" + std::to_string(job.attempt),
    };
    std::vector<char*> env, args;
    for (auto& e : env_strings) env.push_back(e.data());
    env.push_back(nullptr);
    // /proc/self/exe rather than a path: the very binary running now, even
    // if a newer bunny has been installed over it since it started. The
    // guard learns bunny's pid from here, not from getppid(), because
    // bunny may already have died by the time the guard asks.
    std::string bunny_pid = std::to_string(::getpid());
    for (const char* a : {"bunny-guard", guard_flag, bunny_pid.c_str(), "--"}) args.push_back(const_cast<char*>(a));
    for (const auto& a : _h.options.argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);

    uv_process_options_t po{};
    po.file = "/proc/self/exe";
    po.args = args.data();
    po.env = env.data();
    po.stdio = stdio;
    po.stdio_count = guard_report_fd + 1;
    po.exit_cb = on_exit;
    // Its own session and process group, so a timeout can signal everything
    // the handler started, not just the first process. The parent-death
    // signal the guard asks for is sent when the thread that forked it
    // ends: this is the loop's thread, which lives as long as bunny.
    po.flags = UV_PROCESS_DETACHED;
    _proc.data = this;
    int rc = uv_spawn(_h.loop, &_proc, &po);
    if (rc != 0) {
      // The process handle still has to be closed.
      ++_handles;
      uv_close(reinterpret_cast<uv_handle_t*>(&_proc), on_closed);
      _exited = _out_eof = _err_eof = _report_eof = true;
      _spawn_error = std::string("cannot start handler ") + _h.options.argv[0] + ": " + uv_strerror(rc);
      uv_timer_start(&_timer, on_spawn_failed, 0, 0);
      return;
    }
    ++_handles;
    _running = true;
    for (uv_pipe_t* p : {&_in, &_out}) {
      uv_os_fd_t fd;
      // Best effort: where the ceiling is lower, the default 64 KiB works.
      if (uv_fileno(reinterpret_cast<uv_handle_t*>(p), &fd) == 0) (void)::fcntl(fd, F_SETPIPE_SZ, pipe_bytes);
    }
    // Straight from relay's answer: libuv writes what the pipe takes and
    // keeps the rest queued as a pointer into it, never a copy. (uv_buf_t
    // is not const, but a write only reads it.)
    uv_buf_t b = uv_buf_init(const_cast<char*>(_payload.data()), static_cast<unsigned>(_payload.size()));
    _write.data = this;
    if (uv_write(&_write, reinterpret_cast<uv_stream_t*>(&_in), &b, 1, on_written) != 0) close_stdin();
    uv_read_start(reinterpret_cast<uv_stream_t*>(&_out), on_alloc_stdout, on_stdout);
    uv_read_start(reinterpret_cast<uv_stream_t*>(&_err), on_alloc, on_stderr);
    uv_read_start(reinterpret_cast<uv_stream_t*>(&_report), on_alloc, on_report);
    uv_timer_start(&_timer, on_timeout, _h.options.timeout_ms, 0);
  }

  void signal_group(int sig) {
    if (_running && !_exited) {
      // Negative pid: the whole process group the handler leads.
      if (::kill(-_proc.pid, sig) != 0) uv_process_kill(&_proc, sig);
    }
  }

  // The hard end of a run. A group SIGKILL would end the guard before it
  // could reach what the handler moved out of the group (setsid), so the
  // guard is asked instead: it kills every descendant, then the group and
  // itself. A guard that has not ended kill_grace_ms later (stopped by the
  // handler, say) gets the group SIGKILL after all.
  void hard_kill() {
    if (!_running || _exited) return;
    if (_hard_kill_asked) {
      signal_group(SIGKILL);
      return;
    }
    _hard_kill_asked = true;
    ::kill(_proc.pid, SIGCONT);
    ::kill(_proc.pid, guard_kill_signal);
    uv_timer_start(&_timer, on_kill_timer, _h.options.kill_grace_ms, 0);
  }

  void close_stdin() {
    if (_stdin_closed) return;
    _stdin_closed = true;
    uv_close(reinterpret_cast<uv_handle_t*>(&_in), on_closed);
  }

  static void on_written(uv_write_t* req, int) {
    // EPIPE (the handler did not read its input) is not an error in itself.
    auto* r = static_cast<exec_run*>(req->data);
    r->close_stdin();
    // Relay's answer is not needed any more: its memory goes back while the
    // handler works.
    r->_payload = {};
    r->_keep.reset();
  }

  // stderr and the guard's report: small, through one scratch buffer.
  static void on_alloc(uv_handle_t* h, size_t, uv_buf_t* buf) {
    auto* r = static_cast<exec_run*>(h->data);
    buf->base = r->_buffer;
    buf->len = sizeof r->_buffer;
  }

  // stdout is read straight into the result buffer, behind what it holds.
  // The buffer grows geometrically (std::string's growth), so each byte is
  // moved a bounded number of times, and is zero-filled once, a read's
  // worth at a time; it never grows past the output limit plus one read.
  static void on_alloc_stdout(uv_handle_t* h, size_t, uv_buf_t* buf) {
    auto* r = static_cast<exec_run*>(h->data);
    if (r->_overflow) {
      // Past the limit: what still comes is drained and dropped.
      buf->base = r->_buffer;
      buf->len = sizeof r->_buffer;
      return;
    }
    std::string& out = r->_stdout;
    size_t used = r->_stdout_len;
    size_t limit = v1::complete_room + r->_h.options.max_output_bytes + 1;  // one more: to see it overflow
    size_t want = std::min(stdout_read_bytes, limit - std::min(limit - 1, used));
    if (out.size() < used + want) out.resize(used + want);
    buf->base = out.data() + used;
    buf->len = want;
  }

  static void on_stdout(uv_stream_t* s, ssize_t n, const uv_buf_t*) {
    auto* r = static_cast<exec_run*>(s->data);
    if (n > 0) {
      if (r->_overflow) return;
      r->_stdout_len += static_cast<size_t>(n);
      if (r->_stdout_len - v1::complete_room > r->_h.options.max_output_bytes) {
        r->_overflow = true;
        std::string().swap(r->_stdout);  // nothing of it will be used
        r->_stdout_len = 0;
        r->hard_kill();
      }
    } else if (n < 0) {
      r->_out_eof = true;
      uv_read_stop(s);
      r->maybe_finish();
    }
  }

  static void on_stderr(uv_stream_t* s, ssize_t n, const uv_buf_t* buf) {
    auto* r = static_cast<exec_run*>(s->data);
    if (n > 0) {
      r->_stderr.append(buf->base, static_cast<size_t>(n));
      if (r->_stderr.size() > 2 * stderr_tail_bytes) r->_stderr.erase(0, r->_stderr.size() - stderr_tail_bytes);
    } else if (n < 0) {
      r->_err_eof = true;
      uv_read_stop(s);
      r->maybe_finish();
    }
  }

  // The guard's start report: nothing before end of file when the handler
  // was started, the errno of its exec (or of the guard's set-up) if not.
  static void on_report(uv_stream_t* s, ssize_t n, const uv_buf_t* buf) {
    auto* r = static_cast<exec_run*>(s->data);
    if (n > 0) {
      size_t room = sizeof r->_report_bytes - r->_report_len;
      size_t take = std::min(room, static_cast<size_t>(n));
      std::memcpy(r->_report_bytes + r->_report_len, buf->base, take);
      r->_report_len += take;
    } else if (n < 0) {
      r->_report_eof = true;
      uv_read_stop(s);
      int error = 0;
      if (r->_report_len == sizeof error) std::memcpy(&error, r->_report_bytes, sizeof error);
      // The same words libuv used when it started the handler itself
      // (libuv's errors are negated errnos).
      if (error > 0)
        r->_spawn_error = std::string("cannot start handler ") + r->_h.options.argv[0] + ": " + uv_strerror(-error);
      r->maybe_finish();
    }
  }

  static void on_exit(uv_process_t* p, int64_t status, int sig) {
    auto* r = static_cast<exec_run*>(p->data);
    r->_exited = true;
    r->_status = status;
    r->_signal = sig;
    // What is left of the guard's group when the guard did not end it (a
    // handler that killed its guard); none, when the guard ended as it
    // should. The group id stays taken while it has members.
    ::kill(-p->pid, SIGKILL);
    // A grandchild may keep stdout open; do not wait for it forever.
    uv_timer_start(&r->_timer, on_pipe_timeout, pipe_drain_ms, 0);
    r->maybe_finish();
  }

  static void on_timeout(uv_timer_t* t) {
    auto* r = static_cast<exec_run*>(t->data);
    r->_timed_out = true;
    r->signal_group(SIGTERM);
    uv_timer_start(&r->_timer, on_kill_timer, r->_h.options.kill_grace_ms, 0);
  }

  static void on_kill_timer(uv_timer_t* t) {
    auto* r = static_cast<exec_run*>(t->data);
    if (r->_exited) {
      on_pipe_timeout(t);
      return;
    }
    r->hard_kill();
  }

  static void on_pipe_timeout(uv_timer_t* t) {
    auto* r = static_cast<exec_run*>(t->data);
    r->_out_eof = r->_err_eof = r->_report_eof = true;
    r->maybe_finish();
  }

  static void on_spawn_failed(uv_timer_t* t) {
    auto* r = static_cast<exec_run*>(t->data);
    r->maybe_finish();
  }

  std::string tail() const {
    std::string t = _stderr.size() > stderr_tail_bytes ? _stderr.substr(_stderr.size() - stderr_tail_bytes) : _stderr;
    while (!t.empty() && (t.back() == '\n' || t.back() == '\r')) t.pop_back();
    return t.empty() ? std::string() : ": " + t;
  }

  outcome decide() {
    outcome o;
    o.cancelled = _cancelled;
    o.timed_out = _timed_out;
    if (!_spawn_error.empty()) o.error = _spawn_error;
    else if (_cancelled) o.error = _why;
    else if (_timed_out) o.error = "handler timed out after " + std::to_string(_h.options.timeout_ms) + " ms";
    else if (_overflow) o.error = "handler stdout exceeds " + std::to_string(_h.options.max_output_bytes) + " bytes";
    else if (_signal) o.error = "handler killed by signal " + std::to_string(_signal);
    else if (_status != 0) o.error = "handler exited with status " + std::to_string(_status);
    else {
      std::string why;
      _stdout.resize(_stdout_len);
      if (check_json_result(_stdout, v1::complete_room, why)) {
        o.ok = true;
        o.result = std::move(_stdout);
      } else {
        o.error = "handler stdout is not a JSON result (" + why + ")";
      }
    }
    if (!o.ok && _spawn_error.empty() && !_cancelled && !_overflow) {
      o.error_own_bytes = o.error.size();
      o.error += tail();
    }
    return o;
  }

  void maybe_finish() {
    if (_finished || !_exited || !_out_eof || !_err_eof || !_report_eof) return;
    _finished = true;
    outcome o = decide();
    uv_timer_stop(&_timer);
    close_stdin();
    for (uv_handle_t* h : {reinterpret_cast<uv_handle_t*>(&_out), reinterpret_cast<uv_handle_t*>(&_err),
                           reinterpret_cast<uv_handle_t*>(&_report), reinterpret_cast<uv_handle_t*>(&_timer)})
      uv_close(h, on_closed);
    if (_running) uv_close(reinterpret_cast<uv_handle_t*>(&_proc), on_closed);
    done_fn done = std::move(_done);
    done(std::move(o));
  }

  static void on_closed(uv_handle_t* h) {
    auto* r = static_cast<exec_run*>(h->data);
    if (--r->_handles == 0) delete r;
  }

  exec_handler& _h;
  std::string_view _payload;          // in relay's answer...
  std::shared_ptr<const void> _keep;  // ...which this holds until stdin is written
  done_fn _done;
  uv_process_t _proc{};
  uv_pipe_t _in{}, _out{}, _err{}, _report{};
  uv_timer_t _timer{};
  uv_write_t _write{};
  int _handles = 0;
  bool _running = false, _exited = false, _out_eof = false, _err_eof = false, _report_eof = false;
  bool _stdin_closed = false, _timed_out = false, _cancelled = false, _overflow = false, _finished = false;
  bool _hard_kill_asked = false;
  int64_t _status = 0;
  int _signal = 0;
  char _report_bytes[sizeof(int) + 1];  // one more: a longer report is malformed, not an errno
  size_t _report_len = 0;
  size_t _stdout_len = v1::complete_room;  // _stdout's bytes that hold data; the rest is read room
  std::string _stdout, _stderr, _why, _spawn_error;
  char _buffer[65536];
};

handler_run* exec_handler::start(const job_input& job, done_fn done) {
  return new exec_run(*this, job, std::move(done));
}

}  // namespace

std::unique_ptr<handler> make_exec_handler(uv_loop_t* loop, exec_options o) {
  return std::make_unique<exec_handler>(loop, std::move(o));
}

}  // namespace relay::bunny
