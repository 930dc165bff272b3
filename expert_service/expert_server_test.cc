// The expert server through its gRPC API, built on the same Create() path as
// the binary: in-process channels, and TCP on 127.0.0.1:0 for streaming.
#include "expert_service/expert_server.h"

#include <atomic>
#include <cmath>
#include <map>
#include <set>
#include <thread>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "common/deterministic_init.h"
#include "common/reference_expert.h"
#include "common/tensor_codec.h"
#include "common/testing/random_tensor.h"
#include "common/testing/tensor_matchers.h"
#include "common/transport_credentials.h"
#include "expert_service/onednn_runtime.h"
#include "expert_service/testing/observed_kernel.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "proto/expert.grpc.pb.h"
#include "proto/health.grpc.pb.h"

namespace moe::expert {
namespace {

using ::moe::testing::RandomTensor;
using ::moe::testing::TensorNear;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

constexpr char kConfig[] = R"pb(
  model { d_model: 32 d_ff: 64 num_experts: 4 top_k: 2 seed: 9 }
  cluster {
    servers { name: "a" address: "127.0.0.1:1" }
    servers { name: "b" address: "127.0.0.1:2" }
    strategy: PLACEMENT_STRATEGY_MODEL_PARALLEL
  }
)pb";

ModelConfig Model() { return ParseServingConfig(kConfig)->model; }

// A clock tests move by hand.
class FakeClock {
 public:
  absl::Time Now() const { return absl::FromUnixMicros(micros_.load()); }
  void Advance(absl::Duration d) { micros_ += absl::ToInt64Microseconds(d); }

