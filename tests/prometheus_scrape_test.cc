// A real Prometheus (Debian's package) scraping a real local cluster with
// the project's own scrape config and rules: after a known load, the
// counters it stores equal what was sent, per-expert token counts add up
// across the router and the expert servers, promtool finds nothing wrong in
// either /metrics, and every PromQL expression of the Grafana dashboard
// returns data.
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "absl/time/clock.h"
#include "common/model_config.h"
#include "common/tensor_codec.h"
#include "common/testing/random_tensor.h"
#include "common/transport_credentials.h"
#include "deploy/local/child_process.h"
#include "deploy/local/local_cluster.h"
#include "proto/router.grpc.pb.h"

namespace moe {
namespace {

using ::moe::local::ChildProcess;
using ::moe::local::HttpGet;
using ::moe::local::LocalCluster;
using ::moe::local::RunfilePath;

constexpr int kNumExperts = 4;
constexpr int kTopK = 2;
constexpr int kDModel = 32;
// The known load: inference requests, then training steps.
constexpr int kForwards = 25;
constexpr int64_t kTokensPerForward = 37;
constexpr int kTrainSteps = 2;
constexpr int64_t kTokensPerTrainStep = 16;

std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

std::string UrlEncode(const std::string& text) {
  std::string out;
  for (unsigned char c : text) {
    if (std::isalnum(c) || c == '-' || c == '_' || c == '.' || c == '~') {
      out += static_cast<char>(c);
    } else {
      absl::StrAppend(&out, "%", absl::Hex(c, absl::kZeroPad2));
    }
  }
  return out;
}

class PrometheusScrapeTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    const std::string tmp = std::getenv("TEST_TMPDIR");
    local::LocalClusterOptions options;
    options.config = *ParseServingConfig(absl::StrCat(R"(
      model { d_model: )", kDModel, R"( d_ff: 64 num_experts: )", kNumExperts,
                                                      R"( top_k: )", kTopK, R"(
              capacity_factor: 1.0 overflow_policy: OVERFLOW_POLICY_DROP seed: 7 }
      cluster { servers { name: "expert-0" address: "x:1" }
                servers { name: "expert-1" address: "x:2" }
                strategy: PLACEMENT_STRATEGY_HYBRID })"));
    options.onednn_threads = 1;
    options.work_dir = tmp;
    // Exact accounting across router and servers: a hedged call runs on two
    // replicas, and both count it (slow sanitizer builds do hedge).
    options.router_flags = {"--hedge_max_delay=0"};
    auto cluster = LocalCluster::Start(options);
    ASSERT_TRUE(cluster.ok()) << cluster.status();
    cluster_ = cluster->release();

    // The committed scrape config, pointed at this cluster's targets, this
    // test's rules path, and scraping every second.
    const std::string targets = tmp + "/targets.json";
    ASSERT_TRUE(cluster_->WritePrometheusTargets(targets).ok());
    std::string config = ReadFile(RunfilePath("deploy/prometheus/prometheus.yml"));
    config = absl::StrReplaceAll(
        config, {{"/tmp/moe-serve/targets.json", targets},
                 {"rules/moe-serve.rules.yml",
                  RunfilePath("deploy/prometheus/rules/moe-serve.rules.yml")},
                 {"scrape_interval: 5s", "scrape_interval: 1s"},
                 {"evaluation_interval: 5s", "evaluation_interval: 1s"},
                 {"refresh_interval: 5s", "refresh_interval: 1s"}});
    std::ofstream(tmp + "/prometheus.yml") << config;
    prometheus_port_ = local::PickFreePort();
    prometheus_ = new ChildProcess(
        "/usr/bin/prometheus",
        {"--config.file=" + tmp + "/prometheus.yml", "--storage.tsdb.path=" + tmp + "/tsdb",
         absl::StrCat("--web.listen-address=127.0.0.1:", prometheus_port_), "--log.level=warn"});
    // Ready once it answers its readiness endpoint.
    const absl::Time deadline = absl::Now() + absl::Seconds(60);
    while (HttpGet(prometheus_port_, "/-/ready").find("Ready") == std::string::npos) {
      ASSERT_LT(absl::Now(), deadline) << "Prometheus did not start:\n" << prometheus_->output();
      absl::SleepFor(absl::Milliseconds(100));  // Polling a readiness endpoint.
    }
    // Rates need a sample from before the load: wait for the first scrape of
    // every process.
    ASSERT_EQ(Eventually(R"(count(up{job=~"moe-router|moe-expert"} == 1))", 3), 3)
        << prometheus_->output();
    SendKnownLoad();
    ready_ = !HasFatalFailure();
  }

