// Named leases an expert server keeps for the routers, so that one of them
// decides at a time (an automatic Rebalance): a lease is granted to a
// holder when it is free, expired, or already that holder's (a renewal),
// for a bounded time. Bounded: a few names, short names and holders, a
// time-to-live of at most 10 minutes. Thread-safe.
#ifndef MOE_EXPERT_SERVICE_LEASE_TABLE_H_
#define MOE_EXPERT_SERVICE_LEASE_TABLE_H_

#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "proto/expert.pb.h"

namespace moe::expert {

class LeaseTable {
 public:
  static constexpr int kMaxLeases = 16;
  static constexpr size_t kMaxNameBytes = 64;
  static constexpr size_t kMaxHolderBytes = 256;
  static constexpr absl::Duration kMaxTtl = absl::Minutes(10);

  struct Lease {
    bool granted = false;
    // Who holds it now, until when.
    std::string holder;
    absl::Time expiry;
  };

  // INVALID_ARGUMENT for a name that is empty, too long or not
  // [A-Za-z0-9._-], an empty or too long holder, or a ttl outside
  // (0, kMaxTtl]; RESOURCE_EXHAUSTED for a new name beyond kMaxLeases
  // (expired leases make room).
  absl::StatusOr<Lease> Acquire(const std::string& name, const std::string& holder,
                                absl::Duration ttl, absl::Time now) ABSL_LOCKS_EXCLUDED(mu_);
  // Frees the lease when `holder` holds it (a holder that is done need not
  // wait for its expiry); the same errors as Acquire for a bad name or
  // holder. The answer is never granted.
  absl::StatusOr<Lease> Release(const std::string& name, const std::string& holder, absl::Time now)
      ABSL_LOCKS_EXCLUDED(mu_);
  // A wire ttl in milliseconds as a duration; out of (0, kMaxTtl] (any
  // int64, no overflow): zero, which Acquire refuses.
  static absl::Duration TtlFromMillis(int64_t ms) {
    return ms > 0 && ms <= absl::ToInt64Milliseconds(kMaxTtl) ? absl::Milliseconds(ms)
                                                              : absl::ZeroDuration();
  }

 private:
  absl::Mutex mu_;
  absl::flat_hash_map<std::string, Lease> leases_ ABSL_GUARDED_BY(mu_);
};

// An AcquireLease call (a release when it asks for one), answered from
// `table`.
absl::StatusOr<v1::AcquireLeaseResponse> AnswerLeaseRequest(LeaseTable& table,
                                                            const v1::AcquireLeaseRequest& request,
                                                            absl::Time now);

}  // namespace moe::expert

#endif  // MOE_EXPERT_SERVICE_LEASE_TABLE_H_
