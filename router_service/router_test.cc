// The router core against the in-process reference layer, with real expert
// stores and oneDNN kernels behind the in-process ExpertClient: every
// placement strategy x top_k x batch size x overflow policy.
#include "router_service/router.h"

#include <atomic>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <numeric>
#include <set>
#include <thread>
#include <tuple>

#include "absl/synchronization/notification.h"
#include "common/compute_pool.h"
#include "common/deterministic_init.h"
#include "common/reference_moe.h"
#include "common/tensor_codec.h"
#include "common/testing/random_tensor.h"
#include "common/testing/tensor_matchers.h"
#include "expert_service/onednn_expert_kernel.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "router_service/testing/in_process_cluster.h"
#include "router_service/testing/in_process_expert_client.h"

namespace moe::router {
namespace {

using ::moe::testing::RandomTensor;
using ::moe::testing::TensorNear;
using ::testing::AllOf;
using ::testing::HasSubstr;
using testing::InProcessExpertClient;

ModelConfig Model(int top_k, bool drop) {
  ModelConfig model;
  model.d_model = 32;
  model.d_ff = 48;
  model.num_experts = 8;
  model.top_k = top_k;
  model.seed = 17;
  if (drop) {
    model.overflow = OverflowPolicy::kDrop;
    model.capacity_factor = 0.5f;  // small: pairs are dropped
  }
  return model;
}

using Cluster = testing::InProcessCluster;
using testing::Decoded;
using testing::ForwardAndWait;
using testing::MakePlacement;
using testing::OnednnKernels;
using testing::Wire;

using Case = std::tuple<PlacementStrategy, int, int64_t, bool>;

class RouterMatrixTest : public ::testing::TestWithParam<Case> {};

TEST_P(RouterMatrixTest, ForwardEqualsTheReference) {
  const auto [strategy, top_k, tokens, drop] = GetParam();
  Cluster cluster(Model(top_k, drop), strategy);
  const FloatTensor x = RandomTensor({tokens, 32}, 100 + tokens);
  absl::StatusOr<Router::ForwardResult> result = cluster.Forward(Wire(x));
  ASSERT_TRUE(result.ok()) << result.status();

  const ReferenceMoe reference = *ReferenceMoe::Create(cluster.model, cluster.weights);
  const ReferenceForward expected = *reference.Forward(x);
  EXPECT_EQ(result->routing.expert_ids, expected.routing.expert_ids);
  EXPECT_EQ(result->routing.dropped, expected.routing.dropped);
  if (drop && tokens >= 7) {
    EXPECT_GT(expected.routing.dropped_pairs, 0);
  }
  EXPECT_TRUE(TensorNear(Decoded(result->y, 32), expected.y, 1e-5));
}

INSTANTIATE_TEST_SUITE_P(
    AllStrategies, RouterMatrixTest,
    ::testing::Combine(::testing::Values(PlacementStrategy::kDataParallel,
                                         PlacementStrategy::kModelParallel,
                                         PlacementStrategy::kHybrid,
                                         PlacementStrategy::kDynamic),
                       ::testing::Values(1, 2, 4), ::testing::Values(0, 1, 7, 1000),
                       ::testing::Bool()));

class RouterTrainingTest : public ::testing::TestWithParam<PlacementStrategy> {};

TEST_P(RouterTrainingTest, BackwardEqualsTheReference) {
  Cluster cluster(Model(2, false), GetParam());
  const FloatTensor x = RandomTensor({37, 32}, 5), dy = RandomTensor({37, 32}, 6);
  absl::StatusOr<Router::ForwardResult> forward = cluster.Forward(Wire(x), true);
  ASSERT_TRUE(forward.ok()) << forward.status();
  EXPECT_GT(forward->request_id, 0u);
  absl::StatusOr<v1::Tensor> dx = cluster.Backward(forward->request_id, Wire(dy));
  ASSERT_TRUE(dx.ok()) << dx.status();

  const ReferenceMoe reference = *ReferenceMoe::Create(cluster.model, cluster.weights);
  const ReferenceForward ref_forward = *reference.Forward(x);
  const ReferenceGradients expected = *reference.Backward(x, ref_forward, dy);
  EXPECT_TRUE(TensorNear(Decoded(*dx, 32), expected.dx, 1e-5));
  // The gate's, kept by the lease keeper (server 0) for the next step.
  const FloatTensor kept = cluster.KeptGateGradient();
  ASSERT_EQ(kept.values().size(), expected.params.gate->values().size());
  EXPECT_TRUE(TensorNear(kept, *expected.params.gate, 1e-5));
  // Each expert's gradient, summed over its replicas, is the reference's.
  for (int e = 0; e < cluster.model.num_experts; ++e) {
    const ExpertWeights sum = cluster.SummedGradients(ExpertKey(0, e));
    for (ExpertTensor which : kAllExpertTensors) {
      EXPECT_TRUE(TensorNear(sum.tensor(which),
                             expected.params.experts.at(e).tensor(which), 1e-5))
          << "expert " << e;
    }
  }
  EXPECT_EQ(cluster.router.pending_training(), 0u);
  EXPECT_EQ(cluster.Backward(forward->request_id, Wire(dy)).status().code(),
            absl::StatusCode::kNotFound);
}

INSTANTIATE_TEST_SUITE_P(Strategies, RouterTrainingTest,
                         ::testing::Values(PlacementStrategy::kDataParallel,
                                           PlacementStrategy::kModelParallel,
                                           PlacementStrategy::kHybrid));

// The gate variants real models use (common/gating.h; each checked against
// PyTorch in common/testing:reference_moe_torch_test) reach the router from
// the config: forward and backward equal the reference.
TEST(RouterTest, EveryGateVariantEqualsTheReference) {
  const std::vector<GateOptions> gates = {
      {false, 0, 0, 1.0},   // Qwen2-MoE / OLMoE, norm_topk_prob = false
      {false, 4, 2, 16.0},  // DeepSeek-V2, group_limited_greedy
      {true, 2, 1, 1.0},
      {true, 0, 0, 1.0, 0.5, 0.1},  // trained with the load-balancing and z losses
  };
  for (const GateOptions& gate : gates) {
    SCOPED_TRACE(::testing::Message() << "renormalize " << gate.renormalize << ", groups "
                                      << gate.num_groups << "/" << gate.top_groups);
    ModelConfig model = Model(2, false);
    model.gate = gate;
    Cluster cluster(model, PlacementStrategy::kHybrid);
    const FloatTensor x = RandomTensor({41, 32}, 8), dy = RandomTensor({41, 32}, 9);
    absl::StatusOr<Router::ForwardResult> forward = cluster.Forward(Wire(x), true);
    ASSERT_TRUE(forward.ok()) << forward.status();
    absl::StatusOr<v1::Tensor> dx = cluster.Backward(forward->request_id, Wire(dy));
    ASSERT_TRUE(dx.ok()) << dx.status();
    const ReferenceMoe reference = *ReferenceMoe::Create(cluster.model, cluster.weights);
    const ReferenceForward expected = *reference.Forward(x);
    const ReferenceGradients grads = *reference.Backward(x, expected, dy);
    EXPECT_EQ(forward->routing.expert_ids, expected.routing.expert_ids);
    EXPECT_EQ(forward->routing.weights, expected.routing.weights);
    EXPECT_TRUE(TensorNear(Decoded(forward->y, 32), expected.y, 1e-5));
    EXPECT_TRUE(TensorNear(Decoded(*dx, 32), grads.dx, 1e-5));
    EXPECT_TRUE(TensorNear(cluster.KeptGateGradient(), *grads.params.gate, 1e-5));
  }
}

// Micro-batches (Router::Options::micro_batch_bytes): an expert's rows go
// out in calls of a few rows, and the answer is the same bits as one call
// per expert (and so equals the reference), for every strategy, top_k,
// batch size and overflow policy; training keeps one call per expert.
using MicroBatchCase = std::tuple<PlacementStrategy, int, bool>;

class MicroBatchTest : public ::testing::TestWithParam<MicroBatchCase> {};

TEST_P(MicroBatchTest, GivesTheSameBitsAsWholeCalls) {
  const auto [strategy, top_k, drop] = GetParam();
  Cluster cluster(Model(top_k, drop), strategy);
  Router::Options options{cluster.model, *cluster.weights.gate};
  options.micro_batch_bytes = 3 * 32 * 4;  // 3 rows of d_model 32
  Router split(options, cluster.placement, cluster.client);
  const ReferenceMoe reference = *ReferenceMoe::Create(cluster.model, cluster.weights);
  for (int64_t tokens : {1, 7, 1000, 5000}) {
    SCOPED_TRACE(::testing::Message() << tokens << " tokens");
    const FloatTensor x32 = RandomTensor({tokens, 32}, 300 + tokens);
    const v1::Tensor x = Wire(x32);
    const int before = cluster.client.forwards();
    absl::StatusOr<Router::ForwardResult> whole = cluster.Forward(x);
    ASSERT_TRUE(whole.ok()) << whole.status();
    const int whole_calls = cluster.client.forwards() - before;
    absl::Notification done;
    absl::StatusOr<Router::ForwardResult> pieces;
    split.Forward(x, 0, false, absl::InfiniteFuture(), [&](auto r) {
      pieces = std::move(r);
      done.Notify();
    });
    done.WaitForNotification();
    ASSERT_TRUE(pieces.ok()) << pieces.status();
    const int split_calls = cluster.client.forwards() - before - whole_calls;
    // From 1000 tokens (half of the pairs dropped with DROP): tens of rows
    // per expert and replica, in calls of 3.
    if (tokens >= 1000) {
      EXPECT_GT(split_calls, 4 * whole_calls);
    }
    EXPECT_EQ(pieces->y.data(), whole->y.data());  // bit for bit
    EXPECT_EQ(pieces->routing.expert_ids, whole->routing.expert_ids);
    const ReferenceForward expected = *reference.Forward(x32);
    EXPECT_EQ(pieces->routing.expert_ids, expected.routing.expert_ids);
    EXPECT_EQ(pieces->routing.dropped, expected.routing.dropped);
    EXPECT_TRUE(TensorNear(Decoded(pieces->y, 32), expected.y, 1e-5));
  }
}

INSTANTIATE_TEST_SUITE_P(AllStrategies, MicroBatchTest,
                         ::testing::Combine(::testing::Values(PlacementStrategy::kDataParallel,
                                                              PlacementStrategy::kModelParallel,
                                                              PlacementStrategy::kHybrid,
                                                              PlacementStrategy::kDynamic),
                                            ::testing::Values(1, 2, 4), ::testing::Bool()));

// Every successful forward reports its calls' time outside the kernels and
// the hidden part of it; split calls on one server hide some.
TEST(RouterTest, ForwardsReportTheirOverlap) {
  Cluster cluster(Model(2, false), PlacementStrategy::kModelParallel);
  Router::Options options{cluster.model, *cluster.weights.gate};
  options.micro_batch_bytes = 3 * 32 * 4;
  std::vector<DispatchOverlap> reports;
  absl::Mutex mu;
  options.on_overlap = [&](const DispatchOverlap& overlap) {
    absl::MutexLock lock(&mu);
    reports.push_back(overlap);
  };
  Router router(options, cluster.placement, cluster.client);
  for (int i = 0; i < 3; ++i) {
    absl::Notification done;
    router.Forward(Wire(RandomTensor({500, 32}, 40 + i)), 0, false, absl::InfiniteFuture(),
                   [&](auto r) {
                     EXPECT_TRUE(r.ok()) << r.status();
                     done.Notify();
                   });
    done.WaitForNotification();
  }
  absl::MutexLock lock(&mu);
  ASSERT_EQ(reports.size(), 3u);
  for (const DispatchOverlap& overlap : reports) {
    EXPECT_GT(overlap.wait, absl::ZeroDuration());
    EXPECT_GE(overlap.hidden, absl::ZeroDuration());
    EXPECT_LE(overlap.hidden, overlap.wait);
  }
}

TEST(RouterTest, Bf16InBf16Out) {
  Cluster cluster(Model(2, false), PlacementStrategy::kHybrid);
  const FloatTensor x = RandomTensor({9, 32}, 7);
  absl::StatusOr<Router::ForwardResult> result = cluster.Forward(Wire(x, DType::kBFloat16));
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->y.dtype(), v1::DTYPE_BF16);
  FloatTensor x_rounded = Decoded(Wire(x, DType::kBFloat16), 32);
  const ReferenceForward expected =
      *ReferenceMoe::Create(cluster.model, cluster.weights)->Forward(x_rounded);
  EXPECT_TRUE(TensorNear(Decoded(result->y, 32), expected.y, 1e-2));
}

// Forwards of a few microseconds' work are planned and combined where they
// were received (a pool thread's hand-off would cost more): with every pool
// thread busy they still finish, and larger ones wait for the pool.
TEST(RouterTest, SmallForwardsDoNotWaitForThePool) {
  Cluster cluster(Model(2, false), PlacementStrategy::kHybrid);
  ComputePool pool(1, 16);
  absl::Notification release;
  ASSERT_TRUE(pool.Submit([&] { release.WaitForNotification(); }));
  Router::Options options{cluster.model, *cluster.weights.gate};
  options.pool = &pool;
  Router router(options, cluster.placement, cluster.client);
  // d_model 32 x 8 experts: 256 tokens are the gate's 2^16 multiply-adds.
  EXPECT_TRUE(router.RunsWhereReceived(256));
  EXPECT_FALSE(router.RunsWhereReceived(257));

  absl::StatusOr<Router::ForwardResult> small =
      ForwardAndWait(router, Wire(RandomTensor({7, 32}, 3)));
  ASSERT_TRUE(small.ok()) << small.status();
  const v1::Tensor x = Wire(RandomTensor({300, 32}, 4));
  absl::Notification large_done;
  absl::StatusOr<Router::ForwardResult> large;
  router.Forward(x, 0, false, absl::Now() + absl::Seconds(30),
                 [&](absl::StatusOr<Router::ForwardResult> result) {
                   large = std::move(result);
                   large_done.Notify();
                 });
  EXPECT_FALSE(large_done.HasBeenNotified());  // its combine waits for the pool
  release.Notify();
  ASSERT_TRUE(large_done.WaitForNotificationWithTimeout(absl::Seconds(30)));
  ASSERT_TRUE(large.ok()) << large.status();
}

int RoundedCalls(const InProcessExpertClient& client) {
  int rounded = 0;
  for (const auto& call : client.dispatched()) rounded += call.tokens_rounded;
  return rounded;
}

// Forwards through a router that rounds rows for bf16 servers and one that
// does not give the same bits, in fp32, without failovers.
void ExpectRoundingKeepsTheBits(const ModelConfig& model, const MoeWeights& weights,
                                const Placement& placement, ExpertClient& client) {
  Router::Options options{model, *weights.gate};
  Router rounding(options, placement, client);
  options.round_tokens_for_bf16_servers = false;
  Router exact(options, placement, client);
  for (int i = 0; i < 3; ++i) {
    const v1::Tensor x = Wire(RandomTensor({200, 32}, 60 + i));
    absl::StatusOr<Router::ForwardResult> a = ForwardAndWait(rounding, x);
    absl::StatusOr<Router::ForwardResult> b = ForwardAndWait(exact, x);
    ASSERT_TRUE(a.ok()) << a.status();
    ASSERT_TRUE(b.ok()) << b.status();
    EXPECT_EQ(a->y.dtype(), v1::DTYPE_FP32);
    EXPECT_EQ(a->y.data(), b->y.data());  // bit for bit
  }
  EXPECT_EQ(rounding.failovers(), 0);
}

// Servers computing in bf16: once their answers say so, an fp32 request's
// rows go to them rounded to bf16, and the answer is the same bits as from
// fp32 rows (their kernels round the rows the same way), in fp32.
TEST(RouterTest, Fp32RowsGoToBf16ServersRoundedWithTheSameBits) {
  const ModelConfig model = Model(2, false);
  const MoeWeights weights = InitAllWeights(model, 0);
  for (PlacementStrategy strategy :
       {PlacementStrategy::kDataParallel, PlacementStrategy::kModelParallel,
        PlacementStrategy::kHybrid}) {
    SCOPED_TRACE(PlacementStrategyName(strategy));
    const Placement placement = MakePlacement(model, strategy, 3);
    InProcessExpertClient client(model, placement, weights, OnednnKernels(DType::kBFloat16));
    ExpectRoundingKeepsTheBits(model, weights, placement, client);
    EXPECT_GT(RoundedCalls(client), 0);
  }
}

// A client whose servers' answers say bf16 while their kernels compute in
// fp32, as when a server restarts with other kernels.
class Bf16SayingClient : public InProcessExpertClient {
 public:
  using InProcessExpertClient::InProcessExpertClient;
  void Forward(int server, const v1::DispatchRequest& request, absl::string_view rows,
               ForwardDone done) override {
    InProcessExpertClient::Forward(server, request, rows,
                                   [done = std::move(done)](auto reply) mutable {
                                     if (reply.ok() && !(*reply)->response().has_error()) {
                                       (*reply)->response().set_compute_dtype(v1::DTYPE_BF16);
                                     }
                                     std::move(done)(std::move(reply));
                                   });
  }
};

// Rounded rows refused by a server computing in fp32 go again unrounded:
// the answer is the fp32 one, never one computed from rounded rows.
TEST(RouterTest, RoundedRowsRefusedByFp32KernelsGoAgainUnrounded) {
  const ModelConfig model = Model(2, false);
  const MoeWeights weights = InitAllWeights(model, 0);
  const Placement placement = MakePlacement(model, PlacementStrategy::kHybrid, 2);
  Bf16SayingClient client(model, placement, weights, OnednnKernels());
  ExpectRoundingKeepsTheBits(model, weights, placement, client);
  EXPECT_GT(RoundedCalls(client), 0);  // sent rounded, refused, sent again
}

TEST(RouterTest, FailsOverToAnotherReplica) {
  Cluster cluster(Model(2, false), PlacementStrategy::kDataParallel);
  const FloatTensor x = RandomTensor({64, 32}, 8);
  const ReferenceForward expected =
      *ReferenceMoe::Create(cluster.model, cluster.weights)->Forward(x);
  // Server 1 fails every call while still looking healthy.
  cluster.client.BreakSilently(1);
  absl::StatusOr<Router::ForwardResult> result = cluster.Forward(Wire(x));
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_TRUE(TensorNear(Decoded(result->y, 32), expected.y, 1e-5));
  EXPECT_GT(cluster.router.failovers(), 0);
  // A server known to be down is not even tried.
  cluster.client.Kill(1);
  const int calls = cluster.client.calls(1);
  ASSERT_TRUE(cluster.Forward(Wire(x)).ok());
  EXPECT_EQ(cluster.client.calls(1), calls);
}

// A replica that fails every call while looking healthy is ejected after
// ReplicaPicker::kEjectAfter failures in a row: later calls do not reach it
// at all (outlier detection), and none fails.
TEST(RouterTest, AReplicaThatKeepsFailingIsEjected) {
  Cluster cluster(Model(2, false), PlacementStrategy::kDataParallel);
  const FloatTensor x = RandomTensor({64, 32}, 8);
  const ReferenceForward expected =
      *ReferenceMoe::Create(cluster.model, cluster.weights)->Forward(x);
  cluster.client.BreakSilently(1);
  for (int i = 0; i < 4 && !cluster.router.Ejected(1); ++i) {
    absl::StatusOr<Router::ForwardResult> result = cluster.Forward(Wire(x));
    ASSERT_TRUE(result.ok()) << result.status();
    EXPECT_TRUE(TensorNear(Decoded(result->y, 32), expected.y, 1e-5));
  }
  ASSERT_TRUE(cluster.router.Ejected(1));
  EXPECT_FALSE(cluster.router.Ejected(0));
  const int calls = cluster.client.calls(1);
  for (int i = 0; i < 5; ++i) ASSERT_TRUE(cluster.Forward(Wire(x)).ok());
  EXPECT_EQ(cluster.client.calls(1), calls);
}

// A replica that released an expert answers NOT_FOUND: the router serves
// from another replica (and avoids that one for a while); only when no
// replica hosts it is the call NOT_FOUND, naming the expert.
TEST(RouterTest, AReleasedReplicaIsFailedOverAndAvoided) {
  Cluster cluster(Model(2, false), PlacementStrategy::kDataParallel, 2);
  const FloatTensor x = RandomTensor({64, 32}, 10);
  const ReferenceForward expected =
      *ReferenceMoe::Create(cluster.model, cluster.weights)->Forward(x);
  ASSERT_TRUE(cluster.client.store(0).RemoveExpert(ExpertKey(0, 0)).ok());
  for (int i = 0; i < 20; ++i) {
    absl::StatusOr<Router::ForwardResult> result = cluster.Forward(Wire(x));
    ASSERT_TRUE(result.ok()) << result.status();
    EXPECT_TRUE(TensorNear(Decoded(result->y, 32), expected.y, 1e-5));
  }
  EXPECT_THAT(cluster.router.StaleExperts(0), ::testing::ElementsAre(ExpertKey(0, 0)));

  ASSERT_TRUE(cluster.client.store(1).RemoveExpert(ExpertKey(0, 0)).ok());
  absl::StatusOr<Router::ForwardResult> none = cluster.Forward(Wire(x));
  EXPECT_EQ(none.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(none.status().message(), HasSubstr("expert 0: no replica hosts it"));
}

TEST(RouterTest, ModelParallelWithoutReplicaFailsNamingTheExperts) {
  Cluster cluster(Model(2, false), PlacementStrategy::kModelParallel, 2);
  const FloatTensor x = RandomTensor({64, 32}, 9);
  cluster.client.Kill(1);  // holds experts 4-7
  absl::StatusOr<Router::ForwardResult> down = cluster.Forward(Wire(x));
  EXPECT_EQ(down.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(down.status().message(), HasSubstr("no live replica"));
  EXPECT_THAT(down.status().message(), HasSubstr("4"));
  // Silently broken: the failure is discovered per call, and named.
  cluster.client.Revive(1);
  cluster.client.BreakSilently(1);
  absl::StatusOr<Router::ForwardResult> broken = cluster.Forward(Wire(x));
  EXPECT_EQ(broken.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(broken.status().message(), HasSubstr("no live replica (servers 1 unavailable"));
  // Back up: served again.
  cluster.client.Revive(1);
  EXPECT_TRUE(cluster.Forward(Wire(x)).ok());
}

// A router over two in-process servers that hold every call (stalled).
struct StalledCluster {
  // `micro_batch_bytes`: Router::Options::micro_batch_bytes.
  explicit StalledCluster(int64_t micro_batch_bytes = 0) {
    client = std::make_unique<InProcessExpertClient>(model, placement, weights, OnednnKernels());
    Router::Options options{model, *weights.gate};
    options.timer = &timer;
    options.micro_batch_bytes = micro_batch_bytes;
    router = std::make_unique<Router>(std::move(options), placement, *client);
    client->Stall(0);
    client->Stall(1);
  }
  // The client first: the late answers it still runs call back into the
  // router.
  ~StalledCluster() {
    client.reset();
    router.reset();
  }

  // What a forward answered, and how many times.
  struct Outcome {
    absl::Notification done;
    absl::Status status;
    int calls = 0;
  };

  // Starts a forward of `x` that records its answer in `outcome`.
  void Forward(const v1::Tensor& x, bool training, absl::Time deadline, Outcome& outcome,
               std::shared_ptr<Cancellation> cancellation = nullptr) {
    router->Forward(
        x, 0, training, deadline,
        [&outcome](absl::StatusOr<Router::ForwardResult> r) {
          outcome.status = r.status();
          ++outcome.calls;
          outcome.done.Notify();
        },
        std::move(cancellation));
  }

  // Lets both servers go (their held answers come late) and checks that a
  // fresh call is served.
  void UnstallAndServeAgain() {
    client->Unstall(0);
    client->Unstall(1);
    absl::Notification served;
    router->Forward(Wire(RandomTensor({4, 32}, 4)), 0, false, absl::InfiniteFuture(),
                    [&](absl::StatusOr<Router::ForwardResult> r) {
                      EXPECT_TRUE(r.ok()) << r.status();
                      served.Notify();
                    });
    served.WaitForNotification();
  }

  const ModelConfig model = Model(2, false);
  const MoeWeights weights = InitAllWeights(model);
  const Placement placement = ModelParallelPlacement(8, 2);
  DeadlineTimer timer;
  std::unique_ptr<InProcessExpertClient> client;
  std::unique_ptr<Router> router;
};

// A replica that is alive but does not answer (stalled: SIGSTOPped,
// overloaded): an inference forward's group is also sent to another replica
// after a delay adapted to that server's answer time, the first answer is
// taken, and the slow replica is avoided for a while.
TEST(RouterTest, ASilentReplicaIsHedgedAndAvoided) {
  const ModelConfig model = Model(2, false);
  const MoeWeights weights = InitAllWeights(model);
  const Placement placement = DataParallelPlacement(8, 2);
  DeadlineTimer timer;
  auto client = std::make_unique<InProcessExpertClient>(model, placement, weights, OnednnKernels());
  Router::Options options{model, *weights.gate};
  options.timer = &timer;
  auto router = std::make_unique<Router>(std::move(options), placement, *client);
  const ReferenceMoe reference = *ReferenceMoe::Create(model, weights);
  auto forward = [&](const FloatTensor& x) {
    absl::Notification done;
    absl::StatusOr<Router::ForwardResult> result;
    const v1::Tensor wire = Wire(x);  // valid until the call is done
    router->Forward(wire, 0, false, absl::InfiniteFuture(),
                    [&](absl::StatusOr<Router::ForwardResult> r) {
                      result = std::move(r);
                      done.Notify();
                    });
    done.WaitForNotification();
    return result;
  };
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(forward(RandomTensor({16, 32}, i)).ok());
  client->Stall(1);
  for (int i = 0; i < 10; ++i) {
    const FloatTensor x = RandomTensor({16, 32}, 10 + i);
    absl::StatusOr<Router::ForwardResult> result = forward(x);
    ASSERT_TRUE(result.ok()) << result.status();
    EXPECT_TRUE(TensorNear(Decoded(result->y, 32), reference.Forward(x)->y, 1e-5));
  }
  EXPECT_GT(router->hedges(), 0);
  EXPECT_FALSE(router->StaleExperts(1).empty());
  EXPECT_TRUE(router->StaleExperts(0).empty());
  client->Unstall(1);
  client.reset();  // its late answers call back into the router
  router.reset();
}

TEST(RouterTest, DeadlineEndsACallThatWaitsOnAStalledServer) {
  StalledCluster cluster;
  StalledCluster::Outcome outcome;
  cluster.Forward(Wire(RandomTensor({16, 32}, 3)), false, absl::Now() + absl::Milliseconds(20),
                  outcome);
  outcome.done.WaitForNotification();
  EXPECT_EQ(outcome.status.code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_THAT(outcome.status.message(), HasSubstr("expert calls unanswered"));
  // The late answers arrive and are dropped: `done` ran exactly once.
  cluster.UnstallAndServeAgain();
  EXPECT_EQ(outcome.calls, 1);
}

TEST(RouterTest, ACancelledCallEndsAtOnceAndKeepsNothing) {
  StalledCluster cluster;
  auto cancellation = std::make_shared<Cancellation>();
  StalledCluster::Outcome outcome;
  cluster.Forward(Wire(RandomTensor({16, 32}, 3)), /*training=*/true, absl::InfiniteFuture(),
                  outcome, cancellation);
  cancellation->Cancel();
  outcome.done.WaitForNotification();
  EXPECT_EQ(outcome.status.code(), absl::StatusCode::kCancelled);
  // Each expert call it had sent was cancelled at its server.
  EXPECT_GT(cluster.client->cancels(), 0);
  // The late answers are dropped: no second `done`, no training state kept.
  cluster.UnstallAndServeAgain();
  EXPECT_EQ(outcome.calls, 1);
  EXPECT_EQ(cluster.router->pending_training(), 0u);
  // Cancelling after the end changes nothing.
  cancellation->Cancel();
  EXPECT_EQ(outcome.calls, 1);
}

// An inference forward split into micro-batches of 3 rows (d_model 32,
// fp32): a cancel reaches every micro-batch sent, and a deadline ends the
// forward once, whichever micro-batches are still out.
TEST(RouterTest, CancelsAndDeadlinesEndEveryMicroBatch) {
  constexpr int64_t kMicroBatchBytes = 3 * 32 * 4;
  const v1::Tensor x = Wire(RandomTensor({16, 32}, 3));
  {
    StalledCluster cluster(kMicroBatchBytes);
    auto cancellation = std::make_shared<Cancellation>();
    StalledCluster::Outcome outcome;
    cluster.Forward(x, /*training=*/false, absl::InfiniteFuture(), outcome, cancellation);
    cancellation->Cancel();
    outcome.done.WaitForNotification();
    EXPECT_EQ(outcome.status.code(), absl::StatusCode::kCancelled);
    // 32 pairs over 8 experts in calls of at most 3 rows: more calls than
    // experts, and each one cancelled at its server.
    EXPECT_GT(cluster.client->forwards(), 8);
    EXPECT_EQ(cluster.client->cancels(), cluster.client->forwards());
    cluster.UnstallAndServeAgain();
    EXPECT_EQ(outcome.calls, 1);
  }
  {
    StalledCluster cluster(kMicroBatchBytes);
    StalledCluster::Outcome outcome;
    cluster.Forward(x, false, absl::Now() + absl::Milliseconds(20), outcome);
    outcome.done.WaitForNotification();
    EXPECT_EQ(outcome.status.code(), absl::StatusCode::kDeadlineExceeded);
    EXPECT_GT(cluster.client->forwards(), 8);
    cluster.UnstallAndServeAgain();
    EXPECT_EQ(outcome.calls, 1);
  }
}

TEST(RouterTest, ReportsItsPhases) {
  const ModelConfig model = Model(2, false);
  const MoeWeights weights = InitAllWeights(model);
  const Placement placement = HybridPlacement(8, 2);
  InProcessExpertClient client(model, placement, weights, OnednnKernels());
  Router::Options options{model, *weights.gate};
  int reports = 0;
  absl::Duration total;
  options.on_phases = [&](absl::Duration gate, absl::Duration fan_out, absl::Duration combine) {
    ++reports;
    EXPECT_GE(gate, absl::ZeroDuration());
    EXPECT_GE(fan_out, absl::ZeroDuration());
    EXPECT_GE(combine, absl::ZeroDuration());
    total = gate + fan_out + combine;
  };
  Router router(std::move(options), placement, client);
  absl::Notification done;
  const absl::Time start = absl::Now();
  router.Forward(Wire(RandomTensor({20, 32}, 5)), 0, false, absl::InfiniteFuture(),
                 [&](absl::StatusOr<Router::ForwardResult> r) {
                   EXPECT_TRUE(r.ok());
                   done.Notify();
                 });
  done.WaitForNotification();
  EXPECT_EQ(reports, 1);
  EXPECT_LE(total, absl::Now() - start);  // the phases are parts of the call
}

TEST(RouterTest, BadInputIsNamed) {
  Cluster cluster(Model(2, false), PlacementStrategy::kHybrid);
  EXPECT_THAT(cluster.Forward(Wire(RandomTensor({3, 31}, 1))).status().message(),
              HasSubstr("x: expected d_model = 32, got 31"));
  v1::Tensor nan = Wire(RandomTensor({3, 32}, 1));
  reinterpret_cast<float*>(nan.mutable_data()->data())[33] = std::nanf("");
  EXPECT_THAT(cluster.Forward(nan).status().message(), HasSubstr("x: NaN at row 1, column 1"));
  EXPECT_EQ(cluster.Backward(12345, Wire(RandomTensor({3, 32}, 1))).status().code(),
            absl::StatusCode::kNotFound);
  absl::StatusOr<Router::ForwardResult> forward =
      cluster.Forward(Wire(RandomTensor({3, 32}, 2)), true);
  ASSERT_TRUE(forward.ok());
  EXPECT_THAT(cluster.Backward(forward->request_id, Wire(RandomTensor({4, 32}, 1)))
                  .status()
                  .message(),
              HasSubstr("grad_output: expected tokens = 3, got 4"));
}

// A client whose servers' answers are damaged after they computed them.
class DamagingClient : public InProcessExpertClient {
 public:
  DamagingClient(const ModelConfig& model, const Placement& placement, const MoeWeights& weights,
                 std::function<void(std::string&)> damage)
      : InProcessExpertClient(model, placement, weights, OnednnKernels()),
        damage_(std::move(damage)) {}
  void Forward(int server, const v1::DispatchRequest& request, absl::string_view rows,
               ForwardDone done) override {
    InProcessExpertClient::Forward(
        server, request, rows, [this, done = std::move(done)](auto reply) mutable {
          if (reply.ok() && (*reply)->response().has_output()) {
            damage_(*(*reply)->response().mutable_output()->mutable_data());
          }
          std::move(done)(std::move(reply));
        });
  }

 private:
  std::function<void(std::string&)> damage_;
};

// An answer with a NaN, or of the wrong size, fails the call naming the
// server and the expert: never an output computed from it.
TEST(RouterTest, BadAnswersAreNamed) {
  const ModelConfig model = Model(2, false);
  const MoeWeights weights = InitAllWeights(model, 0);
  const Placement placement = MakePlacement(model, PlacementStrategy::kModelParallel, 2);
  DamagingClient nan(model, placement, weights, [](std::string& data) {
    const float value = std::nanf("");
    if (data.size() >= 2 * sizeof(float)) std::memcpy(&data[sizeof(float)], &value, sizeof(value));
  });
  DamagingClient inf(model, placement, weights, [](std::string& data) {
    const float value = std::numeric_limits<float>::infinity();
    if (data.size() >= 40 * sizeof(float)) std::memcpy(&data[39 * sizeof(float)], &value, 4);
  });
  DamagingClient cut(model, placement, weights, [](std::string& data) { data.pop_back(); });
  const v1::Tensor x = Wire(RandomTensor({50, 32}, 5));
  for (auto [client, message] : {std::pair<ExpertClient*, const char*>{&nan, "in row 0"},
                                 {&inf, "in row 1"},
                                 {&cut, "bytes"}}) {
    Router router({model, *weights.gate}, placement, *client);
    absl::StatusOr<Router::ForwardResult> result = ForwardAndWait(router, x);
    EXPECT_EQ(result.status().code(), absl::StatusCode::kInternal);
    EXPECT_THAT(result.status().message(),
                AllOf(HasSubstr("answered expert"), HasSubstr("badly: expert output: "),
                      HasSubstr(message)));
  }
}

// The placement seam: Forwards run while the placement is swapped back and
// forth between two that put every expert on different servers. Each call
// plans (and would fail over) with one whole placement: every expert call
// of a request goes where the epoch it reports says, and every answer is
// the reference's.
TEST(RouterTest, APlacementSwapUnderLoadGivesEachRequestOneWholePlacement) {
  // Every server hosts every expert, so either placement can serve, and
  // serves every epoch the test installs.
  Cluster cluster(Model(2, false), PlacementStrategy::kDataParallel);
  for (int s = 0; s < 3; ++s) cluster.client.dispatcher(s).SetPlacementEpochs(1, 1 << 20);
  std::vector<std::vector<int>> shifted_a(8), shifted_b(8);
  for (int e = 0; e < 8; ++e) {
    shifted_a[e] = {e % 3};
    shifted_b[e] = {(e + 1) % 3};
  }
  const Placement a = *Placement::Create(3, shifted_a);
  const Placement b = *Placement::Create(3, shifted_b);
  ASSERT_EQ(cluster.router.InstallPlacement(a).value()->version, 2u);
  EXPECT_EQ(cluster.router.InstallPlacement(MakePlacement(PlacementStrategy::kHybrid, 8, 2))
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);

  std::atomic<bool> stop{false};
  std::thread swapper([&] {
    for (int i = 0; !stop; ++i) ASSERT_TRUE(cluster.router.InstallPlacement(i % 2 ? a : b).ok());
  });
  const FloatTensor x = RandomTensor({16, 32}, 21);
  const ReferenceForward expected = *ReferenceMoe::Create(cluster.model, cluster.weights)->Forward(x);
  std::map<uint64_t, uint64_t> epoch_of_request;
  std::vector<std::thread> clients;
  absl::Mutex mu;
  for (int c = 0; c < 2; ++c) {
    clients.emplace_back([&] {
      for (int i = 0; i < 60; ++i) {
        absl::StatusOr<Router::ForwardResult> y = cluster.Forward(Wire(x), /*training=*/true);
        ASSERT_TRUE(y.ok()) << y.status();
        ASSERT_TRUE(TensorNear(Decoded(y->y, 32), expected.y, 1e-5));
        absl::MutexLock lock(&mu);
        epoch_of_request[y->request_id] = y->placement_epoch;
      }
    });
  }
  for (auto& t : clients) t.join();
  stop = true;
  swapper.join();

  std::set<uint64_t> epochs;
  int checked = 0;
  for (const auto& d : cluster.client.dispatched()) {
    auto it = epoch_of_request.find(d.request_id);
    if (it == epoch_of_request.end()) continue;
    // Epoch 2 is a, then b, a, b, ...: even epochs are a.
    const Placement& used = it->second % 2 == 0 ? a : b;
    EXPECT_TRUE(used.Holds(d.server, d.expert))
        << "request " << d.request_id << " (epoch " << it->second << ") sent expert "
        << d.expert << " to server " << d.server;
    epochs.insert(it->second);
    ++checked;
  }
  EXPECT_EQ(epoch_of_request.size(), 120u);
  EXPECT_GT(checked, 120);
  EXPECT_GT(epochs.size(), 1u) << "the swaps never met a request";
}

}  // namespace
}  // namespace moe::router