 private:
  std::atomic<int64_t> micros_{absl::ToUnixMicros(absl::FromUnixSeconds(1'700'000'000))};
};

// A real (reference) kernel that holds every Forward until the gate opens,
// so tests control exactly what is in flight.
class Gate {
 public:
  void Enter() {
    absl::MutexLock lock(&mu_);
    ++entered_;
    mu_.Await(absl::Condition(&open_));
  }
  void AwaitEntered(int n) {
    absl::MutexLock lock(&mu_);
    auto enough = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return entered_ >= n; };
    mu_.Await(absl::Condition(&enough));
  }
  void Open() {
    absl::MutexLock lock(&mu_);
    open_ = true;
  }
  // Rows of every Forward that passed, in order.
  void Record(int64_t rows) {
    absl::MutexLock lock(&mu_);
    rows_.push_back(rows);
  }
  std::vector<int64_t> rows() {
    absl::MutexLock lock(&mu_);
    return rows_;
  }

 private:
  absl::Mutex mu_;
  int entered_ ABSL_GUARDED_BY(mu_) = 0;
  bool open_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<int64_t> rows_ ABSL_GUARDED_BY(mu_);
};

struct ServerSetup {
  std::string name = "a";
  int compute_threads = 2;
  int64_t training_bytes = 1 << 30;
  FakeClock* clock = nullptr;
  // When set, expert 0's kernel waits at this gate (the others never do).
  Gate* gate = nullptr;
  // Off here (the servers' default is on): the gate tests hold one request
  // per kernel call; merging has tests of its own.
  bool merge_requests = false;
  absl::Duration batch_window = absl::ZeroDuration();
  // The servers' default, but off with a gate: a held request must hold a
  // compute thread, not the gRPC thread that reads the next.
  int64_t inline_call_multiply_adds = ExpertServer::Options().inline_call_multiply_adds;
  int64_t max_batch_rows = 4096;
  int max_stream_outstanding = StreamBounds().max_outstanding;
  DType compute_dtype = DType::kFloat32;
};

std::unique_ptr<ExpertServer> StartServer(const ServerSetup& setup) {
  ExpertServer::Options options;
  options.config = *ParseServingConfig(kConfig);
  options.name = setup.name;
  options.listen_address = "127.0.0.1:0";
  options.metrics_port = -1;
  options.compute_threads = setup.compute_threads;
  options.onednn_threads = 1;
  options.training = {setup.training_bytes, absl::Seconds(30)};
  options.merge_requests = setup.merge_requests;
  options.batch_window = setup.batch_window;
  options.inline_call_multiply_adds = setup.gate != nullptr ? 0 : setup.inline_call_multiply_adds;
  options.max_batch_rows = setup.max_batch_rows;
  options.streams.max_outstanding = setup.max_stream_outstanding;
  options.compute_dtype = setup.compute_dtype;
  if (setup.clock != nullptr) {
    options.clock = [clock = setup.clock] { return clock->Now(); };
  }
  if (setup.gate != nullptr) {
    // Experts are created in id order, so the first kernel is expert 0's.
    options.kernel_factory =
        [gate = setup.gate, made = std::make_shared<int>(0)](
            const ExpertWeights& weights) -> absl::StatusOr<std::unique_ptr<ExpertKernel>> {
      std::function<void(int64_t)> hold;
      if ((*made)++ == 0) {
        hold = [gate](int64_t rows) {
          gate->Enter();
          gate->Record(rows);
        };
      }
      return std::unique_ptr<ExpertKernel>(new testing::ObservedKernel(weights, std::move(hold)));
    };
  }
  absl::StatusOr<std::unique_ptr<ExpertServer>> server = ExpertServer::Create(options);
  MOE_CHECK(server.ok(), server.status().ToString());
  return *std::move(server);
}

std::shared_ptr<grpc::Channel> TcpChannel(int port) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(512 << 20);
  return grpc::CreateCustomChannel(absl::StrCat("127.0.0.1:", port),
                                   TransportCredentials::Plaintext().ForChannel(), args);
}

v1::DispatchRequest Request(uint64_t seq, int expert, const FloatTensor& x,
                            bool training = false, uint64_t request_id = 0) {
  v1::DispatchRequest r;
  r.set_sequence_id(seq);
  r.set_expert_id(expert);
  EncodeFloats(x.values(), x.shape(), DType::kFloat32, r.mutable_tokens());
  r.set_training(training);
  r.set_request_id(request_id);
  return r;
}

FloatTensor ReferenceOutput(int expert, const FloatTensor& x) {
  FloatTensor y(x.shape());
  std::vector<float> hidden(x.dim(0) * 64);
  ReferenceExpertForward(InitExpert(Model(), ExpertKey(0, expert)), x.values(), x.dim(0),
                         absl::MakeSpan(hidden), y.mutable_values());
  return y;
}

FloatTensor Output(const v1::DispatchResponse& response) {
  absl::StatusOr<ConstTensorView> view =
      DecodeTensor(response.output(), TokenBatchSpec("output", 32, 0));
  MOE_CHECK(view.ok(), view.status().ToString());
  return ToFloatTensor(*view);
}

// Sends `requests` on one stream, then reads every answer, keyed by seq id.
absl::flat_hash_map<uint64_t, v1::DispatchResponse> RoundTrip(
    v1::ExpertServer::Stub& stub, const std::vector<v1::DispatchRequest>& requests,
    std::vector<uint64_t>* order = nullptr, grpc::Status* status = nullptr) {
  grpc::ClientContext context;
  auto stream = stub.Dispatch(&context);
  for (const auto& r : requests) EXPECT_TRUE(stream->Write(r));
  stream->WritesDone();
  absl::flat_hash_map<uint64_t, v1::DispatchResponse> answers;
  v1::DispatchResponse response;
  while (stream->Read(&response)) {
    if (order != nullptr) order->push_back(response.sequence_id());
    EXPECT_TRUE(answers.emplace(response.sequence_id(), response).second)
        << "answered twice: " << response.sequence_id();
  }
  const grpc::Status final_status = stream->Finish();
  if (status != nullptr) *status = final_status;
  return answers;
}

TEST(ExpertServerTest, DispatchMatchesTheReferenceOnConcurrentStreams) {
  auto server = StartServer({});
  EXPECT_THAT(server->store().HostedExperts(), ElementsAre(ExpertKey(0, 0), ExpertKey(0, 1)));
  std::vector<std::thread> clients;
  std::atomic<int> checked{0};
  for (int c = 0; c < 4; ++c) {
    clients.emplace_back([&, c] {
      // Two streams over the in-process channel, two over TCP.
      auto channel = c % 2 ? TcpChannel(server->port()) : server->InProcessChannel();
      auto stub = v1::ExpertServer::NewStub(channel);
      std::vector<v1::DispatchRequest> requests;
      std::vector<FloatTensor> inputs;
      for (int i = 0; i < 12; ++i) {
        inputs.push_back(RandomTensor({(c * 13 + i * 7) % 40, 32}, c * 100 + i));
        requests.push_back(Request(i, i % 2, inputs.back()));
      }
      auto answers = RoundTrip(*stub, requests);
      ASSERT_EQ(answers.size(), requests.size());
      for (int i = 0; i < 12; ++i) {
        const v1::DispatchResponse& a = answers.at(i);
        ASSERT_FALSE(a.has_error()) << a.error().message();
        EXPECT_TRUE(TensorNear(Output(a), ReferenceOutput(i % 2, inputs[i]), 1e-5));
        ++checked;
      }
    });
  }
  for (auto& t : clients) t.join();
  EXPECT_EQ(checked.load(), 48);
}

TEST(ExpertServerTest, AnswersComeOutOfOrderMatchedBySequenceId) {
  // Expert 0 is held at a gate: the later request for expert 1 is answered
  // first, and each answer carries its own sequence id.
  Gate gate;
  ServerSetup setup;
  setup.gate = &gate;
  auto server = StartServer(setup);
  auto stub = v1::ExpertServer::NewStub(server->InProcessChannel());
  const FloatTensor first = RandomTensor({300, 32}, 1), second = RandomTensor({1, 32}, 2);
  grpc::ClientContext context;
  auto stream = stub->Dispatch(&context);
  ASSERT_TRUE(stream->Write(Request(10, 0, first)));
  ASSERT_TRUE(stream->Write(Request(11, 1, second)));
  v1::DispatchResponse a, b;
  ASSERT_TRUE(stream->Read(&a));
  EXPECT_EQ(a.sequence_id(), 11u);
  EXPECT_TRUE(TensorNear(Output(a), ReferenceOutput(1, second), 1e-5));
  gate.Open();
  ASSERT_TRUE(stream->Read(&b));
  EXPECT_EQ(b.sequence_id(), 10u);
  EXPECT_TRUE(TensorNear(Output(b), ReferenceOutput(0, first), 1e-5));
  stream->WritesDone();
  EXPECT_TRUE(stream->Finish().ok());
}

TEST(ExpertServerTest, ACancelledRequestThatHasNotStartedIsNeverRun) {
  // One compute thread, held at expert 0's gate by request 10: request 11
  // waits in the queue, is cancelled there, and is answered CANCELLED
  // without running; the cancel of the running request 10 changes nothing.
  Gate gate;
  ServerSetup setup;
  setup.gate = &gate;
  setup.compute_threads = 1;
  auto server = StartServer(setup);
  auto stub = v1::ExpertServer::NewStub(server->InProcessChannel());
  const FloatTensor x = RandomTensor({5, 32}, 3);
  grpc::ClientContext context;
  auto stream = stub->Dispatch(&context);
  v1::DispatchRequest cancel_10, cancel_11;
  cancel_10.set_sequence_id(10);
  cancel_10.set_cancel(true);
  cancel_11.set_sequence_id(11);
  cancel_11.set_cancel(true);
  ASSERT_TRUE(stream->Write(Request(10, 0, x)));
  gate.AwaitEntered(1);
  ASSERT_TRUE(stream->Write(Request(11, 0, x)));
  ASSERT_TRUE(stream->Write(cancel_11));
  ASSERT_TRUE(stream->Write(cancel_10));
  ASSERT_TRUE(stream->Write(Request(12, 1, x)));
  // Request 12 in flight means the server has read the cancels before it.
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  while (server->metrics().inflight->Value() < 3 && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(1));
  }
  ASSERT_EQ(server->metrics().inflight->Value(), 3);
  gate.Open();
  std::map<uint64_t, v1::DispatchResponse> answers;
  v1::DispatchResponse response;
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(stream->Read(&response));
    answers[response.sequence_id()] = response;
  }
  stream->WritesDone();
  EXPECT_TRUE(stream->Finish().ok());
  ASSERT_EQ(answers.size(), 3u);
  EXPECT_FALSE(answers[10].has_error());
  EXPECT_TRUE(TensorNear(Output(answers[10]), ReferenceOutput(0, x), 1e-5));
  ASSERT_TRUE(answers[11].has_error());
  EXPECT_EQ(answers[11].error().code(), static_cast<int>(absl::StatusCode::kCancelled));
  EXPECT_FALSE(answers[12].has_error());
  // Expert 0's kernel ran once: request 10 only.
  EXPECT_EQ(gate.rows(), std::vector<int64_t>({5}));
}

