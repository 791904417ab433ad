// relay's and bunny's configuration: the JSON file and --set overrides, read
// through config::load as the binaries do (the input is written to a file in
// a scratch directory first), then printed and read back.
//
// Input: [which byte] [config JSON] NUL [KEY=VALUE] LF [KEY=VALUE]...; bit 0
// of the first byte picks bunny's configuration instead of relay's.
//
// Invariants: a refusal says why; an accepted configuration prints (as
// --check-config does) to JSON that loads again, and printing and loading
// then agree (see run()).
#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

#include <string>

#include "fuzz_input.h"
#include "relay/config.h"

using namespace relay;

namespace {

// A scratch directory for the file, made once and removed at exit.
struct scratch {
  std::string path;
  scratch() {
    // TMPDIR first: ci/fuzz points it at a directory it removes, which also
    // catches what a crashed run (no destructors) leaves behind.
    const char* base = getenv("TMPDIR");
    if (!base || !*base) base = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp";
    path = std::string(base) + "/relay-config-fuzz-XXXXXX";
    if (!mkdtemp(path.data())) std::abort();
  }
  ~scratch() {
    unlink((path + "/config.json").c_str());
    rmdir(path.c_str());
  }
};

const std::string& dir() {
  static scratch s;
  return s.path;
}

std::string write_config(std::string_view text) {
  std::string path = dir() + "/config.json";
  int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
  if (fd < 0) std::abort();
  size_t off = 0;
  while (off < text.size()) {
    ssize_t n = write(fd, text.data() + off, text.size() - off);
    if (n <= 0) std::abort();
    off += static_cast<size_t>(n);
  }
  close(fd);
  return path;
}

// Loads `text` as the configuration file; false (with a reason) if refused.
template <class Config>
bool load_text(std::string_view text, const config::override_list& overrides, Config& out, std::string& error) {
  bool ok = config::load(write_config(text), overrides, out, error);
  if (!ok) FUZZ_CHECK(!error.empty());
  return ok;
}

template <class Config>
void run(std::string_view text, const config::override_list& overrides) {
  Config cfg;
  std::string error;
  if (!load_text(text, overrides, cfg, error)) return;
  // What --check-config prints loads again. Relative paths that came from
  // defaults or --set (relative to the working directory) come back
  // resolved against the file's directory, so the fixed point is reached
  // after one more round: from then on, printing and loading agree.
  std::string printed = config::to_json(cfg);
  Config again;
  if (!load_text(printed, {}, again, error)) std::fprintf(stderr, "printed:\n%s\nrefused: %s\n", printed.c_str(), error.c_str());
  FUZZ_CHECK(error.empty());
  std::string reprinted = config::to_json(again);
  Config third;
  FUZZ_CHECK(load_text(reprinted, {}, third, error));
  std::string last = config::to_json(third);
  if (last != reprinted) std::fprintf(stderr, "printed:\n%s\nprinted again:\n%s\n", reprinted.c_str(), last.c_str());
  FUZZ_CHECK(last == reprinted);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  fuzz::input in(data, size);
  bool bunny = in.byte() & 1;
  std::string_view rest = in.rest();
  auto nul = rest.find('\0');
  std::string_view text = rest.substr(0, nul);
  config::override_list overrides;
  if (nul != std::string_view::npos) {
    std::string_view sets = rest.substr(nul + 1);
    while (!sets.empty() && overrides.size() < 16) {
      auto nl = sets.find('\n');
      std::string arg(sets.substr(0, nl));
      std::string error;
      if (!config::add_set_override(arg, overrides, error)) FUZZ_CHECK(!error.empty());
      if (nl == std::string_view::npos) break;
      sets.remove_prefix(nl + 1);
    }
  }
  if (bunny) run<config::bunny_config>(text, overrides);
  else run<config::relay_config>(text, overrides);
  return 0;
}
