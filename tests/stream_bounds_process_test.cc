// Bounded streams on a real cluster: the router's ForwardStreams hold at
// most --max_stream_bytes each (then HTTP/2 flow control holds the client)
// and --max_buffered_bytes together (then requests are refused with
// RESOURCE_EXHAUSTED), and at most --max_streams are open. A client that
// sends and never reads cannot grow the router's memory, and everyone else
// is served with outputs equal to the reference.
#include <atomic>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "common/reference_moe.h"
#include "common/tensor_codec.h"
#include "common/testing/random_tensor.h"
#include "common/testing/tensor_matchers.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/process_cluster.h"

namespace moe::testing {
namespace {

using ::testing::HasSubstr;

constexpr int64_t kDModel = 256;
// 256 tokens x 256 x 4 bytes: 256 KiB per request.
constexpr int64_t kBigTokens = 256;

ProcessClusterOptions Options() {
  ProcessClusterOptions options;
  options.model = absl::StrCat("d_model: ", kDModel, " d_ff: 512 num_experts: 4 top_k: 2 seed: 9");
  options.strategy = "DATA_PARALLEL";
  options.router_flags = {"--max_stream_bytes=1048576", "--max_buffered_bytes=4194304",
                          "--max_streams=6"};
  return options;
}

v1::ForwardRequest Request(uint64_t client_id, const FloatTensor& x) {
  v1::ForwardRequest request;
  request.set_client_id(client_id);
  EncodeFloats(x.values(), x.shape(), DType::kFloat32, request.mutable_x());
  return request;
}

// The router's resident memory, from /proc.
int64_t RssBytes(pid_t pid) {
  std::ifstream status(absl::StrCat("/proc/", pid, "/status"));
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("VmRSS:", 0) == 0) {
      int64_t kib = 0;
      std::istringstream(line.substr(6)) >> kib;
      return kib << 10;
    }
  }
  return -1;
}

// Unary Forwards that must all succeed and equal the reference.
void ServeOthers(ProcessCluster& cluster, const ReferenceMoe& reference, int count,
                 const char* when) {
  std::vector<double> ms;
  for (int i = 0; i < count; ++i) {
    const FloatTensor x = RandomTensor({16, kDModel}, 100 + i);
    v1::ForwardResponse response;
    const absl::Time start = absl::Now();
    const grpc::Status status = cluster.Forward(x, &response);
    ms.push_back(absl::ToDoubleMilliseconds(absl::Now() - start));
    ASSERT_TRUE(status.ok()) << when << ": " << status.error_message();
    EXPECT_TRUE(TensorNear(Decoded(response.y(), kDModel), reference.Forward(x)->y, 1e-5));
  }
  std::sort(ms.begin(), ms.end());
  std::cout << when << ": " << count << " Forwards, p50 " << ms[ms.size() / 2] << " ms, max "
            << ms.back() << " ms\n";
}

TEST(StreamBoundsTest, ANeverReadingClientHoldsItsBoundAndOthersAreServed) {
  ProcessCluster cluster(Options());
  const ReferenceMoe reference = cluster.Reference();
  ServeOthers(cluster, reference, 20, "before");
  const int64_t rss_before = RssBytes(cluster.router_pid());

  // Sends 256 KiB requests and never reads; its writes block once the
  // router stops reading it.
  grpc::ClientContext context;
  auto stream = cluster.stub().ForwardStream(&context);
  std::atomic<int> written{0};
  std::thread attacker([&] {
    const v1::ForwardRequest request = Request(1, RandomTensor({kBigTokens, kDModel}, 7));
    for (int i = 0; i < 400 && stream->Write(request); ++i) written.fetch_add(1);
  });
  // Let it send what it can (it stalls well before 400 x 256 KiB = 100 MiB).
  const absl::Time deadline = absl::Now() + absl::Seconds(3);
  int last = -1;
  while (absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(500));
    if (written.load() == last) break;  // stalled
    last = written.load();
  }
  ServeOthers(cluster, reference, 20, "while a client never reads");
  const int64_t rss_during = RssBytes(cluster.router_pid());
  std::cout << "the never-reading client wrote " << written.load() << " requests ("
            << written.load() / 4 << " MiB); router RSS " << (rss_before >> 20) << " -> "
            << (rss_during >> 20) << " MiB\n";
  EXPECT_LT(written.load(), 200) << "the router kept reading a client that never reads";
#ifndef __SANITIZE_ADDRESS__
  // (Under ASan the quarantine keeps freed memory, 256 MiB by default: RSS
  // says nothing about what the router holds there.)
  EXPECT_LT(rss_during - rss_before, int64_t{64} << 20);
#endif
  context.TryCancel();
  attacker.join();
  ServeOthers(cluster, reference, 5, "after");
}

