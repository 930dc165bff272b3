#include "expert_service/step_verdict.h"

#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace moe::expert {

StepVerdict DecideFromPeers(uint64_t step, absl::Span<const PeerAnswer> peers) {
  std::vector<std::string> silent;
  for (const PeerAnswer& peer : peers) {
    if (!peer.steps.ok()) {
      silent.push_back(absl::StrCat(peer.name, " (", peer.steps.status().message(), ")"));
      continue;
    }
    if (peer.steps->committed >= step) {
      return {StepVerdict::kCommitted,
              absl::StrCat(peer.name, " has committed step ", peer.steps->committed)};
    }
  }
  for (const PeerAnswer& peer : peers) {
    if (peer.steps.ok() && peer.steps->aborted >= step) {
      return {StepVerdict::kAborted, absl::StrCat(peer.name, " has aborted it")};
    }
  }
  if (silent.empty()) {
    return {StepVerdict::kAborted,
            peers.empty() ? std::string("no peer could have committed it")
                          : absl::StrCat("none of the ", peers.size(), " peers committed it")};
  }
  return {StepVerdict::kInDoubt, absl::StrCat("no peer that answered committed or aborted it; ",
                                              "not answering: ", absl::StrJoin(silent, ", "))};
}

}  // namespace moe::expert