// Flow control: a stream holds at most max_stream_outstanding requests
// not yet answered; it reads no more until answers have gone out, and then
// answers every request.
TEST(ExpertServerTest, AStreamAcceptsAtMostItsOutstandingLimit) {
  Gate gate;
  ServerSetup setup;
  setup.gate = &gate;
  setup.max_stream_outstanding = 3;
  auto server = StartServer(setup);
  // Over TCP: the client's writes wait in HTTP/2's window while the server
  // reads no more (the in-process transport has none).
  auto stub = v1::ExpertServer::NewStub(TcpChannel(server->port()));
  const FloatTensor x = RandomTensor({2, 32}, 4);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  auto stream = stub->Dispatch(&context);
  // Expert 0 is held at the gate: nothing is answered yet.
  for (uint64_t seq = 1; seq <= 10; ++seq) ASSERT_TRUE(stream->Write(Request(seq, 0, x)));
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  while (server->metrics().inflight->Value() < 3 && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(1));
  }
  ASSERT_EQ(server->metrics().inflight->Value(), 3);
  // Given time, it still has read no fourth one.
  absl::SleepFor(absl::Milliseconds(200));
  EXPECT_EQ(server->metrics().inflight->Value(), 3);
  gate.Open();
  std::set<uint64_t> answered;
  v1::DispatchResponse response;
  for (int i = 0; i < 10; ++i) {
    ASSERT_TRUE(stream->Read(&response));
    EXPECT_FALSE(response.has_error()) << response.error().message();
    answered.insert(response.sequence_id());
  }
  stream->WritesDone();
  EXPECT_TRUE(stream->Finish().ok());
  EXPECT_EQ(answered.size(), 10u);
}

