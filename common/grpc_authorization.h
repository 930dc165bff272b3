// The gRPC side of AuthorizationPolicy: an AuthMetadataProcessor on a
// server's TLS credentials that runs before every call of every service on
// the port (health and reflection included) and refuses it with
// PERMISSION_DENIED unless the policy lets the peer's certificate identity
// (its subject alternative names) call the method (":path").
#ifndef MOE_COMMON_GRPC_AUTHORIZATION_H_
#define MOE_COMMON_GRPC_AUTHORIZATION_H_

#include <grpcpp/security/auth_metadata_processor.h>

#include <functional>
#include <memory>
#include <string>

#include "absl/strings/string_view.h"
#include "common/authorization.h"

namespace moe {

// Called once per denied call with the method, or "other" for a method the
// policy does not name (metric labels stay bounded).
using OnDenied = std::function<void(absl::string_view method)>;

class PolicyAuthProcessor : public grpc::AuthMetadataProcessor {
 public:
  PolicyAuthProcessor(std::shared_ptr<const AuthorizationPolicy> policy, OnDenied on_denied)
      : policy_(std::move(policy)), on_denied_(std::move(on_denied)) {}

  // Decides from memory: runs inline, on the call's thread.
  bool IsBlocking() const override { return false; }
  grpc::Status Process(const InputMetadata& auth_metadata, grpc::AuthContext* context,
                       OutputMetadata* consumed_auth_metadata,
                       OutputMetadata* response_metadata) override;

 private:
  const std::shared_ptr<const AuthorizationPolicy> policy_;
  const OnDenied on_denied_;
};

}  // namespace moe

#endif  // MOE_COMMON_GRPC_AUTHORIZATION_H_
