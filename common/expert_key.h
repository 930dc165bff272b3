// Which expert: the MoE layer it belongs to and its index within that
// layer's gate. Every place that names an expert (placement, Dispatch,
// weight transfer, training state, step and ring groups, checkpoint names)
// uses this key, so serving several MoE layers of one model on the same
// servers adds layers, not a rewrite. The cluster serves layer 0 today; a
// wire message without a layer field means layer 0.
#ifndef MOE_COMMON_EXPERT_KEY_H_
#define MOE_COMMON_EXPERT_KEY_H_

#include <cstdint>
#include <ostream>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/types/span.h"

namespace moe {

struct ExpertKey {
  int32_t layer = 0;
  int32_t expert = 0;

  constexpr ExpertKey() = default;
  constexpr ExpertKey(int32_t layer_index, int32_t expert_index)
      : layer(layer_index), expert(expert_index) {}

  // "expert 3" in layer 0 (today's messages), "layer 2 expert 3" otherwise.
  std::string ToString() const {
    return layer == 0 ? absl::StrCat("expert ", expert)
                      : absl::StrCat("layer ", layer, " expert ", expert);
  }

  friend constexpr bool operator==(ExpertKey a, ExpertKey b) {
    return a.layer == b.layer && a.expert == b.expert;
  }
  friend constexpr bool operator!=(ExpertKey a, ExpertKey b) { return !(a == b); }
  // Layer-major: a layer's experts are contiguous in sorted lists.
  friend constexpr bool operator<(ExpertKey a, ExpertKey b) {
    return a.layer != b.layer ? a.layer < b.layer : a.expert < b.expert;
  }
  friend constexpr bool operator>(ExpertKey a, ExpertKey b) { return b < a; }
  friend constexpr bool operator<=(ExpertKey a, ExpertKey b) { return !(b < a); }
  friend constexpr bool operator>=(ExpertKey a, ExpertKey b) { return !(a < b); }

  template <typename H>
  friend H AbslHashValue(H h, ExpertKey key) {
    return H::combine(std::move(h), key.layer, key.expert);
  }
  friend std::ostream& operator<<(std::ostream& os, ExpertKey key) { return os << key.ToString(); }
};

// Wire messages name an expert with two fields, `layer` and `expert_id`.
template <typename Message>
ExpertKey ExpertKeyOf(const Message& message) {
  return ExpertKey(message.layer(), message.expert_id());
}
template <typename Message>
void SetExpertKey(ExpertKey key, Message* message) {
  message->set_layer(key.layer);
  message->set_expert_id(key.expert);
}

// "1,3" for layer-0 keys, "layer:expert" items ("2:1,2:3") otherwise, for
// messages that list experts.
inline std::string JoinExpertKeys(absl::Span<const ExpertKey> keys) {
  return absl::StrJoin(keys, ",", [](std::string* out, ExpertKey key) {
    if (key.layer == 0) {
      absl::StrAppend(out, key.expert);
    } else {
      absl::StrAppend(out, key.layer, ":", key.expert);
    }
  });
}

}  // namespace moe

#endif  // MOE_COMMON_EXPERT_KEY_H_