  void SetUp() override { ASSERT_TRUE(ready_) << "the cluster, Prometheus or the load failed"; }

  static void TearDownTestSuite() {
    delete prometheus_;
    delete cluster_;
  }

  static void SendKnownLoad() {
    auto router = v1::Router::NewStub(
        grpc::CreateChannel(cluster_->router_address(), TransportCredentials::Plaintext().ForChannel()));
    auto call = [](auto method) {
      grpc::ClientContext context;
      context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
      return method(&context);
    };
    for (int i = 0; i < kForwards; ++i) {
      v1::ForwardRequest request;
      const FloatTensor x = testing::RandomTensor({kTokensPerForward, kDModel}, 100 + i);
      EncodeFloats(x.values(), x.shape(), DType::kFloat32, request.mutable_x());
      request.set_return_routing(true);
      v1::ForwardResponse response;
      const grpc::Status status =
          call([&](grpc::ClientContext* c) { return router->Forward(c, request, &response); });
      ASSERT_TRUE(status.ok()) << status.error_message();
      CountRouting(response);
    }
    for (int step = 0; step < kTrainSteps; ++step) {
      v1::ForwardRequest request;
      const FloatTensor x = testing::RandomTensor({kTokensPerTrainStep, kDModel}, 900 + step);
      EncodeFloats(x.values(), x.shape(), DType::kFloat32, request.mutable_x());
      request.set_training(true);
      request.set_return_routing(true);
      v1::ForwardResponse forward;
      ASSERT_TRUE(call([&](grpc::ClientContext* c) {
                    return router->Forward(c, request, &forward);
                  }).ok());
      CountRouting(forward);
      v1::BackwardRequest backward;
      backward.set_request_id(forward.request_id());
      EncodeFloats(x.values(), x.shape(), DType::kFloat32, backward.mutable_grad_output());
      v1::BackwardResponse backward_response;
      ASSERT_TRUE(call([&](grpc::ClientContext* c) {
                    return router->Backward(c, backward, &backward_response);
                  }).ok());
      v1::StepRequest step_request;
      step_request.set_learning_rate(0.01f);
      v1::StepResponse step_response;
      const grpc::Status stepped = call(
          [&](grpc::ClientContext* c) { return router->Step(c, step_request, &step_response); });
      ASSERT_TRUE(stepped.ok()) << stepped.error_message();
    }
    // One request with the wrong width: an error the dashboards must show.
    v1::ForwardRequest bad;
    const FloatTensor x = testing::RandomTensor({3, kDModel + 1}, 5);
    EncodeFloats(x.values(), x.shape(), DType::kFloat32, bad.mutable_x());
    v1::ForwardResponse ignored;
    ASSERT_EQ(call([&](grpc::ClientContext* c) { return router->Forward(c, bad, &ignored); })
                  .error_code(),
              grpc::StatusCode::INVALID_ARGUMENT);
  }

  // What the responses say was served and dropped.
  static void CountRouting(const v1::ForwardResponse& response) {
    sent_dropped_pairs_ += response.dropped_pairs();
    const v1::Routing& routing = response.routing();
    for (int i = 0; i < routing.expert_ids_size(); ++i) {
      if (!routing.dropped(i)) ++sent_expert_pairs_[routing.expert_ids(i)];
    }
  }

  // The instant query's result vector.
  static nlohmann::json Query(const std::string& promql) {
    const std::string body =
        HttpGet(prometheus_port_, "/api/v1/query?query=" + UrlEncode(promql));
    nlohmann::json answer = nlohmann::json::parse(body, nullptr, /*allow_exceptions=*/false);
    if (answer.is_discarded() || answer["status"] != "success") {
      ADD_FAILURE() << promql << ": " << body;
      return nlohmann::json::array();
    }
    return answer["data"]["result"];
  }

