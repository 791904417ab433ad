// A PostgreSQL primary and one synchronous standby on loopback, started by
// the test from Debian's postgresql-15 binaries, for the fault tests of the
// postgres journal backend (issue 12). Header-only; no libpq: the test talks
// to the servers with psql.
//
// What it sets up, in a temporary directory it owns and removes:
//   - primary: initdb (scram-sha-256, one superuser with a generated
//     password), wal_level=replica, listen 127.0.0.1 only, no Unix socket,
//     synchronous_standby_names = 'FIRST 1 (standby1)' and
//     synchronous_commit = remote_apply: a commit returns only once the
//     standby has applied it, so a read on the standby right after sees it.
//   - standby: pg_basebackup with a permanent replication slot ("standby1"),
//     standby.signal, primary_conninfo with application_name=standby1; its
//     own synchronous_standby_names is empty, so once promoted it accepts
//     writes alone (there is no third node to be synchronous with).
// Authentication is scram-sha-256 with a generated password in a passfile
// (mode 0600) rather than trust: the ports are on 127.0.0.1, which every
// local user of a shared CI machine can reach, and trust would make any of
// them superuser of the test's databases. The DSNs name the passfile, so a
// DSN is all a client needs, and the secret never appears in argv or env.
//
// Servers run as a non-root user, as PostgreSQL requires: the caller itself
// when it is not root; when it is root (CI), the `postgres` user that the
// Debian package creates (else `nobody`), by fork + setgid/setuid before
// exec. The directory and data directories belong to that user.
//
// Processes: the fixture kills only what it started, by PID. A postmaster is
// its child; the postmaster's own children (backends, walsender, walwriter,
// checkpointer...) each call setsid(), so a process-group kill would miss
// them. To crash a node, the fixture SIGSTOPs its postmaster (it can then
// neither fork nor reap, so its children's PIDs cannot be reused), SIGKILLs
// each process whose parent is that postmaster, then SIGKILLs the postmaster:
// the whole server dies at once, like a machine losing power (without losing
// the page cache). The test process makes itself a child subreaper, so the
// orphaned children come back to it and it reaps them by PID. It then removes the postmaster's small System V segment,
// which an orderly shutdown would have removed. Dynamic shared memory uses
// files in the data directory (dynamic_shared_memory_type = mmap), so
// nothing is left in /dev/shm.
//
// Every wait polls with a deadline; none sleeps blindly.
#pragma once

#include <arpa/inet.h>
#include <fcntl.h>
#include <grp.h>
#include <netinet/in.h>
#include <pwd.h>
#include <signal.h>
#include <sys/ipc.h>
#include <sys/prctl.h>
#include <sys/shm.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "process.h"
#include "tmpdir.h"

extern char** environ;

