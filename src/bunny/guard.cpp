// The handler guard (see guard.h for what it is and why it exists).
//
// It is single-threaded and installs no signal handlers: every signal it
// cares about is blocked and taken synchronously with sigwaitinfo(), so no
// code of its own ever runs in signal context, and the child of its fork()
// (a single-threaded parent) may call execvp() as libuv's own child does.
#include "bunny/guard.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <vector>

namespace relay::bunny {
namespace {

// Chosen for the parent-death signal because nothing else sends it to a
// process that has no controlling terminal (the guard is a session leader
// without one); a stray one is told apart by getppid() anyway.
constexpr int parent_death_signal = SIGHUP;

// Signals taken by sigwaitinfo(). SIGCHLD: a child (the handler or an
// adopted descendant) ended. The others are those bunny or an operator may
// send to the handler's process group; the guard receives its own copy,
// and must outlive them as long as the handler does so that bunny sees the
// handler's real status (a handler may trap SIGTERM and exit 0).
constexpr int taken_signals[] = {SIGCHLD, SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2, SIGALRM, guard_kill_signal};

// How long killing the descendants may take: each round reaches one more
// level of the tree (a killed process's children become the guard's), so a
// deep chain needs many rounds; a time bound, not a count, ends it.
constexpr int64_t kill_deadline_ms = 5000;

int64_t monotonic_ms() {
  timespec ts;
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000 + ts.tv_nsec / 1000000;
}

// Tells bunny why the handler could not be started and ends the guard.
[[noreturn]] void report_and_exit(int error) {
  ssize_t n;
  do n = ::write(guard_report_fd, &error, sizeof error);
  while (n < 0 && errno == EINTR);
  ::_exit(127);
}

// Descriptors bunny did not mean to pass: everything of bunny's is
// close-on-exec, but a handler must not depend on that having been right.
void close_inherited_fds() {
  if (::close_range(guard_report_fd + 1, UINT_MAX, 0) == 0) return;
  // close_range(2) is missing before Linux 5.9 or refused by a seccomp
  // filter; list the open descriptors instead of guessing a highest one.
  DIR* d = ::opendir("/proc/self/fd");
  if (d == nullptr) return;
  std::vector<int> fds;
  while (dirent* e = ::readdir(d)) {
    char* end = nullptr;
    long fd = std::strtol(e->d_name, &end, 10);
    if (end != e->d_name && *end == '\0' && fd > guard_report_fd && fd != ::dirfd(d)) fds.push_back(static_cast<int>(fd));
  }
  ::closedir(d);
  for (int fd : fds) ::close(fd);
}

// The guard's children right now: the handler and the descendants it
// adopted as a subreaper. Empty when the kernel does not expose the list.
std::vector<pid_t> children() {
  char path[64];
  std::snprintf(path, sizeof path, "/proc/self/task/%d/children", static_cast<int>(::getpid()));
  std::vector<pid_t> out;
  FILE* f = std::fopen(path, "re");
  if (f == nullptr) return out;
  int pid;
  while (std::fscanf(f, "%d", &pid) == 1) out.push_back(pid);
  std::fclose(f);
  return out;
}

// Kills everything the handler started. Descendants that left the process
// group (setsid, setpgid) are not reached by a group kill, but as a
// subreaper the guard is the parent of each of them once the process
// between them has died; so kill the children, wait for them, and repeat
// with the ones they leave behind, until none is left (or the deadline, in
// case something forks faster than it is killed).
void kill_descendants() {
  const int64_t deadline = monotonic_ms() + kill_deadline_ms;
  while (monotonic_ms() < deadline) {
    std::vector<pid_t> kids = children();
    if (kids.empty()) break;
    for (pid_t k : kids) ::kill(k, SIGKILL);
    for (pid_t k : kids) {
      while (::waitpid(k, nullptr, 0) < 0 && errno == EINTR) {
      }
    }
  }
}

// bunny is gone: nothing the handler started may go on, the guard included.
[[noreturn]] void kill_everything() {
  kill_descendants();
  // The group: what is left of the handler's, and the guard itself.
  ::kill(0, SIGKILL);
  ::_exit(128 + SIGKILL);
}

// Ends the guard the way the handler ended, so that bunny's accounting of
// exit statuses and signals (timeouts, kills) sees the handler.
[[noreturn]] void exit_like(int status) {
  if (WIFEXITED(status)) ::_exit(WEXITSTATUS(status));
  int sig = WTERMSIG(status);
  // The handler has already dumped its core if it was going to; the guard's
  // would be bunny's binary, in the handler's working directory.
  ::prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
  struct sigaction dfl {};
  dfl.sa_handler = SIG_DFL;
  ::sigaction(sig, &dfl, nullptr);
  sigset_t only;
  sigemptyset(&only);
  sigaddset(&only, sig);
  ::raise(sig);
  ::sigprocmask(SIG_UNBLOCK, &only, nullptr);
  // A signal whose default is not to terminate cannot have ended the handler.
  ::_exit(128 + sig);
}

}  // namespace

int run_guard(int argc, char** argv) {
  // argv: <name> --handler-guard <bunny pid> -- <handler argv...>
  if (argc < 5 || std::strcmp(argv[1], guard_flag) != 0 || std::strcmp(argv[3], "--") != 0) {
    std::fputs("bunny: --handler-guard is for bunny's own use\n", stderr);
    return 2;
  }
  char* end = nullptr;
  long bunny = std::strtol(argv[2], &end, 10);
  if (end == argv[2] || *end != '\0' || bunny < 1 || bunny > INT_MAX) {
    std::fputs("bunny: --handler-guard: bad parent pid\n", stderr);
    return 2;
  }
  // Shown by ps and top instead of "exe" (the name of /proc/self/exe).
  ::prctl(PR_SET_NAME, "bunny-guard", 0, 0, 0);

  sigset_t taken, original;
  sigemptyset(&taken);
  for (int s : taken_signals) sigaddset(&taken, s);
  if (::sigprocmask(SIG_BLOCK, &taken, &original) != 0) report_and_exit(errno);

  // The signal is blocked already, so it cannot be lost between the
  // request and the check: if bunny died before the request, getppid() is
  // no longer bunny (the guard has been reparented) and nothing starts.
  if (::prctl(PR_SET_PDEATHSIG, parent_death_signal, 0, 0, 0) != 0) report_and_exit(errno);
  if (::getppid() != static_cast<pid_t>(bunny)) ::_exit(128 + SIGKILL);
  if (::prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0) report_and_exit(errno);
  close_inherited_fds();

  const pid_t guard = ::getpid();
  pid_t handler = ::fork();
  if (handler < 0) report_and_exit(errno);
  if (handler == 0) {
    // The handler: the guard's process group and session, stdio and
    // environment as bunny made them; the signal mask bunny gave the guard
    // (libuv's spawn clears it). The report pipe closes on exec, which
    // tells bunny the handler started; if the exec fails, its errno is sent.
    ::sigprocmask(SIG_SETMASK, &original, nullptr);
    ::fcntl(guard_report_fd, F_SETFD, FD_CLOEXEC);
    // A handler that kills its guard must not run on unwatched: it dies
    // with the guard (checked after the request: the guard may be gone).
    if (::prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) != 0) report_and_exit(errno);
    if (::getppid() != guard) ::_exit(128 + SIGKILL);
    ::execvp(argv[4], argv + 4);
    report_and_exit(errno);
  }
  // The guard writes nothing from here on. Its copies of the handler's
  // stdio would hold the pipes open: bunny would see no EPIPE when the
  // handler stops reading its input, and no end of its output when the
  // handler closes it, until the guard itself ends.
  for (int fd : {guard_report_fd, STDIN_FILENO, STDOUT_FILENO, STDERR_FILENO}) ::close(fd);

  for (;;) {
    siginfo_t info;
    int sig = ::sigwaitinfo(&taken, &info);
    if (sig < 0) continue;  // EINTR: a stop and continue
    // Checked on every wake-up, not only for the parent-death signal: a
    // group signal and bunny's death may arrive together and be merged.
    if (::getppid() != static_cast<pid_t>(bunny)) kill_everything();
    if (sig == guard_kill_signal && info.si_pid == static_cast<pid_t>(bunny)) kill_everything();
    if (sig != SIGCHLD) continue;  // the group's copy went to the handler too
    int status = 0;
    pid_t pid;
    // Reap everything that ended: adopted descendants are the guard's to reap.
    while ((pid = ::waitpid(-1, &status, WNOHANG)) > 0) {
      if (pid == handler) {
        // The job ends with its handler: what the handler started and left
        // running (a background process) would otherwise go on unwatched,
        // past the job and past bunny. Its orphans are the guard's children
        // by now.
        kill_descendants();
        exit_like(status);
      }
    }
  }
}

}  // namespace relay::bunny
