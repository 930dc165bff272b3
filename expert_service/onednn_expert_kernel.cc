#include "expert_service/onednn_expert_kernel.h"

#include <algorithm>
#include <cmath>
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

// A transposed view of an fp32 [r, c] row-major matrix, as [c, r].
memory Transposed(const dnnl::engine& engine, const void* data, int64_t r, int64_t c) {
  return memory({{c, r}, Dt::f32, memory::dims{1, c}}, engine, const_cast<void*>(data));
}

void AddColumnSums(const float* m, int64_t rows, int64_t cols, float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = m + r * cols;
    for (int64_t c = 0; c < cols; ++c) out[c] += row[c];
  }
}

// A row block's element i of a buffer of `dtype`, as fp32.
inline float Load(const std::byte* data, DType dtype, int64_t i) {
  return dtype == DType::kFloat32 ? reinterpret_cast<const float*>(data)[i]
                                  : Bf16ToFloat(reinterpret_cast<const uint16_t*>(data)[i]);
}

inline void Store(std::byte* data, DType dtype, int64_t i, float value) {
  if (dtype == DType::kFloat32) {
    reinterpret_cast<float*>(data)[i] = value;
  } else {
    reinterpret_cast<uint16_t*>(data)[i] = FloatToBf16(value);
  }
}

inline float Sigmoid(float a) { return 1.0f / (1.0f + std::exp(-a)); }

// A per-thread buffer of at least `bytes` (one per `slot`, so a call can
// hold several at once).
std::byte* Scratch(int slot, size_t bytes) {
  thread_local std::vector<std::byte> buffers[3];
  std::vector<std::byte>& buffer = buffers[slot];
  if (buffer.size() < bytes) buffer.resize(bytes);
  return buffer.data();
}

}  // namespace

OnednnExpertKernel::OnednnExpertKernel(const ExpertWeights& master, DType dtype,
                                       OnednnRuntime& runtime)
    : master_(master),
      dtype_(dtype),
      runtime_(runtime),
      d_model_(master.w1.dim(0)),
      d_ff_(master.w1.dim(1)),
      gated_(master.gated()),
      layer1_{dtype, d_model_, d_ff_, gated_ ? Epilogue::kSwishTimes : Epilogue::kRelu},
      layer2_{dtype, d_ff_, d_model_, Epilogue::kNone},
      plain1_{dtype, d_model_, d_ff_, Epilogue::kNone} {}

absl::StatusOr<std::unique_ptr<OnednnExpertKernel>> OnednnExpertKernel::Create(
    const ExpertWeights& master, DType dtype, OnednnRuntime& runtime) {
  if (master.w1.shape().size() != 2 || master.w2.shape() != Shape{master.w1.dim(1), master.w1.dim(0)}) {
    return absl::InvalidArgumentError("expert weights: W1 and W2 shapes disagree");
  }
  if (master.gated() && master.w3.shape() != master.w1.shape()) {
    return absl::InvalidArgumentError("expert weights: W1 and W3 shapes disagree");
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
    if (gated_) {
      // The same layout as W1's (one primitive cache entry serves both).
      MOE_ASSIGN_OR_RETURN(const memory::desc plain_desc, runtime_.WeightsDesc(plain1_));
      if (plain_desc != w1_desc) {
        return absl::InternalError("oneDNN chose different W1 layouts with and without post-ops");
      }
      w3_ = memory(w1_desc, engine);
      b3_ = memory({{1, d_ff_}, Dt::f32, Tag::ab}, engine);
      std::memset(b3_.get_data_handle(), 0, d_ff_ * sizeof(float));
    }
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
    if (gated_) {
      const memory w3_plain =
          Wrap(engine, master_.w3.values().data(), d_model_, d_ff_, DType::kFloat32);
      dnnl::reorder(w3_plain, w3_).execute(stream, const_cast<memory&>(w3_plain), w3_);
    }
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
    MOE_RETURN_IF_ERROR(CheckMatrix("activations", activations->shape, rows, activation_width(),
                                    activations->dtype, dtype_));
  }
  return absl::OkStatus();
}

