// Runs a project binary as a child process (the local cluster launcher and
// the multi-process tests), with its output on a pipe, so the caller can
// wait for a log line such as the bound port without sleeping. A thread
// drains the pipe all the time: a child that logs a lot while nobody waits
// for its lines never blocks on a full pipe (it would freeze, holding
// whatever locks it holds). Thread-compatible.
#ifndef MOE_DEPLOY_LOCAL_CHILD_PROCESS_H_
#define MOE_DEPLOY_LOCAL_CHILD_PROCESS_H_

#include <sys/types.h>

#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace moe::local {

class ChildProcess {
 public:
  // Runs `path` with `args`; the child's stdout and stderr go to the pipe.
  // With `cpus`, the child may run on those CPUs only (its affinity mask
  // from its first instruction, before it sizes any thread pool).
  ChildProcess(const std::string& path, const std::vector<std::string>& args,
               const std::vector<int>& cpus = {});
  // SIGKILLs the child if it still runs.
  ~ChildProcess();

  // Reads the child's output until a line contains `needle` or `timeout`
  // passes; the line, or nullopt (the child exited or time ran out).
  std::optional<std::string> WaitForLine(const std::string& needle, absl::Duration timeout);
  // Everything read so far.
  std::string output() const ABSL_LOCKS_EXCLUDED(mu_);

  // Sends `signal`; then waits for the exit. The exit code, or -signal if
  // the child was killed by one, or nullopt after `timeout`.
  std::optional<int> Stop(int signal, absl::Duration timeout);
  pid_t pid() const { return pid_; }

 private:
  void DrainOutput();

  pid_t pid_ = -1;
  int out_fd_ = -1;
  mutable absl::Mutex mu_;
  std::string output_ ABSL_GUARDED_BY(mu_);
  bool output_closed_ ABSL_GUARDED_BY(mu_) = false;
  // Only WaitForLine's caller moves it.
  size_t scanned_ = 0;
  std::thread drainer_;
};

// The path of a data dependency in the runfiles of this test (bazel test)
// or binary (bazel run, or bazel-bin/...): workspace-relative in, absolute
// out.
std::string RunfilePath(const std::string& workspace_relative);

// The first number after `prefix` in `line` ("port 1234" -> 1234), or -1.
int NumberAfter(const std::string& line, const std::string& prefix);

// A TCP port on 127.0.0.1 that was free a moment ago (bound to port 0 and
// released), for configs that must name their servers' ports up front;
// never the same port twice in one process.
int PickFreePort();

// GET http://127.0.0.1:port/path; the body, or "" on failure.
std::string HttpGet(int port, const std::string& path);

}  // namespace moe::local

#endif  // MOE_DEPLOY_LOCAL_CHILD_PROCESS_H_
