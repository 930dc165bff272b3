#include "expert_service/onednn_expert_kernel.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/bfloat16.h"
#include "common/status_macros.h"

namespace moe::expert {
namespace {

using dnnl::memory;
using Tag = memory::format_tag;
using Dt = memory::data_type;

absl::Status DnnlError(const dnnl::error& e, absl::string_view what) {
  return absl::InternalError(absl::StrCat("oneDNN ", what, ": ", e.what()));
}

absl::Status CheckMatrix(absl::string_view name, const Shape& shape, int64_t rows,
                         int64_t cols, DType dtype, DType want) {
  if (shape.size() != 2 || shape[0] != rows || shape[1] != cols || dtype != want) {
    return absl::InvalidArgumentError(absl::StrCat(
        name, ": expected [", rows, ", ", cols, "] ", DTypeName(want), ", got ",
        ShapeString(shape), " ", DTypeName(dtype)));
  }
  return absl::OkStatus();
}

// A plain row-major memory over caller bytes (oneDNN takes a non-const
// handle; inputs are never written).
memory Wrap(const dnnl::engine& engine, const void* data, int64_t rows, int64_t cols,
            DType dtype) {
  return memory({{rows, cols}, ToDnnl(dtype), Tag::ab}, engine, const_cast<void*>(data));
}

// fp32 copy of a view (bf16 widened); fp32 views are returned in place.
absl::Span<const float> AsFloats(const ConstTensorView& view, std::vector<float>& storage) {
  if (view.dtype == DType::kFloat32) return view.floats();
  storage.resize(view.num_elements());
  Bf16ToFloats(view.bf16s(), absl::MakeSpan(storage));
  return storage;
}

void AddColumnSums(const float* m, int64_t rows, int64_t cols, float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = m + r * cols;
    for (int64_t c = 0; c < cols; ++c) out[c] += row[c];
  }
}

}  // namespace

OnednnExpertKernel::OnednnExpertKernel(const ExpertWeights& master, DType dtype,
                                       OnednnRuntime& runtime)
    : master_(master),
      dtype_(dtype),
      runtime_(runtime),
      d_model_(master.w1.dim(0)),
      d_ff_(master.w1.dim(1)),
      layer1_{dtype, d_model_, d_ff_, /*relu=*/true},
      layer2_{dtype, d_ff_, d_model_, /*relu=*/false} {}

absl::StatusOr<std::unique_ptr<OnednnExpertKernel>> OnednnExpertKernel::Create(
    const ExpertWeights& master, DType dtype, OnednnRuntime& runtime) {
  if (master.w1.shape().size() != 2 || master.w2.shape() != Shape{master.w1.dim(1), master.w1.dim(0)}) {
    return absl::InvalidArgumentError("expert weights: W1 and W2 shapes disagree");
  }
  auto kernel = std::unique_ptr<OnednnExpertKernel>(
      new OnednnExpertKernel(master, dtype, runtime));
  MOE_RETURN_IF_ERROR(kernel->Init());
  return kernel;
}

absl::Status OnednnExpertKernel::Init() {
  MOE_ASSIGN_OR_RETURN(const memory::desc w1_desc, runtime_.WeightsDesc(layer1_));
  MOE_ASSIGN_OR_RETURN(const memory::desc w2_desc, runtime_.WeightsDesc(layer2_));
  try {
    const dnnl::engine& engine = runtime_.engine();
    w1_ = memory(w1_desc, engine);
    w2_ = memory(w2_desc, engine);
    b1_ = memory({{1, d_ff_}, Dt::f32, Tag::ab}, engine);
    b2_ = memory({{1, d_model_}, Dt::f32, Tag::ab}, engine);
  } catch (const dnnl::error& e) {
    return DnnlError(e, "weights memory");
  }
  return ReloadWeights();
}

