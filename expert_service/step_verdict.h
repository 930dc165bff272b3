// What became of a prepared training step whose router said nothing: the
// verdict from what the other servers report of their steps. Pure logic,
// no transport: the step executor asks the peers (their Info) and acts.
#ifndef MOE_EXPERT_SERVICE_STEP_VERDICT_H_
#define MOE_EXPERT_SERVICE_STEP_VERDICT_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace moe::expert {

// What a peer reports of its steps (its Info).
struct PeerSteps {
  uint64_t committed = 0;
  // The step prepared there, awaiting its outcome (0: none).
  uint64_t prepared = 0;
  // The highest step aborted there while preparing or prepared.
  uint64_t aborted = 0;
};

struct PeerAnswer {
  std::string name;
  absl::StatusOr<PeerSteps> steps;
};

// What became of prepared step `step` that heard nothing from its router,
// by its peers' answers: committed when one has committed it (the router
// decided commit, and its commit to this server was lost); aborted when
// one has aborted it, or when every peer answered and none committed it
// (the router never committed anywhere, and no longer can: the inquiry
// runs after the step's deadline, and the router holds the step lease for
// no longer); in doubt otherwise (a peer that may have committed does not
// answer).
struct StepVerdict {
  enum Outcome { kCommitted, kAborted, kInDoubt };
  Outcome outcome = kInDoubt;
  std::string why;
};
StepVerdict DecideFromPeers(uint64_t step, absl::Span<const PeerAnswer> peers);

}  // namespace moe::expert

#endif  // MOE_EXPERT_SERVICE_STEP_VERDICT_H_