namespace test {

namespace pg_detail {

inline const std::string& bin_dir() {
  static const std::string dir = [] {
    const char* v = std::getenv("RELAY_TEST_PG_BINDIR");  // another major version, if ever needed
    return std::string(v && *v ? v : "/usr/lib/postgresql/15/bin");
  }();
  return dir;
}
inline std::string bin(const std::string& name) { return bin_dir() + "/" + name; }

// Whom the servers run as.
struct server_user {
  uid_t uid = 0;
  gid_t gid = 0;
  std::string name;
  bool drop = false;  // true: the caller is root and the child must setuid
};

inline std::optional<server_user> pick_server_user() {
  if (geteuid() != 0) {
    server_user u;
    u.uid = geteuid();
    u.gid = getegid();
    passwd* pw = getpwuid(u.uid);
    u.name = pw ? pw->pw_name : std::to_string(u.uid);
    return u;
  }
  for (const char* name : {"postgres", "nobody"}) {
    passwd* pw = getpwnam(name);
    if (pw && pw->pw_uid != 0) return server_user{pw->pw_uid, pw->pw_gid, name, true};
  }
  return std::nullopt;
}

// The environment for every child: the caller's, minus PG* variables
// (PGHOST, PGOPTIONS, PGSERVICE... would change what psql, pg_basebackup or
// the server do).
inline std::vector<std::string> child_env() {
  std::vector<std::string> env;
  for (char** e = environ; *e; ++e)
    if (std::strncmp(*e, "PG", 2) != 0) env.emplace_back(*e);
  return env;
}

// fork + exec of argv[0] (a full path) with stdout and stderr to files
// (opened before privileges are dropped), as `user` when user.drop, in a
// session of its own when new_session. Everything the child touches is
// prepared before fork: the test process may have threads.
inline pid_t spawn_as(const std::vector<std::string>& argv, const std::string& out_file, const std::string& err_file,
                      const server_user* user, const std::string& cwd, bool new_session) {
  std::vector<char*> args;
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  std::vector<std::string> env_strings = child_env();
  std::vector<char*> env;
  for (auto& e : env_strings) env.push_back(e.data());
  env.push_back(nullptr);
  pid_t pid = fork();
  if (pid != 0) return pid;  // parent (or -1)
  int in = open("/dev/null", O_RDONLY);
  int out = open(out_file.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  int err = open(err_file.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (in < 0 || out < 0 || err < 0) _exit(125);
  if (dup2(in, 0) < 0 || dup2(out, 1) < 0 || dup2(err, 2) < 0) _exit(125);
  if (new_session) setsid();
  // Signals the test process ignores (SIGPIPE) would stay ignored across
  // exec; give the child the defaults.
  signal(SIGPIPE, SIG_DFL);
  if (user && user->drop) {
    gid_t g = user->gid;
    if (setgroups(1, &g) != 0 || setgid(user->gid) != 0 || setuid(user->uid) != 0) _exit(126);
  }
  if (chdir(cwd.c_str()) != 0) _exit(125);
  execve(args[0], args.data(), env.data());
  _exit(127);
}

inline int free_loopback_port() {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof a;
  int port = -1;
  if (bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0 &&
      getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) == 0)
    port = ntohs(a.sin_port);
  close(fd);
  return port;
}

inline std::string random_hex(size_t bytes) {
  std::string raw(bytes, '\0');
  std::FILE* f = std::fopen("/dev/urandom", "rb");
  if (!f || std::fread(raw.data(), 1, bytes, f) != bytes) throw std::runtime_error("reading /dev/urandom failed");
  std::fclose(f);
  static const char* hex = "0123456789abcdef";
  std::string out;
  for (unsigned char c : raw) {
    out += hex[c >> 4];
    out += hex[c & 15];
  }
  return out;
}

// Fields of /proc/<pid>/stat after the command name: state is [0], ppid [1],
// starttime [19].
inline std::vector<std::string> proc_stat(pid_t pid) {
  std::string s = read_file("/proc/" + std::to_string(pid) + "/stat");
  auto close_paren = s.rfind(')');
  std::vector<std::string> fields;
  if (close_paren == std::string::npos) return fields;
  std::istringstream in(s.substr(close_paren + 2));
  for (std::string f; in >> f;) fields.push_back(f);
  return fields;
}

// The processes whose parent is `parent`.
inline std::vector<pid_t> children_of(pid_t parent) {
  std::vector<pid_t> out;
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator("/proc", ec)) {
    const std::string name = entry.path().filename();
    if (name.empty() || name.find_first_not_of("0123456789") != std::string::npos) continue;
    pid_t pid = static_cast<pid_t>(std::stol(name));
    auto f = proc_stat(pid);
    if (f.size() > 1 && std::stol(f[1]) == parent) out.push_back(pid);
  }
  return out;
}

// Gone: no such process, or a zombie (someone else reaps it), or the PID now
// names a different process (a different start time).
inline bool gone(pid_t pid, const std::string& starttime) {
  auto f = proc_stat(pid);
  return f.size() < 20 || f[0] == "Z" || f[0] == "X" || f[19] != starttime;
}

}  // namespace pg_detail

class postgres_cluster {
 public:
  // Why PostgreSQL cannot be started here, or nullopt if it can. A test
  // binary checks this in main() and exits 77 (skipped) with the reason.
  static std::optional<std::string> unavailable_reason() {
    for (const char* tool : {"initdb", "postgres", "pg_basebackup", "pg_isready", "psql"})
      if (access(pg_detail::bin(tool).c_str(), X_OK) != 0)
        return pg_detail::bin(tool) + " is missing (Debian: apt-get install postgresql-15; ci/deps does)";
    if (!pg_detail::pick_server_user())
      return std::string("running as root and there is no non-root user (postgres or nobody) to run the servers as");
    return std::nullopt;
  }

