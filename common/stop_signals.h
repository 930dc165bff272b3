// SIGTERM / SIGINT handling for the binaries: block them in every thread at
// start (before any thread exists), then wait for one in main, so shutdown
// runs on the main thread with no async-signal-safety concerns.
#ifndef MOE_COMMON_STOP_SIGNALS_H_
#define MOE_COMMON_STOP_SIGNALS_H_

#include <pthread.h>

#include <csignal>

namespace moe {

inline sigset_t StopSignals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  return set;
}

// Call first thing in main.
inline void BlockStopSignals() {
  const sigset_t set = StopSignals();
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
}

// Blocks until SIGTERM or SIGINT; returns its name.
inline const char* WaitForStopSignal() {
  const sigset_t set = StopSignals();
  int signal = 0;
  sigwait(&set, &signal);
  return signal == SIGTERM ? "SIGTERM" : "SIGINT";
}

}  // namespace moe

#endif  // MOE_COMMON_STOP_SIGNALS_H_
