// What backward needs from a training forward, kept per (request id,
// expert) with a byte budget and an expiry, so an abandoned request cannot
// hold memory forever. Time is passed in, so expiry is testable without
// sleeping. Thread-safe.
#ifndef MOE_EXPERT_SERVICE_TRAINING_STATE_H_
#define MOE_EXPERT_SERVICE_TRAINING_STATE_H_

#include <cstdint>
#include <optional>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/expert_key.h"
#include "common/tensor.h"

namespace moe::expert {

// The forward's input rows and ReLU activations, in the kernel's dtype.
struct SavedForward {
  DType dtype = DType::kFloat32;
  int64_t rows = 0;
  std::vector<std::byte> x;            // [rows, d_model]
  std::vector<std::byte> activations;  // [rows, ModelConfig::activation_width()]

  size_t bytes() const { return x.size() + activations.size(); }
  ConstTensorView x_view(int64_t d_model) const {
    return {dtype, {rows, d_model}, x.data()};
  }
  ConstTensorView activations_view(int64_t width) const {
    return {dtype, {rows, width}, activations.data()};
  }
};

class TrainingStateStore {
 public:
  struct Options {
    // Total bytes kept; a Put beyond it is RESOURCE_EXHAUSTED.
    int64_t max_bytes = int64_t{2} << 30;
    // How long an entry waits for its backward.
    absl::Duration ttl = absl::Seconds(60);
  };

  explicit TrainingStateStore(Options options) : options_(options) {}

  // Keeps `saved` for (request_id, expert) until `now + ttl`. Expired
  // entries are dropped first. ALREADY_EXISTS if the key is held.
  absl::Status Put(uint64_t request_id, ExpertKey expert, SavedForward saved, absl::Time now)
      ABSL_LOCKS_EXCLUDED(mu_);
  // Removes and returns the entry; NOT_FOUND (naming the id) when unknown or
  // expired. With `rows` (the backward's), INVALID_ARGUMENT, the entry
  // kept, when the forward had another number: a bad call can be retried.
  absl::StatusOr<SavedForward> Take(uint64_t request_id, ExpertKey expert, absl::Time now,
                                    std::optional<int64_t> rows = std::nullopt)
      ABSL_LOCKS_EXCLUDED(mu_);
  // Drops expired entries; returns how many.
  int Expire(absl::Time now) ABSL_LOCKS_EXCLUDED(mu_);

  int64_t bytes() const ABSL_LOCKS_EXCLUDED(mu_);
  size_t size() const ABSL_LOCKS_EXCLUDED(mu_);
  // Entries of `expert` not expired at `now`.
  size_t CountFor(ExpertKey expert, absl::Time now) const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  struct Entry {
    SavedForward saved;
    absl::Time expiry;
  };
  using Key = std::pair<uint64_t, ExpertKey>;

  int ExpireLocked(absl::Time now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const Options options_;
  mutable absl::Mutex mu_;
  absl::flat_hash_map<Key, Entry> entries_ ABSL_GUARDED_BY(mu_);
  int64_t bytes_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace moe::expert

#endif  // MOE_EXPERT_SERVICE_TRAINING_STATE_H_
