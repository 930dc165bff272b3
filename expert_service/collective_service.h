// The Collective service: each Ring stream brings one predecessor's segments.
// A segment is handed to the registry, its verdict written back as the ack,
// and only then is the next segment read: segments of a step stay in order,
// and a segment waiting (parked) for its collective holds back its stream.
// When a stream ends, the collectives it fed fail at once.
#ifndef MOE_EXPERT_SERVICE_COLLECTIVE_SERVICE_H_
#define MOE_EXPERT_SERVICE_COLLECTIVE_SERVICE_H_

#include "expert_service/collective_registry.h"
#include "proto/collective.grpc.pb.h"

namespace moe::expert {

class CollectiveService final : public v1::Collective::CallbackService {
 public:
  // `registry` must outlive the service's streams.
  explicit CollectiveService(CollectiveRegistry* registry) : registry_(registry) {}

  grpc::ServerBidiReactor<v1::RingChunk, v1::RingAck>* Ring(
      grpc::CallbackServerContext* context) override;

 private:
  CollectiveRegistry* const registry_;
};

}  // namespace moe::expert

#endif  // MOE_EXPERT_SERVICE_COLLECTIVE_SERVICE_H_
