// The shipped authorization policy: every method of every moe-serve service
// has its row (an RPC added without one fails here), and the roles decide
// as docs/deploy.md says.
#include <string>
#include <vector>

#include "common/authorization.h"
#include "deploy/local/child_process.h"
#include "gmock/gmock.h"
#include "google/protobuf/descriptor.h"
#include "gtest/gtest.h"
#include "proto/collective.pb.h"
#include "proto/expert.pb.h"
#include "proto/router.pb.h"

namespace moe {
namespace {

AuthorizationPolicy Shipped() {
  absl::StatusOr<AuthorizationPolicy> policy =
      AuthorizationPolicy::Load(local::RunfilePath("deploy/k8s/components/mtls/policy.json"));
  EXPECT_TRUE(policy.ok()) << policy.status();
  return *std::move(policy);
}

TEST(ShippedPolicyTest, EveryMethodHasItsRow) {
  const AuthorizationPolicy policy = Shipped();
  // Linking the messages registers the files' descriptors.
  (void)v1::ForwardRequest::descriptor();
  (void)v1::DispatchRequest::descriptor();
  (void)v1::RingChunk::descriptor();
  const google::protobuf::DescriptorPool* pool = google::protobuf::DescriptorPool::generated_pool();
  int methods = 0;
  for (const char* name : {"moe.v1.Router", "moe.v1.ExpertServer", "moe.v1.Collective"}) {
    const google::protobuf::ServiceDescriptor* service = pool->FindServiceByName(name);
    ASSERT_NE(service, nullptr) << name;
    for (int m = 0; m < service->method_count(); ++m) {
      const std::string method = "/" + service->full_name() + "/" + service->method(m)->name();
      EXPECT_TRUE(policy.Names(method))
          << method << " has no row in deploy/k8s/components/mtls/policy.json";
      ++methods;
    }
  }
  EXPECT_EQ(methods, 25);  // 7 Router, 17 ExpertServer, 1 Collective
}

TEST(ShippedPolicyTest, RolesDecide) {
  const AuthorizationPolicy policy = Shipped();
  const std::vector<std::string> client = {"app-1.clients.moe-serve.example"},
                                 trainer = {"trainer.moe-serve.example"},
                                 router = {"moe-router.moe-serve.svc"},
                                 expert = {"moe-expert-3.moe-expert"};
  EXPECT_TRUE(policy.Check("/moe.v1.Router/Forward", client).ok());
  EXPECT_FALSE(policy.Check("/moe.v1.Router/Step", client).ok());
  EXPECT_TRUE(policy.Check("/moe.v1.Router/Step", trainer).ok());
  EXPECT_FALSE(policy.Check("/moe.v1.Router/Rebalance", trainer).ok());
  EXPECT_TRUE(policy.Check("/moe.v1.ExpertServer/Dispatch", router).ok());
  EXPECT_FALSE(policy.Check("/moe.v1.ExpertServer/Dispatch", client).ok());
  EXPECT_FALSE(policy.Check("/moe.v1.ExpertServer/ReleaseExpert", expert).ok());
  EXPECT_FALSE(policy.Check("/moe.v1.ExpertServer/AbortStep", client).ok());
  // Placement changes, the lease and the gate: the router's alone (an
  // expert server pulls weights with GetExpertWeights, never installs a
  // placement on its peers).
  for (const char* method :
       {"/moe.v1.ExpertServer/PreparePlacement", "/moe.v1.ExpertServer/CommitPlacement",
        "/moe.v1.ExpertServer/AbortPlacement", "/moe.v1.ExpertServer/AcquireLease",
        "/moe.v1.ExpertServer/GetGate", "/moe.v1.ExpertServer/AddGateGradient",
        "/moe.v1.ExpertServer/UpdateStep"}) {
    EXPECT_TRUE(policy.Check(method, router).ok()) << method;
    EXPECT_FALSE(policy.Check(method, expert).ok()) << method;
    EXPECT_FALSE(policy.Check(method, client).ok()) << method;
  }
  EXPECT_TRUE(policy.Check("/moe.v1.Collective/Ring", expert).ok());
  EXPECT_FALSE(policy.Check("/moe.v1.Collective/Ring", router).ok());
  EXPECT_TRUE(policy.Check("/grpc.health.v1.Health/Check", {}).ok());
}

}  // namespace
}  // namespace moe
