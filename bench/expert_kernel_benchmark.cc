// Expert forward per call against two back-to-back raw oneDNN matmul
// primitives of the same shapes (created once, exact row count, weights in
// the layout oneDNN picks), in one run: rows M in {1, 16, 128, 1024, 4096},
// d_model 1024, d_ff 4096, fp32 and bf16. Prints the ratio ours/raw (speed:
// raw time / our time) and GFLOP/s, and the bf16 error against fp32. Then
// gated SiLU experts (Mixtral's: three matrices) in the same run: inference
// (SiLU and the multiply fused as post-ops) and the training forward (x W1
// and x W3 kept), as time per call and GFLOP/s against the ReLU kernel
// (a gated expert does 1.5x the FLOPs). Last, 8 experts called in turn at
// M = 1 and 16, their weights far beyond the caches: what a server's kernel
// calls cost at batch 1 and 64 (one expert called again and again runs
// partly from the cache).
#include <cstdio>
#include <memory>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "bench/ratio_reporter.h"
#include "benchmark/benchmark.h"
#include "common/bfloat16.h"
#include "common/deterministic_init.h"
#include "common/testing/random_tensor.h"
#include "common/testing/tensor_matchers.h"
#include "expert_service/onednn_expert_kernel.h"
#include "expert_service/onednn_runtime.h"
#include "expert_service/reference_expert_kernel.h"
#include "oneapi/dnnl/dnnl.hpp"