TEST(StreamBoundsTest, BufferedBytesAndOpenStreamsAreBounded) {
  ProcessCluster cluster(Options());
  const ReferenceMoe reference = cluster.Reference();
  const FloatTensor big = RandomTensor({kBigTokens, kDModel}, 3);
  const FloatTensor small = RandomTensor({2, kDModel}, 4);

  // Six streams, each answered once, so the router has them all open.
  constexpr int kStreams = 6;
  std::vector<std::unique_ptr<grpc::ClientContext>> contexts;
  std::vector<std::unique_ptr<grpc::ClientReaderWriter<v1::ForwardRequest, v1::ForwardResponse>>>
      streams;
  for (int s = 0; s < kStreams; ++s) {
    contexts.push_back(std::make_unique<grpc::ClientContext>());
    contexts.back()->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    streams.push_back(cluster.stub().ForwardStream(contexts.back().get()));
    ASSERT_TRUE(streams.back()->Write(Request(0, small)));
    v1::ForwardResponse response;
    ASSERT_TRUE(streams.back()->Read(&response));
    ASSERT_FALSE(response.has_error()) << response.error().message();
  }
  // A seventh is refused.
  {
    grpc::ClientContext context;
    auto seventh = cluster.stub().ForwardStream(&context);
    seventh->Write(Request(0, small));
    v1::ForwardResponse response;
    EXPECT_FALSE(seventh->Read(&response));
    const grpc::Status status = seventh->Finish();
    EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
    EXPECT_THAT(status.error_message(), HasSubstr("6 streams open, its limit"));
  }

  // With the servers stopped nothing is answered, so the router holds what
  // it accepts: 4 requests (1 MiB) per stream at most, 4 MiB in all; the
  // rest of 6 x 5 requests is refused at once.
  cluster.PauseServer(0);
  cluster.PauseServer(1);
  std::atomic<int> refused{0};
  std::vector<std::thread> writers, readers;
  std::vector<std::vector<v1::ForwardResponse>> answers(kStreams);
  for (int s = 0; s < kStreams; ++s) {
    writers.emplace_back([&, s] {
      for (uint64_t i = 1; i <= 5; ++i) streams[s]->Write(Request(i, big));
      streams[s]->WritesDone();
    });
    readers.emplace_back([&, s] {
      v1::ForwardResponse response;
      while (streams[s]->Read(&response)) {
        if (response.error().code() == static_cast<int>(grpc::StatusCode::RESOURCE_EXHAUSTED)) {
          refused.fetch_add(1);
        }
        answers[s].push_back(response);
      }
    });
  }
  const absl::Time deadline = absl::Now() + absl::Seconds(20);
  while (refused.load() < 5 * kStreams - 16 - kStreams && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(10));
  }
  cluster.ContinueServer(0);
  cluster.ContinueServer(1);
  for (auto& t : writers) t.join();
  for (auto& t : readers) t.join();
  for (auto& stream : streams) EXPECT_TRUE(stream->Finish().ok());

  // While the servers were stopped the router held at most 4 MiB (16
  // requests) and read no fifth request of a stream holding 1 MiB, so at
  // least 30 - 16 - 6 = 8 were refused (more came in once they ran on);
  // everything else equals the reference.
  int answered = 0;
  for (const auto& stream_answers : answers) {
    for (const v1::ForwardResponse& answer : stream_answers) {
      ++answered;
      if (answer.has_error()) {
        EXPECT_EQ(answer.error().code(), static_cast<int>(grpc::StatusCode::RESOURCE_EXHAUSTED))
            << answer.error().message();
        EXPECT_THAT(answer.error().message(), HasSubstr("MiB of requests, its limit"));
        continue;
      }
      EXPECT_TRUE(TensorNear(Decoded(answer.y(), kDModel), reference.Forward(big)->y, 1e-5));
    }
  }
  EXPECT_EQ(answered, kStreams * 5);
  EXPECT_GE(refused.load(), 8);
  std::cout << refused.load() << " of " << answered << " requests refused at the byte bound\n";
  ServeOthers(cluster, reference, 5, "after");
}

// A stream's request ends at its own deadline (timeout_ms) while the
// stream goes on; one without takes the router's default.
TEST(StreamBoundsTest, AStreamRequestEndsAtItsOwnDeadline) {
  ProcessCluster cluster(Options());
  const ReferenceMoe reference = cluster.Reference();
  const FloatTensor x = RandomTensor({8, kDModel}, 5);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  auto stream = cluster.stub().ForwardStream(&context);
  cluster.PauseServer(0);
  cluster.PauseServer(1);
  v1::ForwardRequest request = Request(1, x);
  request.set_timeout_ms(300);
  const absl::Time start = absl::Now();
  ASSERT_TRUE(stream->Write(request));
  v1::ForwardResponse response;
  ASSERT_TRUE(stream->Read(&response));
  const absl::Duration waited = absl::Now() - start;
  cluster.ContinueServer(0);
  cluster.ContinueServer(1);
  EXPECT_EQ(response.client_id(), 1u);
  EXPECT_EQ(response.error().code(), static_cast<int>(grpc::StatusCode::DEADLINE_EXCEEDED))
      << response.error().message();
  EXPECT_LT(waited, absl::Seconds(10)) << "the stream's 60 s deadline, not the request's";

  ASSERT_TRUE(stream->Write(Request(2, x)));
  ASSERT_TRUE(stream->Read(&response));
  ASSERT_FALSE(response.has_error()) << response.error().message();
  EXPECT_TRUE(TensorNear(Decoded(response.y(), kDModel), reference.Forward(x)->y, 1e-5));
  stream->WritesDone();
  EXPECT_TRUE(stream->Finish().ok());
}

}  // namespace
}  // namespace moe::testing