  // Makes the directory; start() starts the servers.
  postgres_cluster() {
    auto user = pg_detail::pick_server_user();
    if (!user) throw std::runtime_error(*unavailable_reason());
    _user = *user;
    // The postmaster's children that crash() kills are orphaned when it
    // dies; as a subreaper, the test process gets them and reaps them itself
    // rather than depend on PID 1 (in a container, PID 1 may never reap).
    prctl(PR_SET_CHILD_SUBREAPER, 1);
    const char* base = std::getenv("TMPDIR");
    std::string tmpl = std::string(base && *base ? base : "/tmp") + "/relay-pg-XXXXXX";
    if (!mkdtemp(tmpl.data())) throw std::runtime_error("mkdtemp failed");
    _root = tmpl;
    own(_root);
    _password = pg_detail::random_hex(24);
    _passfile = _root + "/pgpass";
    write_owned(_passfile, "127.0.0.1:*:*:" + _user_name + ":" + _password + "\n");
    write_owned(_root + "/pwfile", _password + "\n");
  }
  postgres_cluster(const postgres_cluster&) = delete;
  postgres_cluster& operator=(const postgres_cluster&) = delete;

  // Stops what is still running (immediate shutdown, then the crash path if
  // a postmaster does not end within 10 s) and removes the directory.
  ~postgres_cluster() {
    for (node* n : {&_standby, &_primary}) shut_down(*n);
    std::error_code ec;
    std::filesystem::remove_all(_root, ec);
  }

  // Call before start(): both servers also take TLS with this certificate
  // and key (copied into the cluster's directory, owned by the server user,
  // as PostgreSQL requires). Clients choose with sslmode in their DSN.
  void use_tls(const std::string& cert_file, const std::string& key_file) {
    std::ifstream cert(cert_file), key(key_file);
    std::stringstream c, k;
    c << cert.rdbuf();
    k << key.rdbuf();
    _tls_cert = _root + "/server.crt";
    _tls_key = _root + "/server.key";
    write_owned(_tls_cert, c.str());
    write_owned(_tls_key, k.str());
  }

