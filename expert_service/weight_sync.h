// Rejoin by sync: a server that (re)starts behind the cluster pulls the
// committed weights (and optimizer state) of each expert it hosts from a
// peer replica, checks them against the peer's digest, and installs them
// at the peer's step, before it serves anything. Transport-free: peers are
// reached through the SyncPeers seam (gRPC in grpc_sync_peers.h, the
// dispatchers of an in-process cluster in tests).
#ifndef MOE_EXPERT_SERVICE_WEIGHT_SYNC_H_
#define MOE_EXPERT_SERVICE_WEIGHT_SYNC_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "common/expert_key.h"
#include "expert_service/expert_store.h"
#include "proto/expert.pb.h"

namespace moe::expert {

// The other servers of the cluster, as the sync sees them.
class SyncPeers {
 public:
  virtual ~SyncPeers() = default;

  virtual int num_peers() const = 0;
  // For messages.
  virtual std::string name(int peer) const = 0;
  // The peer's Info: its committed step and its experts' digests and steps.
  [[nodiscard]] virtual absl::StatusOr<v1::InfoResponse> Info(int peer, absl::Time deadline) = 0;
  // Streams `expert`'s chunks (GetExpertWeights) into `sink`, which may
  // stop the transfer with an error.
  [[nodiscard]] virtual absl::Status FetchExpert(
      int peer, ExpertKey expert, absl::Time deadline,
      absl::FunctionRef<absl::Status(const v1::ExpertWeightsChunk&)> sink) = 0;
  // The gate the peer keeps for its committed step (GetGate).
  [[nodiscard]] virtual absl::StatusOr<v1::GetGateResponse> Gate(int peer, absl::Time deadline) = 0;
};

struct SyncResult {
  // The highest committed step a peer reported (0: none answered, or the
  // cluster never trained).
  uint64_t cluster_step = 0;
  // Peers that answered Info.
  int peers_answered = 0;
  // Experts installed at cluster_step from a peer.
  std::vector<ExpertKey> synced;
  // Hosted experts left at an older step: no answering peer holds them at
  // cluster_step (or every transfer failed). Calls for the committed step
  // are refused for them (FAILED_PRECONDITION naming both steps).
  std::vector<ExpertKey> behind;
  int64_t bytes = 0;
  absl::Duration elapsed;
};

// Every peer's Info, asked at once (at a cold start most peers are not up,
// and each costs a connection attempt), each by `deadline`.
std::vector<absl::StatusOr<v1::InfoResponse>> AskEveryPeer(SyncPeers& peers, absl::Time deadline);

// Asks every peer's Info (in parallel, each by `info_deadline`), takes the
// highest committed step S, and for each expert of `store` older than S
// fetches it from a peer that holds it at S (trying the next such peer when
// a transfer fails or its digest does not match the peer's Info), then
// installs it at step S. An error only for a broken store; peers that do
// not answer are skipped (at a cold start none do).
absl::StatusOr<SyncResult> SyncFromPeers(ExpertStore& store, SyncPeers& peers,
                                         absl::Time info_deadline, absl::Time deadline);

}  // namespace moe::expert

#endif  // MOE_EXPERT_SERVICE_WEIGHT_SYNC_H_
