#include "common/authorization.h"

#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace moe {
namespace {

using ::testing::HasSubstr;

constexpr char kPolicy[] = R"json({
  "roles": {
    "anyone": ["*"],
    "training": ["trainer.example"],
    "cluster": ["moe-router.ns.svc", "*.moe-expert.ns.svc"]
  },
  "methods": {
    "/moe.v1.Router/Forward": ["anyone"],
    "/moe.v1.Router/Step": ["training"],
    "/moe.v1.ExpertServer/*": ["cluster"],
    "/moe.v1.ExpertServer/Info": ["cluster", "training"]
  }
})json";

AuthorizationPolicy Policy() {
  absl::StatusOr<AuthorizationPolicy> policy = AuthorizationPolicy::Parse(kPolicy);
  EXPECT_TRUE(policy.ok()) << policy.status();
  return *std::move(policy);
}

TEST(AuthorizationPolicyTest, RolesDecideAndEverythingElseIsDenied) {
  const AuthorizationPolicy policy = Policy();
  const std::vector<std::string> none, trainer = {"trainer.example"},
                                       expert = {"e-3.moe-expert.ns.svc"},
                                       router = {"x.example", "moe-router.ns.svc"};
  EXPECT_TRUE(policy.Check("/moe.v1.Router/Forward", none).ok());
  EXPECT_TRUE(policy.Check("/moe.v1.Router/Step", trainer).ok());
  EXPECT_TRUE(policy.Check("/moe.v1.ExpertServer/Dispatch", expert).ok());
  EXPECT_TRUE(policy.Check("/moe.v1.ExpertServer/ReleaseExpert", router).ok());
  // The exact entry wins over the service's.
  EXPECT_TRUE(policy.Check("/moe.v1.ExpertServer/Info", trainer).ok());
  EXPECT_FALSE(policy.Check("/moe.v1.ExpertServer/Dispatch", trainer).ok());

  const absl::Status step = policy.Check("/moe.v1.Router/Step", none);
  EXPECT_EQ(step.code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(step.message(),
            "permission denied: /moe.v1.Router/Step for identity (no client certificate) "
            "(allowed: training)");
  EXPECT_THAT(policy.Check("/moe.v1.ExpertServer/ReleaseExpert", trainer).message(),
              HasSubstr("for identity [trainer.example] (allowed: cluster)"));
  // "*.suffix" needs a label before the suffix.
  EXPECT_FALSE(policy.Check("/moe.v1.ExpertServer/Dispatch", {"moe-expert.ns.svc"}).ok());
  EXPECT_FALSE(policy.Check("/moe.v1.ExpertServer/Dispatch", {"evil-moe-expert.ns.svc"}).ok());
  // Default deny: methods the policy does not name, and no method at all.
  EXPECT_THAT(policy.Check("/moe.v1.Router/Rebalance", trainer).message(),
              HasSubstr("the policy allows this method to no one"));
  EXPECT_FALSE(policy.Check("", expert).ok());
  EXPECT_TRUE(policy.Names("/moe.v1.ExpertServer/Anything"));
  EXPECT_FALSE(policy.Names("/moe.v1.Router/Rebalance"));
}

TEST(AuthorizationPolicyTest, AMalformedPolicyIsANamedError) {
  for (const auto& [text, error] : std::vector<std::pair<std::string, std::string>>{
           {"[]", "not a JSON object"},
           {"{\"roles\": {}}", "needs a \"roles\" object and a \"methods\" object"},
           {R"({"roles": {"a": "x"}, "methods": {}})", "roles.a must be a list of strings"},
           {R"({"roles": {"a": [""]}, "methods": {}})", "non-empty strings"},
           {R"({"roles": {"a": ["x"]}, "methods": {"Forward": ["a"]}})",
            "is not /package.Service/Method"},
           {R"({"roles": {"a": ["x"]}, "methods": {"/s.S/M": ["b"]}})", "names unknown role \"b\""},
           {"{\"roles\": ", "not a JSON object"}}) {
    const absl::StatusOr<AuthorizationPolicy> policy = AuthorizationPolicy::Parse(text);
    EXPECT_EQ(policy.status().code(), absl::StatusCode::kInvalidArgument) << text;
    EXPECT_THAT(policy.status().message(), HasSubstr(error)) << text;
  }
  EXPECT_THAT(AuthorizationPolicy::Load("/nonexistent.json").status().message(),
              HasSubstr("cannot read it"));
}

}  // namespace
}  // namespace moe
