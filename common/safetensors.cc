#include "common/safetensors.h"

#include <cstdio>
#include <cstring>
#include <fstream>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/atomic_file.h"
#include "common/bfloat16.h"
#include "common/status_macros.h"
#include "nlohmann/json.hpp"

namespace moe {
namespace {

using nlohmann::json;

// Headers are small (a line of JSON per tensor); a huge length is corrupt.
constexpr uint64_t kMaxHeaderBytes = 100 << 20;

absl::Status Corrupt(absl::string_view path, absl::string_view problem) {
  return absl::InvalidArgumentError(
      absl::StrCat("safetensors ", path, ": ", problem));
}

struct DTypeInfo {
  StoredType type;
  uint64_t size;
};

// The safetensors dtypes (safetensors' Dtype enum) and their element sizes.
absl::StatusOr<DTypeInfo> ParseDType(const json& value) {
  if (!value.is_string()) return absl::InvalidArgumentError("dtype is not a string");
  const std::string& name = value.get_ref<const std::string&>();
  if (name == "F32") return DTypeInfo{StoredType::kF32, 4};
  if (name == "BF16") return DTypeInfo{StoredType::kBF16, 2};
  if (name == "F16") return DTypeInfo{StoredType::kF16, 2};
  for (const auto& [other, size] :
       {std::pair<const char*, uint64_t>{"F64", 8}, {"I64", 8}, {"U64", 8}, {"I32", 4},
        {"U32", 4}, {"I16", 2}, {"U16", 2}, {"I8", 1}, {"U8", 1}, {"BOOL", 1},
        {"F8_E4M3", 1}, {"F8_E5M2", 1}}) {
    if (name == other) return DTypeInfo{StoredType::kOther, size};
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown dtype \"", name, "\""));
}

// IEEE binary16 -> binary32 (exact).
float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  const uint32_t exponent = (h >> 10) & 0x1f;
  uint32_t mantissa = h & 0x3ff;
  uint32_t bits;
  if (exponent == 0x1f) {
    bits = sign | 0x7f800000 | (mantissa << 13);  // Inf, NaN
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    bits = sign;  // +-0
  } else {
    // Subnormal: normalise.
    int shift = 0;
    while ((mantissa & 0x400) == 0) {
      mantissa <<= 1;
      ++shift;
    }
    bits = sign | static_cast<uint32_t>(113 - shift) << 23 | ((mantissa & 0x3ff) << 13);
  }
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

absl::StatusOr<uint64_t> ParseUnsigned(const json& value) {
  if (!value.is_number_unsigned() &&
      !(value.is_number_integer() && value.get<int64_t>() >= 0)) {
    return absl::InvalidArgumentError("expected a non-negative integer");
  }
  return value.get<uint64_t>();
}

// Parses one entry; offsets are relative to the data section of
// `data_size` bytes that starts at `data_start`.
absl::StatusOr<SafetensorsEntry> ParseEntry(const std::string& name,
                                            const json& value,
                                            uint64_t data_start,
                                            uint64_t data_size) {
  if (!value.is_object()) return absl::InvalidArgumentError("not an object");
  SafetensorsEntry entry;
  entry.name = name;
  if (!value.contains("dtype")) return absl::InvalidArgumentError("no dtype");
  MOE_ASSIGN_OR_RETURN(const DTypeInfo dtype, ParseDType(value["dtype"]));
  entry.type = dtype.type;
  entry.dtype = value["dtype"].get<std::string>();
  if (!value.contains("shape") || !value["shape"].is_array()) {
    return absl::InvalidArgumentError("no shape array");
  }
  uint64_t num_elements = 1;
  for (const json& dim : value["shape"]) {
    absl::StatusOr<uint64_t> d = ParseUnsigned(dim);
    if (!d.ok()) return absl::InvalidArgumentError("shape: " + std::string(d.status().message()));
    if (*d != 0 && num_elements > (uint64_t{1} << 40) / *d) {
      return absl::InvalidArgumentError("shape is too large");
    }
    num_elements *= *d;
    entry.shape.push_back(static_cast<int64_t>(*d));
  }
  const json& offsets = value.contains("data_offsets") ? value["data_offsets"] : json();
  if (!offsets.is_array() || offsets.size() != 2) {
    return absl::InvalidArgumentError("data_offsets is not [begin, end]");
  }
  MOE_ASSIGN_OR_RETURN(const uint64_t begin, ParseUnsigned(offsets[0]));
  MOE_ASSIGN_OR_RETURN(const uint64_t end, ParseUnsigned(offsets[1]));
  if (begin > end || end > data_size) {
    return absl::InvalidArgumentError(absl::StrCat(
        "data_offsets [", begin, ", ", end, "] out of range of the ",
        data_size, "-byte data section"));
  }
  const uint64_t expected = num_elements * dtype.size;
  if (end - begin != expected) {
    return absl::InvalidArgumentError(absl::StrCat(
        "data_offsets span ", end - begin, " bytes, shape ",
        ShapeString(entry.shape), " of ", entry.dtype, " needs ",
        expected));
  }
  entry.file_offset = data_start + begin;
  entry.size_bytes = expected;
  return entry;
}

}  // namespace