TEST(ExpertServerTest, MicroBatchingMergesConcurrentRequestsForAnExpert) {
  // A window far longer than the test: the batch runs when it reaches
  // max_batch_rows (2 + 3 + 5 = 10), in one kernel call.
  Gate gate;
  gate.Open();
  ServerSetup setup;
  setup.gate = &gate;
  setup.merge_requests = true;
  setup.batch_window = absl::Hours(1);
  setup.max_batch_rows = 10;
  auto server = StartServer(setup);
  std::vector<FloatTensor> inputs = {RandomTensor({2, 32}, 1), RandomTensor({3, 32}, 2),
                                     RandomTensor({5, 32}, 3)};
  std::vector<std::thread> clients;
  for (int i = 0; i < 3; ++i) {
    clients.emplace_back([&, i] {
      auto stub = v1::ExpertServer::NewStub(server->InProcessChannel());
      auto answers = RoundTrip(*stub, {Request(i, 0, inputs[i])});
      ASSERT_FALSE(answers.at(i).has_error()) << answers.at(i).error().message();
      EXPECT_TRUE(TensorNear(Output(answers.at(i)), ReferenceOutput(0, inputs[i]), 1e-5));
    });
  }
  for (auto& t : clients) t.join();
  EXPECT_THAT(gate.rows(), ElementsAre(10));

  // A lone request is run when its window ends.
  ServerSetup lone = setup;
  Gate lone_gate;
  lone_gate.Open();
  lone.gate = &lone_gate;
  lone.batch_window = absl::Milliseconds(1);
  auto lone_server = StartServer(lone);
  auto stub = v1::ExpertServer::NewStub(lone_server->InProcessChannel());
  auto answers = RoundTrip(*stub, {Request(7, 0, inputs[1])});
  EXPECT_TRUE(TensorNear(Output(answers.at(7)), ReferenceOutput(0, inputs[1]), 1e-5));
  EXPECT_THAT(lone_gate.rows(), ElementsAre(3));
}

