// Durable, all-or-nothing file writes: the bytes go to a temporary file in
// the same directory, which Commit() fsyncs, renames over the target and
// then fsyncs the directory, so after a crash at any point the target is
// either absent (or its old contents) or complete. An uncommitted writer
// removes its temporary file. Thread-compatible.
#ifndef MOE_COMMON_ATOMIC_FILE_H_
#define MOE_COMMON_ATOMIC_FILE_H_

#include <cstddef>
#include <string>

#include "absl/status/statusor.h"

namespace moe {

class AtomicFileWriter {
 public:
  static absl::StatusOr<AtomicFileWriter> Create(std::string path);
  AtomicFileWriter(AtomicFileWriter&& other) noexcept;
  AtomicFileWriter& operator=(AtomicFileWriter&&) = delete;
  ~AtomicFileWriter();

  absl::Status Append(const void* data, size_t size);
  absl::Status Commit();
  int64_t bytes() const { return bytes_; }

 private:
  AtomicFileWriter(std::string path, std::string temp_path, int fd)
      : path_(std::move(path)), temp_path_(std::move(temp_path)), fd_(fd) {}

  std::string path_;
  std::string temp_path_;
  int fd_ = -1;
  int64_t bytes_ = 0;
};

// Creates `path` and its missing parents (mode 0755).
absl::Status MakeDirectories(const std::string& path);

}  // namespace moe

#endif  // MOE_COMMON_ATOMIC_FILE_H_
