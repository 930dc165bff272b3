#include "expert_service/micro_batcher.h"

#include <cstring>
#include <memory>

namespace moe::expert {

MicroBatcher::MicroBatcher(Options options, ExpertStore& store, ComputePool& pool,
                           std::function<absl::Time()> clock)
    : options_(options), store_(store), pool_(pool), clock_(std::move(clock)) {
  if (!queued()) timer_ = std::thread([this] { TimerLoop(); });
}

MicroBatcher::~MicroBatcher() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
    // The pool's tasks of queued batches use this batcher.
    mu_.Await(absl::Condition(
        +[](int* in_pool) { return *in_pool == 0; }, &in_pool_));
  }
  if (timer_.joinable()) timer_.join();
}

void MicroBatcher::Forward(ExpertKey expert, const ConstTensorView& x, const TensorView& y,
                           uint64_t expected_step, Done done, KeepGoing keep_going) {
  const Key key{expert, x.dtype, expected_step};
  if (queued()) {
    std::shared_ptr<Batch> opened;
    {
      absl::MutexLock lock(&mu_);
      std::shared_ptr<Batch>& batch = queued_[key];
      if (batch == nullptr || batch->rows + x.rows() > options_.max_batch_rows) {
        // None waiting (or it is full): a new one, in the pool's queue now.
        batch = std::make_shared<Batch>();
        opened = batch;
      }
      batch->items.push_back({x, y, std::move(done), std::move(keep_going)});
      batch->rows += x.rows();
    }
    if (opened != nullptr) DispatchOpen(key, std::move(opened));
    return;
  }
  Batch full;
  {
    absl::MutexLock lock(&mu_);
    Batch& batch = open_[key];
    if (batch.items.empty()) batch.due = absl::Now() + options_.window;
    batch.items.push_back({x, y, std::move(done), std::move(keep_going)});
    batch.rows += x.rows();
    if (batch.rows < options_.max_batch_rows) return;
    full = std::move(batch);
    open_.erase(key);
  }
  Dispatch(key, std::move(full));
}

void MicroBatcher::TimerLoop() {
  while (true) {
    std::vector<std::pair<Key, Batch>> due;
    {
      absl::MutexLock lock(&mu_);
      // Wake at the earliest due batch (or when a new one may open).
      absl::Time next = absl::InfiniteFuture();
      for (const auto& [key, batch] : open_) next = std::min(next, batch.due);
      auto wake = [this, next]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        if (stopping_) return true;
        for (const auto& [key, batch] : open_) {
          if (batch.due < next) return true;  // a new, earlier batch
        }
        return false;
      };
      mu_.AwaitWithDeadline(absl::Condition(&wake), next);
      const absl::Time now = absl::Now();
      for (auto it = open_.begin(); it != open_.end();) {
        if (stopping_ || it->second.due <= now) {
          due.emplace_back(it->first, std::move(it->second));
          open_.erase(it++);
        } else {
          ++it;
        }
      }
      if (stopping_ && due.empty()) return;
    }
    for (auto& [key, batch] : due) Dispatch(key, std::move(batch));
  }
}

void MicroBatcher::Dispatch(const Key& key, Batch batch) {
  auto shared = std::make_shared<Batch>(std::move(batch));
  if (!pool_.Submit([this, key, shared] { Run(key, *shared); })) {
    for (Item& item : shared->items) {
      std::move(item.done)(absl::ResourceExhaustedError(
                               "expert server compute queue is full; retry or use another replica"),
                           absl::ZeroDuration());
    }
  }
}

void MicroBatcher::DispatchOpen(const Key& key, std::shared_ptr<Batch> batch) {
  {
    absl::MutexLock lock(&mu_);
    ++in_pool_;
  }
  const bool submitted = pool_.Submit([this, key, batch] {
    {
      // Started: nothing joins it any more.
      absl::MutexLock lock(&mu_);
      auto it = queued_.find(key);
      if (it != queued_.end() && it->second == batch) queued_.erase(it);
    }
    Run(key, *batch);
    absl::MutexLock lock(&mu_);
    --in_pool_;
  });
  if (submitted) return;
  {
    absl::MutexLock lock(&mu_);
    --in_pool_;
    auto it = queued_.find(key);
    if (it != queued_.end() && it->second == batch) queued_.erase(it);
  }
  for (Item& item : batch->items) {
    std::move(item.done)(absl::ResourceExhaustedError(
                             "expert server compute queue is full; retry or use another replica"),
                         absl::ZeroDuration());
  }
}

void MicroBatcher::Run(const Key& key, Batch& batch) {
  const ExpertKey expert = key.expert;
  // Requests whose caller gave up (deadline, cancellation) are answered
  // with that and left out.
  std::vector<Item> items;
  int64_t rows = 0;
  for (Item& item : batch.items) {
    absl::Status wanted = item.keep_going ? item.keep_going() : absl::OkStatus();
    if (!wanted.ok()) {
      std::move(item.done)(std::move(wanted), absl::ZeroDuration());
      continue;
    }
    rows += item.x.rows();
    items.push_back(std::move(item));
  }
  batch.items = std::move(items);
  batch.rows = rows;
  if (batch.items.empty()) return;
  const absl::Time start = absl::Now();
  if (batch.items.size() == 1) {
    // Alone: its own rows, no copies, and it stops between blocks when its
    // caller gives up.
    Item& item = batch.items[0];
    absl::Status status = store_.Forward(expert, item.x, item.y, false, 0, clock_(),
                                         key.expected_step, item.keep_going);
    std::move(item.done)(std::move(status), absl::Now() - start);
    return;
  }
  // Copy the rows into one batch, run it once, copy the answers back.
  // One key, one input dtype; the answers' dtype follows from it (the
  // dispatcher's choice), so it is one per batch too.
  const DType dtype = batch.items[0].x.dtype;
  const DType y_dtype = batch.items[0].y.dtype;
  const int64_t d_model = batch.items[0].x.cols();
  const size_t row_bytes = d_model * DTypeSize(dtype);
  std::vector<std::byte> x(batch.rows * row_bytes), y(batch.rows * d_model * DTypeSize(y_dtype));
  size_t offset = 0;
  for (const Item& item : batch.items) {
    if (item.x.size_bytes() > 0) std::memcpy(x.data() + offset, item.x.data, item.x.size_bytes());
    offset += item.x.size_bytes();
  }
  const absl::Status status = store_.Forward(expert, {dtype, {batch.rows, d_model}, x.data()},
                                             {y_dtype, {batch.rows, d_model}, y.data()}, false, 0,
                                             clock_(), key.expected_step);
  offset = 0;
  for (Item& item : batch.items) {
    if (status.ok() && item.y.size_bytes() > 0) {
      std::memcpy(item.y.data, y.data() + offset, item.y.size_bytes());
    }
    offset += item.y.size_bytes();
  }
  // Each request's share by rows: the shares of one batch add up to its
  // time, as the router adds up a server's kernel time.
  const absl::Duration ran = absl::Now() - start;
  for (Item& item : batch.items) {
    std::move(item.done)(status,
                         batch.rows > 0 ? ran * item.x.rows() / batch.rows : absl::ZeroDuration());
  }
}

}  // namespace moe::expert
