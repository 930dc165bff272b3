// The README's main job: moe_local starts a real cluster, serves a load
// through it without a failure, prints its summary, and stops every process
// cleanly.
#include <sched.h>

#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "common/model_config.h"
#include "deploy/local/child_process.h"
#include "deploy/local/local_cluster.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace moe::testing {
namespace {

using ::moe::local::ChildProcess;
using ::moe::local::RunfilePath;
using ::testing::ContainsRegex;
using ::testing::HasSubstr;

// With --pin_cpus: the router on the first CPU this test may use, each
// server on the next (wrapping around on a small machine), as the kernel
// reports the children's affinity.
TEST(MoeLocalTest, RunsALoadAndStopsCleanly) {
  ChildProcess run(
      RunfilePath("deploy/local/moe_local"),
      {"--servers=3", "--strategy=DATA_PARALLEL", "--d_model=64", "--d_ff=128", "--duration=1s",
       "--concurrency=2", "--batch=32", "--server_flags=--batch_window=1ms,--max_batch_rows=4096",
       "--pin_cpus", "--router_cpus=1", "--server_cpus=1"});
  EXPECT_EQ(run.Stop(0, absl::Seconds(120)), 0) << run.output();
  const std::string& out = run.output();
  EXPECT_THAT(out, HasSubstr("3 expert servers, DATA_PARALLEL placement"));
  EXPECT_THAT(out, HasSubstr(" 0 failed"));
  EXPECT_THAT(out, HasSubstr("tokens/s"));
  EXPECT_THAT(out, HasSubstr("latency     p50"));
  EXPECT_THAT(out, HasSubstr("server imbalance"));
  // Then three training steps, replicas bit-identical after them.
  EXPECT_THAT(out, HasSubstr("step   3"));
  EXPECT_THAT(out, HasSubstr("replicas    bit-identical"));
  EXPECT_THAT(out, HasSubstr("router: exit 0"));
  EXPECT_THAT(out, HasSubstr("expert-2: exit 0"));
  cpu_set_t set;
  ASSERT_EQ(sched_getaffinity(0, sizeof(set), &set), 0);
  std::vector<int> cpus;
  for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
    if (CPU_ISSET(cpu, &set)) cpus.push_back(cpu);
  }
  EXPECT_THAT(
      out, ContainsRegex(absl::StrCat("router \\(pid [0-9]+\\) pinned to CPUs ", cpus[0], "\n")));
  for (size_t s = 0; s < 3; ++s) {
    EXPECT_THAT(out, ContainsRegex(absl::StrCat("expert-", s, " \\(pid [0-9]+\\) pinned to CPUs ",
                                                cpus[(1 + s) % cpus.size()], "\n")));
  }
  if (cpus.size() < 4) {
    EXPECT_THAT(out, HasSubstr("some processes share CPUs"));
  }
}

// --tls: mutual TLS everywhere (clients to the router, router to servers,
// the servers' ring all-reduce), with a CA made at run time.
TEST(MoeLocalTest, RunsOverMutualTls) {
  ChildProcess run(RunfilePath("deploy/local/moe_local"),
                   {"--tls", "--servers=2", "--strategy=HYBRID", "--d_model=64", "--d_ff=128",
                    "--duration=1s", "--concurrency=2", "--batch=32", "--train_steps=2"});
  EXPECT_EQ(run.Stop(0, absl::Seconds(120)), 0) << run.output();
  const std::string& out = run.output();
  EXPECT_THAT(out, HasSubstr("HYBRID placement, fp32 kernels, mutual tls"));
  EXPECT_THAT(out, HasSubstr(" 0 failed"));
  EXPECT_THAT(out, HasSubstr("step   2"));
  EXPECT_THAT(out, HasSubstr("replicas    bit-identical"));
  EXPECT_THAT(out, HasSubstr("router: exit 0"));
}

