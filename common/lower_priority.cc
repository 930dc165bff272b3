#include "common/lower_priority.h"

#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <thread>

namespace moe {

void LowerThisThreadsPriority() {
  (void)setpriority(PRIO_PROCESS, static_cast<id_t>(syscall(SYS_gettid)), 10);  // best effort
}

void AtLowerPriority(absl::FunctionRef<void()> work) {
  std::thread thread([&work] {
    LowerThisThreadsPriority();
    work();
  });
  thread.join();
}

}  // namespace moe
