#include "expert_service/onednn_runtime.h"

#include <omp.h>

#include "absl/strings/str_cat.h"
#include "common/cpu_budget.h"
#include "common/log.h"

namespace moe::expert {
namespace {

using dnnl::memory;
using Tag = memory::format_tag;
using Dt = memory::data_type;

absl::Status DnnlError(const dnnl::error& e, absl::string_view what) {
  return absl::InternalError(absl::StrCat("oneDNN ", what, ": ", e.what()));
}

std::unique_ptr<CachedMatmul> MakeCached(const dnnl::matmul::primitive_desc& pd) {
  return std::unique_ptr<CachedMatmul>(new CachedMatmul{dnnl::matmul(pd), pd.scratchpad_desc()});
}

}  // namespace

void CachedMatmul::Execute(const dnnl::stream& stream,
                           std::unordered_map<int, dnnl::memory> args) const {
  const size_t bytes = scratchpad.get_size();
  if (bytes > 0) {
    thread_local std::vector<std::byte> buffer;
    if (buffer.size() < bytes) buffer.resize(bytes);
    args.emplace(DNNL_ARG_SCRATCHPAD,
                 dnnl::memory(scratchpad, stream.get_engine(), buffer.data()));
  }
  primitive.execute(const_cast<dnnl::stream&>(stream), args);
}

std::vector<int64_t> SplitRows(int64_t rows) {
  std::vector<int64_t> pieces;
  while (rows >= kMaxBucketRows) {
    pieces.push_back(kMaxBucketRows);
    rows -= kMaxBucketRows;
  }
  for (int64_t bucket = kMaxBucketRows / 2; bucket >= kExactRowsBelow; bucket /= 2) {
    if (rows >= bucket) {
      pieces.push_back(bucket);
      rows -= bucket;
    }
  }
  if (rows > 0) pieces.push_back(rows);
  return pieces;
}

dnnl::memory::data_type ToDnnl(DType dtype) {
  return dtype == DType::kFloat32 ? Dt::f32 : Dt::bf16;
}

absl::StatusOr<std::unique_ptr<OnednnRuntime>> OnednnRuntime::Create(int num_threads) {
  if (num_threads < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("oneDNN threads must be >= 0, got ", num_threads));
  }
  const int threads = num_threads == 0 ? CpuBudget() : num_threads;
  ConfigureCallingThread(threads);
  try {
    return std::unique_ptr<OnednnRuntime>(
        new OnednnRuntime(dnnl::engine(dnnl::engine::kind::cpu, 0), threads));
  } catch (const dnnl::error& e) {
    return DnnlError(e, "engine");
  }
}

void OnednnRuntime::ConfigureCallingThread(int num_threads) {
  omp_set_num_threads(num_threads);
}

bool OnednnRuntime::HasNativeBf16() {
  const dnnl::cpu_isa isa = dnnl::get_effective_cpu_isa();
  return isa == dnnl::cpu_isa::avx512_core_bf16 || isa == dnnl::cpu_isa::avx512_core_amx;
}

std::string OnednnRuntime::Description() const {
  const dnnl_version_t* v = dnnl_version();
  const char* runtime = v->cpu_runtime == DNNL_RUNTIME_OMP   ? "OpenMP"
                        : v->cpu_runtime == DNNL_RUNTIME_SEQ ? "sequential"
                        : v->cpu_runtime == DNNL_RUNTIME_TBB ? "TBB"
                                                             : "other";
  return absl::StrCat("oneDNN ", v->major, ".", v->minor, ".", v->patch, ", ", runtime,
                      " runtime, ", num_threads_, " threads, native bf16 ",
                      HasNativeBf16() ? "yes" : "no");
}

