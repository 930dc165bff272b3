#include "common/lower_priority.h"

#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <thread>

namespace moe {

void AtLowerPriority(absl::FunctionRef<void()> work) {
  std::thread thread([&work] {
    (void)setpriority(PRIO_PROCESS, static_cast<id_t>(syscall(SYS_gettid)), 10);  // best effort
    work();
  });
  thread.join();
}

}  // namespace moe
