// Who may call which RPC: a policy that maps identities (the subject
// alternative names of the peer's verified TLS certificate) to roles, and
// full method names to the roles allowed to call them. Default deny: a
// method the policy does not name is refused, as is a peer without a role
// it needs. Transport-free; the gRPC glue is grpc_authorization.h.
//
// Policy file (JSON), checked as hostile input:
//   {"roles":   {"inference": ["*"], "cluster": ["router", "*.moe-expert.ns.svc"]},
//    "methods": {"/moe.v1.Router/Forward": ["inference"],
//                "/moe.v1.ExpertServer/*": ["cluster"]}}
// An identity pattern is exact, "*.suffix" (one or more leading labels), or
// "*" (any peer, with or without a certificate). A method key is a full
// name, or "/package.Service/*" for every method of a service; the exact
// entry wins over the service's. Thread-safe (immutable).
#ifndef MOE_COMMON_AUTHORIZATION_H_
#define MOE_COMMON_AUTHORIZATION_H_

#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace moe {

class AuthorizationPolicy {
 public:
  static absl::StatusOr<AuthorizationPolicy> Parse(absl::string_view json);
  static absl::StatusOr<AuthorizationPolicy> Load(const std::string& path);

  // OK, or PERMISSION_DENIED naming the method, the identities and the roles
  // that may call it.
  absl::Status Check(absl::string_view method, absl::Span<const std::string> identities) const;
  // Whether the policy names `method` (exactly or by its service), for
  // bounded metric labels.
  bool Names(absl::string_view method) const;

 private:
  const std::vector<std::string>* RolesOf(absl::string_view method) const;

  // role -> identity patterns
  std::map<std::string, std::vector<std::string>> roles_;
  // method (or "/pkg.Service/*") -> roles
  std::map<std::string, std::vector<std::string>, std::less<>> methods_;
};

}  // namespace moe

#endif  // MOE_COMMON_AUTHORIZATION_H_
