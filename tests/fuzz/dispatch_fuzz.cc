// The expert server's request path without a transport: any DispatchRequest
// or BackwardDispatchRequest gets exactly one answer, an output of the
// request's shape or an error, and the server goes on (training state stays
// within its byte budget).
#include <cstdint>
#include <map>
#include <memory>

#include "common/deterministic_init.h"
#include "common/tensor_codec.h"
#include "expert_service/expert_dispatcher.h"
#include "expert_service/reference_expert_kernel.h"
#include "prometheus/registry.h"

namespace {

struct Server {
  Server() {
    model.d_model = 4;
    model.d_ff = 8;
    model.num_experts = 3;
    model.top_k = 1;
    model.max_batch_tokens = 64;
    std::map<moe::ExpertKey, moe::ExpertWeights> experts;
    for (int e : {0, 2}) experts.emplace(moe::ExpertKey(0, e), moe::InitExpert(model, {0, e}));
    store = *moe::expert::ExpertStore::Create(
        {model, "fuzz", {/*max_bytes=*/1 << 16, absl::Seconds(60)}}, std::move(experts),
        [](const moe::ExpertWeights& w)
            -> absl::StatusOr<std::unique_ptr<moe::expert::ExpertKernel>> {
          return std::make_unique<moe::expert::ReferenceExpertKernel>(w);
        });
    metrics = moe::expert::ExpertMetrics::Create(registry, model);
    dispatcher = std::make_unique<moe::expert::ExpertDispatcher>(
        moe::expert::ExpertDispatcher::Options{"fuzz"}, *store, *metrics, nullptr, nullptr);
  }
  moe::ModelConfig model;
  prometheus::Registry registry;
  std::unique_ptr<moe::expert::ExpertStore> store;
  std::unique_ptr<moe::expert::ExpertMetrics> metrics;
  std::unique_ptr<moe::expert::ExpertDispatcher> dispatcher;
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static Server* server = new Server();
  auto request = std::make_unique<moe::v1::DispatchRequest>();
  if (request->ParseFromArray(data, static_cast<int>(size))) {
    const int64_t rows = request->tokens().shape_size() > 0 ? request->tokens().shape(0) : -1;
    int answers = 0;
    server->dispatcher->Dispatch(
        std::move(request), std::make_unique<moe::v1::DispatchResponse>(),
        [&](std::unique_ptr<moe::v1::DispatchResponse> response) {
          ++answers;
          if (response->has_output() && response->output().shape(0) != rows) __builtin_trap();
          if (!response->has_output() && !response->has_error()) __builtin_trap();
        });
    if (answers != 1) __builtin_trap();
  }
  moe::v1::BackwardDispatchRequest backward;
  if (backward.ParseFromArray(data, static_cast<int>(size))) {
    moe::v1::BackwardDispatchResponse response;
    server->dispatcher->Backward(backward, &response);
    if (!response.has_grad_input() && !response.has_error()) __builtin_trap();
  }
  if (server->store->training_state().bytes() > (1 << 16)) __builtin_trap();
  return 0;
}
