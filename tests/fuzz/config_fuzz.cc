// Serving configs are text protos from a ConfigMap: parsed and validated or
// refused with a named error, never a crash; an accepted config has a
// placement.
#include <cstdint>
#include <string>

#include "common/model_config.h"
#include "common/placement.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  absl::StatusOr<moe::ServingConfig> config = moe::ParseServingConfig(text);
  if (!config.ok()) return 0;
  // Placement of huge configs would be slow, not wrong: bound the work.
  if (config->model.num_experts > 4096 || config->cluster.servers.size() > 256) return 0;
  absl::StatusOr<moe::Placement> placement = moe::ComputePlacement(config->model, config->cluster);
  (void)placement;
  return 0;
}
