#include "expert_service/allreduce/ring_allreduce.h"

#include <cmath>
#include <limits>
#include <cstring>
#include <random>

#include "absl/strings/str_cat.h"
#include "expert_service/allreduce/collective_registry.h"
#include "expert_service/allreduce/loopback_ring_link.h"
#include "expert_service/allreduce/ring_segment.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace moe::allreduce {
namespace {

using ::testing::HasSubstr;

constexpr uint64_t kGroup = 0xabc;

// `segment` serialized for the wire, then re-cut into slices of
// `slice_bytes` (the last one shorter).
grpc::ByteBuffer CutIntoSlices(const RingSegment& segment, size_t slice_bytes) {
  grpc::ByteBuffer serialized;
  bool own = false;
  EXPECT_TRUE(grpc::SerializationTraits<RingSegment>::Serialize(segment, &serialized, &own).ok());
  std::vector<grpc::Slice> slices;
  EXPECT_TRUE(serialized.Dump(&slices).ok());
  std::string bytes;
  for (const grpc::Slice& slice : slices) {
    bytes.append(reinterpret_cast<const char*>(slice.begin()), slice.size());
  }
  std::vector<grpc::Slice> cut;
  for (size_t i = 0; i < bytes.size(); i += slice_bytes) {
    cut.emplace_back(bytes.data() + i, std::min(slice_bytes, bytes.size() - i));
  }
  return grpc::ByteBuffer(cut.data(), cut.size());
}

// Through the real wire format: serialized as GrpcRingLink sends it, cut
// into odd-sized slices as a socket may deliver it (floats straddle slices),
// and parsed as the Collective service reads it.
std::unique_ptr<ReceivedRingSegment> ThroughTheWire(const RingHeader& header,
                                                    absl::Span<const float> data) {
  RingSegment segment;
  RingHeaderToChunk(header, &segment.header);
  segment.data = data.data();
  segment.length = static_cast<int64_t>(data.size());
  auto received = std::make_unique<ReceivedSegment>();
  grpc::ByteBuffer wire = CutIntoSlices(segment, /*slice_bytes=*/1021);
  const grpc::Status parsed = ReceivedSegment::FromByteBuffer(wire, *received);
  EXPECT_TRUE(parsed.ok()) << parsed.error_message();
  return received;
}

// N ranks in one process: registry i receives from rank i-1 over link i-1.
class Ring {
 public:
  explicit Ring(int n) : n_(n) {
    for (int i = 0; i < n; ++i) {
      registries_.push_back(std::make_unique<CollectiveRegistry>(absl::Seconds(5)));
      registries_.back()->AddGroup(kGroup);
    }
    for (int i = 0; i < n; ++i) {
      links_.push_back(
          std::make_unique<LoopbackRingLink>(registries_[(i + 1) % n].get(), ThroughTheWire));
    }
  }
  ~Ring() { links_.clear(); }

  std::shared_ptr<RingAllReduce> Make(int rank, uint64_t step, std::vector<float> buffer,
                                      RingOptions options) {
    return RingAllReduce::Create({step, kGroup, rank, n_, absl::StrCat("rank ", (rank + n_ - 1) % n_),
                                  absl::StrCat("rank ", (rank + 1) % n_), std::move(buffer)},
                                 options, links_[rank].get());
  }

  CollectiveRegistry& registry(int rank) { return *registries_[rank]; }
  LoopbackRingLink& link(int rank) { return *links_[rank]; }

