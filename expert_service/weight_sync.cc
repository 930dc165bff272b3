#include "expert_service/weight_sync.h"

#include <thread>

#include "absl/strings/str_cat.h"
#include "common/log.h"
#include "common/status_macros.h"
#include "expert_service/weight_transfer.h"

namespace moe::expert {
namespace {

// A peer holding `expert` at `step`, with the digest it reports.
struct Holder {
  int peer;
  uint64_t digest;
};

// Pulls `expert` from `peer` and checks it against the sender's digest
// (the assembler's) and the one the peer's Info reported.
absl::StatusOr<ExpertSnapshot> Fetch(SyncPeers& peers, const ModelConfig& model, ExpertKey expert,
                                     const Holder& holder, absl::Time deadline, int64_t& bytes) {
  ExpertAssembler assembler(model);
  MOE_RETURN_IF_ERROR(
      peers.FetchExpert(holder.peer, expert, deadline, [&](const v1::ExpertWeightsChunk& chunk) {
        bytes += static_cast<int64_t>(chunk.data().size());
        return assembler.Add(chunk);
      }));
  if (assembler.expert() != expert) {
    return absl::DataLossError(absl::StrCat(
        "asked for ", expert.ToString(), ", got ",
        assembler.expert() ? assembler.expert()->ToString() : std::string("no chunk")));
  }
  MOE_ASSIGN_OR_RETURN(ExpertSnapshot snapshot, assembler.Finish());
  // Finish() checked the bytes against the sender's digest.
  if (assembler.digest() != holder.digest) {
    return absl::DataLossError(absl::StrCat("weights digest ", assembler.digest(),
                                            " differs from the one its Info reported, ",
                                            holder.digest, " (committed meanwhile?)"));
  }
  return snapshot;
}

}  // namespace

std::vector<absl::StatusOr<v1::InfoResponse>> AskEveryPeer(SyncPeers& peers, absl::Time deadline) {
  std::vector<absl::StatusOr<v1::InfoResponse>> infos(peers.num_peers(),
                                                      absl::UnknownError("not asked"));
  std::vector<std::thread> askers;
  for (int p = 0; p < peers.num_peers(); ++p) {
    askers.emplace_back([&, p] { infos[p] = peers.Info(p, deadline); });
  }
  for (std::thread& t : askers) t.join();
  return infos;
}

absl::StatusOr<SyncResult> SyncFromPeers(ExpertStore& store, SyncPeers& peers,
                                         absl::Time info_deadline, absl::Time deadline) {
  const absl::Time start = absl::Now();
  SyncResult result;
  const std::vector<absl::StatusOr<v1::InfoResponse>> infos = AskEveryPeer(peers, info_deadline);
  for (int p = 0; p < peers.num_peers(); ++p) {
    if (!infos[p].ok()) {
      MOE_LOG(INFO, "sync: peer ", peers.name(p), " did not answer Info (",
              infos[p].status().message(), ")");
      continue;
    }
    ++result.peers_answered;
    result.cluster_step = std::max<uint64_t>(result.cluster_step, infos[p]->step());
  }
  const uint64_t target = result.cluster_step;
  for (ExpertKey expert : store.HostedExperts()) {
    MOE_ASSIGN_OR_RETURN(const uint64_t step, store.Step(expert));
    if (step >= target) continue;
    std::vector<Holder> holders;
    for (int p = 0; p < peers.num_peers(); ++p) {
      if (!infos[p].ok()) continue;
      for (const v1::ExpertDigest& d : infos[p]->experts()) {
        if (ExpertKeyOf(d) == expert && d.step() == target)
          holders.push_back({p, d.weights_digest()});
      }
    }
    bool installed = false;
    for (const Holder& holder : holders) {
      absl::StatusOr<ExpertSnapshot> snapshot =
          Fetch(peers, store.model(), expert, holder, deadline, result.bytes);
      if (!snapshot.ok()) {
        MOE_LOG(WARNING, "sync: ", expert.ToString(), " from ", peers.name(holder.peer),
                " failed: ", snapshot.status().message());
        continue;
      }
      MOE_RETURN_IF_ERROR(store.SwapInWeights(expert, *snapshot, target));
      MOE_LOG(INFO, "sync: ", expert.ToString(), " at step ", target, " from ",
              peers.name(holder.peer));
      result.synced.push_back(expert);
      installed = true;
      break;
    }
    if (!installed) {
      MOE_LOG(ERROR, "sync: ", expert.ToString(), " stays at step ", step,
              holders.empty() ? absl::StrCat(": no answering peer holds it at step ", target)
                              : absl::StrCat(": every transfer failed"),
              "; calls for step ", target, " are refused until it is synced or loaded");
      result.behind.push_back(expert);
    }
  }
  result.elapsed = absl::Now() - start;
  return result;
}

}  // namespace moe::expert
