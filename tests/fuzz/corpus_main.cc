// Runs a fuzz target's LLVMFuzzerTestOneInput on every file of the seed
// corpus directories given as arguments (runfiles-relative), so the seeds
// are regression tests in every build (optimized and ASan/UBSan), not only
// under libFuzzer.
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "deploy/local/child_process.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);

int main(int argc, char** argv) {
  int files = 0;
  for (int i = 1; i < argc; ++i) {
    const std::string dir = moe::local::RunfilePath(argv[i]);
    for (const auto& entry : std::filesystem::directory_iterator(dir)) {
      std::ifstream file(entry.path(), std::ios::binary);
      const std::vector<char> bytes((std::istreambuf_iterator<char>(file)), {});
      LLVMFuzzerTestOneInput(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size());
      ++files;
    }
  }
  std::printf("%d corpus files ran\n", files);
  return files > 0 ? 0 : 1;
}
