#include <unistd.h>

#include <cinttypes>
#include <cstdio>

#include "relay/http.h"

namespace relay::http {

std::string body_spool::path_of(const std::string& dir, uint64_t file) {
  char name[17];
  std::snprintf(name, sizeof name, "%016" PRIx64, file);
  return dir + "/" + name;
}

body_spool::~body_spool() {
  if (keep || dir.empty()) return;
  std::string p = path();
  if (!loop) {
    ::unlink(p.c_str());
    return;
  }
  // The request frees itself in the callback; an error (the file is gone
  // already) leaves nothing to do.
  auto* req = new uv_fs_t;
  if (uv_fs_unlink(loop, req, p.c_str(), [](uv_fs_t* r) {
        uv_fs_req_cleanup(r);
        delete r;
      }) != 0)
    delete req;
}

}  // namespace relay::http
