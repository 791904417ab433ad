// One libpq connection driven by its asynchronous API with a deadline, for
// the threads of the postgres backend (relay/journal_postgres.h): a silent
// network or a stalled server costs at most the deadline, and a stop request
// is seen within one poll slice, so neither thread can hang relay.
#pragma once

#include <libpq-fe.h>

#include <chrono>
#include <functional>
#include <memory>
#include <span>
#include <string>

namespace relay::journal::postgres {

using steady = std::chrono::steady_clock;

struct result_free {
  void operator()(PGresult* r) const { PQclear(r); }
};
using result = std::unique_ptr<PGresult, result_free>;

// A statement parameter: text (format 0) or binary (format 1).
struct param {
  const char* data;
  int length;
  int format = 0;
};

class conn {
 public:
  // `stop` is polled while waiting; true gives up at once.
  conn(std::string dsn, std::function<bool()> stop) : _dsn(std::move(dsn)), _stop(std::move(stop)) {}
  conn(const conn&) = delete;
  conn& operator=(const conn&) = delete;
  ~conn() { reset(); }

  bool ok() const { return _c && PQstatus(_c) == CONNECTION_OK; }
  // Drops the connection (a statement in flight is then in doubt).
  void reset();
  // Connects unless connected. A server in recovery (a read replica) is
  // refused: relay must write to the primary.
  bool connect(steady::time_point until, std::string& error);
  // Runs `sql` (one statement, or several without parameters) and keeps
  // the last result. False on any error, which names the server's message
  // and SQLSTATE; the connection is dropped unless the server answered.
  bool exec(const char* sql, std::span<const param> params, steady::time_point until, result& out,
            std::string& error, int result_format = 0);
  bool exec(const char* sql, steady::time_point until, std::string& error) {
    result r;
    return exec(sql, {}, until, r, error);
  }
  // Runs a query in single-row mode (binary results), calling on_row for
  // each row; on_row returning false stops with an error it has set.
  bool stream(const char* sql, std::span<const param> params, const std::function<bool(const PGresult*)>& on_row,
              std::string& error);

 private:
  bool send_params(const char* sql, std::span<const param> params, int result_format);
  bool send_wait(bool sent, steady::time_point until, std::string& error);
  bool wait_readable(steady::time_point until, std::string& error);
  std::string describe(const char* what) const;

  std::string _dsn;
  std::function<bool()> _stop;
  PGconn* _c = nullptr;
};

}  // namespace relay::journal::postgres