TEST(ExpertServerTest, EveryBadInputFailsItselfAndTheStreamGoesOn) {
  auto server = StartServer({});
  auto stub = v1::ExpertServer::NewStub(server->InProcessChannel());
  const FloatTensor good = RandomTensor({3, 32}, 3);
  std::vector<v1::DispatchRequest> requests;
  auto add = [&](v1::DispatchRequest r) {
    r.set_sequence_id(requests.size());
    requests.push_back(std::move(r));
  };
  v1::DispatchRequest r = Request(0, 0, good);
  r.mutable_tokens()->set_dtype(v1::DTYPE_UNSPECIFIED);
  add(r);                                              // 0 dtype
  r = Request(0, 0, good);
  r.mutable_tokens()->clear_shape();
  r.mutable_tokens()->add_shape(96);
  add(r);                                              // 1 rank
  r = Request(0, 0, good);
  r.mutable_tokens()->mutable_data()->pop_back();
  add(r);                                              // 2 byte length
  add(Request(0, 0, RandomTensor({3, 31}, 4)));         // 3 d_model
  FloatTensor nan = good;
  nan.mutable_values()[40] = std::nanf("");
  add(Request(0, 0, nan));                             // 4 NaN
  FloatTensor inf = good;
  inf.mutable_values()[5] = INFINITY;
  add(Request(0, 0, inf));                             // 5 Inf
  add(Request(0, 7, good));                            // 6 unknown expert
  add(Request(0, 2, good));                            // 7 not held here
  add(Request(0, 1, good));                            // 8 good
  auto answers = RoundTrip(*stub, requests);
  ASSERT_EQ(answers.size(), 9u);
  auto error = [&](int i) {
    EXPECT_TRUE(answers.at(i).has_error()) << i;
    return std::make_pair(answers.at(i).error().code(), answers.at(i).error().message());
  };
  const int kInvalid = 3, kNotFound = 5;
  EXPECT_EQ(error(0).first, kInvalid);
  EXPECT_THAT(error(0).second, HasSubstr("tokens: dtype DTYPE_UNSPECIFIED is not supported"));
  EXPECT_THAT(error(1).second, HasSubstr("tokens: expected rank 2"));
  EXPECT_THAT(error(2).second,
              HasSubstr("tokens: expected 384 bytes (3 tokens x 32 d_model x fp32), got 383"));
  EXPECT_THAT(error(3).second, HasSubstr("expected d_model = 32, got 31"));
  EXPECT_THAT(error(4).second, HasSubstr("tokens: NaN at row 1, column 8"));
  EXPECT_THAT(error(5).second, HasSubstr("tokens: Inf at row 0, column 5"));
  EXPECT_EQ(error(6).first, kInvalid);
  EXPECT_THAT(error(6).second, HasSubstr("expert 7: out of range [0, 4)"));
  EXPECT_EQ(error(7).first, kNotFound);
  EXPECT_THAT(error(7).second, HasSubstr("expert 2: not hosted by server a (hosts 0,1)"));
  ASSERT_FALSE(answers.at(8).has_error());
  EXPECT_TRUE(TensorNear(Output(answers.at(8)), ReferenceOutput(1, good), 1e-5));
}

TEST(ExpertServerTest, AVersionedRequestRunsOnlyAtItsVersionAndIsToldTheServers) {
  auto server = StartServer({});
  auto stub = v1::ExpertServer::NewStub(server->InProcessChannel());
  const FloatTensor x = RandomTensor({3, 32}, 8);
  auto versioned = [&](uint64_t seq, uint64_t epoch, uint64_t step) {
    v1::DispatchRequest r = Request(seq, 1, x);
    r.mutable_version()->set_placement_epoch(epoch);
    r.mutable_version()->set_weights_step(step);
    return r;
  };
  // The server starts at placement epoch 1 with the weights as loaded
  // (step 0); an unversioned request is not checked.
  // A call from another epoch for an expert not hosted here is stale
  // (planned on a placement this server no longer serves), not NOT_FOUND.
  v1::DispatchRequest elsewhere = versioned(5, 2, 0);
  elsewhere.set_expert_id(3);
  auto answers = RoundTrip(*stub, {versioned(1, 1, 0), versioned(2, 2, 0), versioned(3, 1, 4),
                                   Request(4, 1, x), elsewhere});
  ASSERT_FALSE(answers.at(1).has_error()) << answers.at(1).error().message();
  EXPECT_TRUE(TensorNear(Output(answers.at(1)), ReferenceOutput(1, x), 1e-5));
  EXPECT_FALSE(answers.at(1).has_server_version());
  const int kFailedPrecondition = 9;
  EXPECT_EQ(answers.at(2).error().code(), kFailedPrecondition);
  EXPECT_THAT(answers.at(2).error().message(),
              HasSubstr("serves placement epoch 1, the call is for epoch 2"));
  EXPECT_EQ(answers.at(2).server_version().placement_epoch(), 1u);
  EXPECT_EQ(answers.at(2).server_version().weights_step(), 0u);
  EXPECT_EQ(answers.at(3).error().code(), kFailedPrecondition);
  EXPECT_THAT(answers.at(3).error().message(),
              HasSubstr("expert 1 here has the weights of step 0, the call is for step 4"));
  EXPECT_TRUE(answers.at(3).has_server_version());
  EXPECT_FALSE(answers.at(4).has_error());
  EXPECT_EQ(answers.at(5).error().code(), kFailedPrecondition);
  EXPECT_EQ(answers.at(5).server_version().placement_epoch(), 1u);
}

TEST(ExpertServerTest, Bf16RequestsGetBf16Answers) {
  auto server = StartServer({});
  auto stub = v1::ExpertServer::NewStub(server->InProcessChannel());
  const FloatTensor x = RandomTensor({5, 32}, 5);
  v1::DispatchRequest r = Request(1, 0, x);
  EncodeFloats(x.values(), x.shape(), DType::kBFloat16, r.mutable_tokens());
  auto answers = RoundTrip(*stub, {r});
  ASSERT_FALSE(answers.at(1).has_error()) << answers.at(1).error().message();
  EXPECT_EQ(answers.at(1).output().dtype(), v1::DTYPE_BF16);
  EXPECT_TRUE(TensorNear(Output(answers.at(1)), ReferenceOutput(0, x), 2e-2));
}

