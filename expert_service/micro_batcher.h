// Merges concurrent inference requests for the same expert into one larger
// kernel call: the first request for an expert opens a batch; requests that
// join it (up to max_batch_rows) are copied into one batch, run once, and
// their rows copied back. It pays where a kernel call costs about the same
// for 1 row as for a few (small M is bound by reading the weights).
// With a window of 0 (queued merging, the default) a batch goes to the
// compute pool as soon as it opens and closes when a pool thread starts it:
// the requests that reach the batcher meanwhile (those queued behind it
// while the threads were busy) join, and an idle server runs a request at
// once, adding no wait. With a window > 0 the first request waits up to
// the window for company (//bench:micro_batch_benchmark).
// Thread-safe.
#ifndef MOE_EXPERT_SERVICE_MICRO_BATCHER_H_
#define MOE_EXPERT_SERVICE_MICRO_BATCHER_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/functional/any_invocable.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/compute_pool.h"
#include "common/expert_key.h"
#include "common/tensor.h"
#include "expert_service/expert_store.h"

namespace moe::expert {

class MicroBatcher {
 public:
  struct Options {
    // How long the first request of a batch waits for company; 0: not at
    // all, only requests queued meanwhile join (above).
    absl::Duration window = absl::ZeroDuration();
    // A batch runs as soon as it holds this many rows.
    int64_t max_batch_rows = 4096;
  };
  // The request's status, and its share (by rows) of the time the batch
  // it ran in took (its kernel and the merge's copies, not the wait
  // before it; zero when it did not run).
  using Done = absl::AnyInvocable<void(absl::Status, absl::Duration ran) &&>;
  // OK while the request's caller still wants it (its deadline, its
  // cancellation); checked before a batch runs, and between the blocks of
  // a request run alone.
  using KeepGoing = std::function<absl::Status()>;

  // `store` and `pool` must outlive the batcher.
  MicroBatcher(Options options, ExpertStore& store, ComputePool& pool,
               std::function<absl::Time()> clock);
  // Runs what is open, waits for the batches handed to the pool (which must
  // still run them), then stops the timer thread (if any).
  ~MicroBatcher();

  // Queues y = Expert_e(x) (inference only). x and y must stay valid until
  // `done` runs; it runs exactly once, on a compute pool thread (or inline
  // with RESOURCE_EXHAUSTED when the pool refuses the batch).
  // Only requests for the same step (ExpertStore::Forward's expected_step)
  // are merged.
  void Forward(ExpertKey expert, const ConstTensorView& x, const TensorView& y,
               uint64_t expected_step, Done done, KeepGoing keep_going = nullptr)
      ABSL_LOCKS_EXCLUDED(mu_);

 private:
  struct Item {
    ConstTensorView x;
    TensorView y;
    Done done;
    KeepGoing keep_going;
  };
  struct Batch {
    std::vector<Item> items;
    int64_t rows = 0;
    absl::Time due;
  };
  bool queued() const { return options_.window == absl::ZeroDuration(); }
  struct Key {
    ExpertKey expert;
    DType dtype;
    uint64_t expected_step;
    template <typename H>
    friend H AbslHashValue(H h, const Key& k) {
      return H::combine(std::move(h), k.expert, k.dtype, k.expected_step);
    }
    bool operator==(const Key& o) const {
      return expert == o.expert && dtype == o.dtype && expected_step == o.expected_step;
    }
  };

  void TimerLoop();
  // Hands a batch to the pool.
  void Dispatch(const Key& key, Batch batch);
  // Queued merging: hands the open batch `batch` to the pool; it closes
  // when it starts.
  void DispatchOpen(const Key& key, std::shared_ptr<Batch> batch);
  void Run(const Key& key, Batch& batch);

  const Options options_;
  ExpertStore& store_;
  ComputePool& pool_;
  const std::function<absl::Time()> clock_;
  absl::Mutex mu_;
  // Timed batches waiting for their window.
  absl::flat_hash_map<Key, Batch> open_ ABSL_GUARDED_BY(mu_);
  // Queued merging: the batch of each key handed to the pool, not started.
  absl::flat_hash_map<Key, std::shared_ptr<Batch>> queued_ ABSL_GUARDED_BY(mu_);
  // Queued merging: batches handed to the pool and not yet run.
  int in_pool_ ABSL_GUARDED_BY(mu_) = 0;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread timer_;
};

}  // namespace moe::expert

#endif  // MOE_EXPERT_SERVICE_MICRO_BATCHER_H_
