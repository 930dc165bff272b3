#include "expert_service/weight_transfer.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace moe::expert {
namespace {

// By kAllExpertTensors index.
constexpr size_t kNumTensors = std::size(kAllExpertTensors);
constexpr v1::ExpertTensorKind kWeightKinds[kNumTensors] = {
    v1::EXPERT_TENSOR_KIND_W1_WEIGHT, v1::EXPERT_TENSOR_KIND_W1_BIAS,
    v1::EXPERT_TENSOR_KIND_W2_WEIGHT, v1::EXPERT_TENSOR_KIND_W2_BIAS,
    v1::EXPERT_TENSOR_KIND_W3_WEIGHT};
constexpr v1::ExpertTensorKind kMomentumKinds[kNumTensors] = {
    v1::EXPERT_TENSOR_KIND_W1_WEIGHT_MOMENTUM, v1::EXPERT_TENSOR_KIND_W1_BIAS_MOMENTUM,
    v1::EXPERT_TENSOR_KIND_W2_WEIGHT_MOMENTUM, v1::EXPERT_TENSOR_KIND_W2_BIAS_MOMENTUM,
    v1::EXPERT_TENSOR_KIND_W3_WEIGHT_MOMENTUM};
constexpr v1::ExpertTensorKind kSecondMomentKinds[kNumTensors] = {
    v1::EXPERT_TENSOR_KIND_W1_WEIGHT_SECOND_MOMENT, v1::EXPERT_TENSOR_KIND_W1_BIAS_SECOND_MOMENT,
    v1::EXPERT_TENSOR_KIND_W2_WEIGHT_SECOND_MOMENT, v1::EXPERT_TENSOR_KIND_W2_BIAS_SECOND_MOMENT,
    v1::EXPERT_TENSOR_KIND_W3_WEIGHT_SECOND_MOMENT};

// What a chunk carries: the weights, or one of the optimizer's states.
enum class Part { kWeights, kFirst, kSecond };

// kind -> (part, which tensor); false for an unknown kind.
bool Decode(v1::ExpertTensorKind kind, Part* part, ExpertTensor* which) {
  for (size_t i = 0; i < kNumTensors; ++i) {
    if (kind == kWeightKinds[i] || kind == kMomentumKinds[i] || kind == kSecondMomentKinds[i]) {
      *part = kind == kWeightKinds[i]     ? Part::kWeights
              : kind == kMomentumKinds[i] ? Part::kFirst
                                          : Part::kSecond;
      *which = kAllExpertTensors[i];
      return true;
    }
  }
  return false;
}

void AppendChunks(ExpertKey expert, v1::ExpertTensorKind kind, const FloatTensor& tensor,
                  size_t max_chunk_bytes, std::vector<v1::ExpertWeightsChunk>& out) {
  if (tensor.num_elements() == 0) return;  // a ReLU expert's W3
  const auto* bytes = reinterpret_cast<const char*>(tensor.values().data());
  const size_t size = tensor.num_elements() * sizeof(float);
  size_t offset = 0;
  do {
    const size_t n = std::min(max_chunk_bytes, size - offset);
    v1::ExpertWeightsChunk& chunk = out.emplace_back();
    chunk.set_layer(expert.layer);
    chunk.set_expert_id(expert.expert);
    chunk.set_kind(kind);
    chunk.mutable_shape()->Assign(tensor.shape().begin(), tensor.shape().end());
    chunk.set_offset_bytes(offset);
    chunk.set_data(bytes + offset, n);
    offset += n;
  } while (offset < size);
}

}  // namespace

std::vector<v1::ExpertWeightsChunk> ChunkExpert(ExpertKey expert, const ExpertSnapshot& snapshot,
                                                size_t max_chunk_bytes) {
  max_chunk_bytes = std::max(max_chunk_bytes, kMinChunkBytes);
  std::vector<v1::ExpertWeightsChunk> chunks;
  for (size_t i = 0; i < kNumTensors; ++i) {
    AppendChunks(expert, kWeightKinds[i], snapshot.weights.tensor(kAllExpertTensors[i]),
                 max_chunk_bytes, chunks);
  }
  if (snapshot.velocity) {
    for (size_t i = 0; i < kNumTensors; ++i) {
      AppendChunks(expert, kMomentumKinds[i], snapshot.velocity->tensor(kAllExpertTensors[i]),
                   max_chunk_bytes, chunks);
    }
  }
  if (snapshot.second_moment) {
    for (size_t i = 0; i < kNumTensors; ++i) {
      AppendChunks(expert, kSecondMomentKinds[i],
                   snapshot.second_moment->tensor(kAllExpertTensors[i]), max_chunk_bytes, chunks);
    }
  }
  chunks.back().set_weights_digest(snapshot.weights.Digest());
  chunks.back().set_last(true);
  return chunks;
}

