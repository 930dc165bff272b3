#include "expert_service/grpc_ring_link.h"

#include "common/grpc_status.h"

namespace moe::expert {

GrpcRingLink::GrpcRingLink(std::string name, const std::string& address,
                           int max_message_bytes, absl::Duration min_backoff,
                           absl::Duration max_backoff)
    : channel_(KeepaliveChannel(address, max_message_bytes, min_backoff, max_backoff)),
      stub_(v1::Collective::NewStub(channel_)) {
  v1::Collective::Stub* stub = stub_.get();
  session_ = std::make_unique<ClientStreamSession<v1::RingChunk, v1::RingAck>>(
      absl::StrCat(name, " Ring"),
      [stub](grpc::ClientContext* context,
             grpc::ClientBidiReactor<v1::RingChunk, v1::RingAck>* reactor) {
        stub->async()->Ring(context, reactor);
      },
      min_backoff, max_backoff);
}

void GrpcRingLink::Send(v1::RingChunk* chunk, AckDone done) {
  chunk->set_sequence_id(next_sequence_.fetch_add(1));
  session_->Send(*chunk, [done = std::move(done)](
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

}  // namespace moe::expert
