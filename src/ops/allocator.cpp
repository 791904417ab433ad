// glibc's allocator tuned so that memory a process frees goes back to the
// system: what a peer made us hold must leave the RSS once it is released.
#include <malloc.h>

#include "relay/ops.h"

namespace relay::ops {

void return_freed_memory_promptly() {
  // glibc raises its mmap threshold to the size of each large block freed
  // (up to 32 MiB on 64-bit), after which 1 MiB bodies and answers come
  // from the heap, and a heap does not shrink below its highest block in
  // use: 32 connections that had each sent one 1 MiB body kept 20 MB of RSS
  // after every byte of it was freed. A fixed threshold (which also turns
  // the dynamic one off) serves such blocks from mmap and unmaps them on
  // free; the cost is one mmap/munmap per large block, small beside copying
  // its bytes once.
  mallopt(M_MMAP_THRESHOLD, 128 * 1024);
  // And give back a heap's free top above 1 MiB (the default is 128 KiB:
  // trimming at every free would cost syscalls on the hot path).
  mallopt(M_TRIM_THRESHOLD, 1024 * 1024);
}

}  // namespace relay::ops
