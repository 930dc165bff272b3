// Rejoin by sync over in-process peers (the dispatchers of real stores):
// a restarted server takes each expert at the cluster's committed step from
// a replica, checks digests, falls over to the next replica when a transfer
// is corrupt, and names the experts nobody can give it.
#include "expert_service/weight_sync.h"

#include <map>
#include <memory>

#include "common/deterministic_init.h"
#include "common/log.h"
#include "common/status_macros.h"
#include "expert_service/allreduce/collective_registry.h"
#include "expert_service/expert_dispatcher.h"
#include "expert_service/reference_expert_kernel.h"
#include "expert_service/step_executor.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "prometheus/registry.h"

namespace moe::expert {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

ModelConfig Model() {
  ModelConfig model;
  model.d_model = 8;
  model.d_ff = 16;
  model.num_experts = 4;
  model.top_k = 2;
  model.seed = 21;
  model.optimizer.type = OptimizerType::kSgdMomentum;
  model.optimizer.momentum = 0.9f;
  return model;
}

// Weights "trained" to step `step`: deterministic, different per step.
ExpertSnapshot Trained(ExpertKey expert, uint64_t step) {
  ExpertSnapshot snapshot{InitExpert(Model(), expert), InitExpert(Model(), ExpertKey(0, 3))};
  for (float& v : snapshot.weights.w1.mutable_values()) v += 0.01f * step;
  for (float& v : snapshot.velocity->b2.mutable_values()) v -= 0.5f * step;
  return snapshot;
}

// One server: a store with `experts` and its dispatcher.
struct Server {
  Server(std::vector<int> experts, uint64_t step, prometheus::Registry& registry) {
    std::map<ExpertKey, ExpertWeights> weights;
    for (int e : experts) weights.emplace(ExpertKey(0, e), InitExpert(Model(), ExpertKey(0, e)));
    store = *ExpertStore::Create(
        {Model(), "server", {}}, std::move(weights),
        [](const ExpertWeights& w) -> absl::StatusOr<std::unique_ptr<ExpertKernel>> {
          return std::make_unique<ReferenceExpertKernel>(w);
        });
    for (int e : experts) {
      if (step == 0) continue;
      ExpertSnapshot trained = Trained(ExpertKey(0, e), step);
      MOE_CHECK(store->SwapInWeights(ExpertKey(0, e), trained, step).ok());
    }
    metrics = ExpertMetrics::Create(registry, Model());
    dispatcher = std::make_unique<ExpertDispatcher>(ExpertDispatcher::Options{"server"}, *store,
                                                    *metrics, nullptr, nullptr);
  }
  std::unique_ptr<ExpertStore> store;
  std::unique_ptr<ExpertMetrics> metrics;
  std::unique_ptr<ExpertDispatcher> dispatcher;
};

// The in-process peers, with faults: a peer can be down, or send chunks
// with one byte flipped.
class InProcessPeers : public SyncPeers {
 public:
  struct Peer {
    Server* server;
    uint64_t committed_step;
    bool down = false;
    bool corrupt = false;
  };
  explicit InProcessPeers(std::vector<Peer> peers) : peers_(std::move(peers)) {}

  int num_peers() const override { return static_cast<int>(peers_.size()); }
  std::string name(int peer) const override { return absl::StrCat("peer-", peer); }
  absl::StatusOr<v1::InfoResponse> Info(int peer, absl::Time) override {
    if (peers_[peer].down) return absl::UnavailableError("connection refused");
    v1::InfoResponse info;
    peers_[peer].server->dispatcher->Info(&info);
    info.set_step(peers_[peer].committed_step);  // no step executor here
    return info;
  }
  absl::Status FetchExpert(
      int peer, ExpertKey expert, absl::Time,
      absl::FunctionRef<absl::Status(const v1::ExpertWeightsChunk&)> sink) override {
    ++fetches;
    v1::GetExpertWeightsRequest request;
    SetExpertKey(expert, &request);
    request.set_max_chunk_bytes(256);
    MOE_ASSIGN_OR_RETURN(auto chunks, peers_[peer].server->dispatcher->ExpertChunks(request));
    for (v1::ExpertWeightsChunk& chunk : chunks) {
      if (peers_[peer].corrupt) (*chunk.mutable_data())[0] ^= 1;
      MOE_RETURN_IF_ERROR(sink(chunk));
    }
    return absl::OkStatus();
  }
  absl::StatusOr<v1::GetGateResponse> Gate(int peer, absl::Time) override {
    v1::GetGateResponse gate;
    MOE_RETURN_IF_ERROR(peers_[peer].server->dispatcher->GetGate(&gate));
    return gate;
  }
  int fetches = 0;

