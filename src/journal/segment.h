// Segment files: naming, listing and the header (see relay/journal.h).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace relay::journal {

// dir/segment-<16 digits>.log
std::string segment_path(const std::string& dir, uint64_t number);
// Segment numbers present in `dir`, ascending.
std::vector<uint64_t> list_segments(const std::string& dir);
void write_segment_header(std::string& out, uint64_t number);

}  // namespace relay::journal