absl::Status OnednnExpertKernel::ReloadWeights() {
  try {
    const dnnl::engine& engine = runtime_.engine();
    dnnl::stream stream(engine);
    const memory w1_plain = Wrap(engine, master_.w1.values().data(), d_model_, d_ff_,
                                 DType::kFloat32);
    const memory w2_plain = Wrap(engine, master_.w2.values().data(), d_ff_, d_model_,
                                 DType::kFloat32);
    dnnl::reorder(w1_plain, w1_).execute(stream, const_cast<memory&>(w1_plain), w1_);
    dnnl::reorder(w2_plain, w2_).execute(stream, const_cast<memory&>(w2_plain), w2_);
    stream.wait();
    std::memcpy(b1_.get_data_handle(), master_.b1.values().data(), d_ff_ * sizeof(float));
    std::memcpy(b2_.get_data_handle(), master_.b2.values().data(), d_model_ * sizeof(float));
  } catch (const dnnl::error& e) {
    return DnnlError(e, "weights reorder");
  }
  return absl::OkStatus();
}

absl::Status OnednnExpertKernel::CheckForwardShapes(const ConstTensorView& x,
                                                    const TensorView& y,
                                                    const TensorView* activations) const {
  if (x.shape.size() != 2) {
    return absl::InvalidArgumentError(
        absl::StrCat("x: expected rank 2, got ", ShapeString(x.shape)));
  }
  const int64_t rows = x.rows();
  MOE_RETURN_IF_ERROR(CheckMatrix("x", x.shape, rows, d_model_, x.dtype, dtype_));
  MOE_RETURN_IF_ERROR(CheckMatrix("y", y.shape, rows, d_model_, y.dtype, dtype_));
  if (activations != nullptr) {
    MOE_RETURN_IF_ERROR(CheckMatrix("activations", activations->shape, rows, d_ff_,
                                    activations->dtype, dtype_));
  }
  return absl::OkStatus();
}

absl::Status OnednnExpertKernel::Forward(const ConstTensorView& x, const TensorView& y,
                                         const TensorView* activations) {
  MOE_RETURN_IF_ERROR(CheckForwardShapes(x, y, activations));
  const size_t element = DTypeSize(dtype_);
  const auto* x_bytes = x.data;
  auto* y_bytes = y.data;
  // Hidden activations go to the caller's buffer when training, else to a
  // per-thread scratch sized for the largest row block.
  std::byte* hidden = activations != nullptr ? activations->data : nullptr;
  thread_local std::vector<std::byte> scratch;
  if (hidden == nullptr) {
    const size_t need = std::min(x.rows(), kMaxBucketRows) * d_ff_ * element;
    if (scratch.size() < need) scratch.resize(need);
  }
  try {
    const dnnl::engine& engine = runtime_.engine();
    dnnl::stream stream(engine);
    int64_t row = 0;
    for (int64_t rows : SplitRows(x.rows())) {
      MOE_ASSIGN_OR_RETURN(const CachedMatmul* layer1, runtime_.Forward(layer1_, rows));
      MOE_ASSIGN_OR_RETURN(const CachedMatmul* layer2, runtime_.Forward(layer2_, rows));
      std::byte* h = hidden != nullptr ? hidden + row * d_ff_ * element : scratch.data();
      memory src = Wrap(engine, x_bytes + row * d_model_ * element, rows, d_model_, dtype_);
      memory mid = Wrap(engine, h, rows, d_ff_, dtype_);
      memory dst = Wrap(engine, y_bytes + row * d_model_ * element, rows, d_model_, dtype_);
      layer1->Execute(stream, {{DNNL_ARG_SRC, src},
                               {DNNL_ARG_WEIGHTS, w1_},
                               {DNNL_ARG_BIAS, b1_},
                               {DNNL_ARG_DST, mid}});
      layer2->Execute(stream, {{DNNL_ARG_SRC, mid},
                               {DNNL_ARG_WEIGHTS, w2_},
                               {DNNL_ARG_BIAS, b2_},
                               {DNNL_ARG_DST, dst}});
      row += rows;
    }
    stream.wait();
  } catch (const dnnl::error& e) {
    return DnnlError(e, "forward");
  }
  return absl::OkStatus();
}

