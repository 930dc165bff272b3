// Safetensors files are attacker-writable input (a checkpoint volume):
// Open validates the header (offsets, sizes, dtypes, JSON) or names the
// problem; every float entry it accepts can be read in full, and reading
// another dtype as floats is a named error.
#include <unistd.h>

#include <cstdint>
#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::string path = absl::StrCat("/tmp/safetensors_fuzz.", getpid());
  std::ofstream(path, std::ios::binary | std::ios::trunc)
      .write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
  absl::StatusOr<moe::SafetensorsReader> reader = moe::SafetensorsReader::Open(path);
  if (!reader.ok()) return 0;
  for (const moe::SafetensorsEntry& entry : reader->entries()) {
    // The entry lies inside the file, so its size is bounded by the input.
    if (entry.file_offset + entry.size_bytes > size) __builtin_trap();
    std::vector<float> values(moe::NumElements(entry.shape));
    const bool floats = entry.type != moe::StoredType::kOther;
    if (reader->ReadFloats(entry, absl::MakeSpan(values)).ok() != floats) __builtin_trap();
  }
  return 0;
}