absl::Status OnednnExpertKernel::Forward(const ConstTensorView& x, const TensorView& y,
                                         const TensorView* activations) {
  MOE_RETURN_IF_ERROR(CheckForwardShapes(x, y, activations));
  if (gated_) return GatedForward(x, y, activations);
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
  MOE_RETURN_IF_ERROR(CheckMatrix("activations", activations.shape, rows, activation_width(),
                                  activations.dtype, dtype_));
  MOE_RETURN_IF_ERROR(
      CheckMatrix("grad_output", dy.shape, rows, d_model_, dy.dtype, DType::kFloat32));
  MOE_RETURN_IF_ERROR(
      CheckMatrix("grad_input", dx.shape, rows, d_model_, dx.dtype, DType::kFloat32));
  if (rows == 0) return absl::OkStatus();

  std::vector<float> x_storage, a_storage;
  const absl::Span<const float> x32 = AsFloats(x, x_storage);
  const absl::Span<const float> a32 = AsFloats(activations, a_storage);
  if (gated_) return GatedBackward(x32, a32, dy, dx, grads);
  std::vector<float> d_hidden(rows * d_ff_);
  MOE_ASSIGN_OR_RETURN(const BackwardMatmuls m, FindBackwardMatmuls());
  try {
    const dnnl::engine& engine = runtime_.engine();
    dnnl::stream stream(engine);
    const auto plain = [&](const void* data, int64_t r, int64_t c) {
      return Wrap(engine, data, r, c, DType::kFloat32);
    };
    memory dy_mem = plain(dy.data, rows, d_model_);
    memory dh_mem = plain(d_hidden.data(), rows, d_ff_);
    // dL/da = dy W2^T  (W2 is [d_ff, d_model]).
    m.times_w2t->Execute(stream, {{DNNL_ARG_SRC, dy_mem},
                                  {DNNL_ARG_WEIGHTS,
                                   Transposed(engine, master_.w2.values().data(), d_ff_, d_model_)},
                                  {DNNL_ARG_DST, dh_mem}});
    stream.wait();
    // dL/dh = dL/da where the unit was active.
    for (int64_t i = 0; i < rows * d_ff_; ++i) {
      if (!(a32[i] > 0.0f)) d_hidden[i] = 0.0f;
    }
    // dx = dh W1^T  (W1 is [d_model, d_ff]).
    m.times_w1t->Execute(stream, {{DNNL_ARG_SRC, dh_mem},
                                  {DNNL_ARG_WEIGHTS,
                                   Transposed(engine, master_.w1.values().data(), d_model_, d_ff_)},
                                  {DNNL_ARG_DST, plain(dx.data, rows, d_model_)}});
    // dW2 += a^T dy;  dW1 += x^T dh.
    m.grad_w2->Execute(stream,
                       {{DNNL_ARG_SRC, Transposed(engine, a32.data(), rows, d_ff_)},
                        {DNNL_ARG_WEIGHTS, dy_mem},
                        {DNNL_ARG_DST, plain(grads.w2.mutable_values().data(), d_ff_, d_model_)}});
    m.grad_w1->Execute(stream,
                       {{DNNL_ARG_SRC, Transposed(engine, x32.data(), rows, d_model_)},
                        {DNNL_ARG_WEIGHTS, dh_mem},
                        {DNNL_ARG_DST, plain(grads.w1.mutable_values().data(), d_model_, d_ff_)}});
    stream.wait();
  } catch (const dnnl::error& e) {
    return DnnlError(e, "backward");
  }
  AddColumnSums(dy.floats().data(), rows, d_model_, grads.b2.mutable_values().data());
  AddColumnSums(d_hidden.data(), rows, d_ff_, grads.b1.mutable_values().data());
  return absl::OkStatus();
}

absl::StatusOr<OnednnExpertKernel::BackwardMatmuls> OnednnExpertKernel::FindBackwardMatmuls() {
  BackwardMatmuls m;
  MOE_ASSIGN_OR_RETURN(m.times_w2t,
                       runtime_.Backward(BackwardOp::kTimesWeightsTransposed, d_model_, d_ff_));
  MOE_ASSIGN_OR_RETURN(m.times_w1t,
                       runtime_.Backward(BackwardOp::kTimesWeightsTransposed, d_ff_, d_model_));
  MOE_ASSIGN_OR_RETURN(m.grad_w2,
                       runtime_.Backward(BackwardOp::kAccumulateWeightGrad, d_ff_, d_model_));
  MOE_ASSIGN_OR_RETURN(m.grad_w1,
                       runtime_.Backward(BackwardOp::kAccumulateWeightGrad, d_model_, d_ff_));
  return m;
}

