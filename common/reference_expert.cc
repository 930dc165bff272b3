#include "common/reference_expert.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/log.h"

namespace moe {
namespace {

// out[c] += a * m[r, c] for one row r of a [rows, cols] matrix.
inline void AddScaledRow(float a, const float* m_row, int64_t cols, float* out) {
  for (int64_t c = 0; c < cols; ++c) out[c] += a * m_row[c];
}

inline double Dot(const float* a, const float* b, int64_t n) {
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += static_cast<double>(a[i]) * b[i];
  return sum;
}

inline double Sigmoid(double a) { return 1.0 / (1.0 + std::exp(-a)); }

// Gated SiLU: hidden_pre rows are [x W1 + b1 | x W3].
void GatedForward(const ExpertWeights& weights, absl::Span<const float> x, int64_t rows,
                  absl::Span<float> hidden_pre, absl::Span<float> y) {
  const int64_t d_model = weights.w1.dim(0);
  const int64_t d_ff = weights.w1.dim(1);
  const float* w1 = weights.w1.values().data();
  const float* w2 = weights.w2.values().data();
  const float* w3 = weights.w3.values().data();
  for (int64_t r = 0; r < rows; ++r) {
    const float* x_row = x.data() + r * d_model;
    float* a = hidden_pre.data() + r * 2 * d_ff;
    float* b = a + d_ff;
    std::copy(weights.b1.values().begin(), weights.b1.values().end(), a);
    std::fill(b, b + d_ff, 0.0f);
    for (int64_t i = 0; i < d_model; ++i) {
      AddScaledRow(x_row[i], w1 + i * d_ff, d_ff, a);
      AddScaledRow(x_row[i], w3 + i * d_ff, d_ff, b);
    }
    float* y_row = y.data() + r * d_model;
    std::copy(weights.b2.values().begin(), weights.b2.values().end(), y_row);
    for (int64_t f = 0; f < d_ff; ++f) {
      const float h = static_cast<float>(a[f] * Sigmoid(a[f]) * b[f]);
      AddScaledRow(h, w2 + f * d_model, d_model, y_row);
    }
  }
}

void GatedBackward(const ExpertWeights& weights, absl::Span<const float> x,
                   absl::Span<const float> hidden_pre, absl::Span<const float> dy, int64_t rows,
                   absl::Span<float> dx, ExpertWeights& grads) {
  const int64_t d_model = weights.w1.dim(0);
  const int64_t d_ff = weights.w1.dim(1);
  const float* w1 = weights.w1.values().data();
  const float* w2 = weights.w2.values().data();
  const float* w3 = weights.w3.values().data();
  float* dw1 = grads.w1.mutable_values().data();
  float* db1 = grads.b1.mutable_values().data();
  float* dw2 = grads.w2.mutable_values().data();
  float* db2 = grads.b2.mutable_values().data();
  float* dw3 = grads.w3.mutable_values().data();
  std::vector<float> da(d_ff), db(d_ff);
  for (int64_t r = 0; r < rows; ++r) {
    const float* x_row = x.data() + r * d_model;
    const float* a = hidden_pre.data() + r * 2 * d_ff;
    const float* b = a + d_ff;
    const float* dy_row = dy.data() + r * d_model;
    for (int64_t m = 0; m < d_model; ++m) db2[m] += dy_row[m];
    for (int64_t f = 0; f < d_ff; ++f) {
      const double s = Sigmoid(a[f]);
      const double silu = a[f] * s;
      // dW2[f, :] += h[f] * dy;  dL/dh[f] = W2[f, :] . dy.
      AddScaledRow(static_cast<float>(silu * b[f]), dy_row, d_model, dw2 + f * d_model);
      const double dh = Dot(w2 + f * d_model, dy_row, d_model);
      // d SiLU(a)/da = s (1 + a (1 - s)).
      da[f] = static_cast<float>(dh * b[f] * s * (1.0 + a[f] * (1.0 - s)));
      db[f] = static_cast<float>(dh * silu);
      db1[f] += da[f];
    }
    float* dx_row = dx.data() + r * d_model;
    for (int64_t i = 0; i < d_model; ++i) {
      AddScaledRow(x_row[i], da.data(), d_ff, dw1 + i * d_ff);
      AddScaledRow(x_row[i], db.data(), d_ff, dw3 + i * d_ff);
      dx_row[i] = static_cast<float>(Dot(w1 + i * d_ff, da.data(), d_ff) +
                                     Dot(w3 + i * d_ff, db.data(), d_ff));
    }
  }
}

}  // namespace

void ReferenceExpertForward(const ExpertWeights& weights,
                            absl::Span<const float> x, int64_t rows,
                            absl::Span<float> hidden_pre, absl::Span<float> y) {
  const int64_t d_model = weights.w1.dim(0);
  const int64_t d_ff = weights.w1.dim(1);
  MOE_CHECK(static_cast<int64_t>(x.size()) == rows * d_model);
  MOE_CHECK(static_cast<int64_t>(y.size()) == rows * d_model);
  MOE_CHECK(static_cast<int64_t>(hidden_pre.size()) == rows * d_ff * (weights.gated() ? 2 : 1));
  if (weights.gated()) return GatedForward(weights, x, rows, hidden_pre, y);
  const float* w1 = weights.w1.values().data();
  const float* w2 = weights.w2.values().data();
  std::vector<float> activation(d_ff);
  for (int64_t r = 0; r < rows; ++r) {
    const float* x_row = x.data() + r * d_model;
    float* h = hidden_pre.data() + r * d_ff;
    std::copy(weights.b1.values().begin(), weights.b1.values().end(), h);
    for (int64_t i = 0; i < d_model; ++i) AddScaledRow(x_row[i], w1 + i * d_ff, d_ff, h);

    float* y_row = y.data() + r * d_model;
    std::copy(weights.b2.values().begin(), weights.b2.values().end(), y_row);
    for (int64_t f = 0; f < d_ff; ++f) {
      const float a = std::max(h[f], 0.0f);
      if (a != 0.0f) AddScaledRow(a, w2 + f * d_model, d_model, y_row);
    }
  }
}

void ReferenceExpertBackward(const ExpertWeights& weights,
                             absl::Span<const float> x,
                             absl::Span<const float> hidden_pre,
                             absl::Span<const float> dy, int64_t rows,
                             absl::Span<float> dx, ExpertWeights& grads) {
  const int64_t d_model = weights.w1.dim(0);
  const int64_t d_ff = weights.w1.dim(1);
  MOE_CHECK(static_cast<int64_t>(x.size()) == rows * d_model);
  MOE_CHECK(static_cast<int64_t>(dy.size()) == rows * d_model);
  MOE_CHECK(static_cast<int64_t>(dx.size()) == rows * d_model);
  MOE_CHECK(static_cast<int64_t>(hidden_pre.size()) == rows * d_ff * (weights.gated() ? 2 : 1));
  if (weights.gated()) return GatedBackward(weights, x, hidden_pre, dy, rows, dx, grads);
  const float* w1 = weights.w1.values().data();
  const float* w2 = weights.w2.values().data();
  float* dw1 = grads.w1.mutable_values().data();
  float* db1 = grads.b1.mutable_values().data();
  float* dw2 = grads.w2.mutable_values().data();
  float* db2 = grads.b2.mutable_values().data();
  std::vector<float> d_hidden(d_ff);
  for (int64_t r = 0; r < rows; ++r) {
    const float* x_row = x.data() + r * d_model;
    const float* h = hidden_pre.data() + r * d_ff;
    const float* dy_row = dy.data() + r * d_model;
    for (int64_t m = 0; m < d_model; ++m) db2[m] += dy_row[m];
    for (int64_t f = 0; f < d_ff; ++f) {
      const float a = std::max(h[f], 0.0f);
      // dW2[f, :] += a[f] * dy;  dL/da[f] = W2[f, :] . dy.
      if (a != 0.0f) AddScaledRow(a, dy_row, d_model, dw2 + f * d_model);
      d_hidden[f] = h[f] > 0.0f
                        ? static_cast<float>(Dot(w2 + f * d_model, dy_row, d_model))
                        : 0.0f;
      db1[f] += d_hidden[f];
    }
    float* dx_row = dx.data() + r * d_model;
    for (int64_t i = 0; i < d_model; ++i) {
      // dW1[i, :] += x[i] * dh;  dx[i] = W1[i, :] . dh.
      AddScaledRow(x_row[i], d_hidden.data(), d_ff, dw1 + i * d_ff);
      dx_row[i] = static_cast<float>(Dot(w1 + i * d_ff, d_hidden.data(), d_ff));
    }
  }
}

}  // namespace moe