TEST(MoeLoadgenTest, MeasuresARunningClusterAgainstTheLocalLayer) {
  const std::string dir = ::testing::TempDir();
  const std::string text = R"pb(
    model { d_model: 64 d_ff: 128 num_experts: 4 top_k: 2 seed: 3 }
    cluster {
      servers { name: "a" address: "127.0.0.1:1" }
      servers { name: "b" address: "127.0.0.1:2" }
      strategy: PLACEMENT_STRATEGY_HYBRID
    }
  )pb";
  local::LocalClusterOptions options;
  options.config = *ParseServingConfig(text);
  options.work_dir = dir;
  options.onednn_threads = 1;
  absl::StatusOr<std::unique_ptr<local::LocalCluster>> cluster =
      local::LocalCluster::Start(options);
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  const std::string json = dir + "/loadgen.json";
  ChildProcess loadgen(
      RunfilePath("clients/cpp/moe_loadgen"),
      {"--router=" + (*cluster)->router_address(), "--config=" + (*cluster)->config_path(),
       "--concurrency=1,2", "--batch=1,16", "--requests=20", "--duration=1s", "--compare_local",
       "--rounds=2", "--json=" + json});
  EXPECT_EQ(loadgen.Stop(0, absl::Seconds(120)), 0) << loadgen.output();
  EXPECT_THAT(loadgen.output(), HasSubstr("tokens/s"));
  EXPECT_THAT(loadgen.output(), HasSubstr("ratio"));
  std::ifstream file(json);
  const std::string written((std::istreambuf_iterator<char>(file)), {});
  EXPECT_THAT(written, HasSubstr("\"remote_over_local\""));
  EXPECT_THAT(written, HasSubstr("\"remote_over_local_rounds\""));
  EXPECT_THAT(written, HasSubstr("\"rounds\": 2"));
  EXPECT_THAT(written, HasSubstr("\"failures\": 0"));

  // The same over ForwardStreams.
  const std::string streamed_json = dir + "/loadgen_streaming.json";
  ChildProcess streamed(RunfilePath("clients/cpp/moe_loadgen"),
                        {"--router=" + (*cluster)->router_address(),
                         "--config=" + (*cluster)->config_path(), "--concurrency=2",
                         "--batch=16", "--requests=40", "--streaming",
                         "--json=" + streamed_json});
  EXPECT_EQ(streamed.Stop(0, absl::Seconds(120)), 0) << streamed.output();
  std::ifstream streamed_file(streamed_json);
  const std::string streamed_written((std::istreambuf_iterator<char>(streamed_file)), {});
  EXPECT_THAT(streamed_written, HasSubstr("\"streaming\": true"));
  EXPECT_THAT(streamed_written, HasSubstr("\"requests\": 40"));
  EXPECT_THAT(streamed_written, HasSubstr("\"failures\": 0"));
  for (const std::string& line : (*cluster)->Stop()) EXPECT_THAT(line, HasSubstr("exit 0"));
}

TEST(MoeLocalTest, BadStrategyIsNamed) {
  ChildProcess run(RunfilePath("deploy/local/moe_local"), {"--strategy=RANDOM"});
  EXPECT_EQ(run.Stop(0, absl::Seconds(30)), 2);
  EXPECT_THAT(run.output(), HasSubstr("--strategy: \"RANDOM\""));
}

// --server_flags reach every expert server (a bad value stops the first
// one, whose own error moe_local shows); flags it sets itself are refused.
TEST(MoeLocalTest, ServerFlagsReachTheServers) {
  ChildProcess bad_value(
      RunfilePath("deploy/local/moe_local"),
      {"--servers=1", "--d_model=64", "--d_ff=128", "--server_flags=--batch_window=banana"});
  EXPECT_NE(bad_value.Stop(0, absl::Seconds(60)), 0);
  EXPECT_THAT(bad_value.output(), HasSubstr("batch_window"));
  EXPECT_THAT(bad_value.output(), HasSubstr("did not start"));
  ChildProcess ours(RunfilePath("deploy/local/moe_local"), {"--server_flags=--port=1"});
  EXPECT_EQ(ours.Stop(0, absl::Seconds(30)), 2);
  EXPECT_THAT(ours.output(), HasSubstr("--server_flags: extra flag \"--port=1\""));
}

}  // namespace
}  // namespace moe::testing
