// A server's half of a placement change over in-process peers (the
// dispatchers of real stores): the compare-and-set from its epoch, pulls
// checked against the sender's digest, both epochs served while prepared,
// steps held, release on commit, undo on abort, and the refusals that move
// nothing (another change, training state leaving, no holder).
#include "expert_service/placement_keeper.h"

#include <map>
#include <memory>

#include "common/deterministic_init.h"
#include "common/log.h"
#include "common/placement_proto.h"
#include "common/proto_status.h"
#include "common/status_macros.h"
#include "common/tensor_codec.h"
#include "expert_service/allreduce/collective_registry.h"
#include "expert_service/reference_expert_kernel.h"
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
  model.seed = 23;
  return model;
}

ClusterConfig Cluster() {
  ClusterConfig cluster;
  cluster.servers = {{"e0", "unused:1"}, {"e1", "unused:2"}};
  return cluster;
}

// servers_of[expert] over e0, e1.
Placement PlacementOf(std::vector<std::vector<int>> servers_of) {
  return *Placement::Create(2, std::move(servers_of));
}

// One server of the two: its store, dispatcher, steps and keeper; `peer`
// reaches the other.
struct Server {
  Server(int index, const Placement& placement, SyncPeers& peer, prometheus::Registry& registry)
      : metrics(ExpertMetrics::Create(registry, Model())) {
    std::map<ExpertKey, ExpertWeights> weights;
    for (ExpertKey e : placement.ExpertsOn(index)) weights.emplace(e, InitExpert(Model(), e));
    store = *ExpertStore::Create(
        {Model(), absl::StrCat("e", index), {}}, std::move(weights),
        [](const ExpertWeights& w) -> absl::StatusOr<std::unique_ptr<ExpertKernel>> {
          return std::make_unique<ReferenceExpertKernel>(w);
        });
    steps = std::make_unique<StepExecutor>(
        StepExecutor::Options{Model().optimizer, absl::StrCat("e", index), {}}, *store,
        collectives);
    dispatcher =
        std::make_unique<ExpertDispatcher>(ExpertDispatcher::Options{absl::StrCat("e", index)},
                                           *store, *metrics, nullptr, steps.get());
    PlacementKeeper::Options options;
    options.model = Model();
    options.cluster = Cluster();
    options.server = index;
    options.peer_of = [](int) { return 0; };
    options.set_rings = [this](const Placement&) {
      ++ring_changes;
      return absl::OkStatus();
    };
    keeper =
        std::make_unique<PlacementKeeper>(options, placement, 1, *store, *dispatcher, *steps, peer);
  }
  std::vector<int> Hosted() const {
    std::vector<int> ids;
    for (ExpertKey e : store->HostedExperts()) ids.push_back(e.expert);
    return ids;
  }
  // A versioned Dispatch at `epoch` of one row for `expert`: its status.
  absl::Status DispatchAt(int expert, uint64_t epoch, bool training = false) {
    auto request = std::make_unique<v1::DispatchRequest>();
    request->set_expert_id(expert);
    request->set_training(training);
    request->set_request_id(7);
    request->mutable_version()->set_placement_epoch(epoch);
    FloatTensor x({1, Model().d_model});
    EncodeFloats(x.values(), x.shape(), DType::kFloat32, request->mutable_tokens());
    absl::Status status;
    dispatcher->Dispatch(std::move(request), std::make_unique<v1::DispatchResponse>(),
                         [&](std::unique_ptr<v1::DispatchResponse> response) {
                           status = response->has_error() ? FromProtoStatus(response->error())
                                                          : absl::OkStatus();
                         });
    return status;
  }

  allreduce::CollectiveRegistry collectives;
  std::unique_ptr<ExpertMetrics> metrics;
  std::unique_ptr<ExpertStore> store;
  std::unique_ptr<StepExecutor> steps;
  std::unique_ptr<ExpertDispatcher> dispatcher;
  std::unique_ptr<PlacementKeeper> keeper;
  int ring_changes = 0;
};