  // The value of a query that yields one sample, or NaN.
  static double Scalar(const std::string& promql) {
    const nlohmann::json result = Query(promql);
    if (result.size() != 1) return std::nan("");
    return std::stod(result[0]["value"][1].get<std::string>());
  }

  // Waits until `promql` equals `expected` (scrapes land every second).
  static double Eventually(const std::string& promql, double expected) {
    const absl::Time deadline = absl::Now() + absl::Seconds(60);
    double value = Scalar(promql);
    while (value != expected && absl::Now() < deadline) {
      absl::SleepFor(absl::Milliseconds(250));  // Waiting for the next scrape.
      value = Scalar(promql);
    }
    return value;
  }

  static LocalCluster* cluster_;
  static ChildProcess* prometheus_;
  static int prometheus_port_;
  static int64_t sent_dropped_pairs_;
  static std::vector<int64_t> sent_expert_pairs_;
  static bool ready_;
};

LocalCluster* PrometheusScrapeTest::cluster_ = nullptr;
ChildProcess* PrometheusScrapeTest::prometheus_ = nullptr;
int PrometheusScrapeTest::prometheus_port_ = 0;
int64_t PrometheusScrapeTest::sent_dropped_pairs_ = 0;
std::vector<int64_t> PrometheusScrapeTest::sent_expert_pairs_(kNumExperts);
bool PrometheusScrapeTest::ready_ = false;

TEST_F(PrometheusScrapeTest, CountersEqualTheLoadSent) {
  const int forwards = kForwards + kTrainSteps;
  const int64_t tokens = kForwards * kTokensPerForward + kTrainSteps * kTokensPerTrainStep;
  EXPECT_EQ(Eventually(R"(sum(moe_router_requests_total{method="Forward",code="OK"}))", forwards),
            forwards);
  EXPECT_EQ(Eventually(R"(sum(moe_router_requests_total{method="Forward",code="INVALID_ARGUMENT"}))", 1), 1);
  EXPECT_EQ(Eventually(R"(sum(moe_router_requests_total{method="Backward",code="OK"}))", kTrainSteps),
            kTrainSteps);
  EXPECT_EQ(Eventually(R"(sum(moe_router_requests_total{method="Step",code="OK"}))", kTrainSteps),
            kTrainSteps);
  EXPECT_EQ(Eventually(R"(sum(moe_router_tokens_total{method="Forward"}))", tokens), tokens);
  EXPECT_EQ(Eventually(R"(sum(moe_router_tokens_total{method="Backward"}))",
                       kTrainSteps * kTokensPerTrainStep),
            kTrainSteps * kTokensPerTrainStep);
  // Every (token, expert) pair is served or dropped, and the dropped ones are
  // the ones the responses reported.
  EXPECT_EQ(Eventually("sum(moe_router_dropped_pairs_total)", sent_dropped_pairs_),
            sent_dropped_pairs_);
  EXPECT_EQ(Eventually("sum(moe_router_expert_tokens_total)", tokens * kTopK - sent_dropped_pairs_),
            tokens * kTopK - sent_dropped_pairs_);
  // Both servers committed both steps.
  EXPECT_EQ(Eventually(R"(sum(moe_expert_steps_total{result="committed"}))", 2 * kTrainSteps),
            2 * kTrainSteps);
  EXPECT_EQ(Scalar(R"(count(up{job=~"moe-router|moe-expert"} == 1))"), 3);
}

