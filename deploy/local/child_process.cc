#include "deploy/local/child_process.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "common/log.h"

extern char** environ;

namespace moe::local {

ChildProcess::ChildProcess(const std::string& path, const std::vector<std::string>& args,
                           const std::vector<int>& cpus) {
  int fds[2];
  MOE_CHECK(pipe(fds) == 0);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, fds[1], STDOUT_FILENO);
  posix_spawn_file_actions_adddup2(&actions, fds[1], STDERR_FILENO);
  posix_spawn_file_actions_addclose(&actions, fds[0]);
  std::vector<char*> argv;
  argv.push_back(const_cast<char*>(path.c_str()));
  for (const std::string& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  // The child starts with no signals blocked, whatever this thread has.
  posix_spawnattr_t attr;
  posix_spawnattr_init(&attr);
  sigset_t none;
  sigemptyset(&none);
  posix_spawnattr_setsigmask(&attr, &none);
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK);
  // A new process inherits the affinity of the thread that spawns it, and
  // posix_spawn has no attribute for it: this thread takes the child's mask
  // for the spawn and its own back after.
  cpu_set_t own;
  if (!cpus.empty()) {
    MOE_CHECK(sched_getaffinity(0, sizeof(own), &own) == 0);
    cpu_set_t child;
    CPU_ZERO(&child);
    for (int cpu : cpus) {
      MOE_CHECK(cpu >= 0 && cpu < CPU_SETSIZE, "no CPU ", cpu);
      CPU_SET(cpu, &child);
    }
    MOE_CHECK(sched_setaffinity(0, sizeof(child), &child) == 0, "cannot run ", path, " on CPUs (",
              std::strerror(errno), ")");
  }
  const int rc = posix_spawn(&pid_, path.c_str(), &actions, &attr, argv.data(), environ);
  if (!cpus.empty()) MOE_CHECK(sched_setaffinity(0, sizeof(own), &own) == 0);
  MOE_CHECK(rc == 0, "cannot start ", path, ": ", std::strerror(rc));
  posix_spawn_file_actions_destroy(&actions);
  posix_spawnattr_destroy(&attr);
  close(fds[1]);
  out_fd_ = fds[0];
  drainer_ = std::thread([this] { DrainOutput(); });
}

ChildProcess::~ChildProcess() {
  if (pid_ > 0) {
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
  }
  // The child is gone, so its end of the pipe is closed: the drainer ends.
  drainer_.join();
  close(out_fd_);
}

void ChildProcess::DrainOutput() {
  char buffer[4096];
  while (true) {
    const ssize_t n = read(out_fd_, buffer, sizeof(buffer));
    if (n < 0 && errno == EINTR) continue;
    absl::MutexLock lock(&mu_);
    if (n <= 0) {
      output_closed_ = true;
      return;
    }
    output_.append(buffer, n);
  }
}

std::string ChildProcess::output() const {
  absl::MutexLock lock(&mu_);
  return output_;
}

std::optional<std::string> ChildProcess::WaitForLine(const std::string& needle,
                                                     absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  absl::MutexLock lock(&mu_);
  while (true) {
    // Complete lines not yet scanned.
    size_t end;
    while ((end = output_.find('\n', scanned_)) != std::string::npos) {
      std::string line = output_.substr(scanned_, end - scanned_);
      scanned_ = end + 1;
      if (line.find(needle) != std::string::npos) return line;
    }
    if (output_closed_) return std::nullopt;  // the child exited
    const size_t seen = output_.size();
    auto more = [this, seen]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      return output_.size() > seen || output_closed_;
    };
    if (!mu_.AwaitWithDeadline(absl::Condition(&more), deadline)) return std::nullopt;
  }
}

std::optional<int> ChildProcess::Stop(int signal, absl::Duration timeout) {
  if (pid_ <= 0) return std::nullopt;
  kill(pid_, signal);
  const absl::Time deadline = absl::Now() + timeout;
  {
    // An exiting child closes its output first.
    absl::MutexLock lock(&mu_);
    mu_.AwaitWithDeadline(absl::Condition(&output_closed_), deadline);
  }
  while (true) {
    int status = 0;
    if (waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      if (WIFEXITED(status)) return WEXITSTATUS(status);
      return -WTERMSIG(status);
    }
    if (absl::Now() >= deadline) return std::nullopt;
    absl::SleepFor(absl::Milliseconds(1));  // output closed, exit status not yet posted
  }
}

std::string RunfilePath(const std::string& workspace_relative) {
  const char* srcdir = std::getenv("TEST_SRCDIR");
  const char* workspace = std::getenv("TEST_WORKSPACE");
  if (srcdir != nullptr && workspace != nullptr) {
    return absl::StrCat(srcdir, "/", workspace, "/", workspace_relative);
  }
  // A binary: <binary>.runfiles/moe_serve/...
  char self[4096];
  const ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
  MOE_CHECK(n > 0, "cannot find this binary's path");
  self[n] = '\0';
  return absl::StrCat(self, ".runfiles/moe_serve/", workspace_relative);
}

int NumberAfter(const std::string& line, const std::string& prefix) {
  const size_t at = line.find(prefix);
  if (at == std::string::npos) return -1;
  return std::atoi(line.c_str() + at + prefix.size());
}

int PickFreePort() {
  // The kernel may offer a port it offered a moment ago (nothing listens on
  // it yet): a cluster picked in a row would get one port twice.
  static absl::Mutex mu(absl::kConstInit);
  static auto* given = new absl::flat_hash_set<int>();
  absl::MutexLock lock(&mu);
  while (true) {
    const int fd = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = 0;
    MOE_CHECK(bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0);
    socklen_t length = sizeof(addr);
    MOE_CHECK(getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &length) == 0);
    close(fd);
    const int port = ntohs(addr.sin_port);
    if (given->insert(port).second) return port;
  }
}

std::string HttpGet(int port, const std::string& path) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(port);
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    close(fd);
    return "";
  }
  const std::string request =
      absl::StrCat("GET ", path, " HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
  if (write(fd, request.data(), request.size()) != static_cast<ssize_t>(request.size())) {
    close(fd);
    return "";
  }
  std::string response;
  char buffer[8192];
  ssize_t n;
  while ((n = read(fd, buffer, sizeof(buffer))) > 0) response.append(buffer, n);
  close(fd);
  const size_t body = response.find("\r\n\r\n");
  return body == std::string::npos ? "" : response.substr(body + 4);
}

}  // namespace moe::local
