#include "expert_service/lease_table.h"

#include <algorithm>

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

absl::Status CheckNames(const std::string& name, const std::string& holder) {
  if (name.empty() || name.size() > LeaseTable::kMaxNameBytes || !PlainName(name)) {
    return absl::InvalidArgumentError(absl::StrCat("lease name: 1 to ", LeaseTable::kMaxNameBytes,
                                                   " bytes of [A-Za-z0-9._-], got ", name.size(),
                                                   " bytes"));
  }
  if (holder.empty() || holder.size() > LeaseTable::kMaxHolderBytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "lease holder: 1 to ", LeaseTable::kMaxHolderBytes, " bytes, got ", holder.size()));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<LeaseTable::Lease> LeaseTable::Release(const std::string& name,
                                                      const std::string& holder, absl::Time now) {
  if (absl::Status bad = CheckNames(name, holder); !bad.ok()) return bad;
  absl::MutexLock lock(&mu_);
  auto it = leases_.find(name);
  if (it == leases_.end()) return Lease{};
  if (it->second.holder == holder) it->second.expiry = std::min(it->second.expiry, now);
  Lease answer = it->second;
  answer.granted = false;
  return answer;
}

absl::StatusOr<LeaseTable::Lease> LeaseTable::Acquire(const std::string& name,
                                                      const std::string& holder, absl::Duration ttl,
                                                      absl::Time now) {
  if (absl::Status bad = CheckNames(name, holder); !bad.ok()) return bad;
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

absl::StatusOr<v1::AcquireLeaseResponse> AnswerLeaseRequest(LeaseTable& table,
                                                            const v1::AcquireLeaseRequest& request,
                                                            absl::Time now) {
  const absl::StatusOr<LeaseTable::Lease> lease =
      request.release() ? table.Release(request.name(), request.holder(), now)
                        : table.Acquire(request.name(), request.holder(),
                                        LeaseTable::TtlFromMillis(request.ttl_ms()), now);
  if (!lease.ok()) return lease.status();
  v1::AcquireLeaseResponse response;
  response.set_granted(lease->granted);
  response.set_holder(lease->holder);
  response.set_expires_in_ms(std::max<int64_t>(0, absl::ToInt64Milliseconds(lease->expiry - now)));
  return response;
}

}  // namespace moe::expert
