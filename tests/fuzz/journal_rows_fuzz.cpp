// A row of the postgres journal backend (relay/journal_postgres.h) as the
// database hands it back: records of the current format back to back,
// decoded by for_each_record() into a fresh broker as a new leader's replay
// does. The database is untrusted input too: a row may be damaged anywhere.
//
// Invariants: never crashes; a row it takes is exactly the records it
// decoded, framed again by encode() (nothing skipped, nothing invented); a
// row it refuses names the problem and its offset, and the records before
// the bad one were applied in order.
#include <string>

#include "../support/counting_random.h"
#include "relay/journal.h"

using namespace relay;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view row(reinterpret_cast<const char*>(data), size);
  queue::broker b(queue::broker_limits{}, test::counting_random());
  std::string again, problem;
  journal::record_run run;
  bool ok = journal::for_each_record(
      row,
      [&](const queue::record& r) {
        journal::encode(r, again);
        return b.apply(r);
      },
      run, problem);
  if (ok) {
    if (again != row) std::abort();
    if (!problem.empty()) std::abort();
  } else {
    if (problem.find(" at offset ") == std::string::npos) std::abort();
    // What was applied is a prefix of the row, framed the same way.
    if (row.substr(0, again.size()) != again) std::abort();
  }
  if (run.skipped > run.records) std::abort();
  return 0;
}
