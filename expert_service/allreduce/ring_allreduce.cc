#include "expert_service/allreduce/ring_allreduce.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/log.h"

namespace moe::allreduce {
namespace {

int PhaseIndex(RingPhase phase) { return phase == RingPhase::kReduceScatter ? 0 : 1; }

}  // namespace

std::shared_ptr<RingAllReduce> RingAllReduce::Create(Spec spec, RingOptions options,
                                                     RingLink* successor) {
  return std::shared_ptr<RingAllReduce>(
      new RingAllReduce(std::move(spec), options, successor));
}

RingAllReduce::RingAllReduce(Spec spec, RingOptions options, RingLink* successor)
    : spec_(std::move(spec)), options_(options), successor_(successor) {
  MOE_CHECK(spec_.size >= 1 && spec_.rank >= 0 && spec_.rank < spec_.size);
  MOE_CHECK(options_.segment_elements > 0 && options_.window_segments > 0);
  const int n = spec_.size;
  const int r = spec_.rank;
  for (int s = 0; s + 1 < n; ++s) {
    sends_expected_ += SegmentsIn(Mod(r - s)) + SegmentsIn(Mod(r + 1 - s));
    receives_expected_ += SegmentsIn(ReceivedChunk(RingPhase::kReduceScatter, s)) +
                          SegmentsIn(ReceivedChunk(RingPhase::kAllGather, s));
  }
  next_offset_.resize(2 * std::max(n - 1, 0));
  for (int s = 0; s + 1 < n; ++s) {
    next_offset_[s] = ChunkBegin(ReceivedChunk(RingPhase::kReduceScatter, s));
    next_offset_[n - 1 + s] = ChunkBegin(ReceivedChunk(RingPhase::kAllGather, s));
  }
}

std::string RingAllReduce::Name() const {
  return absl::StrCat("all-reduce of step ", spec_.step, " group ", absl::Hex(spec_.group_id));
}

int64_t RingAllReduce::ChunkBegin(int chunk) const {
  return static_cast<int64_t>(chunk) * static_cast<int64_t>(spec_.buffer.size()) / spec_.size;
}

int64_t RingAllReduce::SegmentsIn(int chunk) const {
  const int64_t length = ChunkEnd(chunk) - ChunkBegin(chunk);
  return (length + options_.segment_elements - 1) / options_.segment_elements;
}

int RingAllReduce::ReceivedChunk(RingPhase phase, int ring_step) const {
  return phase == RingPhase::kReduceScatter ? Mod(spec_.rank - ring_step - 1)
                                                : Mod(spec_.rank - ring_step);
}

void RingAllReduce::QueueChunk(RingPhase phase, int ring_step, int chunk) {
  const int64_t end = ChunkEnd(chunk);
  for (int64_t offset = ChunkBegin(chunk); offset < end; offset += options_.segment_elements) {
    to_send_.push_back(
        {phase, ring_step, chunk, offset, std::min(options_.segment_elements, end - offset)});
  }
}

void RingAllReduce::Start() {
  {
    absl::MutexLock lock(&mu_);
    if (spec_.size == 1) return;  // nothing to exchange: Wait returns at once
    QueueChunk(RingPhase::kReduceScatter, 0, spec_.rank);
  }
  Pump();
}

void RingAllReduce::Pump() {
  {
    absl::MutexLock lock(&mu_);
    // One sender at a time keeps the segments of a step in order.
    if (pumping_) return;
    pumping_ = true;
  }
  while (true) {
    RingHeader header;
    absl::Span<const float> data;
    bool abort = false;
    {
      absl::MutexLock lock(&mu_);
      header.step = spec_.step;
      header.group_id = spec_.group_id;
      header.sender_rank = spec_.rank;
      header.buffer_elements = static_cast<int64_t>(spec_.buffer.size());
      if (abort_pending_) {
        abort_pending_ = false;
        abort = true;
        header.abort = status_;
      } else if (!status_.ok() || to_send_.empty() ||
                 in_flight_ >= options_.window_segments) {
        pumping_ = false;
        return;
      } else {
        const Segment next = to_send_.front();
        to_send_.pop_front();
        ++in_flight_;
        header.phase = next.phase;
        header.ring_step = next.ring_step;
        header.chunk_index = next.chunk;
        header.offset_elements = next.offset;
        // Sent from the buffer as it is, without a copy: a segment's region
        // changes again only after this send has gone all the way round the
        // ring (and was acknowledged here).
        data = absl::MakeConstSpan(spec_.buffer.data() + next.offset,
                                   static_cast<size_t>(next.length));
        bytes_sent_ += next.length * static_cast<int64_t>(sizeof(float));
      }
    }
    if (abort) {
      // Best effort: the successor may be the one that is gone.
      successor_->Send(header, {}, [self = shared_from_this()](absl::Status) {});
    } else {
      successor_->Send(header, data, [self = shared_from_this()](absl::Status status) {
        self->OnAck(std::move(status));
      });
    }
  }
}

void RingAllReduce::OnAck(absl::Status status) {
  {
    absl::MutexLock lock(&mu_);
    --in_flight_;
    if (status.ok()) {
      ++acked_;
    } else {
      FailLocked(absl::Status(status.code(), absl::StrCat(Name(), ": sending to ",
                                                          spec_.successor, ": ",
                                                          status.message())));
    }
  }
  Pump();
}

absl::Status RingAllReduce::Validate(const ReceivedRingSegment& segment) const {
  const RingHeader& chunk = segment.header();
  const int n = spec_.size;
  auto reject = [&](auto... what) {
    return absl::InvalidArgumentError(absl::StrCat(Name(), ": rejected a segment from ",
                                                   spec_.predecessor, ": ", what...));
  };
  if (chunk.step != spec_.step || chunk.group_id != spec_.group_id) {
    return absl::FailedPreconditionError(absl::StrCat(
        Name(), ": rejected a segment of step ", chunk.step, " group ",
        absl::Hex(chunk.group_id)));
  }
  if (chunk.buffer_elements != static_cast<int64_t>(spec_.buffer.size())) {
    return reject("buffer of ", chunk.buffer_elements, " elements, this rank has ",
                  spec_.buffer.size());
  }
  if (chunk.sender_rank != Mod(spec_.rank - 1)) {
    return reject("sender rank ", chunk.sender_rank, ", the predecessor is rank ",
                  Mod(spec_.rank - 1));
  }
  if (chunk.phase != RingPhase::kReduceScatter && chunk.phase != RingPhase::kAllGather) {
    return reject("unknown phase ", static_cast<int>(chunk.phase));
  }
  if (chunk.ring_step < 0 || chunk.ring_step >= n - 1) {
    return reject("ring step ", chunk.ring_step, " outside [0, ", n - 1, ")");
  }
  const int expected_chunk = ReceivedChunk(chunk.phase, chunk.ring_step);
  if (chunk.chunk_index != expected_chunk) {
    return reject("chunk ", chunk.chunk_index, " at ring step ", chunk.ring_step,
                  ", expected chunk ", expected_chunk);
  }
  const int64_t expected_offset =
      next_offset_[PhaseIndex(chunk.phase) * (n - 1) + chunk.ring_step];
  const int64_t length =
      std::min(options_.segment_elements, ChunkEnd(expected_chunk) - expected_offset);
  if (chunk.offset_elements != expected_offset || length <= 0) {
    return reject("segment at element ", chunk.offset_elements, ", expected ",
                  length <= 0 ? std::string("none (chunk complete)")
                              : absl::StrCat(expected_offset));
  }
  if (static_cast<int64_t>(segment.payload_bytes()) !=
      length * static_cast<int64_t>(sizeof(float))) {
    return reject(segment.payload_bytes(), " data bytes, expected ", length * sizeof(float));
  }
  return absl::OkStatus();
}

absl::Status RingAllReduce::OnChunk(const ReceivedRingSegment& segment) {
  bool pump = false;
  absl::Status verdict;
  {
    absl::MutexLock lock(&mu_);
    verdict = Receive(segment, pump);
  }
  if (pump) Pump();
  return verdict;
}

absl::Status RingAllReduce::Receive(const ReceivedRingSegment& segment, bool& pump) {
  const RingHeader& chunk = segment.header();
  if (!status_.ok()) return status_;
  if (!chunk.abort.ok()) {
    const absl::Status& cause = chunk.abort;
    FailLocked(absl::Status(cause.code(), absl::StrCat(Name(), ": ", spec_.predecessor,
                                                       " failed: ", cause.message())));
    pump = true;  // passes it on
    return status_;
  }
  if (absl::Status invalid = Validate(segment); !invalid.ok()) {
    FailLocked(invalid);
    pump = true;
    return invalid;
  }
  {
    const int n = spec_.size;
    const int step = chunk.ring_step;
    const int64_t offset = chunk.offset_elements;
    const int64_t length = static_cast<int64_t>(segment.payload_bytes() / sizeof(float));
    float* dst = spec_.buffer.data() + offset;
    if (chunk.phase == RingPhase::kReduceScatter) {
      segment.AddPayloadTo(dst);
      // The sum so far goes on: at the next reduce-scatter step, or, once
      // complete (the last step), as the first all-gather step.
      if (step + 1 < n - 1) {
        to_send_.push_back({RingPhase::kReduceScatter, step + 1, chunk.chunk_index, offset,
                            length});
      } else {
        to_send_.push_back({RingPhase::kAllGather, 0, chunk.chunk_index, offset, length});
      }
      pump = true;
    } else {
      segment.CopyPayloadTo(dst);
      if (step + 1 < n - 1) {
        to_send_.push_back({RingPhase::kAllGather, step + 1, chunk.chunk_index, offset,
                            length});
        pump = true;
      }
    }
    next_offset_[PhaseIndex(chunk.phase) * (n - 1) + step] = offset + length;
    ++received_;
  }
  return absl::OkStatus();
}

void RingAllReduce::Fail(absl::Status status) {
  {
    absl::MutexLock lock(&mu_);
    FailLocked(std::move(status));
  }
  Pump();
}

void RingAllReduce::FailLocked(absl::Status status) {
  if (!status_.ok() || Finished()) return;
  MOE_LOG(WARNING, status.message());
  status_ = std::move(status);
  to_send_.clear();
  abort_pending_ = spec_.size > 1;
}

void RingAllReduce::PredecessorLost(const absl::Status& why) {
  {
    absl::MutexLock lock(&mu_);
    if (received_ == receives_expected_) return;
    FailLocked(absl::UnavailableError(
        absl::StrCat(Name(), ": predecessor ", spec_.predecessor, ": ", why.message())));
  }
  Pump();
}

bool RingAllReduce::Finished() const {
  return received_ == receives_expected_ && acked_ == sends_expected_;
}

absl::Status RingAllReduce::Wait(absl::Time deadline) {
  absl::Status status = WaitLocked(deadline);
  Pump();  // passes a deadline failure on
  return status;
}

absl::Status RingAllReduce::WaitLocked(absl::Time deadline) {
  absl::MutexLock lock(&mu_);
  auto over = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return !status_.ok() || Finished();
  };
  if (!mu_.AwaitWithDeadline(absl::Condition(&over), deadline)) {
    std::vector<std::string> waits;
    if (received_ < receives_expected_) {
      waits.push_back(absl::StrCat("segments from ", spec_.predecessor, " (", received_, " of ",
                                   receives_expected_, " received)"));
    }
    if (acked_ < sends_expected_) {
      waits.push_back(absl::StrCat("acknowledgements from ", spec_.successor, " (", acked_,
                                   " of ", sends_expected_, ")"));
    }
    FailLocked(absl::DeadlineExceededError(absl::StrCat(
        Name(), ": deadline exceeded waiting for ", absl::StrJoin(waits, " and "))));
  }
  return status_;
}

std::vector<float> RingAllReduce::TakeBuffer() {
  absl::MutexLock lock(&mu_);
  MOE_CHECK(status_.ok() && Finished());
  return std::move(spec_.buffer);
}

int64_t RingAllReduce::bytes_sent() const {
  absl::MutexLock lock(&mu_);
  return bytes_sent_;
}

}  // namespace moe::allreduce
