// Command-line usage for the project's binaries: `--help` lists the flags
// defined in the binary's main.cc and the shared ones it links (transport
// security, server flags). Abseil's default looks for a file named after
// the program, which our thin main.cc files are not.
#ifndef MOE_COMMON_FLAGS_USAGE_H_
#define MOE_COMMON_FLAGS_USAGE_H_

#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/match.h"
#include "absl/strings/string_view.h"

namespace moe {

// Call before absl::ParseCommandLine.
inline void SetFlagsUsage(absl::string_view usage) {
  absl::SetProgramUsageMessage(usage);
  absl::FlagsUsageConfig config;
  config.contains_help_flags = [](absl::string_view path) {
    return absl::EndsWith(path, "main.cc") ||
           absl::EndsWith(path, "common/transport_credentials.cc") ||
           absl::EndsWith(path, "common/server_flags.cc");
  };
  config.contains_helpshort_flags = config.contains_help_flags;
  absl::SetFlagsUsageConfig(config);
}

}  // namespace moe

#endif  // MOE_COMMON_FLAGS_USAGE_H_