  // initdb, primary up, base backup, standby up, and the standby reported
  // as synchronous by the primary; then the database `dbname()` is created
  // (a commit, so it already goes through synchronous replication). Throws
  // with the servers' logs on failure; bounded by timeout_ms overall.
  void start(int timeout_ms = 45000) {
    auto until = deadline(timeout_ms);
    _primary.dir = _root + "/primary";
    _standby.dir = _root + "/standby";
    _primary.log = _root + "/primary.log";
    _standby.log = _root + "/standby.log";
    auto r = run_tool({pg_detail::bin("initdb"), "-D", _primary.dir, "-U", _user_name, "--pwfile=" + _root + "/pwfile",
                       "--auth=scram-sha-256", "--no-locale", "-E", "UTF8", "--no-sync", "--no-instructions"},
                      until);
    unlink((_root + "/pwfile").c_str());
    if (r.exit_code != 0) throw std::runtime_error("initdb failed (" + std::to_string(r.exit_code) + "): " + r.err + r.out);
    write_owned(_primary.dir + "/pg_hba.conf",
                "# Written by tests/support/postgres.h: the superuser, from loopback only, with a password.\n"
                "host all " + _user_name + " 127.0.0.1/32 scram-sha-256\n"
                "host replication " + _user_name + " 127.0.0.1/32 scram-sha-256\n");
    start_node(_primary, until, [this](int port) {
      return common_settings(port) +
             "synchronous_standby_names = 'FIRST 1 (standby1)'\n"
             "synchronous_commit = remote_apply\n";
    });

    r = run_tool({pg_detail::bin("pg_basebackup"), "-d", base_dsn(_primary.port), "-D", _standby.dir, "-X", "stream",
                  "-C", "-S", "standby1", "--checkpoint=fast", "--no-sync"},
                 until);
    if (r.exit_code != 0)
      throw std::runtime_error("pg_basebackup failed (" + std::to_string(r.exit_code) + "): " + r.err + r.out);
    write_owned(_standby.dir + "/standby.signal", "");
    start_node(_standby, until, [this](int port) {
      return common_settings(port) +
             "synchronous_standby_names = ''\n"
             "synchronous_commit = remote_apply\n"
             "hot_standby = on\n"
             "primary_slot_name = 'standby1'\n"
             "primary_conninfo = '" + base_dsn(_primary.port) + " application_name=standby1'\n";
    });

    for (;;) {
      auto q = psql(primary_dsn("postgres"),
                    "SELECT sync_state FROM pg_stat_replication WHERE application_name = 'standby1'", 5000);
      if (q.exit_code == 0 && q.out == "sync\n") break;
      if (std::chrono::steady_clock::now() >= until)
        throw std::runtime_error("the standby never became synchronous (last: " + q.out + q.err + ")\n" + logs());
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    auto c = psql(primary_dsn("postgres"), "CREATE DATABASE " + _dbname, remaining_ms(until));
    if (c.exit_code != 0) throw std::runtime_error("CREATE DATABASE failed: " + c.err + "\n" + logs());
  }

  // libpq connection strings (keyword=value), self-contained: the passfile
  // holds the password.
  std::string primary_dsn(const std::string& db = {}) const { return dsn(_primary.port, db); }
  std::string standby_dsn(const std::string& db = {}) const { return dsn(_standby.port, db); }
  const std::string& dbname() const { return _dbname; }
  const std::string& user_name() const { return _user_name; }
  const std::string& passfile_path() const { return _passfile; }
  const std::string& dir() const { return _root; }
  int primary_port() const { return _primary.port; }
  int standby_port() const { return _standby.port; }
  pid_t primary_pid() const { return _primary.pid; }
  pid_t standby_pid() const { return _standby.pid; }
  bool primary_running() const { return _primary.pid > 0; }
  bool standby_running() const { return _standby.pid > 0; }
  const std::string& server_user_name() const { return _user.name; }
  std::string primary_log() const { return read_file(_primary.log); }
  std::string standby_log() const { return read_file(_standby.log); }
  std::string primary_data_dir() const { return _primary.dir; }

  // The primary dies at once: postmaster and every one of its children
  // SIGKILLed (see the top of this file). Returns once all are gone (10 s
  // at most; throws if not).
  void stop_primary_immediate() { crash(_primary); }
  void stop_standby_immediate() { crash(_standby); }

  // pg_promote() on the standby, then waits (bounded) until it is out of
  // recovery. It has no synchronous standby of its own: commits on it are
  // acknowledged on one node.
  void promote_standby(int timeout_ms = 30000) {
    auto until = deadline(timeout_ms);
    auto r = psql(standby_dsn("postgres"), "SELECT pg_promote(true, " + std::to_string(timeout_ms / 1000) + ")",
                  timeout_ms);
    if (r.exit_code != 0 || r.out != "t\n")
      throw std::runtime_error("pg_promote failed: " + r.out + r.err + "\n" + standby_log());
    for (;;) {
      auto q = psql(standby_dsn("postgres"), "SELECT pg_is_in_recovery()", 5000);
      if (q.exit_code == 0 && q.out == "f\n") return;
      if (std::chrono::steady_clock::now() >= until)
        throw std::runtime_error("the standby is still in recovery: " + q.out + q.err + "\n" + standby_log());
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  }

  // psql -X -A -t -q with ON_ERROR_STOP: the rows, '|'-separated, one per
  // line. Runs as the caller (a client needs no privileges: the DSN names
  // the passfile). Killed after timeout_ms.
  run_result psql(const std::string& dsn, const std::string& sql, int timeout_ms = 10000) const {
    return run_child({pg_detail::bin("psql"), "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-d", dsn, "-c", sql},
                     nullptr, timeout_ms);
  }

  // Both servers' logs, for failure messages.
  std::string logs() const {
    return "--- primary log:\n" + primary_log() + "--- standby log:\n" + standby_log();
  }

 private:
  struct node {
    std::string dir;
    std::string log;
    int port = 0;
    pid_t pid = -1;
  };

  using time_point = std::chrono::steady_clock::time_point;
  static time_point deadline(int ms) { return std::chrono::steady_clock::now() + std::chrono::milliseconds(ms); }
  static int remaining_ms(time_point until) {
    auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(until - std::chrono::steady_clock::now()).count();
    return ms > 0 ? static_cast<int>(ms) : 1;
  }

  std::string dsn(int port, const std::string& db) const {
    return base_dsn(port) + " dbname=" + (db.empty() ? _dbname : db);
  }
  std::string base_dsn(int port) const {
    return "host=127.0.0.1 port=" + std::to_string(port) + " user=" + _user_name + " passfile=" + _passfile +
           " connect_timeout=5";
  }

  std::string common_settings(int port) const {
    return "\n# Written by tests/support/postgres.h (later lines win).\n"
           "listen_addresses = '127.0.0.1'\n"
           "port = " + std::to_string(port) + "\n"
           "unix_socket_directories = ''\n"
           "max_connections = 30\n"
           "shared_buffers = 16MB\n"
           "dynamic_shared_memory_type = mmap\n"
           "wal_level = replica\n"
           "max_wal_senders = 4\n"
           "max_replication_slots = 4\n"
           "wal_sender_timeout = 5s\n"
           "wal_receiver_timeout = 5s\n"
           "wal_receiver_status_interval = 1s\n"
           "wal_retrieve_retry_interval = 200ms\n"
           "logging_collector = off\n"
           "log_destination = stderr\n" +
           (_tls_cert.empty() ? std::string()
                              : "ssl = on\nssl_cert_file = '" + _tls_cert + "'\nssl_key_file = '" + _tls_key + "'\n");
  }

  // Chown to the server user (a no-op when that is the caller); 0700/0600.
  void own(const std::string& path) const {
    if (_user.drop && chown(path.c_str(), _user.uid, _user.gid) != 0)
      throw std::runtime_error("chown " + path + ": " + std::strerror(errno));
  }
  void write_owned(const std::string& path, const std::string& text, bool append = false) const {
    int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC | (append ? O_APPEND : O_TRUNC), 0600);
    if (fd < 0) throw std::runtime_error("open " + path + ": " + std::strerror(errno));
    size_t done = 0;
    while (done < text.size()) {
      ssize_t n = ::write(fd, text.data() + done, text.size() - done);
      if (n <= 0) {
        ::close(fd);
        throw std::runtime_error("write " + path);
      }
      done += static_cast<size_t>(n);
    }
    ::close(fd);
    own(path);
  }

  // Runs a command to completion (killed at timeout), as `user` (the server
  // user) or, with nullptr, as the caller.
  run_result run_child(const std::vector<std::string>& argv, const pg_detail::server_user* user, int timeout_ms) const {
    static int counter = 0;
    std::string base = _root + "/run" + std::to_string(counter++);
    run_result r;
    pid_t pid = pg_detail::spawn_as(argv, base + ".out", base + ".err", user, _root, false);
    if (pid < 0) {
      r.err = "cannot fork for " + argv[0];
      return r;
    }
    r.exit_code = wait_exit(pid, timeout_ms);
    if (r.exit_code == -1) {
      ::kill(pid, SIGKILL);
      wait_exit(pid, 5000);
      r.err = argv[0] + " timed out after " + std::to_string(timeout_ms) + " ms\n";
    }
    r.out = read_file(base + ".out");
    r.err += read_file(base + ".err");
    unlink((base + ".out").c_str());
    unlink((base + ".err").c_str());
    return r;
  }
  run_result run_tool(const std::vector<std::string>& argv, time_point until) const {
    return run_child(argv, &_user, remaining_ms(until));
  }

  // Appends settings(port) to the node's postgresql.conf, starts its
  // postmaster and waits until it accepts connections. If the port was
  // taken meanwhile (another process bound it after free_loopback_port()),
  // tries again with another, three times at most.
  template <typename Settings>
  void start_node(node& n, time_point until, Settings settings) {
    for (int attempt = 0;; ++attempt) {
      n.port = pg_detail::free_loopback_port();
      write_owned(n.dir + "/postgresql.conf", settings(n.port), true);
      n.pid = pg_detail::spawn_as({pg_detail::bin("postgres"), "-D", n.dir}, n.log + ".stdout", n.log, &_user, _root,
                                  true);
      if (n.pid < 0) throw std::runtime_error("cannot fork for postgres");
      for (;;) {
        int rc = wait_exit(n.pid, 0);
        if (rc >= 0) {
          n.pid = -1;
          std::string log = read_file(n.log);
          if (attempt < 2 && log.find("could not bind") != std::string::npos) break;
          throw std::runtime_error("postgres in " + n.dir + " exited (" + std::to_string(rc) + "):\n" + log);
        }
        auto q = run_child({pg_detail::bin("pg_isready"), "-q", "-h", "127.0.0.1", "-p", std::to_string(n.port), "-t",
                            "1"},
                           nullptr, 5000);
        if (q.exit_code == 0) return;
        if (std::chrono::steady_clock::now() >= until)
          throw std::runtime_error("postgres in " + n.dir + " not ready in time:\n" + read_file(n.log));
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
      }
    }
  }

  // The crash path (see the top of this file).
  void crash(node& n) {
    if (n.pid <= 0) return;
    auto shm = shm_of(n);
    ::kill(n.pid, SIGSTOP);
    std::vector<std::pair<pid_t, std::string>> victims;
    for (pid_t c : pg_detail::children_of(n.pid)) {
      auto f = pg_detail::proc_stat(c);
      if (f.size() >= 20) victims.emplace_back(c, f[19]);
      ::kill(c, SIGKILL);
    }
    ::kill(n.pid, SIGKILL);
    int rc = wait_exit(n.pid, 10000);
    n.pid = -1;
    auto until = deadline(10000);
    for (const auto& [pid, start] : victims)
      while (!reaped_or_gone(pid, start)) {
        if (std::chrono::steady_clock::now() >= until)
          throw std::runtime_error("a child of the killed postmaster (pid " + std::to_string(pid) + ") is still alive");
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
      }
    if (rc < 0) throw std::runtime_error("the SIGKILLed postmaster did not end");
    release_shm(shm);
  }

  // A killed child of the postmaster has been reparented: to the test
  // process (a subreaper, see the constructor), which reaps it here by its
  // PID, or, if that could not be arranged, to some other reaper.
  static bool reaped_or_gone(pid_t pid, const std::string& starttime) {
    int status = 0;
    pid_t r = waitpid(pid, &status, WNOHANG);
    if (r == pid) return true;
    if (r == 0) return false;  // our child, still running
    return pg_detail::gone(pid, starttime);
  }

  // Immediate shutdown (SIGQUIT: the postmaster quits its children and
  // cleans up), the crash path if it does not end in 10 s.
  void shut_down(node& n) {
    if (n.pid <= 0) return;
    ::kill(n.pid, SIGQUIT);
    if (wait_exit(n.pid, 10000) >= 0) {
      n.pid = -1;
      return;
    }
    try {
      crash(n);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "postgres_cluster: %s\n", e.what());
    }
  }

