#include "common/authorization.h"

#include <fstream>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "nlohmann/json.hpp"

namespace moe {
namespace {

using json = nlohmann::json;

bool Matches(absl::string_view pattern, absl::string_view identity) {
  if (pattern == "*") return true;
  if (absl::StartsWith(pattern, "*.")) {
    const absl::string_view suffix = pattern.substr(1);  // ".suffix"
    return identity.size() > suffix.size() && absl::EndsWith(identity, suffix);
  }
  return pattern == identity;
}

absl::StatusOr<std::vector<std::string>> StringList(const json& value, absl::string_view where) {
  if (!value.is_array()) {
    return absl::InvalidArgumentError(
        absl::StrCat("authorization policy: ", where, " must be a list of strings"));
  }
  std::vector<std::string> out;
  for (const json& item : value) {
    if (!item.is_string() || item.get<std::string>().empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("authorization policy: ", where, " must be a list of non-empty strings"));
    }
    out.push_back(item.get<std::string>());
  }
  return out;
}

}  // namespace

absl::StatusOr<AuthorizationPolicy> AuthorizationPolicy::Parse(absl::string_view text) {
  const json policy = json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/false);
  if (!policy.is_object()) {
    return absl::InvalidArgumentError("authorization policy: not a JSON object");
  }
  const auto roles = policy.find("roles");
  const auto methods = policy.find("methods");
  if (roles == policy.end() || !roles->is_object() || methods == policy.end() ||
      !methods->is_object()) {
    return absl::InvalidArgumentError(
        "authorization policy: needs a \"roles\" object and a \"methods\" object");
  }
  AuthorizationPolicy result;
  for (const auto& [role, identities] : roles->items()) {
    absl::StatusOr<std::vector<std::string>> list =
        StringList(identities, absl::StrCat("roles.", role));
    if (!list.ok()) return list.status();
    result.roles_[role] = *std::move(list);
  }
  for (const auto& [method, allowed] : methods->items()) {
    if (!absl::StartsWith(method, "/") || std::count(method.begin(), method.end(), '/') != 2) {
      return absl::InvalidArgumentError(absl::StrCat("authorization policy: method \"", method,
                                                     "\" is not /package.Service/Method"));
    }
    absl::StatusOr<std::vector<std::string>> list =
        StringList(allowed, absl::StrCat("methods.", method));
    if (!list.ok()) return list.status();
    for (const std::string& role : *list) {
      if (result.roles_.count(role) == 0) {
        return absl::InvalidArgumentError(absl::StrCat("authorization policy: method \"", method,
                                                       "\" names unknown role \"", role, "\""));
      }
    }
    result.methods_[method] = *std::move(list);
  }
  return result;
}

absl::StatusOr<AuthorizationPolicy> AuthorizationPolicy::Load(const std::string& path) {
  constexpr std::streamsize kMaxBytes = 1 << 20;
  std::ifstream file(path);
  if (!file) {
    return absl::InvalidArgumentError(
        absl::StrCat("authorization policy ", path, ": cannot read it"));
  }
  std::string text(kMaxBytes + 1, '\0');
  file.read(text.data(), text.size());
  if (file.gcount() > kMaxBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("authorization policy ", path, ": larger than ", kMaxBytes, " bytes"));
  }
  text.resize(file.gcount());
  absl::StatusOr<AuthorizationPolicy> policy = Parse(text);
  if (!policy.ok()) {
    return absl::Status(policy.status().code(),
                        absl::StrCat(path, ": ", policy.status().message()));
  }
  return policy;
}

const std::vector<std::string>* AuthorizationPolicy::RolesOf(absl::string_view method) const {
  if (auto it = methods_.find(method); it != methods_.end()) return &it->second;
  const size_t slash = method.rfind('/');
  if (slash == absl::string_view::npos || slash == 0) return nullptr;
  if (auto it = methods_.find(absl::StrCat(method.substr(0, slash), "/*")); it != methods_.end()) {
    return &it->second;
  }
  return nullptr;
}

bool AuthorizationPolicy::Names(absl::string_view method) const {
  return RolesOf(method) != nullptr;
}

absl::Status AuthorizationPolicy::Check(absl::string_view method,
                                        absl::Span<const std::string> identities) const {
  const std::vector<std::string>* allowed = RolesOf(method);
  if (allowed != nullptr) {
    for (const std::string& role : *allowed) {
      for (const std::string& pattern : roles_.at(role)) {
        if (pattern == "*") return absl::OkStatus();
        for (const std::string& identity : identities) {
          if (Matches(pattern, identity)) return absl::OkStatus();
        }
      }
    }
  }
  // The method name comes from the request: shown, but not at any length.
  return absl::PermissionDeniedError(absl::StrCat(
      "permission denied: ", method.substr(0, 200), " for identity ",
      identities.empty() ? std::string("(no client certificate)")
                         : absl::StrCat("[", absl::StrJoin(identities, ", "), "]"),
      allowed == nullptr ? std::string(" (the policy allows this method to no one)")
                         : absl::StrCat(" (allowed: ", absl::StrJoin(*allowed, ", "), ")")));
}

}  // namespace moe