// The router's count for each expert equals the pairs the responses say it
// served, and equals the rows the expert servers ran for it (summed over
// the replicas).
TEST_F(PrometheusScrapeTest, PerExpertTokensAddUpAcrossRouterAndServers) {
  const int64_t tokens = kForwards * kTokensPerForward + kTrainSteps * kTokensPerTrainStep;
  ASSERT_EQ(Eventually("sum(moe_expert_tokens_total)", tokens * kTopK - sent_dropped_pairs_),
            tokens * kTopK - sent_dropped_pairs_);
  for (int e = 0; e < kNumExperts; ++e) {
    const double routed = Scalar(absl::StrCat(R"(sum(moe_router_expert_tokens_total{expert=")", e, R"("}))"));
    const double run = Scalar(absl::StrCat(R"(sum(moe_expert_tokens_total{expert=")", e, R"("}))"));
    EXPECT_GT(routed, 0) << "expert " << e;
    EXPECT_EQ(routed, sent_expert_pairs_[e]) << "expert " << e;
    EXPECT_EQ(run, sent_expert_pairs_[e]) << "expert " << e;
  }
  // Every server ran the backward of what it ran forward in training.
  EXPECT_GT(Scalar("sum(moe_expert_backward_tokens_total)"), 0);
}

TEST_F(PrometheusScrapeTest, RulesLoadAndEvaluate) {
  const std::string rules = HttpGet(prometheus_port_, "/api/v1/rules");
  for (const char* alert : {"MoeRouterHighErrorRate", "MoeRouterLatencyP99High",
                            "MoeExpertLoadImbalanced", "MoeExpertServerDown", "MoeRouterDown",
                            "MoeAllReduceFailures"}) {
    EXPECT_NE(rules.find(alert), std::string::npos) << alert << " missing from " << rules;
  }
  EXPECT_EQ(rules.find(R"("health":"err")"), std::string::npos) << rules;
  // A recording rule has produced samples from the scraped data.
  const absl::Time deadline = absl::Now() + absl::Seconds(60);
  while (Query(R"(moe:router_tokens:rate1m{method="Forward"})").empty() && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(250));  // Waiting for the next rule evaluation.
  }
  EXPECT_FALSE(Query(R"(moe:router_tokens:rate1m{method="Forward"})").empty());
  // Nothing fires on a healthy cluster.
  EXPECT_EQ(HttpGet(prometheus_port_, "/api/v1/alerts").find(R"("state":"firing")"),
            std::string::npos);
}

TEST_F(PrometheusScrapeTest, PromtoolFindsNoProblemInEitherMetricsPage) {
  const std::string tmp = std::getenv("TEST_TMPDIR");
  std::vector<int> ports = cluster_->server_metrics_ports();
  ports.push_back(cluster_->router_metrics_port());
  for (int port : ports) {
    const std::string page = HttpGet(port, "/metrics");
    ASSERT_NE(page.find("# TYPE moe_"), std::string::npos) << "port " << port;
    const std::string in = absl::StrCat(tmp, "/metrics.", port);
    std::ofstream(in) << page;
    const int code =
        std::system(absl::StrCat("promtool check metrics < ", in, " > ", in, ".out 2>&1").c_str());
    EXPECT_EQ(code, 0) << "port " << port << ": " << ReadFile(in + ".out");
  }
}

TEST_F(PrometheusScrapeTest, EveryDashboardExpressionReturnsData) {
  // Let a few more scrapes land after the load so that every rate has two
  // samples of the final counters.
  ASSERT_GT(Eventually(R"(sum(moe_router_requests_total{method="Step",code="OK"}))", kTrainSteps), 0);
  const nlohmann::json dashboard =
      nlohmann::json::parse(ReadFile(RunfilePath("deploy/grafana/dashboards/moe-serve.json")));
  int expressions = 0;
  for (const nlohmann::json& panel : dashboard["panels"]) {
    for (const nlohmann::json& target : panel["targets"]) {
      // Grafana's interval variable; the whole test fits in this window.
      const std::string expr =
          absl::StrReplaceAll(target["expr"].get<std::string>(), {{"$__rate_interval", "5m"}});
      ++expressions;
      const nlohmann::json result = Query(expr);
      bool finite = false;
      for (const nlohmann::json& sample : result) {
        finite = finite || std::isfinite(std::stod(sample["value"][1].get<std::string>()));
      }
      EXPECT_TRUE(finite) << panel["title"] << ": " << expr << " gave " << result.dump();
    }
  }
  EXPECT_GE(expressions, 20);
}

}  // namespace
}  // namespace moe
