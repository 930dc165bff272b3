#include "common/grpc_authorization.h"

#include <vector>

#include "common/log.h"

namespace moe {

grpc::Status PolicyAuthProcessor::Process(const InputMetadata& auth_metadata,
                                          grpc::AuthContext* context, OutputMetadata*,
                                          OutputMetadata*) {
  const auto path = auth_metadata.find(":path");
  const absl::string_view method =
      path == auth_metadata.end() ? absl::string_view()
                                  : absl::string_view(path->second.data(), path->second.size());
  std::vector<std::string> identities;
  for (const grpc::string_ref& san : context->FindPropertyValues("x509_subject_alternative_name")) {
    identities.emplace_back(san.data(), san.size());
  }
  const absl::Status status = policy_->Check(method, identities);
  if (status.ok()) return grpc::Status::OK;
  MOE_LOG(WARNING, status.message());
  if (on_denied_) on_denied_(policy_->Names(method) ? method : absl::string_view("other"));
  return grpc::Status(grpc::StatusCode::PERMISSION_DENIED, std::string(status.message()));
}

}  // namespace moe