// A server whose kernels compute in bf16 answers fp32 requests in bf16: the
// same values as its fp32 answer would carry, in half the bytes; merged
// batches too.
TEST(ExpertServerTest, Bf16KernelsAnswerInBf16) {
  if (!OnednnRuntime::HasNativeBf16()) GTEST_SKIP() << "no native bf16 on this CPU";
  for (absl::Duration window : {absl::ZeroDuration(), absl::Milliseconds(20)}) {
    ServerSetup setup;
    setup.compute_dtype = DType::kBFloat16;
    setup.merge_requests = true;
    setup.batch_window = window;
    auto server = StartServer(setup);
    auto stub = v1::ExpertServer::NewStub(server->InProcessChannel());
    const FloatTensor x = RandomTensor({5, 32}, 15);
    v1::DispatchRequest fp32 = Request(1, 0, x);
    v1::DispatchRequest bf16 = Request(2, 0, x);
    EncodeFloats(x.values(), x.shape(), DType::kBFloat16, bf16.mutable_tokens());
    auto answers = RoundTrip(*stub, {fp32, bf16});
    ASSERT_FALSE(answers.at(1).has_error()) << answers.at(1).error().message();
    EXPECT_EQ(answers.at(1).output().dtype(), v1::DTYPE_BF16);
    // The kernel rounds the fp32 rows to bf16 itself: the same answer.
    EXPECT_EQ(answers.at(1).output().data(), answers.at(2).output().data());
    EXPECT_TRUE(TensorNear(Output(answers.at(1)), ReferenceOutput(0, x), 2e-2));
  }
}

TEST(ExpertServerTest, PastDeadlinesAreDeadlineExceeded) {
  FakeClock clock;
  ServerSetup setup;
  setup.clock = &clock;
  auto server = StartServer(setup);
  auto stub = v1::ExpertServer::NewStub(server->InProcessChannel());
  v1::DispatchRequest r = Request(1, 0, RandomTensor({2, 32}, 6));
  r.set_deadline_unix_micros(absl::ToUnixMicros(clock.Now() - absl::Milliseconds(3)));
  auto answers = RoundTrip(*stub, {r});
  EXPECT_EQ(answers.at(1).error().code(), static_cast<int>(grpc::StatusCode::DEADLINE_EXCEEDED));
}

// Forward with training, then backward, over the two streams.
class TrainingTest : public ::testing::Test {
 protected:
  v1::BackwardDispatchResponse Backward(uint64_t request_id, int expert, const FloatTensor& dy) {
    grpc::ClientContext context;
    auto stream = stub_->BackwardDispatch(&context);
    v1::BackwardDispatchRequest r;
    r.set_sequence_id(5);
    r.set_expert_id(expert);
    r.set_request_id(request_id);
    EncodeFloats(dy.values(), dy.shape(), DType::kFloat32, r.mutable_grad_output());
    EXPECT_TRUE(stream->Write(r));
    stream->WritesDone();
    v1::BackwardDispatchResponse response;
    EXPECT_TRUE(stream->Read(&response));
    EXPECT_TRUE(stream->Finish().ok());
    return response;
  }

  void Start(ServerSetup setup) {
    setup.clock = &clock_;
    server_ = StartServer(setup);
    stub_ = v1::ExpertServer::NewStub(server_->InProcessChannel());
  }

  FakeClock clock_;
  std::unique_ptr<ExpertServer> server_;
  std::unique_ptr<v1::ExpertServer::Stub> stub_;
};

TEST_F(TrainingTest, BackwardMatchesTheReference) {
  Start({});
  const FloatTensor x = RandomTensor({9, 32}, 7), dy = RandomTensor({9, 32}, 8);
  auto answers = RoundTrip(*stub_, {Request(1, 1, x, true, 42)});
  ASSERT_FALSE(answers.at(1).has_error());
  const v1::BackwardDispatchResponse response = Backward(42, 1, dy);
  ASSERT_FALSE(response.has_error()) << response.error().message();

  const ExpertWeights weights = InitExpert(Model(), ExpertKey(0, 1));
  ExpertWeights grads = ExpertWeights::Zeros(Model());
  std::vector<float> hidden(9 * 64), y(9 * 32);
  ReferenceExpertForward(weights, x.values(), 9, absl::MakeSpan(hidden), absl::MakeSpan(y));
  FloatTensor dx({9, 32});
  ReferenceExpertBackward(weights, x.values(), hidden, dy.values(), 9, dx.mutable_values(), grads);
  EXPECT_TRUE(TensorNear(ToFloatTensor(*DecodeTensor(response.grad_input(),
                                                     TokenBatchSpec("dx", 32, 0))),
                         dx, 1e-5));
  const ExpertWeights server_grads = *server_->store().Gradients(ExpertKey(0, 1));
  EXPECT_TRUE(TensorNear(server_grads.w1, grads.w1, 1e-5));
  EXPECT_TRUE(TensorNear(server_grads.b2, grads.b2, 1e-5));
}