absl::Status ExpertAssembler::Add(const v1::ExpertWeightsChunk& chunk) {
  if (last_seen_) {
    return absl::InvalidArgumentError("weights chunk after the last one");
  }
  const ExpertKey expert(chunk.layer(), chunk.expert_id());
  if (!expert_) {
    MOE_RETURN_IF_ERROR(CheckExpertKey(model_, expert));
    expert_ = expert;
    snapshot_.weights = ExpertWeights::Zeros(model_);
  } else if (expert != *expert_) {
    return absl::InvalidArgumentError(absl::StrCat("weights chunk for ", expert.ToString(),
                                                   " in a transfer of ", expert_->ToString()));
  }
  Part part = Part::kWeights;
  ExpertTensor which;
  if (!Decode(chunk.kind(), &part, &which)) {
    return absl::InvalidArgumentError(
        absl::StrCat("weights chunk: unknown tensor kind ", chunk.kind()));
  }
  std::optional<ExpertWeights>& state =
      part == Part::kFirst ? snapshot_.velocity : snapshot_.second_moment;
  if (part != Part::kWeights && !state) state = ExpertWeights::Zeros(model_);
  FloatTensor& tensor =
      part == Part::kWeights ? snapshot_.weights.tensor(which) : state->tensor(which);
  const Shape shape(chunk.shape().begin(), chunk.shape().end());
  if (shape != tensor.shape()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "weights chunk ", v1::ExpertTensorKind_Name(chunk.kind()), ": shape ",
        ShapeString(shape), ", the model needs ", ShapeString(tensor.shape())));
  }
  const int64_t size = tensor.num_elements() * static_cast<int64_t>(sizeof(float));
  const int64_t offset = chunk.offset_bytes();
  const int64_t length = static_cast<int64_t>(chunk.data().size());
  // Without overflow: offset and length are each checked against size.
  if (offset < 0 || offset > size || length > size - offset) {
    return absl::InvalidArgumentError(absl::StrCat(
        "weights chunk ", v1::ExpertTensorKind_Name(chunk.kind()), ": ", length,
        " bytes at offset ", offset, ", outside the tensor's ", size));
  }
  if (offset != received_[chunk.kind()]) {
    return absl::InvalidArgumentError(absl::StrCat(
        "weights chunk ", v1::ExpertTensorKind_Name(chunk.kind()), ": bytes at offset ", offset,
        ", expected the next at ", received_[chunk.kind()]));
  }
  std::memcpy(reinterpret_cast<char*>(tensor.mutable_values().data()) + offset,
              chunk.data().data(), chunk.data().size());
  received_[chunk.kind()] += chunk.data().size();
  if (chunk.last()) {
    last_seen_ = true;
    digest_ = chunk.weights_digest();
    step_ = chunk.step();
  }
  return absl::OkStatus();
}

std::string ExpertAssembler::Name() const {
  return expert_ ? expert_->ToString() : "an expert (no chunk received)";
}

absl::StatusOr<ExpertSnapshot> ExpertAssembler::Finish() {
  if (!last_seen_) {
    return absl::InvalidArgumentError(
        absl::StrCat("transfer of ", Name(), " ended before its last chunk"));
  }
  for (size_t i = 0; i < kNumTensors; ++i) {
    const int64_t size = snapshot_.weights.tensor(kAllExpertTensors[i]).num_elements() * 4;
    for (v1::ExpertTensorKind kind : {kWeightKinds[i], kMomentumKinds[i], kSecondMomentKinds[i]}) {
      const bool sent = kind == kWeightKinds[i]     ? true
                        : kind == kMomentumKinds[i] ? snapshot_.velocity.has_value()
                                                    : snapshot_.second_moment.has_value();
      if (sent && received_[kind] != size) {
        return absl::InvalidArgumentError(
            absl::StrCat("transfer of ", Name(), ": ", v1::ExpertTensorKind_Name(kind),
                         " incomplete (", received_[kind], " of ", size, " bytes)"));
      }
    }
  }
  const uint64_t digest = snapshot_.weights.Digest();
  if (digest != digest_) {
    return absl::DataLossError(absl::StrCat("transfer of ", Name(), ": weights digest ", digest,
                                            " does not match the sender's ", digest_));
  }
  return std::move(snapshot_);
}

}  // namespace moe::expert