 private:
  std::vector<Peer> peers_;
};

class WeightSyncTest : public ::testing::Test {
 protected:
  absl::StatusOr<SyncResult> Sync(Server& server, InProcessPeers& peers) {
    const absl::Time deadline = absl::Now() + absl::Seconds(10);
    return SyncFromPeers(*server.store, peers, deadline, deadline);
  }
  prometheus::Registry registry_;
};

TEST_F(WeightSyncTest, TakesEachExpertAtTheCommittedStepFromAReplica) {
  Server a({0, 1}, 3, registry_), b({1}, 3, registry_), down({0}, 3, registry_);
  Server restarted({0, 1, 2}, 0, registry_);
  InProcessPeers peers({{&a, 3}, {&b, 3}, {&down, 3, /*down=*/true}});
  absl::StatusOr<SyncResult> sync = Sync(restarted, peers);
  ASSERT_TRUE(sync.ok()) << sync.status();
  EXPECT_EQ(sync->cluster_step, 3u);
  EXPECT_EQ(sync->peers_answered, 2);
  EXPECT_THAT(sync->synced, ElementsAre(ExpertKey(0, 0), ExpertKey(0, 1)));
  // Expert 2 is held by no peer: it stays at step 0, named.
  EXPECT_THAT(sync->behind, ElementsAre(ExpertKey(0, 2)));
  EXPECT_GT(sync->bytes, 0);
  for (int e : {0, 1}) {
    const ExpertKey key(0, e);
    EXPECT_EQ(*restarted.store->Step(key), 3u);
    const ExpertSnapshot got = *restarted.store->Snapshot(key);
    const ExpertSnapshot want = Trained(key, 3);
    EXPECT_EQ(got.weights.Digest(), want.weights.Digest()) << key;
    // The optimizer state came along.
    EXPECT_EQ(got.velocity->Digest(), want.velocity->Digest()) << key;
  }
  EXPECT_EQ(*restarted.store->Step(ExpertKey(0, 2)), 0u);
  // A forward for the committed step now runs on expert 0 and is refused,
  // by name, for expert 2.
  std::vector<float> x(2 * 8, 0.25f), y(2 * 8);
  const ConstTensorView in{DType::kFloat32, {2, 8}, reinterpret_cast<const std::byte*>(x.data())};
  const TensorView out{DType::kFloat32, {2, 8}, reinterpret_cast<std::byte*>(y.data())};
  EXPECT_TRUE(restarted.store->Forward(ExpertKey(0, 0), in, out, false, 0, absl::Now(), 3).ok());
  EXPECT_THAT(
      restarted.store->Forward(ExpertKey(0, 2), in, out, false, 0, absl::Now(), 3).message(),
      HasSubstr("expert 2 here has the weights of step 0, the call is for step 3"));
}

TEST_F(WeightSyncTest, ACorruptTransferFallsOverToTheNextReplica) {
  Server a({0, 1}, 5, registry_), b({1}, 5, registry_);
  Server restarted({0, 1}, 0, registry_);
  InProcessPeers peers({{&a, 5, false, /*corrupt=*/true}, {&b, 5}});
  absl::StatusOr<SyncResult> sync = Sync(restarted, peers);
  ASSERT_TRUE(sync.ok()) << sync.status();
  // Expert 1 from b after a's corrupt copy; expert 0 has only a's.
  EXPECT_THAT(sync->synced, ElementsAre(ExpertKey(0, 1)));
  EXPECT_THAT(sync->behind, ElementsAre(ExpertKey(0, 0)));
  EXPECT_EQ(peers.fetches, 3);
  EXPECT_EQ(restarted.store->Snapshot(ExpertKey(0, 1))->weights.Digest(),
            Trained(ExpertKey(0, 1), 5).weights.Digest());
  EXPECT_EQ(*restarted.store->Step(ExpertKey(0, 0)), 0u);
}

TEST_F(WeightSyncTest, NothingToDoAtAColdStartOrWhenNotBehind) {
  Server a({0}, 0, registry_), restarted({0}, 0, registry_);
  InProcessPeers cold({{&a, 0, /*down=*/true}});
  absl::StatusOr<SyncResult> sync = Sync(restarted, cold);
  ASSERT_TRUE(sync.ok());
  EXPECT_EQ(sync->cluster_step, 0u);
  EXPECT_EQ(sync->peers_answered, 0);
  EXPECT_TRUE(sync->synced.empty() && sync->behind.empty());
  // Peers at the step this server already has: no transfer.
  Server ahead({0}, 2, registry_), same({0}, 2, registry_);
  InProcessPeers peers({{&ahead, 2}});
  sync = Sync(same, peers);
  ASSERT_TRUE(sync.ok());
  EXPECT_TRUE(sync->synced.empty() && sync->behind.empty());
  EXPECT_EQ(peers.fetches, 0);
}

TEST_F(WeightSyncTest, TheStepExecutorAdoptsTheSyncedStep) {
  allreduce::CollectiveRegistry collectives;
  {
    // Adopting step 4 with an expert left at step 0: training is refused
    // rather than labelling old weights with step 5.
    Server behind({0}, 0, registry_);
    StepExecutor steps({Model().optimizer, "server", {}}, *behind.store, collectives);
    ASSERT_TRUE(steps.AdoptCommitted(4).ok());
    EXPECT_THAT(steps.Prepare({5, 0.1f, absl::Now() + absl::Seconds(5)}).status().message(),
                HasSubstr("holds expert 0 at step 0, not the committed step 4"));
  }
  Server server({0}, 4, registry_);  // synced to step 4
  StepExecutor steps({Model().optimizer, "server", {}}, *server.store, collectives);
  ASSERT_TRUE(steps.AdoptCommitted(4).ok());
  EXPECT_EQ(steps.last_committed(), 4u);
  EXPECT_THAT(steps.Prepare({4, 0.1f, absl::Now() + absl::Seconds(5)}).status().message(),
              HasSubstr("committed step 4"));
  EXPECT_THAT(steps.AdoptCommitted(3).message(), HasSubstr("after committing step 4"));
  EXPECT_TRUE(steps.Prepare({5, 0.1f, absl::Now() + absl::Seconds(5)}).ok());
  EXPECT_THAT(steps.AdoptCommitted(6).message(), HasSubstr("while step 5 runs"));
  steps.Abort(5, "test");
}

}  // namespace
}  // namespace moe::expert
