// A DispatchRequest on the wire with its token rows as a slice of their own,
// not copied into the message: the request (its tokens with shape and dtype
// only) serialized by protobuf, then field `tokens` again holding only
// `data`, whose bytes are the rows where the router gathered them. Protobuf
// merges the two occurrences, so the server reads a plain DispatchRequest.
// Serialization only (the router never reads one).
#ifndef MOE_ROUTER_SERVICE_DISPATCH_WIRE_H_
#define MOE_ROUTER_SERVICE_DISPATCH_WIRE_H_

#include <grpcpp/impl/codegen/serialization_traits.h>
#include <grpcpp/support/byte_buffer.h>

#include <cstdint>
#include <memory>

#include "absl/strings/string_view.h"
#include "proto/expert.pb.h"

namespace moe::router {

struct DispatchWire {
  // Every field but tokens.data. Both it and `rows` must stay valid until
  // the message has been written.
  const v1::DispatchRequest* request = nullptr;
  absl::string_view rows;
  // A one-way message (a cancel) owns its request.
  std::unique_ptr<v1::DispatchRequest> owned;

  uint64_t sequence_id() const { return request->sequence_id(); }
};

}  // namespace moe::router

namespace grpc {

template <>
class SerializationTraits<moe::router::DispatchWire, void> {
 public:
  static Status Serialize(const moe::router::DispatchWire& wire, ByteBuffer* buffer,
                          bool* own_buffer);
  static Status Deserialize(ByteBuffer*, moe::router::DispatchWire*) {
    return Status(StatusCode::UNIMPLEMENTED, "DispatchWire is only sent");
  }
};

}  // namespace grpc

#endif  // MOE_ROUTER_SERVICE_DISPATCH_WIRE_H_
