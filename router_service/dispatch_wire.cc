#include "router_service/dispatch_wire.h"

#include <string>

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

}  // namespace grpc
