#include "expert_service/allreduce/grpc_ring_link.h"

#include "common/proto_status.h"

namespace moe::allreduce {

GrpcRingLink::GrpcRingLink(std::string name, const std::string& address,
                           const TransportCredentials& credentials, int max_message_bytes,
                           absl::Duration min_backoff, absl::Duration max_backoff)
    : channel_(KeepaliveChannel(address, credentials, max_message_bytes, min_backoff,
                                max_backoff)),
      stub_(std::make_unique<Stub>(channel_)) {
  Stub* stub = stub_.get();
  session_ = std::make_unique<ClientStreamSession<RingSegment, v1::RingAck>>(
      absl::StrCat(name, " Ring"),
      [stub](grpc::ClientContext* context,
             grpc::ClientBidiReactor<RingSegment, v1::RingAck>* reactor) {
        stub->PrepareBidiStreamingCall(context, kRingMethod, grpc::StubOptions(), reactor);
      },
      min_backoff, max_backoff);
}

void GrpcRingLink::Send(const RingHeader& header, absl::Span<const float> data,
                        AckDone done) {
  // The message lives until its ack; its data is a slice over `data`.
  auto segment = std::make_unique<RingSegment>();
  RingHeaderToChunk(header, &segment->header);
  segment->header.set_sequence_id(next_sequence_.fetch_add(1));
  segment->data = data.data();
  segment->length = static_cast<int64_t>(data.size());
  const RingSegment& message = *segment;
  session_->Send(message, [segment = std::move(segment), done = std::move(done)](
                              absl::StatusOr<std::unique_ptr<v1::RingAck>> ack) mutable {
    if (!ack.ok()) {
      std::move(done)(ack.status());
    } else if ((*ack)->has_error()) {
      std::move(done)(FromProtoStatus((*ack)->error()));
    } else {
      std::move(done)(absl::OkStatus());
    }
  });
}

}  // namespace moe::allreduce