absl::Status OnednnExpertKernel::GatedForward(const ConstTensorView& x, const TensorView& y,
                                              const TensorView* activations) {
  const size_t element = DTypeSize(dtype_);
  const int64_t block = std::min(x.rows(), kMaxBucketRows);
  // up = x W3 and h = SiLU(x W1 + b1) * up; a = x W1 + b1 when training.
  std::byte* up = Scratch(0, block * d_ff_ * element);
  std::byte* h = Scratch(1, block * d_ff_ * element);
  std::byte* a = activations != nullptr ? Scratch(2, block * d_ff_ * element) : nullptr;
  try {
    const dnnl::engine& engine = runtime_.engine();
    dnnl::stream stream(engine);
    int64_t row = 0;
    for (int64_t rows : SplitRows(x.rows())) {
      MOE_ASSIGN_OR_RETURN(const CachedMatmul* plain_layer, runtime_.Forward(plain1_, rows));
      MOE_ASSIGN_OR_RETURN(const CachedMatmul* layer2, runtime_.Forward(layer2_, rows));
      memory src = Wrap(engine, x.data + row * d_model_ * element, rows, d_model_, dtype_);
      memory up_mem = Wrap(engine, up, rows, d_ff_, dtype_);
      memory h_mem = Wrap(engine, h, rows, d_ff_, dtype_);
      plain_layer->Execute(stream, {{DNNL_ARG_SRC, src},
                                    {DNNL_ARG_WEIGHTS, w3_},
                                    {DNNL_ARG_BIAS, b3_},
                                    {DNNL_ARG_DST, up_mem}});
      if (activations == nullptr) {
        MOE_ASSIGN_OR_RETURN(const CachedMatmul* layer1, runtime_.Forward(layer1_, rows));
        layer1->Execute(stream, {{DNNL_ARG_SRC, src},
                                 {DNNL_ARG_WEIGHTS, w1_},
                                 {DNNL_ARG_BIAS, b1_},
                                 {kSwishTimesOperand, up_mem},
                                 {DNNL_ARG_DST, h_mem}});
      } else {
        // The backward needs x W1 + b1 and x W3 themselves, so the gating
        // is not fused; both go to the caller's rows [a | up].
        plain_layer->Execute(stream, {{DNNL_ARG_SRC, src},
                                      {DNNL_ARG_WEIGHTS, w1_},
                                      {DNNL_ARG_BIAS, b1_},
                                      {DNNL_ARG_DST, Wrap(engine, a, rows, d_ff_, dtype_)}});
        stream.wait();
        std::byte* kept = activations->data + row * 2 * d_ff_ * element;
        for (int64_t r = 0; r < rows; ++r) {
          std::byte* kept_row = kept + r * 2 * d_ff_ * element;
          std::memcpy(kept_row, a + r * d_ff_ * element, d_ff_ * element);
          std::memcpy(kept_row + d_ff_ * element, up + r * d_ff_ * element, d_ff_ * element);
        }
        for (int64_t i = 0; i < rows * d_ff_; ++i) {
          const float pre = Load(a, dtype_, i);
          Store(h, dtype_, i, pre * Sigmoid(pre) * Load(up, dtype_, i));
        }
      }
      layer2->Execute(stream, {{DNNL_ARG_SRC, h_mem},
                               {DNNL_ARG_WEIGHTS, w2_},
                               {DNNL_ARG_BIAS, b2_},
                               {DNNL_ARG_DST, Wrap(engine, y.data + row * d_model_ * element, rows,
                                                   d_model_, dtype_)}});
      stream.wait();
      row += rows;
    }
  } catch (const dnnl::error& e) {
    return DnnlError(e, "gated forward");
  }
  return absl::OkStatus();
}

