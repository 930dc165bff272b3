// The Collective service: each Ring stream brings one predecessor's segments.
// A segment is handed to the registry, its verdict written back as the ack,
// and only then is the next segment read: segments of a step stay in order,
// and a segment waiting (parked) for its collective holds back its stream.
// When a stream ends, the collectives it fed fail at once.
//
// The service implements moe.v1.Collective (proto/collective.proto) by hand
// rather than through the generated base class, so that segments are read
// as ReceivedSegment: their data is added to the collective's buffer
// straight from the slices it arrived in.
#ifndef MOE_EXPERT_SERVICE_ALLREDUCE_COLLECTIVE_SERVICE_H_
#define MOE_EXPERT_SERVICE_ALLREDUCE_COLLECTIVE_SERVICE_H_

#include <grpcpp/impl/service_type.h>

#include "expert_service/allreduce/collective_registry.h"
#include "expert_service/allreduce/ring_segment.h"
#include "proto/collective.pb.h"

namespace moe::allreduce {

class CollectiveService final : public grpc::Service {
 public:
  // `registry` must outlive the service's streams.
  explicit CollectiveService(CollectiveRegistry* registry);

 private:
  CollectiveRegistry* const registry_;
};

}  // namespace moe::allreduce

#endif  // MOE_EXPERT_SERVICE_ALLREDUCE_COLLECTIVE_SERVICE_H_
