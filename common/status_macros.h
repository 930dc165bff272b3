// Status propagation macros. Abseil 20220623 has none; the MOE_ prefix keeps
// them apart from gRPC's, TensorFlow's and Triton's RETURN_IF_ERROR.
#ifndef MOE_COMMON_STATUS_MACROS_H_
#define MOE_COMMON_STATUS_MACROS_H_

#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

// Returns the status of `expr` from the enclosing function if it is not OK.
#define MOE_RETURN_IF_ERROR(expr)                        \
  do {                                                   \
    ::absl::Status moe_status_ = (expr);                 \
    if (!moe_status_.ok()) return moe_status_;           \
  } while (false)

#define MOE_STATUS_CONCAT_INNER_(a, b) a##b
#define MOE_STATUS_CONCAT_(a, b) MOE_STATUS_CONCAT_INNER_(a, b)

// `MOE_ASSIGN_OR_RETURN(lhs, expr)`: evaluates the StatusOr `expr`; returns
// its status if not OK, else move-assigns its value to `lhs`, which may be a
// declaration (`auto x`) or an existing variable.
#define MOE_ASSIGN_OR_RETURN(lhs, expr) \
  MOE_ASSIGN_OR_RETURN_IMPL_(MOE_STATUS_CONCAT_(moe_statusor_, __LINE__), lhs, expr)

#define MOE_ASSIGN_OR_RETURN_IMPL_(statusor, lhs, expr) \
  auto statusor = (expr);                               \
  if (!statusor.ok()) return std::move(statusor).status(); \
  lhs = *std::move(statusor)

#endif  // MOE_COMMON_STATUS_MACROS_H_