namespace moe::bench {
namespace {

using expert::OnednnExpertKernel;
using expert::OnednnRuntime;
using dnnl::memory;

constexpr int64_t kDModel = 1024;
constexpr int64_t kDff = 4096;
constexpr int64_t kRows[] = {1, 16, 128, 1024, 4096};

ModelConfig Model() {
  ModelConfig model;
  model.d_model = kDModel;
  model.d_ff = kDff;
  model.num_experts = 1;
  model.top_k = 1;
  model.seed = 1;
  return model;
}

OnednnRuntime& Runtime() {
  static OnednnRuntime* runtime = OnednnRuntime::Create(0)->release();
  return *runtime;
}

const ExpertWeights& Weights() {
  static const ExpertWeights* weights = new ExpertWeights(InitExpert(Model(), ExpertKey(0, 0)));
  return *weights;
}

const ExpertWeights& GatedWeights() {
  static const ExpertWeights* weights = [] {
    ModelConfig model = Model();
    model.activation = ExpertActivation::kSiluGated;
    return new ExpertWeights(InitExpert(model, ExpertKey(0, 0)));
  }();
  return *weights;
}

// Bytes of a [rows, cols] batch in `dtype`, filled from seeded randoms.
std::vector<std::byte> Batch(int64_t rows, int64_t cols, DType dtype) {
  const FloatTensor x = testing::RandomTensor({rows, cols}, 7);
  std::vector<std::byte> bytes(rows * cols * DTypeSize(dtype));
  if (dtype == DType::kFloat32) {
    std::memcpy(bytes.data(), x.values().data(), bytes.size());
  } else {
    FloatsToBf16(x.values(), absl::MakeSpan(reinterpret_cast<uint16_t*>(bytes.data()),
                                            x.num_elements()));
  }
  return bytes;
}

// `flops_per_weight`: 2 per multiply-add of each [d_model, d_ff] matrix.
void SetFlops(benchmark::State& state, int64_t rows, double flops_per_weight = 4.0) {
  state.counters["GFLOPS"] = benchmark::Counter(flops_per_weight * rows * kDModel * kDff / 1e9,
                                                benchmark::Counter::kIsIterationInvariantRate);
  state.SetItemsProcessed(state.iterations() * rows);
}

// What a forward call runs: a ReLU expert, or a gated one serving or
// training (its activations kept).
enum class Variant { kRelu, kGated, kGatedTraining };

void BM_ExpertKernelForward(benchmark::State& state, DType dtype, Variant variant) {
  const int64_t rows = state.range(0);
  auto kernel = OnednnExpertKernel::Create(variant == Variant::kRelu ? Weights() : GatedWeights(),
                                           dtype, Runtime());
  if (!kernel.ok()) return state.SkipWithError(std::string(kernel.status().message()).c_str());
  const std::vector<std::byte> x = Batch(rows, kDModel, dtype);
  std::vector<std::byte> y(x.size()), kept(rows * 2 * kDff * DTypeSize(dtype));
  const ConstTensorView x_view{dtype, {rows, kDModel}, x.data()};
  const TensorView y_view{dtype, {rows, kDModel}, y.data()};
  const TensorView kept_view{dtype, {rows, 2 * kDff}, kept.data()};
  const TensorView* activations = variant == Variant::kGatedTraining ? &kept_view : nullptr;
  if (!(*kernel)->Forward(x_view, y_view, activations).ok()) return state.SkipWithError("forward");
  for (auto _ : state) {
    const absl::Status status = (*kernel)->Forward(x_view, y_view, activations);
    benchmark::DoNotOptimize(status);
    benchmark::ClobberMemory();
  }
  SetFlops(state, rows, variant == Variant::kRelu ? 4.0 : 6.0);
}

// The same two layers as plain oneDNN: primitives made for this exact M.
void BM_RawOnednnMatmul(benchmark::State& state, DType dtype) {
  const int64_t rows = state.range(0);
  const dnnl::engine& engine = Runtime().engine();
  dnnl::stream stream(engine);
  const memory::data_type dt = expert::ToDnnl(dtype);
  using Tag = memory::format_tag;
  auto make = [&](int64_t k, int64_t n, bool relu) {
    dnnl::primitive_attr attr;
    if (relu) {
      dnnl::post_ops ops;
      ops.append_eltwise(1.0f, dnnl::algorithm::eltwise_relu, 0.0f, 0.0f);
      attr.set_post_ops(ops);
    }
    return dnnl::matmul::primitive_desc(
        dnnl::matmul::desc({{rows, k}, dt, Tag::ab}, {{k, n}, dt, Tag::any},
                           {{1, n}, memory::data_type::f32, Tag::ab}, {{rows, n}, dt, Tag::ab}),
        attr, engine);
  };
  const auto pd1 = make(kDModel, kDff, true), pd2 = make(kDff, kDModel, false);
  const dnnl::matmul layer1(pd1), layer2(pd2);
  memory w1(pd1.weights_desc(), engine), w2(pd2.weights_desc(), engine);
  memory w1_plain({{kDModel, kDff}, memory::data_type::f32, Tag::ab}, engine,
                  const_cast<float*>(Weights().w1.values().data()));
  memory w2_plain({{kDff, kDModel}, memory::data_type::f32, Tag::ab}, engine,
                  const_cast<float*>(Weights().w2.values().data()));
  dnnl::reorder(w1_plain, w1).execute(stream, w1_plain, w1);
  dnnl::reorder(w2_plain, w2).execute(stream, w2_plain, w2);
  memory b1({{1, kDff}, memory::data_type::f32, Tag::ab}, engine,
            const_cast<float*>(Weights().b1.values().data()));
  memory b2({{1, kDModel}, memory::data_type::f32, Tag::ab}, engine,
            const_cast<float*>(Weights().b2.values().data()));
  memory src(pd1.src_desc(), engine), hidden(pd1.dst_desc(), engine), dst(pd2.dst_desc(), engine);
  const std::vector<std::byte> x = Batch(rows, kDModel, dtype);
  std::memcpy(src.get_data_handle(), x.data(), x.size());
  for (auto _ : state) {
    layer1.execute(stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, w1},
                            {DNNL_ARG_BIAS, b1}, {DNNL_ARG_DST, hidden}});
    layer2.execute(stream, {{DNNL_ARG_SRC, hidden}, {DNNL_ARG_WEIGHTS, w2},
                            {DNNL_ARG_BIAS, b2}, {DNNL_ARG_DST, dst}});
    stream.wait();
  }
  SetFlops(state, rows);
}

