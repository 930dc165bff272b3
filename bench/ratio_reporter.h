// A console reporter that also keeps each benchmark's time per iteration and
// counters, so a benchmark's main can print ratios of runs measured side by
// side in the same process.
#ifndef MOE_BENCH_RATIO_REPORTER_H_
#define MOE_BENCH_RATIO_REPORTER_H_

#include <map>
#include <string>
#include <vector>

#include "benchmark/benchmark.h"

namespace moe::bench {

class RatioReporter : public benchmark::ConsoleReporter {
 public:
  struct Result {
    double seconds_per_iteration = 0;
    std::map<std::string, double> counters;
  };

  void ReportRuns(const std::vector<Run>& runs) override {
    for (const Run& run : runs) {
      if (run.error_occurred || run.run_type != Run::RT_Iteration) continue;
      Result& r = results_[run.benchmark_name()];
      r.seconds_per_iteration =
          run.GetAdjustedRealTime() / benchmark::GetTimeUnitMultiplier(run.time_unit);
      for (const auto& [name, counter] : run.counters) r.counters[name] = counter.value;
    }
    ConsoleReporter::ReportRuns(runs);
  }

  // nullptr when the benchmark did not run (filtered out or failed).
  const Result* Find(const std::string& name) const {
    auto it = results_.find(name);
    return it == results_.end() ? nullptr : &it->second;
  }

 private:
  std::map<std::string, Result> results_;
};

}  // namespace moe::bench

#endif  // MOE_BENCH_RATIO_REPORTER_H_
