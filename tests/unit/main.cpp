// The test runner. Like relay's own binaries, it ignores SIGPIPE: tests kill
// servers under load, and a write to a socket the peer closed must fail with
// EPIPE rather than end the test process.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <csignal>

int main(int argc, char** argv) {
  std::signal(SIGPIPE, SIG_IGN);
  doctest::Context context(argc, argv);
  return context.run();
}
