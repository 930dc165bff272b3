// Process-wide oneDNN state: the CPU engine, the size of oneDNN's thread
// pool, and the caches of matmul primitives shared by every expert of the
// same shape. Primitives are created once per (shape, row bucket) and reused
// for every call; weights bind at execution, so one primitive serves all
// experts. Thread-safe.
#ifndef MOE_EXPERT_SERVICE_ONEDNN_RUNTIME_H_
#define MOE_EXPERT_SERVICE_ONEDNN_RUNTIME_H_

#include <cstdint>
#include <memory>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "common/tensor.h"
#include "oneapi/dnnl/dnnl.hpp"

namespace moe::expert {

// The row counts one forward call is split into: full chunks of
// kMaxBucketRows, then the powers of two >= kExactRowsBelow in `rows`, then
// the remainder (< kExactRowsBelow) as one exact bucket. Every piece is a
// contiguous block of the input read in place, and there are at most
// 69 distinct buckets, so primitives are created once and never per call.
inline constexpr int64_t kMaxBucketRows = 4096;
inline constexpr int64_t kExactRowsBelow = 64;
std::vector<int64_t> SplitRows(int64_t rows);

// What a forward layer applies to src W + b, fused as oneDNN post-ops.
enum class Epilogue {
  kNone,
  kRelu,
  // SiLU, then times a second [m, n] input of the layer's dtype (the gated
  // SiLU expert's x W3): passed as DNNL_ARG_ATTR_MULTIPLE_POST_OP(1) |
  // DNNL_ARG_SRC_1.
  kSwishTimes,
};

// One linear layer of the forward pass: dst[m, n] = epilogue(src[m, k] W + b).
struct ForwardLayer {
  DType dtype = DType::kFloat32;
  int64_t k = 0;
  int64_t n = 0;
  Epilogue epilogue = Epilogue::kNone;

  template <typename H>
  friend H AbslHashValue(H h, const ForwardLayer& l) {
    return H::combine(std::move(h), l.dtype, l.k, l.n, l.epilogue);
  }
  friend bool operator==(const ForwardLayer& a, const ForwardLayer& b) {
    return a.dtype == b.dtype && a.k == b.k && a.n == b.n && a.epilogue == b.epilogue;
  }
};

// The argument id of kSwishTimes' second input.
inline constexpr int kSwishTimesOperand = DNNL_ARG_ATTR_MULTIPLE_POST_OP(1) | DNNL_ARG_SRC_1;

// The fp32 backward matmuls, with the row count known only at execution.
enum class BackwardOp {
  // dst[m, n] = src[m, k] * W^T for a plain W [n, k] (dL/da, dL/dx).
  kTimesWeightsTransposed,
  // dst[k, n] += src[m, k]^T * other[m, n]  (dW accumulation).
  kAccumulateWeightGrad,
};

// A cached primitive and the scratchpad it needs. Primitives use
// user-managed scratchpads: oneDNN's library-managed one is shared per
// primitive, which races when two threads run the same primitive (seen as
// wrong outputs under concurrent requests). Execute() supplies a per-thread
// scratchpad.
struct CachedMatmul {
  dnnl::matmul primitive;
  dnnl::memory::desc scratchpad;

  // Runs the primitive on `stream` with `args` plus this thread's scratchpad.
  void Execute(const dnnl::stream& stream, std::unordered_map<int, dnnl::memory> args) const;
};

class OnednnRuntime {
 public:
  // Sizes oneDNN's (OpenMP) thread pool to `num_threads` (0: the cores this
  // process may use, its cgroup's CPU limit included: common/cpu_budget.h)
  // and creates the CPU engine.
  static absl::StatusOr<std::unique_ptr<OnednnRuntime>> Create(int num_threads);

  const dnnl::engine& engine() const { return engine_; }
  int num_threads() const { return num_threads_; }
  // "oneDNN 2.6.3, OpenMP runtime, ISA avx512_core_bf16, 2 threads".
  std::string Description() const;
  // Sizes the calling thread's OpenMP pool (OpenMP's thread count is per
  // calling thread): run on every thread that calls oneDNN.
  static void ConfigureCallingThread(int num_threads);
  // Whether this CPU computes bf16 natively (avx512_bf16 or AMX).
  static bool HasNativeBf16();

  // The weights layout oneDNN picks (format_tag::any) for `layer`; the same
  // for every row bucket (checked at creation).
  absl::StatusOr<dnnl::memory::desc> WeightsDesc(const ForwardLayer& layer)
      ABSL_LOCKS_EXCLUDED(mu_);
  // The primitive for exactly `rows` rows. REQUIRES: rows is a bucket.
  absl::StatusOr<const CachedMatmul*> Forward(const ForwardLayer& layer, int64_t rows)
      ABSL_LOCKS_EXCLUDED(mu_);
  absl::StatusOr<const CachedMatmul*> Backward(BackwardOp op, int64_t k, int64_t n)
      ABSL_LOCKS_EXCLUDED(mu_);

  // Forward primitives created so far (for tests and logs).
  int num_forward_primitives() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  OnednnRuntime(dnnl::engine engine, int num_threads)
      : engine_(std::move(engine)), num_threads_(num_threads) {}

  absl::StatusOr<dnnl::matmul::primitive_desc> ForwardDesc(
      const ForwardLayer& layer, int64_t rows, const dnnl::memory::desc& weights) const;

  dnnl::engine engine_;
  const int num_threads_;
  mutable absl::Mutex mu_;
  absl::flat_hash_map<ForwardLayer, dnnl::memory::desc> weights_desc_
      ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<std::pair<ForwardLayer, int64_t>, std::unique_ptr<CachedMatmul>>
      forward_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<std::tuple<BackwardOp, int64_t, int64_t>,
                      std::unique_ptr<CachedMatmul>>
      backward_ ABSL_GUARDED_BY(mu_);
};

dnnl::memory::data_type ToDnnl(DType dtype);

}  // namespace moe::expert

#endif  // MOE_EXPERT_SERVICE_ONEDNN_RUNTIME_H_
