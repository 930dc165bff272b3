// Dispatch on the router's side of the wire, its rows never copied into or
// out of a protobuf message.
//
// Out: a DispatchRequest with its token rows as a slice of their own: the
// request (its tokens with shape and dtype only) serialized by protobuf,
// then field `tokens` again holding only `data`, whose bytes are the rows
// where the router gathered them. Protobuf merges the two occurrences, so
// the server reads a plain DispatchRequest.
//
// In: a DispatchResponse read as an ExpertAnswer, the output's bytes left
// in the slices they arrived in (Combine reads them there).
#ifndef MOE_ROUTER_SERVICE_DISPATCH_WIRE_H_
#define MOE_ROUTER_SERVICE_DISPATCH_WIRE_H_

#include <grpcpp/impl/codegen/serialization_traits.h>
#include <grpcpp/support/byte_buffer.h>

#include <cstdint>
#include <memory>

#include "absl/strings/string_view.h"
#include "proto/expert.pb.h"
#include "router_service/expert_answer.h"

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

template <>
class SerializationTraits<moe::router::ExpertAnswer, void> {
 public:
  static Status Serialize(const moe::router::ExpertAnswer&, ByteBuffer*, bool*) {
    return Status(StatusCode::UNIMPLEMENTED, "ExpertAnswer is only received");
  }
  // Keeps the buffer's slices (no copy). A malformed answer is an error,
  // logged: gRPC then fails the read, and the stream is ended.
  static Status Deserialize(ByteBuffer* buffer, moe::router::ExpertAnswer* answer);
};

}  // namespace grpc

#endif  // MOE_ROUTER_SERVICE_DISPATCH_WIRE_H_