constexpr int64_t kInTurnRows[] = {1, 16};

// Time per call of 8 different fp32 experts in turn (rows = range(0)).
void BM_ExpertsInTurn(benchmark::State& state) {
  const int64_t rows = state.range(0);
  static const auto* kernels = [] {
    auto* made = new std::vector<std::unique_ptr<OnednnExpertKernel>>();
    ModelConfig model = Model();
    model.num_experts = 8;
    for (int e = 0; e < model.num_experts; ++e) {
      auto kernel = OnednnExpertKernel::Create(InitExpert(model, ExpertKey(0, e)), DType::kFloat32,
                                               Runtime());
      if (kernel.ok()) made->push_back(*std::move(kernel));
    }
    return made;
  }();
  if (kernels->size() != 8) return state.SkipWithError("expert kernels");
  const std::vector<std::byte> x = Batch(rows, kDModel, DType::kFloat32);
  std::vector<std::byte> y(x.size());
  const ConstTensorView x_view{DType::kFloat32, {rows, kDModel}, x.data()};
  const TensorView y_view{DType::kFloat32, {rows, kDModel}, y.data()};
  size_t next = 0;
  for (auto _ : state) {
    const absl::Status status =
        (*kernels)[next++ % kernels->size()]->Forward(x_view, y_view, nullptr);
    benchmark::DoNotOptimize(status);
  }
  SetFlops(state, rows);
}

void Register() {
  for (DType dtype : {DType::kFloat32, DType::kBFloat16}) {
    const std::string suffix(DTypeName(dtype));
    for (int64_t rows : kRows) {
      benchmark::RegisterBenchmark(("BM_RawOnednnMatmul/" + suffix).c_str(),
                                   BM_RawOnednnMatmul, dtype)
          ->Arg(rows)
          ->Unit(benchmark::kMicrosecond)
          ->UseRealTime();
      for (auto [name, variant] :
           {std::pair{"BM_ExpertKernelForward/", Variant::kRelu},
            std::pair{"BM_GatedForward/", Variant::kGated},
            std::pair{"BM_GatedTrainingForward/", Variant::kGatedTraining}}) {
        benchmark::RegisterBenchmark((name + suffix).c_str(), BM_ExpertKernelForward, dtype,
                                     variant)
            ->Arg(rows)
            ->Unit(benchmark::kMicrosecond)
            ->UseRealTime();
      }
    }
  }
  for (int64_t rows : kInTurnRows) {
    benchmark::RegisterBenchmark("BM_ExpertsInTurn/fp32", BM_ExpertsInTurn)
        ->Arg(rows)
        ->Unit(benchmark::kMicrosecond)
        ->UseRealTime();
  }
}

