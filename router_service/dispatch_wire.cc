#include "router_service/dispatch_wire.h"

#include <memory>
#include <string>
#include <vector>

#include "common/log.h"
#include "common/proto_wire.h"

namespace grpc {

Status SerializationTraits<moe::router::DispatchWire, void>::Serialize(
    const moe::router::DispatchWire& wire, ByteBuffer* buffer, bool* own_buffer) {
  std::string head = wire.request->SerializeAsString();
  if (!wire.rows.empty()) {
    std::string data_key;
    moe::AppendLengthDelimited(moe::v1::Tensor::kDataFieldNumber, wire.rows.size(), data_key);
    moe::AppendLengthDelimited(moe::v1::DispatchRequest::kTokensFieldNumber,
                               data_key.size() + wire.rows.size(), head);
    head += data_key;
  }
  // The rows stay the caller's until written (STATIC: not freed by gRPC).
  Slice slices[2] = {Slice(head), Slice(wire.rows.data(), wire.rows.size(), Slice::STATIC_SLICE)};
  *buffer = ByteBuffer(slices, wire.rows.empty() ? 1 : 2);
  *own_buffer = true;
  return Status::OK;
}

Status SerializationTraits<moe::router::ExpertAnswer, void>::Deserialize(
    ByteBuffer* buffer, moe::router::ExpertAnswer* answer) {
  auto slices = std::make_shared<std::vector<Slice>>();
  const Status dumped = buffer->Dump(slices.get());
  buffer->Clear();
  if (!dumped.ok()) return dumped;
  std::vector<absl::string_view> pieces;
  pieces.reserve(slices->size());
  for (const Slice& slice : *slices) {
    pieces.emplace_back(reinterpret_cast<const char*>(slice.begin()), slice.size());
  }
  absl::StatusOr<moe::router::ExpertAnswer> parsed =
      moe::router::ExpertAnswer::FromWire(pieces, std::move(slices));
  if (!parsed.ok()) {
    MOE_LOG(WARNING, parsed.status().message());
    return Status(StatusCode::INTERNAL, std::string(parsed.status().message()));
  }
  *answer = *std::move(parsed);
  return Status::OK;
}

}  // namespace grpc