  // The postmaster's System V segment: line 7 of postmaster.pid is
  // "<key> <shmid>".
  struct shm_ref {
    long key = -1;
    int id = -1;
  };
  shm_ref shm_of(const node& n) const {
    std::istringstream in(read_file(n.dir + "/postmaster.pid"));
    std::string line;
    for (int i = 0; i < 7 && std::getline(in, line); ++i) {
    }
    shm_ref s;
    std::istringstream fields(line);
    fields >> s.key >> s.id;
    return s;
  }
  // Removes it if it is still the one the postmaster made: same key, owned
  // by the server user.
  void release_shm(const shm_ref& s) const {
    if (s.id < 0) return;
    shmid_ds ds{};
    if (shmctl(s.id, IPC_STAT, &ds) != 0) return;
    if (static_cast<long>(ds.shm_perm.__key) != s.key || ds.shm_perm.uid != _user.uid) return;
    shmctl(s.id, IPC_RMID, nullptr);
  }

  pg_detail::server_user _user;
  std::string _root;
  std::string _user_name = "relay_test";
  std::string _dbname = "relay";
  std::string _password;
  std::string _passfile;
  std::string _tls_cert, _tls_key;  // use_tls()
  node _primary;
  node _standby;
};

// Whether a test of the postgres journal backend can run here: the backend
// is built (RELAY_WITH_POSTGRES, the OpenSSL build) and PostgreSQL can be
// started. A case that cannot is reported skipped, never passed:
//   TEST_CASE("..." * doctest::skip(!test::postgres_backend_testable()))
inline bool postgres_backend_testable() {
#if defined(RELAY_WITH_POSTGRES) && RELAY_WITH_POSTGRES
  return !postgres_cluster::unavailable_reason();
#else
  return false;
#endif
}

// relay's arguments for the backend with the DSN in `dsn_file` (lease
// 1.5 s, renewals every 0.3 s), then `more`.
inline std::vector<std::string> postgres_relay_args(const std::string& dsn_file, std::vector<std::string> more = {}) {
  std::vector<std::string> a{"--set", "journal.backend=postgres", "--set", "journal.postgres.dsn_file=" + dsn_file,
                             "--set", "journal.postgres.lease_ms=1500", "--set", "journal.postgres.renew_ms=300"};
  a.insert(a.end(), more.begin(), more.end());
  return a;
}

// What a test of the backend starts from: a running cluster, and a DSN file
// (mode 0600, as a secret should be) naming its primary.
struct postgres_backend {
  postgres_cluster pg;
  tmpdir secrets;
  std::string dsn_file = secrets / "dsn";

  postgres_backend() {
    pg.start();
    write_file(dsn_file, pg.primary_dsn() + "\n");
    ::chmod(dsn_file.c_str(), 0600);
  }
  std::vector<std::string> relay_args(std::vector<std::string> more = {}) const {
    return postgres_relay_args(dsn_file, std::move(more));
  }
};

}  // namespace test
