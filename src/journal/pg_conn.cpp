#include "journal/pg_conn.h"

#include <poll.h>

#include <algorithm>
#include <string_view>
#include <vector>

namespace relay::journal::postgres {
namespace {

// How often a wait looks at the stop flag.
constexpr auto slice = std::chrono::milliseconds(50);

std::string trimmed(const char* s) {
  std::string out = s ? s : "";
  while (!out.empty() && (out.back() == '\n' || out.back() == ' ')) out.pop_back();
  return out;
}

// Waits for `events` on fd for at most one slice before `until`. 1: ready,
// 0: not yet, -1: timed out.
int wait_fd(int fd, short events, steady::time_point until) {
  auto now = steady::now();
  if (now >= until) return -1;
  auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(std::min<steady::duration>(until - now, slice));
  pollfd p{fd, events, 0};
  int rc = ::poll(&p, 1, static_cast<int>(ms.count()) + 1);
  return rc > 0 ? 1 : 0;
}

}  // namespace

void conn::reset() {
  if (_c) PQfinish(_c);
  _c = nullptr;
}

std::string conn::describe(const char* what) const {
  std::string m = _c ? trimmed(PQerrorMessage(_c)) : std::string();
  return std::string(what) + (m.empty() ? "" : ": " + m);
}

bool conn::connect(steady::time_point until, std::string& error) {
  if (ok()) return true;
  reset();
  const char* keys[] = {"dbname", "fallback_application_name", nullptr};
  const char* values[] = {_dsn.c_str(), "relay", nullptr};
  _c = PQconnectStartParams(keys, values, 1);
  if (!_c) {
    error = "cannot allocate a database connection";
    return false;
  }
  if (PQstatus(_c) == CONNECTION_BAD) {
    error = describe("cannot connect to the database");
    reset();
    return false;
  }
  PostgresPollingStatusType st = PGRES_POLLING_WRITING;
  while (st != PGRES_POLLING_OK) {
    if (st == PGRES_POLLING_FAILED) {
      error = describe("cannot connect to the database");
      reset();
      return false;
    }
    short events = st == PGRES_POLLING_READING ? POLLIN : POLLOUT;
    int w = 0;
    while ((w = wait_fd(PQsocket(_c), events, until)) == 0)
      if (_stop()) break;
    if (w < 0 || _stop()) {
      error = w < 0 ? "cannot connect to the database: timed out" : "stopping";
      reset();
      return false;
    }
    st = PQconnectPoll(_c);
  }
  // Notices (such as "already exists, skipping") would go to stderr,
  // outside relay's log; none of them needs an operator.
  PQsetNoticeProcessor(_c, [](void*, const char*) {}, nullptr);
  if (PQsetnonblocking(_c, 1) != 0) {
    error = describe("cannot make the database connection non-blocking");
    reset();
    return false;
  }
  // A read replica would refuse every write; say so plainly.
  result r;
  if (!exec("SELECT pg_is_in_recovery()", {}, until, r, error)) return false;
  if (PQntuples(r.get()) == 1 && std::string_view(PQgetvalue(r.get(), 0, 0)) == "t") {
    error = "the database is a read-only standby (in recovery): point journal.postgres.dsn_file at the primary "
            "(the writer endpoint, or target_session_attrs=read-write)";
    reset();
    return false;
  }
  return true;
}

bool conn::wait_readable(steady::time_point until, std::string& error) {
  for (;;) {
    int w = wait_fd(PQsocket(_c), POLLIN, until);
    if (w > 0) return true;
    if (w < 0 || _stop()) {
      error = w < 0 ? "the database did not answer in time" : "stopping";
      return false;
    }
  }
}

bool conn::send_wait(bool sent, steady::time_point until, std::string& error) {
  if (!sent) {
    error = describe("cannot send to the database");
    reset();
    return false;
  }
  // Flush what libpq could not write at once, reading meanwhile (the server
  // may be sending while we send).
  for (;;) {
    int f = PQflush(_c);
    if (f == 0) break;
    if (f < 0) {
      error = describe("cannot send to the database");
      reset();
      return false;
    }
    int w = wait_fd(PQsocket(_c), POLLIN | POLLOUT, until);
    if (w < 0 || _stop()) {
      error = w < 0 ? "the database did not take the statement in time" : "stopping";
      reset();
      return false;
    }
    if (w > 0 && !PQconsumeInput(_c)) {
      error = describe("lost the database connection");
      reset();
      return false;
    }
  }
  return true;
}

bool conn::send_params(const char* sql, std::span<const param> params, int result_format) {
  std::vector<const char*> values;
  std::vector<int> lengths, formats;
  for (const param& p : params) {
    values.push_back(p.data);
    lengths.push_back(p.length);
    formats.push_back(p.format);
  }
  return PQsendQueryParams(_c, sql, static_cast<int>(params.size()), nullptr, values.data(), lengths.data(),
                           formats.data(), result_format) == 1;
}

bool conn::exec(const char* sql, std::span<const param> params, steady::time_point until, result& out,
                std::string& error, int result_format) {
  if (!ok()) {
    error = "not connected to the database";
    return false;
  }
  bool sent;
  if (params.empty() && result_format == 0) {
    sent = PQsendQuery(_c, sql) == 1;
  } else {
    sent = send_params(sql, params, result_format);
  }
  if (!send_wait(sent, until, error)) return false;
  std::string failure;
  out.reset();
  for (;;) {
    while (PQisBusy(_c)) {
      if (!wait_readable(until, error) || !PQconsumeInput(_c)) {
        if (error.empty()) error = describe("lost the database connection");
        // The statement's outcome is unknown: the connection goes with it.
        reset();
        return false;
      }
    }
    PGresult* r = PQgetResult(_c);
    if (!r) break;
    ExecStatusType st = PQresultStatus(r);
    if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK && failure.empty()) {
      const char* state = PQresultErrorField(r, PG_DIAG_SQLSTATE);
      failure = trimmed(PQresultErrorMessage(r)) + (state ? std::string(" (SQLSTATE ") + state + ")" : "");
      if (failure.empty()) failure = PQresStatus(st);
    }
    out.reset(r);
  }
  if (!failure.empty()) {
    error = failure;
    return false;
  }
  if (PQstatus(_c) != CONNECTION_OK) {
    error = describe("lost the database connection");
    reset();
    return false;
  }
  return true;
}

