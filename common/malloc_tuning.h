// glibc malloc settings for processes that move large gRPC messages.
#ifndef MOE_COMMON_MALLOC_TUNING_H_
#define MOE_COMMON_MALLOC_TUNING_H_

namespace moe {

// gRPC allocates a buffer for every large message it receives and frees it
// once the message is handled. By default glibc serves such sizes with mmap
// or gives the freed memory back to the kernel at once (a heap's top beyond
// 128 KiB is trimmed), so the next message page-faults and zero-fills fresh
// pages: at 64 MiB ring all-reduces that was ~30% of the time. Keeping up to
// 64 MiB free per malloc arena, and serving blocks below 32 MiB from the heap,
// reuses those pages. Call first thing in main().
void KeepFreedMessageMemory();

}  // namespace moe

#endif  // MOE_COMMON_MALLOC_TUNING_H_
