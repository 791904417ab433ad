// Child processes for tests: spawn a real binary, find the lines it logs,
// signal it by PID, wait for it. Output goes to files, not pipes, so a
// chatty child can never block on a full pipe while the test waits.
#pragma once

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

extern char** environ;

namespace test {

inline std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

inline void write_file(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
}

// Spawns argv[0] (searched in PATH) with stdout and stderr sent to files.
inline pid_t spawn(const std::vector<std::string>& argv, const std::string& out_file, const std::string& err_file,
                   const std::string& in_file = "/dev/null") {
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 0, in_file.c_str(), O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&fa, 1, out_file.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
  posix_spawn_file_actions_addopen(&fa, 2, err_file.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
  std::vector<char*> args;
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  pid_t pid = -1;
  if (posix_spawnp(&pid, args[0], &fa, nullptr, args.data(), environ) != 0) pid = -1;
  posix_spawn_file_actions_destroy(&fa);
  return pid;
}

// Waits for `pid` up to timeout_ms; returns its exit code, 128+signal, or
// -1 if it is still running.
inline int wait_exit(pid_t pid, int timeout_ms) {
  auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  for (;;) {
    int status = 0;
    pid_t r = waitpid(pid, &status, WNOHANG);
    if (r == pid) return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    if (r < 0) return -2;
    if (std::chrono::steady_clock::now() >= until) return -1;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

// Whether `pid` runs: exists and is not a zombie (a sandbox's PID 1 may
// not reap).
inline bool process_running(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  for (std::string line; std::getline(in, line);)
    if (line.rfind("State:", 0) == 0) return line.find('Z') == std::string::npos && line.find('X') == std::string::npos;
  return false;
}

struct run_result {
  int exit_code = -1;
  std::string out;
  std::string err;
};

// Runs a command to completion (killing it after timeout_ms).
inline run_result run(const std::vector<std::string>& argv, const std::string& scratch_dir, int timeout_ms = 30000,
                      const std::string& in_file = "/dev/null") {
  static int counter = 0;
  std::string base = scratch_dir + "/run" + std::to_string(getpid()) + "_" + std::to_string(counter++);
  run_result r;
  pid_t pid = spawn(argv, base + ".out", base + ".err", in_file);
  if (pid < 0) {
    r.err = "cannot spawn " + argv[0];
    return r;
  }
  r.exit_code = wait_exit(pid, timeout_ms);
  if (r.exit_code == -1) {
    kill(pid, SIGKILL);
    wait_exit(pid, 5000);
  }
  r.out = read_file(base + ".out");
  r.err = read_file(base + ".err");
  unlink((base + ".out").c_str());
  unlink((base + ".err").c_str());
  return r;
}

// A long-running child (relay, bunny) whose stderr log the test can search.
class child {
 public:
  child(const std::vector<std::string>& argv, const std::string& log_file) : _log(log_file) {
    _pid = spawn(argv, log_file + ".stdout", log_file);
  }
  child(const child&) = delete;
  child& operator=(const child&) = delete;
  ~child() {
    if (_pid > 0 && !_exited) {
      ::kill(_pid, SIGKILL);
      wait_exit(_pid, 5000);
    }
  }
  pid_t pid() const { return _pid; }
  std::string log() const { return read_file(_log); }

  // The first log line containing `needle`, waiting up to timeout_ms.
  std::optional<std::string> wait_for_line(const std::string& needle, int timeout_ms = 10000) const {
    auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
    for (;;) {
      std::istringstream lines(log());
      std::string line;
      while (std::getline(lines, line))
        if (line.find(needle) != std::string::npos) return line;
      if (std::chrono::steady_clock::now() >= until) return std::nullopt;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  }
  void signal(int sig) const { ::kill(_pid, sig); }
  int wait(int timeout_ms) {
    int rc = wait_exit(_pid, timeout_ms);
    if (rc >= 0) _exited = true;
    return rc;
  }

 private:
  pid_t _pid = -1;
  bool _exited = false;
  std::string _log;
};

// The non-empty lines of a command's output.
inline std::vector<std::string> lines(const std::string& text) {
  std::vector<std::string> out;
  std::istringstream in(text);
  for (std::string l; std::getline(in, l);)
    if (!l.empty()) out.push_back(l);
  return out;
}

// The value of "key":"..." in a JSON log line.
inline std::string json_field(const std::string& line, const std::string& key) {
  std::string pat = "\"" + key + "\":\"";
  auto p = line.find(pat);
  if (p == std::string::npos) return {};
  p += pat.size();
  return line.substr(p, line.find('"', p) - p);
}

}  // namespace test