// bf16 output against the fp32 reference on the same inputs.
void PrintBf16Error() {
  auto kernel = OnednnExpertKernel::Create(Weights(), DType::kBFloat16, Runtime());
  const int64_t rows = 256;
  const FloatTensor x = testing::RandomTensor({rows, kDModel}, 7);
  const std::vector<std::byte> x_bf16 = Batch(rows, kDModel, DType::kBFloat16);
  std::vector<uint16_t> y_bits(rows * kDModel);
  (void)(*kernel)->Forward({DType::kBFloat16, {rows, kDModel}, x_bf16.data()},
                           {DType::kBFloat16, {rows, kDModel},
                            reinterpret_cast<std::byte*>(y_bits.data())},
                           nullptr);
  FloatTensor y({rows, kDModel}), expected({rows, kDModel});
  Bf16ToFloats(y_bits, y.mutable_values());
  (void)expert::ReferenceExpertKernel(Weights()).Forward(x.view(), expected.mutable_view(),
                                                         nullptr);
  std::printf("bf16 vs fp32 reference (%ld x %ld -> %ld): relative error %.2e\n",
              static_cast<long>(rows), static_cast<long>(kDModel), static_cast<long>(kDff),
              testing::RelativeError(y.values(), expected.values()));
}

}  // namespace
}  // namespace moe::bench

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  std::printf("%s\n", moe::bench::Runtime().Description().c_str());
  moe::bench::Register();
  moe::bench::RatioReporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);

  std::printf("\n%-5s %6s %12s %12s %8s %10s %10s\n", "dtype", "M", "ours us", "raw us",
              "raw/ours", "ours GF/s", "raw GF/s");
  for (const char* dtype : {"fp32", "bf16"}) {
    for (int64_t rows : moe::bench::kRows) {
      const std::string arg = absl::StrCat("/", dtype, "/", rows, "/real_time");
      const auto* ours = reporter.Find("BM_ExpertKernelForward" + arg);
      const auto* raw = reporter.Find("BM_RawOnednnMatmul" + arg);
      if (ours == nullptr || raw == nullptr) continue;
      std::printf("%-5s %6ld %12.1f %12.1f %8.3f %10.1f %10.1f\n", dtype,
                  static_cast<long>(rows), ours->seconds_per_iteration * 1e6,
                  raw->seconds_per_iteration * 1e6,
                  raw->seconds_per_iteration / ours->seconds_per_iteration,
                  ours->counters.at("GFLOPS"), raw->counters.at("GFLOPS"));
    }
  }
  std::printf(
      "\ngated SiLU experts (3 matrices) against ReLU ones (2): time ratio, 1.5 at "
      "equal GFLOP/s\n%-5s %6s %12s %12s %12s %10s %10s\n",
      "dtype", "M", "gated us", "training us", "gated/relu", "gated GF/s", "train GF/s");
  for (const char* dtype : {"fp32", "bf16"}) {
    for (int64_t rows : moe::bench::kRows) {
      const std::string arg = absl::StrCat("/", dtype, "/", rows, "/real_time");
      const auto* relu = reporter.Find("BM_ExpertKernelForward" + arg);
      const auto* gated = reporter.Find("BM_GatedForward" + arg);
      const auto* training = reporter.Find("BM_GatedTrainingForward" + arg);
      if (relu == nullptr || gated == nullptr || training == nullptr) continue;
      std::printf("%-5s %6ld %12.1f %12.1f %12.3f %10.1f %10.1f\n", dtype, static_cast<long>(rows),
                  gated->seconds_per_iteration * 1e6, training->seconds_per_iteration * 1e6,
                  gated->seconds_per_iteration / relu->seconds_per_iteration,
                  gated->counters.at("GFLOPS"), training->counters.at("GFLOPS"));
    }
  }
  const auto* fp32 = reporter.Find("BM_ExpertKernelForward/fp32/4096/real_time");
  const auto* bf16 = reporter.Find("BM_ExpertKernelForward/bf16/4096/real_time");
  if (fp32 != nullptr && bf16 != nullptr) {
    std::printf("bf16 / fp32 GFLOP/s at M = 4096: %.2fx\n",
                bf16->counters.at("GFLOPS") / fp32->counters.at("GFLOPS"));
  }
  moe::bench::PrintBf16Error();
  std::printf(
      "\nfp32, M rows: one expert again and again against 8 experts in turn\n%6s %12s %12s\n", "M",
      "one us", "8 in turn us");
  for (int64_t rows : moe::bench::kInTurnRows) {
    const std::string arg = absl::StrCat("/fp32/", rows, "/real_time");
    const auto* one = reporter.Find("BM_ExpertKernelForward" + arg);
    const auto* in_turn = reporter.Find("BM_ExpertsInTurn" + arg);
    if (one == nullptr || in_turn == nullptr) continue;
    std::printf("%6ld %12.1f %12.1f\n", static_cast<long>(rows), one->seconds_per_iteration * 1e6,
                in_turn->seconds_per_iteration * 1e6);
  }
  return 0;
}