TEST_F(TrainingTest, UnknownAndExpiredIdsAreNotFound) {
  Start({});
  const FloatTensor x = RandomTensor({4, 32}, 9);
  v1::BackwardDispatchResponse unknown = Backward(777, 0, x);
  EXPECT_EQ(unknown.error().code(), static_cast<int>(grpc::StatusCode::NOT_FOUND));
  EXPECT_THAT(unknown.error().message(), HasSubstr("request 777"));

  ASSERT_FALSE(RoundTrip(*stub_, {Request(1, 0, x, true, 778)}).at(1).has_error());
  clock_.Advance(absl::Seconds(31));
  v1::BackwardDispatchResponse expired = Backward(778, 0, x);
  EXPECT_EQ(expired.error().code(), static_cast<int>(grpc::StatusCode::NOT_FOUND));
  EXPECT_THAT(expired.error().message(), HasSubstr("request 778: training state for expert 0 expired"));
}

TEST_F(TrainingTest, OverBudgetIsResourceExhaustedAndNothingElseIsDisturbed) {
  ServerSetup setup;
  // One 4-token forward keeps 4 x (32 + 64) floats = 1536 bytes.
  setup.training_bytes = 2000;
  // One compute thread: requests run in arrival order, so the first one
  // takes the budget.
  setup.compute_threads = 1;
  Start(setup);
  const FloatTensor x = RandomTensor({4, 32}, 10);
  auto answers = RoundTrip(*stub_, {Request(1, 0, x, true, 1), Request(2, 0, x, true, 2),
                                    Request(3, 0, x, false)});
  ASSERT_FALSE(answers.at(1).has_error());
  EXPECT_EQ(answers.at(2).error().code(), static_cast<int>(grpc::StatusCode::RESOURCE_EXHAUSTED));
  EXPECT_THAT(answers.at(2).error().message(), HasSubstr("2000-byte budget"));
  EXPECT_FALSE(answers.at(3).has_error());
  EXPECT_FALSE(Backward(1, 0, x).has_error());
}

TEST(ExpertServerTest, InfoReportsExpertsAndDigests) {
  auto server = StartServer({"b"});
  auto stub = v1::ExpertServer::NewStub(server->InProcessChannel());
  grpc::ClientContext context;
  v1::InfoResponse info;
  ASSERT_TRUE(stub->Info(&context, {}, &info).ok());
  EXPECT_EQ(info.server_name(), "b");
  EXPECT_EQ(info.model().d_ff(), 64);
  EXPECT_EQ(info.compute_dtype(), v1::DTYPE_FP32);
  ASSERT_EQ(info.experts_size(), 2);
  EXPECT_EQ(info.experts(0).expert_id(), 2);
  EXPECT_EQ(info.experts(0).weights_digest(), InitExpert(Model(), ExpertKey(0, 2)).Digest());
  EXPECT_EQ(info.experts(1).weights_digest(), InitExpert(Model(), ExpertKey(0, 3)).Digest());
}

