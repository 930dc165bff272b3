#include "common/log.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace moe::internal {

void LogLine(LogSeverity severity, const char* file, int line,
             absl::string_view message) {
  static constexpr char kLetters[] = {'I', 'W', 'E', 'F'};
  const char* base = std::strrchr(file, '/');
  base = base == nullptr ? file : base + 1;
  std::string text = absl::StrCat(
      std::string(1, kLetters[static_cast<int>(severity)]),
      absl::FormatTime("%m%d %H:%M:%E6S", absl::Now(), absl::UTCTimeZone()),
      " ", base, ":", line, "] ", message, "\n");
  std::fwrite(text.data(), 1, text.size(), stderr);
  if (severity == LogSeverity::kFatal) {
    std::fflush(stderr);
    std::abort();
  }
}

}  // namespace moe::internal
