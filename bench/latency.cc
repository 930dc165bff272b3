#include "bench/latency.h"

#include <algorithm>
#include <chrono>
#include <utility>

#include "absl/time/clock.h"
#include "common/tensor_codec.h"
#include "common/transport_credentials.h"
#include "proto/router.grpc.pb.h"

namespace moe::bench {

double Percentile(std::vector<double> v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<size_t>(q * v.size()))];
}

ForwardLoad::ForwardLoad(const std::string& router_address, int clients, MakeInput make_input) {
  for (int c = 0; c < clients; ++c) {
    clients_.emplace_back([this, router_address, make_input, c] {
      auto client = v1::Router::NewStub(
          NewChannel(router_address, TransportCredentials::Plaintext(), 256 << 20));
      std::mt19937 rng(c);
      while (!stop_.load()) {
        const FloatTensor x = make_input(rng);
        v1::ForwardRequest request;
        EncodeFloats(x.values(), x.shape(), DType::kFloat32, request.mutable_x());
        v1::ForwardResponse response;
        grpc::ClientContext context;
        context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
        const absl::Time start = absl::Now();
        const bool ok = client->Forward(&context, request, &response).ok();
        const absl::Time done = absl::Now();
        absl::MutexLock lock(&mu_);
        samples_.push_back({done, absl::ToDoubleMilliseconds(done - start), ok});
      }
    });
  }
}

std::vector<Sample> ForwardLoad::Stop() {
  stop_.store(true);
  for (std::thread& t : clients_) t.join();
  clients_.clear();
  absl::MutexLock lock(&mu_);
  std::vector<Sample> samples = samples_;
  std::sort(samples.begin(), samples.end(),
            [](const Sample& a, const Sample& b) { return a.done < b.done; });
  return samples;
}

}  // namespace moe::bench
