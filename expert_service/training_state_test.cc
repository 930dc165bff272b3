#include "expert_service/training_state.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace moe::expert {
namespace {

using ::testing::HasSubstr;

SavedForward Saved(size_t bytes) {
  SavedForward s;
  s.x.resize(bytes / 2);
  s.activations.resize(bytes - bytes / 2);
  return s;
}

const absl::Time kT0 = absl::FromUnixSeconds(1000);

TEST(TrainingStateTest, PutThenTakeOnce) {
  TrainingStateStore store({1000, absl::Seconds(10)});
  ASSERT_TRUE(store.Put(7, ExpertKey(0, 2), Saved(100), kT0).ok());
  EXPECT_EQ(store.bytes(), 100);
  absl::StatusOr<SavedForward> taken = store.Take(7, ExpertKey(0, 2), kT0 + absl::Seconds(1));
  ASSERT_TRUE(taken.ok());
  EXPECT_EQ(taken->bytes(), 100u);
  EXPECT_EQ(store.bytes(), 0);
  const absl::Status again = store.Take(7, ExpertKey(0, 2), kT0).status();
  EXPECT_EQ(again.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(again.message(), HasSubstr("request 7"));
}

TEST(TrainingStateTest, AWrongRowCountLeavesTheStateForARetry) {
  TrainingStateStore store({1000, absl::Seconds(10)});
  SavedForward saved = Saved(100);
  saved.rows = 4;
  ASSERT_TRUE(store.Put(7, ExpertKey(0, 2), std::move(saved), kT0).ok());
  const absl::Status wrong = store.Take(7, ExpertKey(0, 2), kT0, 5).status();
  EXPECT_EQ(wrong.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(wrong.message(), HasSubstr("sent 4 tokens to expert 2 in forward, backward has 5"));
  EXPECT_EQ(store.bytes(), 100);
  EXPECT_TRUE(store.Take(7, ExpertKey(0, 2), kT0, 4).ok());
}

TEST(TrainingStateTest, KeysAreRequestAndExpert) {
  TrainingStateStore store({1000, absl::Seconds(10)});
  ASSERT_TRUE(store.Put(7, ExpertKey(0, 1), Saved(10), kT0).ok());
  ASSERT_TRUE(store.Put(7, ExpertKey(0, 2), Saved(10), kT0).ok());
  ASSERT_TRUE(store.Put(8, ExpertKey(0, 1), Saved(10), kT0).ok());
  EXPECT_EQ(store.Put(7, ExpertKey(0, 1), Saved(10), kT0).code(), absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(store.Take(9, ExpertKey(0, 1), kT0).status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(store.Take(7, ExpertKey(0, 2), kT0).ok());
  EXPECT_EQ(store.size(), 2u);
  // The same expert index in another layer is another expert.
  EXPECT_EQ(store.Take(7, ExpertKey(1, 1), kT0).status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(store.Put(7, ExpertKey(1, 1), Saved(10), kT0).ok());
  EXPECT_EQ(store.size(), 3u);
}

TEST(TrainingStateTest, OverBudgetIsResourceExhaustedAndDisturbsNothing) {
  TrainingStateStore store({250, absl::Seconds(10)});
  ASSERT_TRUE(store.Put(1, ExpertKey(0, 0), Saved(100), kT0).ok());
  ASSERT_TRUE(store.Put(2, ExpertKey(0, 0), Saved(100), kT0).ok());
  const absl::Status over = store.Put(3, ExpertKey(0, 0), Saved(100), kT0);
  EXPECT_EQ(over.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(over.message(), HasSubstr("250-byte budget"));
  EXPECT_EQ(store.bytes(), 200);
  EXPECT_TRUE(store.Take(1, ExpertKey(0, 0), kT0).ok());
  EXPECT_TRUE(store.Put(3, ExpertKey(0, 0), Saved(100), kT0).ok());
}

TEST(TrainingStateTest, ExpiredEntriesAreNotFoundAndFreeTheirBytes) {
  TrainingStateStore store({150, absl::Seconds(10)});
  ASSERT_TRUE(store.Put(1, ExpertKey(0, 0), Saved(100), kT0).ok());
  const absl::Status expired = store.Take(1, ExpertKey(0, 0), kT0 + absl::Seconds(10)).status();
  EXPECT_EQ(expired.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(expired.message(), HasSubstr("request 1: training state for expert 0 expired"));
  EXPECT_EQ(store.bytes(), 0);

  // Expiry also makes room for new entries.
  ASSERT_TRUE(store.Put(2, ExpertKey(0, 0), Saved(100), kT0).ok());
  EXPECT_TRUE(store.Put(3, ExpertKey(0, 0), Saved(100), kT0 + absl::Seconds(11)).ok());
  EXPECT_EQ(store.Take(2, ExpertKey(0, 0), kT0 + absl::Seconds(11)).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(store.Expire(kT0 + absl::Seconds(30)), 1);
  EXPECT_EQ(store.bytes(), 0);
}

}  // namespace
}  // namespace moe::expert
