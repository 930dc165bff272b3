// The pair encoding shared by the gate, the dispatch plan, combine, backward
// and the reference layers: each token chooses top_k experts, and pair
// p = t * top_k + j is token t's j-th choice. Every per-pair array
// ([num_tokens * top_k]: expert ids, weights, dropped flags) is indexed by p.
#ifndef MOE_COMMON_PAIR_INDEX_H_
#define MOE_COMMON_PAIR_INDEX_H_

#include <cstdint>

namespace moe {

class PairIndex {
 public:
  // REQUIRES: top_k >= 1.
  explicit PairIndex(int top_k) : top_k_(top_k) {}

  int64_t Pair(int64_t token, int choice) const { return token * top_k_ + choice; }
  int64_t TokenOf(int64_t pair) const { return pair / top_k_; }
  int ChoiceOf(int64_t pair) const { return static_cast<int>(pair % top_k_); }
  // Pairs of `tokens` tokens.
  int64_t Count(int64_t tokens) const { return tokens * top_k_; }

 private:
  int top_k_;
};

}  // namespace moe

#endif  // MOE_COMMON_PAIR_INDEX_H_
