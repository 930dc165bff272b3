// The safetensors file format (github.com/huggingface/safetensors): an
// 8-byte little-endian header length N, N bytes of JSON mapping each tensor
// name to {"dtype", "shape", "data_offsets": [begin, end]} (offsets relative
// to the data section that follows), an optional "__metadata__" object, then
// the raw little-endian data. We write F32 and BF16 and read F32, BF16 and
// F16 as floats; a header may list tensors of any safetensors dtype (a
// whole model's checkpoint holds integer buffers too), which only fail when
// read as floats.
// Reading validates the whole header up front, so a truncated or malformed
// file is an error naming the problem, never a crash. Thread-compatible.
#ifndef MOE_COMMON_SAFETENSORS_H_
#define MOE_COMMON_SAFETENSORS_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "common/tensor.h"

namespace moe {

// How a tensor is stored: the floats ReadFloats widens, or another
// safetensors dtype (integers, bool, F64, F8), named.
enum class StoredType : uint8_t { kF32, kBF16, kF16, kOther };

struct SafetensorsEntry {
  std::string name;
  StoredType type = StoredType::kF32;
  // As the header names it ("F32", "I64", ...).
  std::string dtype;
  Shape shape;
  // Absolute position of the tensor's bytes in the file.
  uint64_t file_offset = 0;
  uint64_t size_bytes = 0;
};

class SafetensorsReader {
 public:
  // Reads and validates the header; tensor data is read on demand.
  static absl::StatusOr<SafetensorsReader> Open(const std::string& path);

  const std::vector<SafetensorsEntry>& entries() const { return entries_; }
  // nullptr when absent.
  const SafetensorsEntry* Find(absl::string_view name) const;
  // Reads one tensor as fp32 (widening BF16 and F16); INVALID_ARGUMENT
  // naming the tensor and its dtype for another type.
  // REQUIRES: out.size() == NumElements(entry.shape).
  absl::Status ReadFloats(const SafetensorsEntry& entry,
                          absl::Span<float> out) const;

 private:
  SafetensorsReader(std::string path, std::vector<SafetensorsEntry> entries)
      : path_(std::move(path)), entries_(std::move(entries)) {}

  std::string path_;
  std::vector<SafetensorsEntry> entries_;
};

// Collects tensors and writes them as one file, all in one dtype.
class SafetensorsWriter {
 public:
  // `values` is not copied: it must stay alive until Write().
  // REQUIRES: values.size() == NumElements(shape); names unique.
  void Add(std::string name, Shape shape, absl::Span<const float> values);
  // Writes `path` durably and atomically (atomic_file.h).
  absl::Status Write(const std::string& path, DType dtype) const;

 private:
  struct Pending {
    std::string name;
    Shape shape;
    absl::Span<const float> values;
  };
  std::vector<Pending> tensors_;
};

}  // namespace moe

#endif  // MOE_COMMON_SAFETENSORS_H_