 private:
  const int n_;
  std::vector<std::unique_ptr<CollectiveRegistry>> registries_;
  std::vector<std::unique_ptr<LoopbackRingLink>> links_;
};

std::vector<std::vector<float>> Inputs(int n, int64_t length, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  std::vector<std::vector<float>> inputs(n, std::vector<float>(length));
  for (auto& v : inputs) {
    for (float& x : v) x = dist(rng);
  }
  return inputs;
}

struct Case {
  int n;
  int64_t length;
  int64_t segment;
};

class RingAllReduceTest : public ::testing::TestWithParam<Case> {};

TEST_P(RingAllReduceTest, SumsExactlyOnceAndEveryRankHoldsTheSameBits) {
  const auto [n, length, segment] = GetParam();
  std::vector<std::vector<float>> buffers = Inputs(n, length, 7);
  std::vector<double> sum(length, 0.0), sum_abs(length, 0.0);
  for (const auto& b : buffers) {
    for (int64_t i = 0; i < length; ++i) {
      sum[i] += b[i];
      sum_abs[i] += std::fabs(b[i]);
    }
  }
  Ring ring(n);
  std::vector<std::shared_ptr<RingAllReduce>> ranks;
  for (int r = 0; r < n; ++r) {
    ranks.push_back(ring.Make(r, 1, buffers[r], {segment, 3}));
  }
  // Rank 0 starts before the others are registered: its first segments
  // wait (parked) at rank 1 until rank 1 starts.
  ring.registry(0).Register(ranks[0]);
  ranks[0]->Start();
  for (int r = 1; r < n; ++r) {
    ring.registry(r).Register(ranks[r]);
    ranks[r]->Start();
  }
  for (int r = 0; r < n; ++r) {
    ASSERT_TRUE(ranks[r]->Wait(absl::Now() + absl::Seconds(60)).ok()) << "rank " << r;
    ring.registry(r).Unregister(*ranks[r]);
    buffers[r] = ranks[r]->TakeBuffer();
  }
  for (int r = 1; r < n && length > 0; ++r) {
    ASSERT_EQ(0, std::memcmp(buffers[r].data(), buffers[0].data(), length * sizeof(float)))
        << "rank " << r << " differs from rank 0";
  }
  // fp32 rounding of an n-term sum: at most (n-1) ulp-sized steps of the
  // running magnitude.
  const double eps = std::ldexp(1.0, -23);
  for (int64_t i = 0; i < length; ++i) {
    ASSERT_LE(std::fabs(buffers[0][i] - sum[i]), n * eps * sum_abs[i] + 1e-30) << "element " << i;
  }
  if (n > 1) {
    const double expected_bytes = 2.0 * (n - 1) / n * length * sizeof(float);
    EXPECT_NEAR(ranks[0]->bytes_sent(), expected_bytes, 2.0 * n * sizeof(float));
  }
}

std::vector<Case> Cases() {
  std::vector<Case> cases;
  for (int n : {1, 2, 3, 4, 8}) {
    for (int64_t length : {int64_t{0}, int64_t{1}, int64_t{n - 1}, int64_t{1000003}}) {
      if (length == n - 1 && n <= 2) continue;  // already there
      cases.push_back({n, length, 4096});
    }
    cases.push_back({n, 1000, 7});  // many odd-sized segments
  }
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Sizes, RingAllReduceTest, ::testing::ValuesIn(Cases()),
                         [](const auto& info) {
                           return absl::StrCat("n", info.param.n, "_len", info.param.length,
                                               "_seg", info.param.segment);
                         });

TEST(RingAllReduce, ChunksOfAnotherStepOrGroupOrSizeAreRejectedNeverSummed) {
  Ring ring(2);
  auto collective = ring.Make(1, 5, std::vector<float>(10, 1.0f), {});
  ring.registry(1).Register(collective);

  v1::RingChunk chunk;
  chunk.mutable_id()->set_step(4);
  chunk.mutable_id()->set_group_id(kGroup);
  chunk.set_sender_rank(0);
  chunk.set_phase(v1::RING_PHASE_REDUCE_SCATTER);
  chunk.set_chunk_index(0);
  chunk.set_buffer_elements(10);
  std::vector<float> ones(5, 1.0f);
  chunk.set_data(reinterpret_cast<const char*>(ones.data()), 5 * sizeof(float));
  auto deliver = [&](const v1::RingChunk& c) {
    absl::Status verdict = absl::UnknownError("no ack");
    const ReceivedSegment segment = ReceivedSegment::FromChunk(c);
    ring.registry(1).Deliver(&segment, [&](absl::Status s) { verdict = std::move(s); });
    return verdict;
  };

  absl::Status wrong_step = deliver(chunk);
  EXPECT_EQ(wrong_step.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(wrong_step.message(), HasSubstr("step 4"));
  EXPECT_THAT(wrong_step.message(), HasSubstr("running step 5"));

  chunk.mutable_id()->set_step(5);
  chunk.mutable_id()->set_group_id(0x999);
  absl::Status wrong_group = deliver(chunk);
  EXPECT_EQ(wrong_group.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(wrong_group.message(), HasSubstr("not a replica group"));

  chunk.mutable_id()->set_group_id(kGroup);
  chunk.set_buffer_elements(11);
  absl::Status wrong_size = deliver(chunk);
  EXPECT_EQ(wrong_size.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(wrong_size.message(), HasSubstr("buffer of 11 elements, this rank has 10"));

  // A rejected segment of the running step fails the collective itself.
  EXPECT_EQ(collective->Wait(absl::Now() + absl::Seconds(5)).code(),
            absl::StatusCode::kInvalidArgument);
  ring.registry(1).Unregister(*collective);
  // The step is over here: its segments are stale.
  chunk.set_buffer_elements(10);
  absl::Status stale = deliver(chunk);
  EXPECT_EQ(stale.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(stale.message(), HasSubstr("over"));
}

TEST(RingAllReduce, DeadPeerEndsItOnEveryLiveRankNamingThePeer) {
  // Rank 2 of 3 dies: sends to it fail, and the stream from it ends (what
  // the Collective service reports as a lost predecessor).
  Ring ring(3);
  std::vector<std::vector<float>> buffers = Inputs(3, 100000, 3);
  ring.link(1).Break();
  std::vector<std::shared_ptr<RingAllReduce>> ranks;
  for (int r = 0; r < 2; ++r) {
    ranks.push_back(ring.Make(r, 1, buffers[r], {1000, 2}));
    ring.registry(r).Register(ranks[r]);
    ranks[r]->Start();
  }
  ring.registry(0).PredecessorLost({kGroup}, absl::UnavailableError("stream from rank 2 ended"));
  const absl::Time start = absl::Now();
  absl::Status status1 = ranks[1]->Wait(start + absl::Seconds(20));
  EXPECT_EQ(status1.code(), absl::StatusCode::kUnavailable) << status1;
  EXPECT_THAT(status1.message(), HasSubstr("rank 2")) << status1;
  absl::Status status0 = ranks[0]->Wait(start + absl::Seconds(20));
  EXPECT_EQ(status0.code(), absl::StatusCode::kUnavailable) << status0;
  // From its lost predecessor or from rank 1's acks, whichever came first.
  EXPECT_THAT(status0.message(), HasSubstr("rank 2")) << status0;
  // At once, not at the deadline.
  EXPECT_LT(absl::Now() - start, absl::Seconds(10));
  for (int r = 0; r < 2; ++r) ring.registry(r).Unregister(*ranks[r]);
}

TEST(RingAllReduce, AFailureIsPassedOnRoundTheRing) {
  Ring ring(4);
  std::vector<std::vector<float>> buffers = Inputs(4, 100000, 5);
  std::vector<std::shared_ptr<RingAllReduce>> ranks;
  for (int r = 0; r < 4; ++r) {
    ranks.push_back(ring.Make(r, 1, buffers[r], {1000, 2}));
  }
  // Rank 2 fails before anyone starts (say, its gradients could not be
  // read); the others learn it from the ring, not from their deadlines.
  ring.registry(2).Register(ranks[2]);
  ranks[2]->Fail(absl::InternalError("rank 2 broke"));
  for (int r : {0, 1, 3}) {
    ring.registry(r).Register(ranks[r]);
    ranks[r]->Start();
  }
  const absl::Time start = absl::Now();
  for (int r : {0, 1, 3}) {
    absl::Status status = ranks[r]->Wait(start + absl::Seconds(20));
    EXPECT_EQ(status.code(), absl::StatusCode::kInternal) << "rank " << r << ": " << status;
    EXPECT_THAT(status.message(), HasSubstr("rank 2 broke"));
  }
  EXPECT_LT(absl::Now() - start, absl::Seconds(10));
  for (int r = 0; r < 4; ++r) ring.registry(r).Unregister(*ranks[r]);
}

TEST(RingAllReduce, StalledPeerEndsEveryRankAtTheDeadline) {
  Ring ring(2);
  std::vector<std::vector<float>> buffers = Inputs(2, 50000, 4);
  ring.link(0).Stall();
  std::vector<std::shared_ptr<RingAllReduce>> ranks;
  for (int r = 0; r < 2; ++r) {
    ranks.push_back(ring.Make(r, 1, buffers[r], {1000, 2}));
    ring.registry(r).Register(ranks[r]);
    ranks[r]->Start();
  }
  const absl::Time start = absl::Now();
  absl::Status status = ranks[0]->Wait(start + absl::Milliseconds(300));
  EXPECT_EQ(status.code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_LT(absl::Now() - start, absl::Seconds(2));
  EXPECT_EQ(ranks[1]->Wait(start + absl::Milliseconds(300)).code(),
            absl::StatusCode::kDeadlineExceeded);
  for (int r = 0; r < 2; ++r) ring.registry(r).Unregister(*ranks[r]);
}

TEST(RingAllReduce, ARemovedGroupEndsItsCollectiveAndRefusesItsSegments) {
  Ring ring(2);
  auto collective = ring.Make(1, 5, std::vector<float>(10, 1.0f), {});
  ring.registry(1).Register(collective);
  EXPECT_TRUE(ring.registry(1).HasGroup(kGroup));
  ring.registry(1).RemoveGroup(kGroup);
  EXPECT_FALSE(ring.registry(1).HasGroup(kGroup));
  const absl::Status ended = collective->Wait(absl::Now() + absl::Seconds(5));
  EXPECT_EQ(ended.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(ended.message(), HasSubstr("was removed from this server"));
  ring.registry(1).Unregister(*collective);  // no group: nothing to do

  v1::RingChunk chunk;
  chunk.mutable_id()->set_step(5);
  chunk.mutable_id()->set_group_id(kGroup);
  chunk.set_phase(v1::RING_PHASE_REDUCE_SCATTER);
  chunk.set_buffer_elements(10);
  const ReceivedSegment segment = ReceivedSegment::FromChunk(chunk);
  absl::Status verdict = absl::UnknownError("no ack");
  ring.registry(1).Deliver(&segment, [&](absl::Status s) { verdict = std::move(s); });
  EXPECT_EQ(verdict.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(verdict.message(), HasSubstr("not a replica group"));
  // And it can come back (a placement change back).
  ring.registry(1).AddGroup(kGroup);
  EXPECT_TRUE(ring.registry(1).HasGroup(kGroup));
}

TEST(RingAllReduce, AnAbortOfAFarStepRefusesOnlyThatStep) {
  Ring ring(2);
  for (int r = 0; r < 2; ++r) {
    ring.registry(r).AbortStep(std::numeric_limits<uint64_t>::max(), absl::AbortedError("stray"));
  }
  std::vector<std::shared_ptr<RingAllReduce>> ranks;
  for (int r = 0; r < 2; ++r) {
    ranks.push_back(ring.Make(r, 1, std::vector<float>(100, 1.0f + r), {}));
    ring.registry(r).Register(ranks[r]);
    ranks[r]->Start();
  }
  for (int r = 0; r < 2; ++r) {
    ASSERT_TRUE(ranks[r]->Wait(absl::Now() + absl::Seconds(10)).ok()) << r;
    ring.registry(r).Unregister(*ranks[r]);
    EXPECT_EQ(ranks[r]->TakeBuffer(), std::vector<float>(100, 3.0f));
  }
}

}  // namespace
}  // namespace moe::allreduce