absl::Status OnednnExpertKernel::Backward(const ConstTensorView& x,
                                          const ConstTensorView& activations,
                                          const ConstTensorView& dy, const TensorView& dx,
                                          ExpertWeights& grads) {
  if (x.shape.size() != 2) {
    return absl::InvalidArgumentError(
        absl::StrCat("x: expected rank 2, got ", ShapeString(x.shape)));
  }
  const int64_t rows = x.rows();
  MOE_RETURN_IF_ERROR(CheckMatrix("x", x.shape, rows, d_model_, x.dtype, dtype_));
  MOE_RETURN_IF_ERROR(CheckMatrix("activations", activations.shape, rows, d_ff_,
                                  activations.dtype, dtype_));
  MOE_RETURN_IF_ERROR(
      CheckMatrix("grad_output", dy.shape, rows, d_model_, dy.dtype, DType::kFloat32));
  MOE_RETURN_IF_ERROR(
      CheckMatrix("grad_input", dx.shape, rows, d_model_, dx.dtype, DType::kFloat32));
  if (rows == 0) return absl::OkStatus();

  std::vector<float> x_storage, a_storage;
  const absl::Span<const float> x32 = AsFloats(x, x_storage);
  const absl::Span<const float> a32 = AsFloats(activations, a_storage);
  std::vector<float> d_hidden(rows * d_ff_);
  MOE_ASSIGN_OR_RETURN(const CachedMatmul* times_w2t,
                       runtime_.Backward(BackwardOp::kTimesWeightsTransposed, d_model_, d_ff_));
  MOE_ASSIGN_OR_RETURN(const CachedMatmul* times_w1t,
                       runtime_.Backward(BackwardOp::kTimesWeightsTransposed, d_ff_, d_model_));
  MOE_ASSIGN_OR_RETURN(const CachedMatmul* grad_w2,
                       runtime_.Backward(BackwardOp::kAccumulateWeightGrad, d_ff_, d_model_));
  MOE_ASSIGN_OR_RETURN(const CachedMatmul* grad_w1,
                       runtime_.Backward(BackwardOp::kAccumulateWeightGrad, d_model_, d_ff_));
  try {
    const dnnl::engine& engine = runtime_.engine();
    dnnl::stream stream(engine);
    const auto plain = [&](const void* data, int64_t r, int64_t c) {
      return Wrap(engine, data, r, c, DType::kFloat32);
    };
    // Transposed view of a [r, c] row-major matrix as [c, r].
    const auto transposed = [&](const void* data, int64_t r, int64_t c) {
      return memory({{c, r}, Dt::f32, memory::dims{1, c}}, engine, const_cast<void*>(data));
    };
    memory dy_mem = plain(dy.data, rows, d_model_);
    memory dh_mem = plain(d_hidden.data(), rows, d_ff_);
    // dL/da = dy W2^T  (W2 is [d_ff, d_model]).
    times_w2t->Execute(stream, {{DNNL_ARG_SRC, dy_mem},
                                {DNNL_ARG_WEIGHTS, transposed(master_.w2.values().data(),
                                                              d_ff_, d_model_)},
                                {DNNL_ARG_DST, dh_mem}});
    stream.wait();
    // dL/dh = dL/da where the unit was active.
    for (int64_t i = 0; i < rows * d_ff_; ++i) {
      if (!(a32[i] > 0.0f)) d_hidden[i] = 0.0f;
    }
    // dx = dh W1^T  (W1 is [d_model, d_ff]).
    times_w1t->Execute(stream, {{DNNL_ARG_SRC, dh_mem},
                                {DNNL_ARG_WEIGHTS, transposed(master_.w1.values().data(),
                                                              d_model_, d_ff_)},
                                {DNNL_ARG_DST, plain(dx.data, rows, d_model_)}});
    // dW2 += a^T dy;  dW1 += x^T dh.
    grad_w2->Execute(stream, {{DNNL_ARG_SRC, transposed(a32.data(), rows, d_ff_)},
                              {DNNL_ARG_WEIGHTS, dy_mem},
                              {DNNL_ARG_DST, plain(grads.w2.mutable_values().data(),
                                                   d_ff_, d_model_)}});
    grad_w1->Execute(stream, {{DNNL_ARG_SRC, transposed(x32.data(), rows, d_model_)},
                              {DNNL_ARG_WEIGHTS, dh_mem},
                              {DNNL_ARG_DST, plain(grads.w1.mutable_values().data(),
                                                   d_model_, d_ff_)}});
    stream.wait();
  } catch (const dnnl::error& e) {
    return DnnlError(e, "backward");
  }
  AddColumnSums(dy.floats().data(), rows, d_model_, grads.b2.mutable_values().data());
  AddColumnSums(d_hidden.data(), rows, d_ff_, grads.b1.mutable_values().data());
  return absl::OkStatus();
}

}  // namespace moe::expert