absl::Status OnednnExpertKernel::GatedBackward(absl::Span<const float> x32,
                                               absl::Span<const float> a32,
                                               const ConstTensorView& dy, const TensorView& dx,
                                               ExpertWeights& grads) {
  const int64_t rows = dy.rows();
  const int64_t n = rows * d_ff_;
  // dh = dL/dh, h = SiLU(a) * up; da and d_up its gradients through the
  // gating (SiLU'(a) = s (1 + a (1 - s)), s = sigmoid(a)).
  std::vector<float> h(n), dh(n), da(n), d_up(n), dx_up(rows * d_model_);
  MOE_ASSIGN_OR_RETURN(const BackwardMatmuls m, FindBackwardMatmuls());
  try {
    const dnnl::engine& engine = runtime_.engine();
    dnnl::stream stream(engine);
    const auto plain = [&](const void* data, int64_t r, int64_t c) {
      return Wrap(engine, data, r, c, DType::kFloat32);
    };
    memory dy_mem = plain(dy.data, rows, d_model_);
    m.times_w2t->Execute(stream, {{DNNL_ARG_SRC, dy_mem},
                                  {DNNL_ARG_WEIGHTS,
                                   Transposed(engine, master_.w2.values().data(), d_ff_, d_model_)},
                                  {DNNL_ARG_DST, plain(dh.data(), rows, d_ff_)}});
    stream.wait();
    for (int64_t r = 0; r < rows; ++r) {
      const float* a = a32.data() + r * 2 * d_ff_;
      const float* up = a + d_ff_;
      for (int64_t f = 0; f < d_ff_; ++f) {
        const int64_t i = r * d_ff_ + f;
        const float s = Sigmoid(a[f]);
        const float silu = a[f] * s;
        h[i] = silu * up[f];
        da[i] = dh[i] * up[f] * s * (1.0f + a[f] * (1.0f - s));
        d_up[i] = dh[i] * silu;
      }
    }
    memory da_mem = plain(da.data(), rows, d_ff_);
    memory d_up_mem = plain(d_up.data(), rows, d_ff_);
    // dx = da W1^T + d_up W3^T.
    m.times_w1t->Execute(stream, {{DNNL_ARG_SRC, da_mem},
                                  {DNNL_ARG_WEIGHTS,
                                   Transposed(engine, master_.w1.values().data(), d_model_, d_ff_)},
                                  {DNNL_ARG_DST, plain(dx.data, rows, d_model_)}});
    m.times_w1t->Execute(stream, {{DNNL_ARG_SRC, d_up_mem},
                                  {DNNL_ARG_WEIGHTS,
                                   Transposed(engine, master_.w3.values().data(), d_model_, d_ff_)},
                                  {DNNL_ARG_DST, plain(dx_up.data(), rows, d_model_)}});
    // dW2 += h^T dy;  dW1 += x^T da;  dW3 += x^T d_up.
    m.grad_w2->Execute(stream,
                       {{DNNL_ARG_SRC, Transposed(engine, h.data(), rows, d_ff_)},
                        {DNNL_ARG_WEIGHTS, dy_mem},
                        {DNNL_ARG_DST, plain(grads.w2.mutable_values().data(), d_ff_, d_model_)}});
    memory x_t = Transposed(engine, x32.data(), rows, d_model_);
    m.grad_w1->Execute(stream,
                       {{DNNL_ARG_SRC, x_t},
                        {DNNL_ARG_WEIGHTS, da_mem},
                        {DNNL_ARG_DST, plain(grads.w1.mutable_values().data(), d_model_, d_ff_)}});
    m.grad_w1->Execute(stream,
                       {{DNNL_ARG_SRC, x_t},
                        {DNNL_ARG_WEIGHTS, d_up_mem},
                        {DNNL_ARG_DST, plain(grads.w3.mutable_values().data(), d_model_, d_ff_)}});
    stream.wait();
  } catch (const dnnl::error& e) {
    return DnnlError(e, "gated backward");
  }
  absl::Span<float> dx32 = dx.floats();
  for (int64_t i = 0; i < rows * d_model_; ++i) dx32[i] += dx_up[i];
  AddColumnSums(dy.floats().data(), rows, d_model_, grads.b2.mutable_values().data());
  AddColumnSums(da.data(), rows, d_ff_, grads.b1.mutable_values().data());
  return absl::OkStatus();
}

}  // namespace moe::expert