absl::StatusOr<dnnl::matmul::primitive_desc> OnednnRuntime::ForwardDesc(
    const ForwardLayer& layer, int64_t rows, const memory::desc& weights) const {
  try {
    const Dt dt = ToDnnl(layer.dtype);
    const memory::desc src({rows, layer.k}, dt, Tag::ab);
    const memory::desc bias({1, layer.n}, Dt::f32, Tag::ab);
    const memory::desc dst({rows, layer.n}, dt, Tag::ab);
    dnnl::primitive_attr attr;
    attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    dnnl::post_ops ops;
    switch (layer.epilogue) {
      case Epilogue::kNone:
        break;
      case Epilogue::kRelu:
        ops.append_eltwise(1.0f, dnnl::algorithm::eltwise_relu, 0.0f, 0.0f);
        break;
      case Epilogue::kSwishTimes:
        // swish with alpha 1 is SiLU: x sigmoid(x).
        ops.append_eltwise(1.0f, dnnl::algorithm::eltwise_swish, 1.0f, 0.0f);
        ops.append_binary(dnnl::algorithm::binary_mul, dst);
        break;
    }
    attr.set_post_ops(ops);
    return dnnl::matmul::primitive_desc(dnnl::matmul::desc(src, weights, bias, dst), attr,
                                        engine_);
  } catch (const dnnl::error& e) {
    return DnnlError(e, "matmul descriptor");
  }
}

absl::StatusOr<memory::desc> OnednnRuntime::WeightsDesc(const ForwardLayer& layer) {
  absl::MutexLock lock(&mu_);
  auto it = weights_desc_.find(layer);
  if (it != weights_desc_.end()) return it->second;
  // Let oneDNN choose for a mid-sized batch; tests check that the other
  // buckets accept the same layout.
  absl::StatusOr<dnnl::matmul::primitive_desc> pd = ForwardDesc(
      layer, 128, memory::desc({layer.k, layer.n}, ToDnnl(layer.dtype), Tag::any));
  if (!pd.ok()) return pd.status();
  const memory::desc chosen = pd->weights_desc();
  weights_desc_.emplace(layer, chosen);
  return chosen;
}

absl::StatusOr<const CachedMatmul*> OnednnRuntime::Forward(const ForwardLayer& layer,
                                                           int64_t rows) {
  absl::StatusOr<memory::desc> weights = WeightsDesc(layer);
  if (!weights.ok()) return weights.status();
  absl::MutexLock lock(&mu_);
  auto& slot = forward_[{layer, rows}];
  if (slot == nullptr) {
    absl::StatusOr<dnnl::matmul::primitive_desc> pd = ForwardDesc(layer, rows, *weights);
    if (!pd.ok()) return pd.status();
    try {
      slot = MakeCached(*pd);
    } catch (const dnnl::error& e) {
      return DnnlError(e, "matmul primitive");
    }
  }
  return slot.get();
}

absl::StatusOr<const CachedMatmul*> OnednnRuntime::Backward(BackwardOp op, int64_t k,
                                                            int64_t n) {
  absl::MutexLock lock(&mu_);
  auto& slot = backward_[{op, k, n}];
  if (slot != nullptr) return slot.get();
  constexpr memory::dim kRows = DNNL_RUNTIME_DIM_VAL;
  try {
    dnnl::matmul::primitive_desc pd;
    if (op == BackwardOp::kTimesWeightsTransposed) {
      // W is stored [n, k]; the matmul reads it as [k, n] with strides (1, k).
      const memory::desc src({kRows, k}, Dt::f32, Tag::ab);
      const memory::desc weights({k, n}, Dt::f32, memory::dims{1, k});
      const memory::desc dst({kRows, n}, Dt::f32, Tag::ab);
      dnnl::primitive_attr attr;
      attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
      pd = dnnl::matmul::primitive_desc(dnnl::matmul::desc(src, weights, dst), attr, engine_);
    } else {
      // src [m, k] read transposed as [k, m]; dst += src^T * other.
      const memory::desc src_t({k, kRows}, Dt::f32, memory::dims{1, k});
      const memory::desc other({kRows, n}, Dt::f32, Tag::ab);
      const memory::desc dst({k, n}, Dt::f32, Tag::ab);
      dnnl::post_ops ops;
      ops.append_sum(1.0f);
      dnnl::primitive_attr attr;
      attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
      attr.set_post_ops(ops);
      pd = dnnl::matmul::primitive_desc(dnnl::matmul::desc(src_t, other, dst), attr,
                                        engine_);
    }
    slot = MakeCached(pd);
  } catch (const dnnl::error& e) {
    return DnnlError(e, "backward matmul");
  }
  return slot.get();
}

int OnednnRuntime::num_forward_primitives() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int>(forward_.size());
}

}  // namespace moe::expert