// The other server, seen through SyncPeers; it can be down or corrupt.
class OnePeer : public SyncPeers {
 public:
  int num_peers() const override { return 1; }
  std::string name(int) const override { return "peer"; }
  absl::StatusOr<v1::InfoResponse> Info(int, absl::Time) override {
    v1::InfoResponse info;
    server->dispatcher->Info(&info);
    return info;
  }
  absl::Status FetchExpert(
      int, ExpertKey expert, absl::Time,
      absl::FunctionRef<absl::Status(const v1::ExpertWeightsChunk&)> sink) override {
    if (down) return absl::UnavailableError("connection refused");
    v1::GetExpertWeightsRequest request;
    SetExpertKey(expert, &request);
    MOE_ASSIGN_OR_RETURN(auto chunks, server->dispatcher->ExpertChunks(request));
    for (v1::ExpertWeightsChunk& chunk : chunks) {
      if (corrupt) (*chunk.mutable_data())[0] ^= 1;
      MOE_RETURN_IF_ERROR(sink(chunk));
    }
    return absl::OkStatus();
  }
  absl::StatusOr<v1::GetGateResponse> Gate(int, absl::Time) override {
    v1::GetGateResponse gate;
    MOE_RETURN_IF_ERROR(server->dispatcher->GetGate(&gate));
    return gate;
  }
  Server* server = nullptr;
  bool down = false;
  bool corrupt = false;
};

class PlacementKeeperTest : public ::testing::Test {
 protected:
  PlacementKeeperTest()
      : start_(PlacementOf({{0}, {0}, {1}, {1}})),
        e0_(0, start_, to_e1_, registry_),
        e1_(1, start_, to_e0_, registry_) {
    to_e1_.server = &e1_;
    to_e0_.server = &e0_;
  }

  static v1::PreparePlacementRequest Prepare(uint64_t from, uint64_t to, const Placement& next) {
    v1::PreparePlacementRequest request;
    request.set_from_epoch(from);
    request.set_epoch(to);
    *request.mutable_placement() = PlacementToProto(next, Cluster());
    return request;
  }
  static v1::CommitPlacementRequest Commit(uint64_t epoch) {
    v1::CommitPlacementRequest request;
    request.set_epoch(epoch);
    return request;
  }

  prometheus::Registry registry_;
  const Placement start_;
  OnePeer to_e1_, to_e0_;
  Server e0_, e1_;
};

