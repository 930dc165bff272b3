// RingLink over gRPC: one persistent Ring stream to the successor, shared by
// every collective that sends to it; acks matched by sequence id. Segments
// go out as RingSegment (their data a slice over the collective's buffer,
// not copied into a message) through the generic stub; the successor's
// Collective service reads them as RingChunk. A broken stream fails the
// pending sends with UNAVAILABLE naming the peer and is reopened on the next
// send after a short back-off (a restarted peer is used again at the next
// step). Thread-safe.
#ifndef MOE_EXPERT_SERVICE_ALLREDUCE_GRPC_RING_LINK_H_
#define MOE_EXPERT_SERVICE_ALLREDUCE_GRPC_RING_LINK_H_

#include <atomic>
#include <memory>
#include <string>

#include <grpcpp/generic/generic_stub.h>

#include "absl/time/time.h"
#include "common/client_stream_session.h"
#include "common/transport_credentials.h"
#include "expert_service/allreduce/ring_link.h"
#include "expert_service/allreduce/ring_segment.h"
#include "proto/collective.grpc.pb.h"  // protobuf serialization of RingAck

namespace moe::allreduce {

class GrpcRingLink : public RingLink {
 public:
  // `name` names the peer in errors ("server expert-1 (10.0.0.2:50051)").
  GrpcRingLink(std::string name, const std::string& address,
               const TransportCredentials& credentials, int max_message_bytes,
               absl::Duration min_backoff = absl::Milliseconds(50),
               absl::Duration max_backoff = absl::Seconds(1));

  void Send(const RingHeader& header, absl::Span<const float> data, AckDone done) override;
  void RetryNow() override { session_->RetryNow(); }

 private:
  using Stub = grpc::TemplatedGenericStub<RingSegment, v1::RingAck>;

  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<Stub> stub_;
  std::atomic<uint64_t> next_sequence_{1};
  // Last: closed (and waited for) before the stub goes.
  std::unique_ptr<ClientStreamSession<RingSegment, v1::RingAck>> session_;
};

}  // namespace moe::allreduce

#endif  // MOE_EXPERT_SERVICE_ALLREDUCE_GRPC_RING_LINK_H_