TEST(ExpertServerTest, ExpertWeightsMoveBetweenServers) {
  auto a = StartServer({"a"});
  auto b = StartServer({"b"});
  auto stub_a = v1::ExpertServer::NewStub(a->InProcessChannel());
  auto stub_b = v1::ExpertServer::NewStub(TcpChannel(b->port()));

  // Stream expert 1 out of a in small chunks, into b.
  std::vector<v1::ExpertWeightsChunk> chunks;
  {
    grpc::ClientContext context;
    v1::GetExpertWeightsRequest request;
    request.set_expert_id(1);
    request.set_max_chunk_bytes(1000);
    auto reader = stub_a->GetExpertWeights(&context, request);
    v1::ExpertWeightsChunk chunk;
    while (reader->Read(&chunk)) chunks.push_back(chunk);
    ASSERT_TRUE(reader->Finish().ok());
  }
  EXPECT_GT(chunks.size(), 8u);
  EXPECT_TRUE(chunks.back().last());
  auto load = [&](const std::vector<v1::ExpertWeightsChunk>& send) {
    grpc::ClientContext context;
    v1::LoadExpertWeightsResponse response;
    auto writer = stub_b->LoadExpertWeights(&context, &response);
    for (const auto& chunk : send) {
      if (!writer->Write(chunk)) break;
    }
    writer->WritesDone();
    return std::make_pair(writer->Finish(), response);
  };
  // A corrupted chunk is caught by the digest; b does not start hosting it.
  std::vector<v1::ExpertWeightsChunk> corrupt = chunks;
  (*corrupt[3].mutable_data())[0] ^= 1;
  auto [bad_status, unused] = load(corrupt);
  EXPECT_EQ(bad_status.error_code(), grpc::StatusCode::DATA_LOSS);
  EXPECT_THAT(b->store().HostedExperts(), ElementsAre(ExpertKey(0, 2), ExpertKey(0, 3)));

  auto [status, response] = load(chunks);
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(response.expert().weights_digest(), InitExpert(Model(), ExpertKey(0, 1)).Digest());
  EXPECT_THAT(b->store().HostedExperts(),
              ElementsAre(ExpertKey(0, 1), ExpertKey(0, 2), ExpertKey(0, 3)));
  const FloatTensor x = RandomTensor({6, 32}, 11);
  EXPECT_EQ(Output(RoundTrip(*stub_b, {Request(1, 1, x)}).at(1)),
            Output(RoundTrip(*stub_a, {Request(1, 1, x)}).at(1)));

  grpc::ClientContext context;
  v1::ReleaseExpertRequest release;
  release.set_expert_id(1);
  v1::ReleaseExpertResponse released;
  ASSERT_TRUE(stub_a->ReleaseExpert(&context, release, &released).ok());
  EXPECT_THAT(a->store().HostedExperts(), ElementsAre(ExpertKey(0, 0)));
}

TEST(ExpertServerTest, HealthIsServingUntilShutdown) {
  auto server = StartServer({});
  auto health = grpc::health::v1::Health::NewStub(server->InProcessChannel());
  grpc::ClientContext context;
  grpc::health::v1::HealthCheckResponse response;
  ASSERT_TRUE(health->Check(&context, {}, &response).ok());
  EXPECT_EQ(response.status(), grpc::health::v1::HealthCheckResponse::SERVING);
}

TEST(ExpertServerTest, ShutdownAnswersEverythingAcceptedAndRefusesNewStreams) {
  // Six requests are accepted and held at the gate (six compute threads);
  // the server is told to stop; then the gate opens. Every accepted request
  // must be answered before the stream ends.
  Gate gate;
  ServerSetup setup;
  setup.compute_threads = 6;
  setup.gate = &gate;
  auto server = StartServer(setup);
  auto stub = v1::ExpertServer::NewStub(TcpChannel(server->port()));
  grpc::ClientContext context;
  auto stream = stub->Dispatch(&context);
  std::vector<FloatTensor> inputs;
  constexpr int kRequests = 6;
  for (int i = 0; i < kRequests; ++i) {
    inputs.push_back(RandomTensor({64 + i, 32}, 20 + i));
    ASSERT_TRUE(stream->Write(Request(i, 0, inputs.back())));
  }
  gate.AwaitEntered(kRequests);
  std::thread stopper([&] { server->Shutdown(); });
  {
    // A stream opened now is refused, or (if it beat the drain) finished by
    // it: UNAVAILABLE either way, while the accepted work is still held.
    grpc::ClientContext late_context;
    auto late = stub->Dispatch(&late_context);
    v1::DispatchResponse unused;
    EXPECT_FALSE(late->Read(&unused));
    EXPECT_EQ(late->Finish().error_code(), grpc::StatusCode::UNAVAILABLE);
  }
  gate.Open();
  absl::flat_hash_map<uint64_t, v1::DispatchResponse> answers;
  v1::DispatchResponse response;
  while (stream->Read(&response)) {
    EXPECT_TRUE(answers.emplace(response.sequence_id(), response).second);
  }
  const grpc::Status status = stream->Finish();
  stopper.join();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAVAILABLE) << status.error_message();
  ASSERT_EQ(answers.size(), static_cast<size_t>(kRequests));
  for (int i = 0; i < kRequests; ++i) {
    ASSERT_FALSE(answers.at(i).has_error()) << answers.at(i).error().message();
    EXPECT_TRUE(TensorNear(Output(answers.at(i)), ReferenceOutput(0, inputs[i]), 1e-5));
  }
}

}  // namespace
}  // namespace moe::expert
