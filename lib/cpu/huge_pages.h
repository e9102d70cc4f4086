// When the CPU kernels ask for transparent huge pages under a result buffer.
#ifndef JAX_PSROI_CPU_HUGE_PAGES_H_
#define JAX_PSROI_CPU_HUGE_PAGES_H_

#include <cstddef>
#include <cstdint>

#include <sys/mman.h>

namespace jax_psroi {
namespace cpu {

// Asks the kernel to back the 2 MiB-aligned interior of a large result buffer
// with transparent huge pages. glibc serves allocations of 32 MiB and more
// with a fresh mmap every time, so a call that writes such a result pays a
// page fault per 4 KiB page on first touch, which can dominate a large
// backward. Smaller buffers are reused from the heap without faults and are
// left alone.
// The buffer is written whole, so no memory is wasted; where THP is disabled
// the call fails harmlessly and is ignored.
inline void advise_huge_pages(void* data, size_t bytes) {
#if defined(MADV_HUGEPAGE)
  constexpr size_t kFreshMmapBytes = size_t{32} << 20;
  if (bytes < kFreshMmapBytes) return;
  constexpr uintptr_t kHugePage = uintptr_t{1} << 21;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(data);
  const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t last = (begin + bytes) & ~(kHugePage - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

}  // namespace cpu
}  // namespace jax_psroi

#endif  // JAX_PSROI_CPU_HUGE_PAGES_H_
