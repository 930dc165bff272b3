#include "common/malloc_tuning.h"

#include <malloc.h>

namespace moe {

void KeepFreedMessageMemory() {
  mallopt(M_MMAP_THRESHOLD, 32 << 20);
  mallopt(M_TRIM_THRESHOLD, 64 << 20);
}

}  // namespace moe
