// The test CA of tests/support/pki.sh, with a database of the test's own:
// for tests that issue a certificate while relay runs, revoke it later, or
// let it expire. The PKI directory itself is shared by a test process and
// never written to; its CA key signs, the copied database records.
#pragma once

#include <doctest/doctest.h>

#include <ctime>
#include <string>
#include <vector>

#include "process.h"
#include "relay_fixture.h"

namespace test {

class private_ca {
 public:
  // Copies the CA's database and configuration into `dir`.
  explicit private_ca(std::string dir) : _dir(std::move(dir)) {
    const std::string& p = pki();
    REQUIRE_EQ(run({"cp", "-r", p + "/ca.db", p + "/ca.cnf", _dir}, _dir).exit_code, 0);
  }

  // A client certificate `name`.crt/.key in dir with SAN URI `uri`; `extra`
  // are arguments for `openssl ca` (e.g. {"-enddate", utc_in(5)}).
  std::string issue(const std::string& name, const std::string& uri, std::vector<std::string> extra = {"-days", "30"}) {
    openssl({"ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", name + ".key"});
    openssl({"req", "-new", "-key", name + ".key", "-out", name + ".csr", "-subj", "/CN=" + name});
    write_file(_dir + "/" + name + ".ext", "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                                           "extendedKeyUsage=clientAuth\nsubjectAltName=URI:" + uri + "\n");
    std::vector<std::string> args{"ca", "-batch", "-config", "ca.cnf", "-cert", pki() + "/ca.crt", "-keyfile",
                                  pki() + "/ca.key", "-in", name + ".csr", "-out", name + ".crt", "-extfile",
                                  name + ".ext", "-notext"};
    args.insert(args.end(), extra.begin(), extra.end());
    openssl(args);
    return _dir + "/" + name + ".crt";
  }
  void revoke(const std::string& name) {
    openssl({"ca", "-config", "ca.cnf", "-cert", pki() + "/ca.crt", "-keyfile", pki() + "/ca.key", "-revoke",
             name + ".crt"});
  }
  // Writes the CA's current CRL to `path`, replacing it in one rename (as a
  // Secret update does), so that relay never reads half a file.
  void write_crl(const std::string& path) {
    openssl({"ca", "-config", "ca.cnf", "-cert", pki() + "/ca.crt", "-keyfile", pki() + "/ca.key", "-gencrl", "-out",
             "crl.tmp"});
    REQUIRE_EQ(std::rename((_dir + "/crl.tmp").c_str(), path.c_str()), 0);
  }
  // A client context presenting `name`.crt/.key, trusting the test CA.
  std::shared_ptr<const relay::tls::context> client(const std::string& name, bool resume_sessions = false) const {
    relay::tls::client_options o;
    o.cert_file = _dir + "/" + name + ".crt";
    o.key_file = _dir + "/" + name + ".key";
    o.ca_file = pki() + "/ca.crt";
    o.resume_sessions = resume_sessions;
    std::string error;
    auto ctx = relay::tls::context::make_client(o, error);
    REQUIRE_MESSAGE(ctx != nullptr, error);
    return ctx;
  }

  // `openssl ca -enddate` for `seconds` from now (YYYYMMDDHHMMSSZ).
  static std::string utc_in(int seconds) {
    std::time_t t = std::time(nullptr) + seconds;
    std::tm tm{};
    gmtime_r(&t, &tm);
    char buf[16];
    std::strftime(buf, sizeof buf, "%Y%m%d%H%M%SZ", &tm);
    return buf;
  }

 private:
  void openssl(std::vector<std::string> args) {
    // `openssl ca` finds its database relative to the working directory.
    std::vector<std::string> argv{"sh", "-c", "cd \"$0\" && exec openssl \"$@\"", _dir};
    argv.insert(argv.end(), args.begin(), args.end());
    auto r = run(argv, _dir);
    REQUIRE_MESSAGE(r.exit_code == 0, "openssl " << args[0] << " failed: " << r.err);
  }

  std::string _dir;
};

}  // namespace test
