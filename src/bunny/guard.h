// The handler guard: the process bunny starts for every exec job, between
// bunny and the handler, so that the handler and everything it starts die
// with bunny however bunny dies (SIGKILL, OOM, a crash), wherever it runs.
//
// libuv's uv_spawn has no hook between fork and exec, so the parent-death
// signal cannot be set in the handler itself; the guard is the bunny binary
// re-executed through /proc/self/exe (no second binary to install, and it is
// the same build as the bunny that started it, even mid-upgrade):
//
//   /proc/self/exe --handler-guard <bunny pid> -- <handler argv...>
//
// It is started in its own session and process group (the group bunny
// signals on timeout or cancel), and
//   - asks for a parent-death signal, then checks its parent is still the
//     bunny whose pid it was given (bunny may have died before the request);
//   - becomes a child subreaper, so a descendant that double-forks to leave
//     its parent is still its child;
//   - forks and execs the handler in its process group with the stdin,
//     stdout, stderr, working directory and environment bunny gave it
//     (bunny builds that environment; the guard passes it on as it is);
//   - exits as the handler did: the same status, or killed by the same
//     signal, so bunny's timeout and kill accounting is unchanged;
//   - when the handler exits, SIGKILLs what it left running (the guard is
//     the parent of its orphans);
//   - when bunny dies, or asks with guard_kill_signal (bunny's hard kill on
//     a timeout, cancel or output overflow: a group SIGKILL would end the
//     guard before it could reach descendants that left the group), SIGKILLs
//     the descendants that left the group and then the whole group, itself
//     included;
//   - gives the handler a parent-death signal too, so a handler that kills
//     its guard dies with it (bunny then SIGKILLs what is left of the group).
//
// fd 3 is a pipe to bunny that reports whether the handler started: the
// guard closes it when the handler's exec succeeded (end of file, nothing
// written) or writes the exec's errno to it (4 bytes, native order) when it
// failed, so bunny can still say "cannot start handler X: <reason>".
#pragma once

namespace relay::bunny {

// The first argument that selects guard mode; main() checks for it before
// anything else runs.
inline constexpr const char* guard_flag = "--handler-guard";

// Sent by bunny to the guard alone: end the handler and everything it
// started, now. Only taken from the guard's parent (bunny).
inline constexpr int guard_kill_signal = 34 + 2;  // SIGRTMIN + 2 under glibc; not a signal anything else sends

// The fd of the start report pipe in the guard (see above).
inline constexpr int guard_report_fd = 3;

// Runs the guard with main()'s arguments; returns only with an exit status
// for a malformed command line (the handler's own status ends the process
// from inside).
int run_guard(int argc, char** argv);

}  // namespace relay::bunny
