// The README's main job: moe_local starts a real cluster, serves a load
// through it without a failure, prints its summary, and stops every process
// cleanly.
#include <string>

#include "absl/time/time.h"
#include "deploy/local/child_process.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace moe::testing {
namespace {

using ::moe::local::ChildProcess;
using ::moe::local::RunfilePath;
using ::testing::HasSubstr;

TEST(MoeLocalTest, RunsALoadAndStopsCleanly) {
  ChildProcess run(RunfilePath("deploy/local/moe_local"),
                   {"--servers=3", "--strategy=DATA_PARALLEL", "--d_model=64", "--d_ff=128",
                    "--duration=1s", "--concurrency=2", "--batch=32"});
  EXPECT_EQ(run.Stop(0, absl::Seconds(120)), 0) << run.output();
  const std::string& out = run.output();
  EXPECT_THAT(out, HasSubstr("3 expert servers, DATA_PARALLEL placement"));
  EXPECT_THAT(out, HasSubstr(" 0 failed"));
  EXPECT_THAT(out, HasSubstr("tokens/s"));
  EXPECT_THAT(out, HasSubstr("latency     p50"));
  EXPECT_THAT(out, HasSubstr("server imbalance"));
  EXPECT_THAT(out, HasSubstr("router: exit 0"));
  EXPECT_THAT(out, HasSubstr("expert-2: exit 0"));
}

TEST(MoeLocalTest, BadStrategyIsNamed) {
  ChildProcess run(RunfilePath("deploy/local/moe_local"), {"--strategy=RANDOM"});
  EXPECT_EQ(run.Stop(0, absl::Seconds(30)), 2);
  EXPECT_THAT(run.output(), HasSubstr("--strategy: \"RANDOM\""));
}

}  // namespace
}  // namespace moe::testing
