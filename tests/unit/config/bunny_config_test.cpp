// bunny's configuration: limits.max_job_bytes and the keys that follow it.
#include <doctest/doctest.h>

#include "relay/config.h"

using namespace relay::config;

namespace {

bool load_with(override_list extra, bunny_config& c, std::string& error) {
  override_list o{{"handler.exec", "/bin/cat"}};
  o.insert(o.end(), extra.begin(), extra.end());
  return load(std::nullopt, o, c, error);
}

}  // namespace

TEST_CASE("bunny limits.max_job_bytes: 16 MiB by default, up to 256 MiB; the handler's output limit follows it") {
  bunny_config c;
  std::string error;
  REQUIRE_MESSAGE(load_with({}, c, error), error);
  CHECK_EQ(c.limits.max_job_bytes, uint64_t{16} << 20);
  CHECK_EQ(c.handler.max_output_bytes, uint64_t{16} << 20);
  CHECK(to_json(c).find("\"max_job_bytes\": 16777216") != std::string::npos);

  REQUIRE_MESSAGE(load_with({{"limits.max_job_bytes", "268435456"}}, c, error), error);
  CHECK_EQ(c.limits.max_job_bytes, uint64_t{256} << 20);
  CHECK_EQ(c.handler.max_output_bytes, uint64_t{256} << 20);

  // An explicit, smaller output limit stays.
  REQUIRE_MESSAGE(load_with({{"handler.max_output_bytes", "1000000"}}, c, error), error);
  CHECK_EQ(c.handler.max_output_bytes, 1000000u);
}

TEST_CASE("bunny limits.max_job_bytes: out of range, or below the handler's output limit, is refused by name") {
  bunny_config c;
  std::string error;
  CHECK_FALSE(load_with({{"limits.max_job_bytes", "268435457"}}, c, error));
  CHECK_MESSAGE(error.find("limits.max_job_bytes") != std::string::npos, error);
  CHECK_FALSE(load_with({{"limits.max_job_bytes", "1024"}}, c, error));
  CHECK_MESSAGE(error.find("limits.max_job_bytes") != std::string::npos, error);
  CHECK_FALSE(load_with({{"limits.max_job_bytes", "1048576"}, {"handler.max_output_bytes", "2097152"}}, c, error));
  CHECK_MESSAGE(error.find("\"handler.max_output_bytes\" (2097152) exceeds \"limits.max_job_bytes\" (1048576)") !=
                    std::string::npos,
                error);
}
