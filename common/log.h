// Minimal logging for boundaries (start-up, ports, peers up/down, shutdown)
// and a CHECK for broken invariants. Abseil 20220623 has no absl/log and we
// add no glog. Lines go to stderr as "I1126 17:02:51.123456 file.cc:42] msg".
// Thread-safe: each line is written with one fwrite.
#ifndef MOE_COMMON_LOG_H_
#define MOE_COMMON_LOG_H_

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace moe {

enum class LogSeverity { kInfo, kWarning, kError, kFatal };

// Spellings for MOE_LOG(INFO, ...), as in glog and absl/log.
namespace log_severity {
inline constexpr LogSeverity INFO = LogSeverity::kInfo;
inline constexpr LogSeverity WARNING = LogSeverity::kWarning;
inline constexpr LogSeverity ERROR = LogSeverity::kError;
}  // namespace log_severity

namespace internal {
// Writes one line; with kFatal, also aborts.
void LogLine(LogSeverity severity, const char* file, int line,
             absl::string_view message);
}  // namespace internal

}  // namespace moe

// MOE_LOG(INFO, "listening on ", port);  pieces are joined with absl::StrCat.
#define MOE_LOG(severity, ...)                                              \
  ::moe::internal::LogLine(::moe::log_severity::severity, __FILE__, __LINE__, \
                           ::absl::StrCat(__VA_ARGS__))

// Crashes with a message when an invariant does not hold. Bad input is a
// Status, never a CHECK.
#define MOE_CHECK(cond, ...)                                                \
  do {                                                                      \
    if (!(cond)) {                                                          \
      ::moe::internal::LogLine(::moe::LogSeverity::kFatal, __FILE__, __LINE__, \
                               ::absl::StrCat("Check failed: " #cond " ",   \
                                              ##__VA_ARGS__));              \
    }                                                                       \
  } while (false)

#endif  // MOE_COMMON_LOG_H_