TEST_F(PlacementKeeperTest, PreparePullsServesBothEpochsAndCommitReleases) {
  // Expert 1 moves from e0 to e1.
  const Placement next = PlacementOf({{0}, {1}, {1}, {1}});
  v1::PreparePlacementResponse prepared;
  ASSERT_TRUE(e1_.keeper->Prepare(Prepare(1, 2, next), &prepared).ok());
  ASSERT_EQ(prepared.added_size(), 1);
  EXPECT_EQ(prepared.added(0).expert_id(), 1);
  EXPECT_EQ(prepared.added(0).weights_digest(), *e0_.store->Digest(ExpertKey(0, 1)));
  EXPECT_GT(prepared.bytes(), 0);
  EXPECT_THAT(e1_.Hosted(), ElementsAre(1, 2, 3));
  ASSERT_TRUE(e0_.keeper->Prepare(Prepare(1, 2, next), &prepared).ok());
  // Both epochs are served; training forwards of the expert leaving e0
  // are not.
  EXPECT_TRUE(e0_.DispatchAt(1, 1).ok());
  EXPECT_TRUE(e0_.DispatchAt(1, 2).ok());
  EXPECT_TRUE(e1_.DispatchAt(1, 2).ok());
  EXPECT_EQ(e0_.DispatchAt(1, 3).code(), absl::StatusCode::kFailedPrecondition);
  const absl::Status training = e0_.DispatchAt(1, 1, /*training=*/true);
  EXPECT_EQ(training.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(training.message(), HasSubstr("leaves server e0"));
  // Steps wait for the change.
  const absl::Status step = e0_.steps->Prepare({1, 0.1f, absl::Now() + absl::Seconds(1)}).status();
  EXPECT_EQ(step.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(step.message(), HasSubstr("the placement change to epoch 2"));
  // Info reports the committed epoch until the commit.
  v1::InfoResponse info;
  e0_.keeper->FillInfo(&info);
  EXPECT_EQ(info.placement_epoch(), 1u);

  v1::CommitPlacementResponse committed;
  ASSERT_TRUE(e0_.keeper->Commit(Commit(2), &committed).ok());
  ASSERT_EQ(committed.released_size(), 1);
  EXPECT_EQ(committed.released(0).expert_id(), 1);
  EXPECT_THAT(e0_.Hosted(), ElementsAre(0));
  EXPECT_EQ(e0_.DispatchAt(0, 1).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(e0_.DispatchAt(0, 2).ok());
  EXPECT_EQ(e0_.ring_changes, 1);
  e0_.keeper->FillInfo(&info);
  EXPECT_EQ(info.placement_epoch(), 2u);
  EXPECT_TRUE(*PlacementFromProto(info.placement(), Model(), Cluster(), "p") == next)
      << "Info reports the committed placement";
  // A retried commit is fine; steps run again.
  EXPECT_TRUE(e0_.keeper->Commit(Commit(2), &committed).ok());
  EXPECT_TRUE(e0_.steps->Prepare({1, 0.1f, absl::Now() + absl::Seconds(1)}).ok());
}

TEST_F(PlacementKeeperTest, OneChangeAtATimeFromTheEpochServed) {
  const Placement next = PlacementOf({{0, 1}, {0}, {1}, {1}});
  v1::PreparePlacementResponse prepared;
  absl::Status status = e1_.keeper->Prepare(Prepare(3, 4, next), &prepared);
  EXPECT_EQ(status.code(), absl::StatusCode::kAborted);
  EXPECT_THAT(status.message(), HasSubstr("serves placement epoch 1, not 3"));
  // A far epoch (that would leave no room for the next) is refused.
  status = e1_.keeper->Prepare(Prepare(1, ~uint64_t{0}, next), &prepared);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(e1_.keeper->Prepare(Prepare(1, 2, next), &prepared).ok());
  // A retry of the same Prepare is fine; another change to the same epoch
  // (another router's) is not.
  EXPECT_TRUE(e1_.keeper->Prepare(Prepare(1, 2, next), &prepared).ok());
  status = e1_.keeper->Prepare(Prepare(1, 2, start_), &prepared);
  EXPECT_EQ(status.code(), absl::StatusCode::kAborted);
  EXPECT_THAT(status.message(), HasSubstr("one change at a time"));
  // Nothing to commit at another epoch.
  v1::CommitPlacementResponse committed;
  EXPECT_EQ(e1_.keeper->Commit(Commit(3), &committed).code(),
            absl::StatusCode::kFailedPrecondition);
}

TEST_F(PlacementKeeperTest, AbortReleasesWhatPrepareAddedAndNothingElseMoves) {
  const Placement next = PlacementOf({{0, 1}, {0, 1}, {1}, {1}});
  v1::PreparePlacementResponse prepared;
  ASSERT_TRUE(e1_.keeper->Prepare(Prepare(1, 2, next), &prepared).ok());
  EXPECT_THAT(e1_.Hosted(), ElementsAre(0, 1, 2, 3));
  v1::AbortPlacementRequest abort;
  abort.set_epoch(2);
  ASSERT_TRUE(e1_.keeper->Abort(abort).ok());
  EXPECT_THAT(e1_.Hosted(), ElementsAre(2, 3));
  EXPECT_EQ(e1_.DispatchAt(2, 2).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(e1_.DispatchAt(2, 1).ok());
  EXPECT_EQ(e1_.ring_changes, 0);
  EXPECT_TRUE(e1_.steps->Prepare({1, 0.1f, absl::Now() + absl::Seconds(1)}).ok());
}

TEST_F(PlacementKeeperTest, TrainingStateOnALeavingExpertRefusesTheChange) {
  FloatTensor x({2, Model().d_model}), y({2, Model().d_model});
  ASSERT_TRUE(
      e0_.store
          ->Forward(ExpertKey(0, 1), x.view(), y.mutable_view(), /*training=*/true, 9, absl::Now())
          .ok());
  v1::PreparePlacementResponse prepared;
  const absl::Status status =
      e0_.keeper->Prepare(Prepare(1, 2, PlacementOf({{0}, {1}, {1}, {1}})), &prepared);
  EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(status.message(), HasSubstr("expert 1 would leave server e0"));
  EXPECT_THAT(status.message(), HasSubstr("Step first"));
  // Nothing changed: training forwards of expert 1 still run here.
  EXPECT_TRUE(e0_.DispatchAt(1, 1, /*training=*/true).ok());
  EXPECT_THAT(e0_.Hosted(), ElementsAre(0, 1));
}

TEST_F(PlacementKeeperTest, APullThatFailsNamesTheExpertAndAddsNothing) {
  const Placement next = PlacementOf({{0, 1}, {0, 1}, {1}, {1}});
  v1::PreparePlacementResponse prepared;
  to_e0_.corrupt = true;
  absl::Status status = e1_.keeper->Prepare(Prepare(1, 2, next), &prepared);
  EXPECT_EQ(status.code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(status.message(), HasSubstr("expert 0: no server could give it"));
  EXPECT_THAT(status.message(), HasSubstr("digest"));
  EXPECT_THAT(e1_.Hosted(), ElementsAre(2, 3));
  to_e0_.corrupt = false;
  to_e0_.down = true;
  status = e1_.keeper->Prepare(Prepare(1, 2, next), &prepared);
  EXPECT_THAT(status.message(), HasSubstr("connection refused"));
  // And the next change goes through.
  to_e0_.down = false;
  EXPECT_TRUE(e1_.keeper->Prepare(Prepare(1, 2, next), &prepared).ok());
}

}  // namespace
}  // namespace moe::expert
