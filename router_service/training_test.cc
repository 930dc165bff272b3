// Training through the router core over in-process expert servers (real
// stores, oneDNN kernels, the two-phase step with ring all-reduces over
// loopback links): 20 Forward/Backward/Step rounds equal 20 steps of the
// reference with the shared optimizer, replicas bit-identical after each;
// a ring that breaks mid-step fails the step naming the server, leaves every
// weight and every accumulator as it was, and the next step works. The same
// training equivalence runs across processes in tests/training_process_test.
#include <limits>
#include <map>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "common/deterministic_init.h"
#include "common/reference_moe.h"
#include "common/testing/random_tensor.h"
#include "common/testing/reference_training.h"
#include "common/testing/tensor_matchers.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "router_service/testing/in_process_cluster.h"

namespace moe::router {
namespace {

using ::moe::testing::ConcatRows;
using ::moe::testing::RandomTensor;
using ::moe::testing::ReferenceTraining;
using ::moe::testing::TensorNear;
using testing::Decoded;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using testing::InProcessCluster;
using testing::Wire;

constexpr int kDModel = 32;
constexpr int kTokens = 64;

ModelConfig Model(const OptimizerOptions& optimizer) {
  ModelConfig model;
  model.d_model = kDModel;
  model.d_ff = 64;
  model.num_experts = 6;
  model.top_k = 2;
  model.seed = 9;
  model.optimizer = optimizer;
  return model;
}

// expert -> digest, checking that every replica has the same one.
std::map<ExpertKey, uint64_t> ReplicaDigests(InProcessCluster& cluster) {
  std::map<ExpertKey, uint64_t> digests;
  for (int s = 0; s < cluster.placement.num_servers(); ++s) {
    expert::ExpertStore& store = cluster.client.store(s);
    for (ExpertKey e : store.HostedExperts()) {
      const uint64_t digest = *store.Digest(e);
      auto [it, first] = digests.emplace(e, digest);
      EXPECT_EQ(it->second, digest) << "replicas of expert " << e << " differ (server " << s
                                    << ")";
    }
  }
  return digests;
}

struct TrainingCase {
  PlacementStrategy strategy;
  OptimizerType optimizer;
  // As in tests/training_process_test: small enough that 20 steps stay tame.
  float learning_rate;
  // Global gradient-norm clipping (0: off); 1 clips every step here.
  float max_grad_norm = 0.0f;
};

std::string CaseName(const TrainingCase& c) {
  const char* optimizer = c.optimizer == OptimizerType::kSgd           ? "sgd"
                          : c.optimizer == OptimizerType::kSgdMomentum ? "momentum"
                                                                       : "adamw";
  return absl::StrCat(PlacementStrategyName(c.strategy), "_", optimizer,
                      c.max_grad_norm > 0 ? "_clipped" : "");
}

class InProcessTrainingTest : public ::testing::TestWithParam<TrainingCase> {};

TEST_P(InProcessTrainingTest, TwentyStepsEqualTheReferenceAndReplicasStayIdentical) {
  OptimizerOptions optimizer;
  optimizer.type = GetParam().optimizer;
  if (optimizer.type == OptimizerType::kSgdMomentum) optimizer.momentum = 0.9f;
  optimizer.max_grad_norm = GetParam().max_grad_norm;
  const ModelConfig model = Model(optimizer);
  InProcessCluster cluster(model, GetParam().strategy);
  const float lr = GetParam().learning_rate;

  ReferenceTraining reference(model, InitAllWeights(model));

  for (int step = 1; step <= 20; ++step) {
    const FloatTensor x = RandomTensor({kTokens, kDModel}, 100 + step);
    const FloatTensor dy = RandomTensor({kTokens, kDModel}, 200 + step);
    const ReferenceTraining::Step expected = reference.Train(x, dy, lr);

    absl::StatusOr<Router::ForwardResult> y = cluster.Forward(Wire(x), /*training=*/true);
    ASSERT_TRUE(y.ok()) << y.status();
    ASSERT_TRUE(TensorNear(Decoded(y->y, kDModel), expected.forward.y, 1e-5)) << "step " << step;
    absl::StatusOr<v1::Tensor> dx = cluster.Backward(y->request_id, Wire(dy));
    ASSERT_TRUE(dx.ok()) << dx.status();
    ASSERT_TRUE(TensorNear(Decoded(*dx, kDModel), expected.grads.dx, 1e-5)) << "step " << step;
    absl::StatusOr<StepCoordinator::Result> stepped = cluster.Step(lr);
    ASSERT_TRUE(stepped.ok()) << stepped.status();
    EXPECT_EQ(stepped->step, static_cast<uint64_t>(step));
    ReplicaDigests(cluster);
  }

  for (int e = 0; e < model.num_experts; ++e) {
    for (int s : cluster.placement.ServersOf(ExpertKey(0, e))) {
      const expert::ExpertSnapshot served = *cluster.client.store(s).Snapshot(ExpertKey(0, e));
      for (ExpertTensor which : kAllExpertTensors) {
        EXPECT_TRUE(TensorNear(served.weights.tensor(which),
                               reference.weights().experts.at(e).tensor(which), 1e-5))
            << "expert " << e << " on server " << s << ", tensor " << static_cast<int>(which);
      }
    }
  }
  EXPECT_TRUE(TensorNear(cluster.router.gate()->value, *reference.weights().gate, 1e-5));
  EXPECT_EQ(cluster.router.gate()->version, 20u);  // committed at step 20
  // Routing on fresh tokens is the reference's, token for token.
  const FloatTensor x = RandomTensor({kTokens, kDModel}, 999);
  const ReferenceForward expected = *reference.Layer().Forward(x);
  absl::StatusOr<Router::ForwardResult> y = cluster.Forward(Wire(x));
  ASSERT_TRUE(y.ok()) << y.status();
  EXPECT_TRUE(TensorNear(Decoded(y->y, kDModel), expected.y, 1e-5));
  EXPECT_EQ(y->routing.expert_ids, expected.routing.expert_ids);
}

INSTANTIATE_TEST_SUITE_P(
    Strategies, InProcessTrainingTest,
    ::testing::Values(
        TrainingCase{PlacementStrategy::kHybrid, OptimizerType::kSgdMomentum, 0.01f},
        TrainingCase{PlacementStrategy::kHybrid, OptimizerType::kSgd, 0.05f},
        TrainingCase{PlacementStrategy::kDataParallel, OptimizerType::kSgdMomentum, 0.01f},
        TrainingCase{PlacementStrategy::kDataParallel, OptimizerType::kSgd, 0.05f},
        TrainingCase{PlacementStrategy::kModelParallel, OptimizerType::kSgd, 0.05f},
        TrainingCase{PlacementStrategy::kHybrid, OptimizerType::kAdamW, 0.01f},
        TrainingCase{PlacementStrategy::kDataParallel, OptimizerType::kAdamW, 0.01f, 1.0f},
        TrainingCase{PlacementStrategy::kModelParallel, OptimizerType::kAdamW, 0.01f, 1.0f},
        TrainingCase{PlacementStrategy::kHybrid, OptimizerType::kSgdMomentum, 0.01f, 1.0f}),
    [](const auto& info) { return CaseName(info.param); });

// Two MoE layers in one cluster: each layer's forwards, backwards and the
// steps that update both equal that layer's reference (its own gate and
// experts, nothing crossing between layers); a layer the model does not
// have is refused by name.
TEST(InProcessTrainingTest, TwoLayersTrainAsTwoReferenceLayers) {
  OptimizerOptions optimizer;
  optimizer.type = OptimizerType::kAdamW;
  ModelConfig model = Model(optimizer);
  model.num_layers = 2;
  for (PlacementStrategy strategy :
       {PlacementStrategy::kHybrid, PlacementStrategy::kModelParallel}) {
    SCOPED_TRACE(PlacementStrategyName(strategy));
    InProcessCluster cluster(model, strategy);
    std::vector<ReferenceTraining> reference;
    for (int l = 0; l < 2; ++l) reference.emplace_back(model, InitAllWeights(model, l));
    // The layers' initial weights differ (their own init ids).
    ASSERT_FALSE(TensorNear(*cluster.layers[0].gate, *cluster.layers[1].gate, 1e-2));

    for (int step = 1; step <= 4; ++step) {
      for (int l = 0; l < 2; ++l) {
        const FloatTensor x = RandomTensor({kTokens, kDModel}, 100 * l + step);
        const FloatTensor dy = RandomTensor({kTokens, kDModel}, 200 * l + step + 50);
        const ReferenceTraining::Step expected = reference[l].Train(x, dy, 0.01f);
        absl::StatusOr<Router::ForwardResult> y = cluster.Forward(Wire(x), true, l);
        ASSERT_TRUE(y.ok()) << y.status();
        EXPECT_EQ(y->routing.expert_ids, expected.forward.routing.expert_ids);
        ASSERT_TRUE(TensorNear(Decoded(y->y, kDModel), expected.forward.y, 1e-5))
            << "layer " << l << " step " << step;
        absl::StatusOr<v1::Tensor> dx = cluster.Backward(y->request_id, Wire(dy));
        ASSERT_TRUE(dx.ok()) << dx.status();
        ASSERT_TRUE(TensorNear(Decoded(*dx, kDModel), expected.grads.dx, 1e-5))
            << "layer " << l << " step " << step;
      }
      absl::StatusOr<StepCoordinator::Result> stepped = cluster.Step(0.01f);
      ASSERT_TRUE(stepped.ok()) << stepped.status();
      ReplicaDigests(cluster);
    }
    for (int l = 0; l < 2; ++l) {
      for (int e = 0; e < model.num_experts; ++e) {
        const ExpertKey key(l, e);
        for (int s : cluster.placement.ServersOf(key)) {
          const expert::ExpertSnapshot served = *cluster.client.store(s).Snapshot(key);
          for (ExpertTensor which : kAllExpertTensors) {
            EXPECT_TRUE(TensorNear(served.weights.tensor(which),
                                   reference[l].weights().experts.at(e).tensor(which), 1e-5))
                << key << " on server " << s << ", tensor " << static_cast<int>(which);
          }
        }
      }
      const absl::Span<const float> gate =
          GateOfLayer(model, cluster.router.gate()->value.values(), l);
      EXPECT_TRUE(TensorNear(
          FloatTensor({kDModel, model.num_experts}, std::vector<float>(gate.begin(), gate.end())),
          *reference[l].weights().gate, 1e-5))
          << "gate of layer " << l;
    }
    absl::StatusOr<Router::ForwardResult> missing =
        cluster.Forward(Wire(RandomTensor({4, kDModel}, 1)), false, 2);
    EXPECT_EQ(missing.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(missing.status().message(), HasSubstr("layer 2 is out of range [0, 2)"));
  }
}

TEST(InProcessTrainingFaultTest, ABrokenRingFailsTheStepAndLeavesEveryReplicaAsItWas) {
  InProcessCluster cluster(Model({}), PlacementStrategy::kDataParallel);
  absl::StatusOr<Router::ForwardResult> y =
      cluster.Forward(Wire(RandomTensor({kTokens, kDModel}, 1)), true);
  ASSERT_TRUE(y.ok()) << y.status();
  ASSERT_TRUE(cluster.Backward(y->request_id, Wire(RandomTensor({kTokens, kDModel}, 2))).ok());
  const std::map<ExpertKey, uint64_t> before = ReplicaDigests(cluster);
  std::map<std::pair<int, ExpertKey>, ExpertWeights> grads_before;
  for (int s = 0; s < 3; ++s) {
    for (ExpertKey e : cluster.client.store(s).HostedExperts()) {
      grads_before.emplace(std::make_pair(s, e), *cluster.client.store(s).Gradients(e));
    }
  }

  // Server 1's segments to server 2 fail as if server 2 had died.
  cluster.client.ring_link(1, 2).Break();
  absl::StatusOr<StepCoordinator::Result> failed = cluster.Step(0.1f, absl::Seconds(10));
  ASSERT_FALSE(failed.ok());
  EXPECT_THAT(failed.status().message(), HasSubstr("server-2"));
  // No weight moved, and each replica's accumulators hold exactly its own
  // gradients again (nothing summed, nothing lost).
  EXPECT_EQ(ReplicaDigests(cluster), before);
  for (const auto& [key, grads] : grads_before) {
    const ExpertWeights now = *cluster.client.store(key.first).Gradients(key.second);
    for (ExpertTensor which : kAllExpertTensors) {
      EXPECT_EQ(now.tensor(which).values(), grads.tensor(which).values())
          << "server " << key.first << " expert " << key.second;
    }
  }

  cluster.client.ring_link(1, 2).Heal();
  absl::StatusOr<StepCoordinator::Result> stepped = cluster.Step(0.1f);
  ASSERT_TRUE(stepped.ok()) << stepped.status();
  EXPECT_NE(ReplicaDigests(cluster), before);
}

// The ring seam of a placement change: a server's rings are replaced only
// between steps, and the cluster trains on with them.
TEST(InProcessTrainingFaultTest, RingsChangeOnlyBetweenSteps) {
  InProcessCluster cluster(Model({}), PlacementStrategy::kModelParallel);
  absl::StatusOr<Router::ForwardResult> y =
      cluster.Forward(Wire(RandomTensor({kTokens, kDModel}, 1)), true);
  ASSERT_TRUE(y.ok()) << y.status();
  ASSERT_TRUE(cluster.Backward(y->request_id, Wire(RandomTensor({kTokens, kDModel}, 2))).ok());
  // No replicas, no rings: server 2 prepares step 1 alone.
  expert::StepExecutor& steps = cluster.client.steps(2);
  ASSERT_TRUE(steps.Prepare({1, 0.1f, absl::Now() + absl::Seconds(5)}).ok());
  const absl::Status while_prepared = steps.SetRings({});
  EXPECT_EQ(while_prepared.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(while_prepared.message(), HasSubstr("only between steps"));
  steps.Abort(1, "a test");
  EXPECT_TRUE(steps.SetRings({}).ok());
  // The cluster goes on past the step server 2 aborted.
  absl::StatusOr<StepCoordinator::Result> stepped = cluster.Step(0.1f);
  ASSERT_TRUE(stepped.ok()) << stepped.status();
  EXPECT_EQ(stepped->step, 2u);
}

// The step is decided once every server has prepared it. A server whose
// commit is lost is named in the answer (the step is committed) and commits
// on the next step's word; when no server confirms, nothing is installed
// here and the next step settles it.
TEST(InProcessTrainingFaultTest, ALostCommitIsCommittedOnTheNextStepsWord) {
  const ModelConfig model = Model({});
  InProcessCluster cluster(model, PlacementStrategy::kDataParallel);
  ReferenceTraining reference(model, InitAllWeights(model));
  for (int step = 1; step <= 3; ++step) {
    const FloatTensor x = RandomTensor({kTokens, kDModel}, 500 + step);
    const FloatTensor dy = RandomTensor({kTokens, kDModel}, 600 + step);
    const ReferenceTraining::Step expected = reference.Train(x, dy, 0.05f);
    absl::StatusOr<Router::ForwardResult> y = cluster.Forward(Wire(x), true);
    ASSERT_TRUE(y.ok()) << y.status();
    ASSERT_TRUE(TensorNear(Decoded(y->y, kDModel), expected.forward.y, 1e-5)) << "step " << step;
    ASSERT_TRUE(cluster.Backward(y->request_id, Wire(dy)).ok());
    // Step 1's commit to server 1 is lost, every attempt.
    if (step == 1) cluster.client.LoseCommits(1, 3);
    absl::StatusOr<StepCoordinator::Result> stepped = cluster.Step(0.05f);
    ASSERT_TRUE(stepped.ok()) << stepped.status();
    EXPECT_EQ(stepped->step, static_cast<uint64_t>(step));
    if (step == 1) {
      ASSERT_EQ(stepped->servers_behind.size(), 1u);
      EXPECT_THAT(stepped->servers_behind[0], HasSubstr("server-1 CommitStep: lost"));
      EXPECT_EQ(cluster.client.steps(1).steps().prepared, 1u);
    } else {
      EXPECT_TRUE(stepped->servers_behind.empty());
      // Committed where the commit was lost, on this step's word, before
      // it prepared this one: every replica is equal and the reference's.
      ReplicaDigests(cluster);
    }
  }
  for (int s = 0; s < cluster.placement.num_servers(); ++s) {
    const expert::ExpertSnapshot served = *cluster.client.store(s).Snapshot(ExpertKey(0, 2));
    EXPECT_TRUE(TensorNear(served.weights.w1, reference.weights().experts.at(2).w1, 1e-5));
  }
  EXPECT_TRUE(TensorNear(cluster.router.gate()->value, *reference.weights().gate, 1e-5));

  // No server confirms step 4: an error, no new gate here, and the next
  // step aborts it everywhere (it was committed nowhere).
  const std::map<ExpertKey, uint64_t> before = ReplicaDigests(cluster);
  absl::StatusOr<Router::ForwardResult> y =
      cluster.Forward(Wire(RandomTensor({kTokens, kDModel}, 700)), true);
  ASSERT_TRUE(y.ok());
  ASSERT_TRUE(cluster.Backward(y->request_id, Wire(RandomTensor({kTokens, kDModel}, 701))).ok());
  for (int s = 0; s < cluster.placement.num_servers(); ++s) cluster.client.LoseCommits(s, 3);
  absl::StatusOr<StepCoordinator::Result> lost = cluster.Step(0.05f);
  EXPECT_EQ(lost.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(lost.status().message(), HasSubstr("none confirmed its commit"));
  EXPECT_EQ(cluster.router.gate()->version, 3u);
  EXPECT_EQ(ReplicaDigests(cluster), before);
  absl::StatusOr<StepCoordinator::Result> next = cluster.Step(0.05f);
  ASSERT_TRUE(next.ok()) << next.status();
  EXPECT_EQ(next->step, 5u);
  EXPECT_EQ(cluster.client.steps(0).steps().aborted, 4u);
  ReplicaDigests(cluster);
}

// One router steps at a time: the step lease (kept by server 0) refuses a
// second router while the first holds it, naming the holder.
TEST(InProcessTrainingFaultTest, OneRouterStepsAtATime) {
  InProcessCluster cluster(Model({}), PlacementStrategy::kHybrid);
  v1::AcquireLeaseRequest request;
  request.set_name("step");
  request.set_holder("router-b/000001");
  request.set_ttl_ms(60000);
  absl::Notification held;
  cluster.client.AcquireLease(0, request, absl::Now() + absl::Seconds(1),
                              [&](absl::StatusOr<v1::AcquireLeaseResponse> r) {
                                EXPECT_TRUE(r.ok() && r->granted());
                                held.Notify();
                              });
  held.WaitForNotification();
  absl::StatusOr<StepCoordinator::Result> refused = cluster.Step(0.05f);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kAborted);
  EXPECT_THAT(refused.status().message(), HasSubstr("router router-b/000001 is running a step"));
  // Released: this router steps.
  request.set_release(true);
  absl::Notification released;
  cluster.client.AcquireLease(0, request, absl::Now() + absl::Seconds(1),
                              [&](absl::StatusOr<v1::AcquireLeaseResponse>) { released.Notify(); });
  released.WaitForNotification();
  absl::StatusOr<StepCoordinator::Result> stepped = cluster.Step(0.05f);
  ASSERT_TRUE(stepped.ok()) << stepped.status();
  EXPECT_EQ(stepped->step, 1u);
}

// Non-finite values never reach a weight: an infinite, NaN or negative
// learning rate is refused at once, and an update that overflows fails the
// step with every replica, the gate and the gradients as they were; a sane
// step then works.
TEST(InProcessTrainingFaultTest, NonFiniteUpdatesNeverReachAWeight) {
  InProcessCluster cluster(Model({}), PlacementStrategy::kHybrid);
  absl::StatusOr<Router::ForwardResult> y =
      cluster.Forward(Wire(RandomTensor({kTokens, kDModel}, 11)), true);
  ASSERT_TRUE(y.ok()) << y.status();
  ASSERT_TRUE(cluster.Backward(y->request_id, Wire(RandomTensor({kTokens, kDModel}, 12))).ok());
  const std::map<ExpertKey, uint64_t> before = ReplicaDigests(cluster);

  for (float bad :
       {std::numeric_limits<float>::infinity(), std::numeric_limits<float>::quiet_NaN(), -1.0f}) {
    absl::StatusOr<StepCoordinator::Result> refused = cluster.Step(bad);
    EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_THAT(refused.status().message(), HasSubstr("must be finite and >= 0")) << bad;
  }

  absl::StatusOr<StepCoordinator::Result> overflow = cluster.Step(3e38f);
  EXPECT_EQ(overflow.status().code(), absl::StatusCode::kOutOfRange);
  EXPECT_THAT(overflow.status().message(), HasSubstr("non-finite"));
  EXPECT_EQ(ReplicaDigests(cluster), before);
  EXPECT_EQ(cluster.router.gate()->version, 0u);

  absl::StatusOr<StepCoordinator::Result> sane = cluster.Step(0.01f);
  ASSERT_TRUE(sane.ok()) << sane.status();
  EXPECT_NE(ReplicaDigests(cluster), before);
  EXPECT_EQ(cluster.router.gate()->version, sane->step);
}

// dL/dy is checked before the forward's state is used: a NaN or a wrong
// shape is INVALID_ARGUMENT, and the same Backward with a good dL/dy then
// works (router and servers kept their state).
// A training forward sends each expert's pairs to one replica, so that a
// failover finds none of that forward's state on the next replica: with one
// replica failing every call, the forward, its backward and the step equal
// the reference.
TEST(InProcessTrainingFaultTest, ATrainingForwardFailsOverWholeExperts) {
  const ModelConfig model = Model({});
  InProcessCluster cluster(model, PlacementStrategy::kDataParallel);
  ReferenceTraining reference(model, InitAllWeights(model));
  const FloatTensor x = RandomTensor({kTokens, kDModel}, 41);
  const FloatTensor dy = RandomTensor({kTokens, kDModel}, 42);
  const ReferenceTraining::Step expected = reference.Train(x, dy, 0.01f);
  cluster.client.BreakSilently(1);
  absl::StatusOr<Router::ForwardResult> y = cluster.Forward(Wire(x), /*training=*/true);
  ASSERT_TRUE(y.ok()) << y.status();
  EXPECT_GT(cluster.router.failovers(), 0);
  EXPECT_TRUE(TensorNear(Decoded(y->y, kDModel), expected.forward.y, 1e-5));
  absl::StatusOr<v1::Tensor> dx = cluster.Backward(y->request_id, Wire(dy));
  ASSERT_TRUE(dx.ok()) << dx.status();
  EXPECT_TRUE(TensorNear(Decoded(*dx, kDModel), expected.grads.dx, 1e-5));
  cluster.client.Revive(1);
  ASSERT_TRUE(cluster.Step(0.01f).ok());
  for (int e = 0; e < model.num_experts; ++e) {
    for (int s = 0; s < 2; ++s) {
      const expert::ExpertSnapshot served = *cluster.client.store(s).Snapshot(ExpertKey(0, e));
      EXPECT_TRUE(TensorNear(served.weights.w1, reference.weights().experts.at(e).w1, 1e-5))
          << "expert " << e << " on server " << s;
    }
  }
}

TEST(InProcessTrainingFaultTest, ABadGradientCanBeRetried) {
  InProcessCluster cluster(Model({}), PlacementStrategy::kHybrid);
  absl::StatusOr<Router::ForwardResult> y =
      cluster.Forward(Wire(RandomTensor({kTokens, kDModel}, 31)), true);
  ASSERT_TRUE(y.ok()) << y.status();
  FloatTensor nan = RandomTensor({kTokens, kDModel}, 32);
  nan.mutable_values()[5] = std::numeric_limits<float>::quiet_NaN();
  absl::StatusOr<v1::Tensor> bad = cluster.Backward(y->request_id, Wire(nan));
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  bad = cluster.Backward(y->request_id, Wire(RandomTensor({kTokens + 1, kDModel}, 33)));
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  absl::StatusOr<v1::Tensor> good =
      cluster.Backward(y->request_id, Wire(RandomTensor({kTokens, kDModel}, 34)));
  EXPECT_TRUE(good.ok()) << good.status();
  EXPECT_TRUE(cluster.Step(0.01f).ok());
}

// Training request ids carry the router's tag: two routers over the same
// servers never share one (the servers key training state by it), and a
// Backward sent to the other router is refused naming the right one.
TEST(InProcessTrainingFaultTest, ABackwardGoesToTheRouterOfItsForward) {
  InProcessCluster cluster(Model({}), PlacementStrategy::kHybrid);
  Router::Options options{cluster.model, *cluster.weights.gate};
  options.tag = 0xabcdef;
  options.name = "router-b";
  Router other(std::move(options), cluster.placement, cluster.client);
  const FloatTensor x = RandomTensor({kTokens, kDModel}, 41);
  absl::StatusOr<Router::ForwardResult> a = cluster.Forward(Wire(x), true);
  ASSERT_TRUE(a.ok()) << a.status();
  absl::Notification done;
  absl::StatusOr<Router::ForwardResult> b;
  const v1::Tensor wire = Wire(x);  // valid until the call is done
  other.Forward(wire, 0, true, absl::InfiniteFuture(), [&](auto r) {
    b = std::move(r);
    done.Notify();
  });
  done.WaitForNotification();
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_NE(a->request_id, b->request_id);
  EXPECT_EQ(b->request_id >> 40, 0xabcdefu);

  auto backward = [&](Router& router, uint64_t request_id, uint64_t seed) {
    absl::Notification done;
    absl::StatusOr<v1::Tensor> dx;
    const v1::Tensor dy = Wire(RandomTensor({kTokens, kDModel}, seed));  // valid until done
    router.Backward(request_id, dy, absl::InfiniteFuture(), [&](auto r) {
      dx = std::move(r);
      done.Notify();
    });
    done.WaitForNotification();
    return dx;
  };
  const absl::Status wrong = backward(cluster.router, b->request_id, 42).status();
  EXPECT_EQ(wrong.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(wrong.message(), HasSubstr("was made by router tag abcdef"));
  EXPECT_THAT(wrong.message(), HasSubstr("not by this one (/000000)"));
  // An id of tag 0 is no deployed router's: unknown, not misdirected.
  EXPECT_EQ(backward(other, a->request_id, 43).status().code(), absl::StatusCode::kNotFound);
  // Each router still has its own.
  EXPECT_TRUE(backward(other, b->request_id, 44).ok());
  EXPECT_TRUE(backward(cluster.router, a->request_id, 45).ok());
  EXPECT_EQ(other.pending_training(), 0u);
}

// Backwards through two routers, one Step through one of them: the step
// applies both routers' gate gradients (the lease keeper sums them) and
// equals the reference trained on both batches at once. Every server keeps
// the gate its last CommitStep carried: the other router, meeting servers
// at the newer step, learns that gate from them and serves what the router
// that stepped serves; a router that starts later takes it too.
TEST(InProcessTrainingFaultTest, BackwardsThroughTwoRoutersMakeOneStep) {
  InProcessCluster cluster(Model({}), PlacementStrategy::kHybrid);
  auto other_router = [&](uint32_t tag) {
    Router::Options options{cluster.model, *cluster.weights.gate};
    options.tag = tag;
    return std::make_unique<Router>(std::move(options), cluster.placement, cluster.client);
  };
  std::unique_ptr<Router> other = other_router(0xb);
  auto forward = [](Router& router, const v1::Tensor& x, bool training) {
    return testing::ForwardAndWait(router, x, training);
  };
  const FloatTensor x0 = RandomTensor({kTokens, kDModel}, 50);
  const FloatTensor dy0 = RandomTensor({kTokens, kDModel}, 51);
  const FloatTensor x1 = RandomTensor({kTokens, kDModel}, 52);
  const FloatTensor dy1 = RandomTensor({kTokens, kDModel}, 53);
  // The other router trains on one batch...
  absl::StatusOr<Router::ForwardResult> mine = forward(*other, Wire(x0), true);
  ASSERT_TRUE(mine.ok()) << mine.status();
  {
    absl::Notification done;
    absl::StatusOr<v1::Tensor> dx;
    other->Backward(mine->request_id, Wire(dy0), absl::InfiniteFuture(), [&](auto r) {
      dx = std::move(r);
      done.Notify();
    });
    done.WaitForNotification();
    ASSERT_TRUE(dx.ok()) << dx.status();
  }
  // ... the first router on another, and steps.
  absl::StatusOr<Router::ForwardResult> y = cluster.Forward(Wire(x1), true);
  ASSERT_TRUE(y.ok()) << y.status();
  ASSERT_TRUE(cluster.Backward(y->request_id, Wire(dy1)).ok());
  ASSERT_TRUE(cluster.Step(0.05f).ok());
  ASSERT_EQ(cluster.router.gate()->version, 1u);
  // The reference, on both batches as one (no capacity limit: a token's
  // routing does not depend on the others).
  ReferenceTraining reference(cluster.model, InitAllWeights(cluster.model));
  reference.Train(ConcatRows(x0, x1), ConcatRows(dy0, dy1), 0.05f);
  EXPECT_TRUE(TensorNear(cluster.router.gate()->value, *reference.weights().gate, 1e-5));
  EXPECT_TRUE(cluster.client.steps(0).gate_gradient().empty());

  // The other router's next forward meets step 1: it learns the gate (bit
  // for bit) and serves what the first router serves.
  const v1::Tensor fresh = Wire(RandomTensor({kTokens, kDModel}, 54));
  absl::StatusOr<Router::ForwardResult> served = forward(*other, fresh, false);
  ASSERT_TRUE(served.ok()) << served.status();
  absl::StatusOr<Router::ForwardResult> first = cluster.Forward(fresh);
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_EQ(other->gate()->version, 1u);
  EXPECT_TRUE(TensorNear(other->gate()->value, cluster.router.gate()->value, 0));
  EXPECT_TRUE(TensorNear(Decoded(served->y, kDModel), Decoded(first->y, kDModel), 1e-6));
  EXPECT_EQ(served->routing.expert_ids, first->routing.expert_ids);
  // A router that starts now takes the servers' gate.
  std::unique_ptr<Router> late = other_router(0xc);
  ASSERT_TRUE(late->AdoptServersGate(absl::Now() + absl::Seconds(5)).ok());
  EXPECT_EQ(late->gate()->version, 1u);
  EXPECT_TRUE(TensorNear(late->gate()->value, cluster.router.gate()->value, 0));
}

// An AbortStep of a step that never started here (2^64-1, say, from a
// stray caller) refuses only that step: training goes on.
TEST(InProcessTrainingFaultTest, AnAbortOfAFarStepRefusesOnlyThatStep) {
  InProcessCluster cluster(Model({}), PlacementStrategy::kDataParallel);
  absl::StatusOr<Router::ForwardResult> y =
      cluster.Forward(Wire(RandomTensor({kTokens, kDModel}, 21)), true);
  ASSERT_TRUE(y.ok()) << y.status();
  ASSERT_TRUE(cluster.Backward(y->request_id, Wire(RandomTensor({kTokens, kDModel}, 22))).ok());
  v1::AbortStepRequest abort;
  abort.set_step(std::numeric_limits<uint64_t>::max());
  abort.set_reason("stray");
  for (int s = 0; s < 3; ++s) ASSERT_TRUE(cluster.client.dispatcher(s).AbortStep(abort).ok());
  absl::StatusOr<StepCoordinator::Result> stepped = cluster.Step(0.01f);
  ASSERT_TRUE(stepped.ok()) << stepped.status();
  EXPECT_EQ(stepped->step, 1u);
  ReplicaDigests(cluster);
  // The aborted step itself stays refused.
  const absl::StatusOr<expert::StepExecutor::PrepareResult> late =
      cluster.client.steps(0).Prepare({abort.step(), 0.01f, absl::Now() + absl::Seconds(1)});
  EXPECT_EQ(late.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(late.status().message(), HasSubstr("more than 65536 ahead is refused"));
  // Nor does a far PrepareStep that was refused stop the next real step.
  ASSERT_TRUE(cluster.Forward(Wire(RandomTensor({kTokens, kDModel}, 23)), true).ok());
  EXPECT_EQ(cluster.Step(0.01f)->step, 2u);
}

// Versions on the wire. A router whose gate is behind the servers' weights
// (another router stepped) is refused by every replica rather than mixing
// its old gate with new experts; it then learns the servers' gate and runs
// the call again on it.
TEST(InProcessVersionTest, ARouterBehindTheServersLearnsTheirGate) {
  InProcessCluster cluster(Model({}), PlacementStrategy::kHybrid);
  const FloatTensor x = RandomTensor({kTokens, kDModel}, 5);
  absl::StatusOr<Router::ForwardResult> y = cluster.Forward(Wire(x), true);
  ASSERT_TRUE(y.ok()) << y.status();
  ASSERT_TRUE(cluster.Backward(y->request_id, Wire(RandomTensor({kTokens, kDModel}, 6))).ok());
  ASSERT_TRUE(cluster.Step(0.1f).ok());

  // A second router over the same servers, still at step 0.
  Router behind({cluster.model, *cluster.weights.gate}, cluster.placement, cluster.client);
  const v1::Tensor wire = Wire(x);
  absl::Notification done;
  absl::StatusOr<Router::ForwardResult> stale;
  behind.Forward(wire, 0, false, absl::InfiniteFuture(), [&](auto r) {
    stale = std::move(r);
    done.Notify();
  });
  done.WaitForNotification();
  ASSERT_TRUE(stale.ok()) << stale.status();
  EXPECT_EQ(stale->gate_version, 1u);
  absl::StatusOr<Router::ForwardResult> current = cluster.Forward(wire);
  ASSERT_TRUE(current.ok()) << current.status();
  EXPECT_TRUE(TensorNear(Decoded(stale->y, kDModel), Decoded(current->y, kDModel), 1e-6));
}

// A replica behind the cluster's step (restarted with no replica to sync
// from) answers FAILED_PRECONDITION once; the router then avoids it for
// that expert (a stale mark, shown per server) and serves from the others.
TEST(InProcessVersionTest, AReplicaBehindIsAvoidedAfterItsFirstRefusal) {
  InProcessCluster cluster(Model({}), PlacementStrategy::kDataParallel, 2);
  const FloatTensor x = RandomTensor({kTokens, kDModel}, 11);
  absl::StatusOr<Router::ForwardResult> y = cluster.Forward(Wire(x), true);
  ASSERT_TRUE(y.ok()) << y.status();
  ASSERT_TRUE(cluster.Backward(y->request_id, Wire(RandomTensor({kTokens, kDModel}, 12))).ok());
  ASSERT_TRUE(cluster.Step(0.1f).ok());
  // Server 1's expert 0 goes back to the initial weights at step 0.
  const ExpertKey expert(0, 0);
  expert::ExpertSnapshot old{cluster.weights.experts.at(0), std::nullopt};
  ASSERT_TRUE(cluster.client.store(1).SwapInWeights(expert, old, 0).ok());

  const size_t before = cluster.client.dispatched().size();
  for (int i = 0; i < 4; ++i) {
    absl::StatusOr<Router::ForwardResult> served = cluster.Forward(Wire(x));
    ASSERT_TRUE(served.ok()) << served.status();
  }
  EXPECT_THAT(cluster.router.StaleExperts(1), ElementsAre(expert));
  EXPECT_TRUE(cluster.router.StaleExperts(0).empty());
  // Expert 0 reached server 1 at most once (the refusal that marked it).
  int to_stale = 0;
  const auto dispatched = cluster.client.dispatched();
  for (size_t i = before; i < dispatched.size(); ++i) {
    if (dispatched[i].server == 1 && dispatched[i].expert == expert) ++to_stale;
  }
  EXPECT_LE(to_stale, 1);
}

// A Forward planned before a step committed meets servers that moved on:
// the router has caught up by then, so it runs the call again with the new
// gate and weights; the answer is the new model's, never a mix.
TEST(InProcessVersionTest, AForwardOverlappingACommitIsRunAgainAtTheNewStep) {
  InProcessCluster cluster(Model({}), PlacementStrategy::kModelParallel);
  const FloatTensor x = RandomTensor({kTokens, kDModel}, 7);
  const FloatTensor dy = RandomTensor({kTokens, kDModel}, 8);
  absl::StatusOr<Router::ForwardResult> y = cluster.Forward(Wire(x), true);
  ASSERT_TRUE(y.ok()) << y.status();
  ASSERT_TRUE(cluster.Backward(y->request_id, Wire(dy)).ok());
  // The reference after the step.
  ReferenceTraining reference(cluster.model, cluster.weights);
  reference.Train(x, dy, 0.1f);
  const ReferenceForward expected = *reference.Layer().Forward(x);

  // Server 0 holds its Forward calls; the other servers answer at step 0.
  cluster.client.Stall(0);
  const v1::Tensor wire = Wire(x);  // valid until the call ends, restarts too
  absl::Notification done;
  absl::StatusOr<Router::ForwardResult> result;
  cluster.router.Forward(wire, 0, false, absl::InfiniteFuture(), [&](auto r) {
    result = std::move(r);
    done.Notify();
  });
  ASSERT_TRUE(cluster.Step(0.1f).ok());  // the step's calls are not held
  cluster.client.Unstall(0);
  done.WaitForNotification();
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->gate_version, 1u);
  EXPECT_TRUE(TensorNear(Decoded(result->y, kDModel), expected.y, 1e-5));
  EXPECT_EQ(result->routing.expert_ids, expected.routing.expert_ids);
}

}  // namespace
}  // namespace moe::router
