#include "expert_service/lease_table.h"

#include "absl/strings/str_cat.h"

namespace moe::expert {
namespace {

bool PlainName(const std::string& name) {
  for (char c : name) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                    c == '.' || c == '_' || c == '-';
    if (!ok) return false;
  }
  return true;
}

}  // namespace

absl::StatusOr<LeaseTable::Lease> LeaseTable::Acquire(const std::string& name,
                                                      const std::string& holder, absl::Duration ttl,
                                                      absl::Time now) {
  if (name.empty() || name.size() > kMaxNameBytes || !PlainName(name)) {
    return absl::InvalidArgumentError(absl::StrCat("lease name: 1 to ", kMaxNameBytes,
                                                   " bytes of [A-Za-z0-9._-], got ", name.size(),
                                                   " bytes"));
  }
  if (holder.empty() || holder.size() > kMaxHolderBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("lease holder: 1 to ", kMaxHolderBytes, " bytes, got ", holder.size()));
  }
  if (ttl <= absl::ZeroDuration() || ttl > kMaxTtl) {
    return absl::InvalidArgumentError(absl::StrCat(
        "lease ttl: in (0, ", absl::FormatDuration(kMaxTtl), "], got ", absl::FormatDuration(ttl)));
  }
  absl::MutexLock lock(&mu_);
  auto it = leases_.find(name);
  if (it == leases_.end()) {
    if (leases_.size() >= kMaxLeases) {
      // Expired leases make room.
      for (auto e = leases_.begin(); e != leases_.end();) {
        if (e->second.expiry <= now) {
          leases_.erase(e++);
        } else {
          ++e;
        }
      }
      if (leases_.size() >= kMaxLeases) {
        return absl::ResourceExhaustedError(
            absl::StrCat("this server keeps at most ", kMaxLeases, " leases"));
      }
    }
    it = leases_.emplace(name, Lease{}).first;
  }
  Lease& lease = it->second;
  if (lease.holder.empty() || lease.holder == holder || lease.expiry <= now) {
    lease.holder = holder;
    lease.expiry = now + ttl;
  }
  Lease answer = lease;
  answer.granted = lease.holder == holder;
  return answer;
}

}  // namespace moe::expert