bool conn::stream(const char* sql, std::span<const param> params, const std::function<bool(const PGresult*)>& on_row,
                  std::string& error) {
  if (!ok()) {
    error = "not connected to the database";
    return false;
  }
  // No deadline on the whole (a large shard takes a while), but none on
  // silence either would hang: each wait for more rows is bounded.
  auto wait_more = [] { return steady::now() + std::chrono::seconds(60); };
  bool sent = send_params(sql, params, 1);
  if (!send_wait(sent, wait_more(), error)) return false;
  if (!PQsetSingleRowMode(_c)) {
    error = describe("cannot read rows one by one");
    reset();
    return false;
  }
  bool good = true;
  for (;;) {
    while (PQisBusy(_c)) {
      if (!wait_readable(wait_more(), error) || !PQconsumeInput(_c)) {
        if (error.empty()) error = describe("lost the database connection");
        reset();
        return false;
      }
    }
    result r(PQgetResult(_c));
    if (!r) break;
    ExecStatusType st = PQresultStatus(r.get());
    if (st == PGRES_SINGLE_TUPLE) {
      if (!on_row(r.get())) {
        // Abandoned midway: the rest of the result is not worth reading.
        reset();
        return false;
      }
    } else if (st != PGRES_TUPLES_OK && good) {
      const char* state = PQresultErrorField(r.get(), PG_DIAG_SQLSTATE);
      error = trimmed(PQresultErrorMessage(r.get())) + (state ? std::string(" (SQLSTATE ") + state + ")" : "");
      good = false;
    }
  }
  return good;
}

}  // namespace relay::journal::postgres