absl::StatusOr<SafetensorsReader> SafetensorsReader::Open(const std::string& path) {
  std::ifstream file(path, std::ios::binary | std::ios::ate);
  if (!file) {
    return absl::NotFoundError(absl::StrCat("safetensors ", path, ": cannot open"));
  }
  const uint64_t file_size = static_cast<uint64_t>(file.tellg());
  if (file_size < 8) {
    return Corrupt(path, absl::StrCat("truncated: ", file_size,
                                      " bytes, shorter than the 8-byte header length"));
  }
  unsigned char length_bytes[8];
  file.seekg(0);
  file.read(reinterpret_cast<char*>(length_bytes), 8);
  uint64_t header_size = 0;
  for (int i = 7; i >= 0; --i) header_size = (header_size << 8) | length_bytes[i];
  if (header_size > kMaxHeaderBytes || header_size > file_size - 8) {
    return Corrupt(path, absl::StrCat("header length ", header_size,
                                      " exceeds the file (", file_size,
                                      " bytes): truncated or not safetensors"));
  }
  std::string header(header_size, '\0');
  file.read(header.data(), header_size);
  if (!file) return Corrupt(path, "cannot read the header");

  const json parsed = json::parse(header, nullptr, /*allow_exceptions=*/false);
  if (parsed.is_discarded() || !parsed.is_object()) {
    return Corrupt(path, "the header is not a JSON object");
  }
  const uint64_t data_start = 8 + header_size;
  const uint64_t data_size = file_size - data_start;
  std::vector<SafetensorsEntry> entries;
  for (const auto& [name, value] : parsed.items()) {
    if (name == "__metadata__") continue;
    absl::StatusOr<SafetensorsEntry> entry =
        ParseEntry(name, value, data_start, data_size);
    if (!entry.ok()) {
      return Corrupt(path, absl::StrCat("tensor \"", name, "\": ",
                                        entry.status().message()));
    }
    entries.push_back(*std::move(entry));
  }
  return SafetensorsReader(path, std::move(entries));
}

const SafetensorsEntry* SafetensorsReader::Find(absl::string_view name) const {
  for (const SafetensorsEntry& entry : entries_) {
    if (entry.name == name) return &entry;
  }
  return nullptr;
}

absl::Status SafetensorsReader::ReadFloats(const SafetensorsEntry& entry,
                                           absl::Span<float> out) const {
  MOE_CHECK(static_cast<int64_t>(out.size()) == NumElements(entry.shape));
  if (entry.type == StoredType::kOther) {
    return absl::InvalidArgumentError(
        absl::StrCat("safetensors ", path_, ": tensor \"", entry.name, "\" is ", entry.dtype,
                     ", the wrong dtype for weights (want F32, BF16 or F16)"));
  }
  std::ifstream file(path_, std::ios::binary);
  file.seekg(entry.file_offset);
  if (entry.type == StoredType::kF32) {
    file.read(reinterpret_cast<char*>(out.data()), entry.size_bytes);
  } else {
    std::vector<uint16_t> bits(out.size());
    file.read(reinterpret_cast<char*>(bits.data()), entry.size_bytes);
    if (entry.type == StoredType::kBF16) {
      Bf16ToFloats(bits, out);
    } else {
      for (size_t i = 0; i < bits.size(); ++i) out[i] = HalfToFloat(bits[i]);
    }
  }
  if (!file) {
    return Corrupt(path_, absl::StrCat("cannot read tensor \"", entry.name, "\""));
  }
  return absl::OkStatus();
}

void SafetensorsWriter::Add(std::string name, Shape shape,
                            absl::Span<const float> values) {
  MOE_CHECK(static_cast<int64_t>(values.size()) == NumElements(shape), name);
  tensors_.push_back({std::move(name), std::move(shape), values});
}

absl::Status SafetensorsWriter::Write(const std::string& path, DType dtype) const {
  json header = json::object();
  uint64_t offset = 0;
  for (const Pending& t : tensors_) {
    const uint64_t size = t.values.size() * DTypeSize(dtype);
    header[t.name] = {{"dtype", dtype == DType::kFloat32 ? "F32" : "BF16"},
                      {"shape", std::vector<int64_t>(t.shape.begin(), t.shape.end())},
                      {"data_offsets", {offset, offset + size}}};
    offset += size;
  }
  header["__metadata__"] = {{"format", "pt"}, {"producer", "moe-serve"}};
  std::string header_text = header.dump();
  // Pad with spaces so the data section starts 8-byte aligned, as the
  // reference implementation does.
  header_text.append((8 - header_text.size() % 8) % 8, ' ');

  MOE_ASSIGN_OR_RETURN(AtomicFileWriter file, AtomicFileWriter::Create(path));
  unsigned char length_bytes[8];
  uint64_t length = header_text.size();
  for (int i = 0; i < 8; ++i) length_bytes[i] = (length >> (8 * i)) & 0xff;
  MOE_RETURN_IF_ERROR(file.Append(length_bytes, 8));
  MOE_RETURN_IF_ERROR(file.Append(header_text.data(), header_text.size()));
  std::vector<uint16_t> bits;
  for (const Pending& t : tensors_) {
    if (dtype == DType::kFloat32) {
      MOE_RETURN_IF_ERROR(file.Append(t.values.data(), t.values.size() * sizeof(float)));
    } else {
      bits.resize(t.values.size());
      FloatsToBf16(t.values, absl::MakeSpan(bits));
      MOE_RETURN_IF_ERROR(file.Append(bits.data(), bits.size() * sizeof(uint16_t)));
    }
  }
  MOE_RETURN_IF_ERROR(file.Commit());
  return absl::OkStatus();
}

}  // namespace moe
