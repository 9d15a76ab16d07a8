// fp32 compute kernels: a cache-blocked matrix multiply, RMSNorm, gated MLP activations and vector helpers.
#pragma once

#include <cstddef>
#include <vector>

#include "threads.h"

namespace sinkcheck {

// A weight matrix W[out][in] (the nn.Linear layout) repacked for matmul(): panels of kPanel
// output rows, each stored k-major (for each input index, kPanel consecutive floats), the last
// panel zero-padded. The micro-kernel then streams one contiguous panel per tile.
constexpr int kPanel = 16;

struct PackedMatrix {
  int out = 0;
  int in = 0;
  std::vector<float> panels;  // ceil(out / kPanel) * in * kPanel
  std::vector<float> bias;    // empty, or `out` values
};

PackedMatrix pack_matrix(const float* weight, int out, int in, std::vector<float> bias = {});

// One panel: n_rows <= kPanel consecutive weight rows of `in` floats (row-major) written k-major to
// panel[k * kPanel + j], rows n_rows .. kPanel-1 as zeros. pack_matrix is this over every panel.
void pack_panel(const float* rows, int n_rows, int in, float* panel);

// y[r][o] = sum_k x[r][k] * W[o][k] (+ bias[o]) for r < rows; x is rows x in, y is rows x out,
// both row-major with the given row strides. Output columns are split over the pool's threads.
void matmul(ThreadPool& pool, const float* x, size_t x_stride, int rows, const PackedMatrix& w, float* y,
            size_t y_stride);

// out = x / sqrt(mean(x^2) + eps) * weight, as transformers' RMSNorm in fp32.
void rmsnorm(const float* x, const float* weight, int n, float eps, float* out);

// gate[i] = silu(gate[i]) * up[i]: the SwiGLU combination.
void silu_mul(float* gate, const float* up, size_t n);

// gate[i] = gelu_tanh(gate[i]) * up[i], with transformers' gelu_pytorch_tanh
// 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), computed as x * sigmoid(2 sqrt(2/pi) (x + 0.044715 x^3)).
void gelu_tanh_mul(float* gate, const float* up, size_t n);

// In place: x[i] = exp(x[i] - max), returns the sum. Accurate to about 1 ulp.
float exp_shift_sum(float* x, int n, float max);

// Attention scores of one query against n keys: out[j] = q . keys[j * stride .. + dim] * scale.
void attention_scores(const float* q, const float* keys, size_t stride, int n, int dim, float scale, float* out);

// out[0..dim) = sum_j weights[j] * values[j * stride .. + dim]: the attention output of one query.
void weighted_sum(const float* weights, const float* values, size_t stride, int n, int dim, float* out);

}  // namespace sinkcheck
