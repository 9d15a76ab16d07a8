#include "kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace sinkcheck {

namespace {

// GCC/Clang vector extensions: portable SIMD (AVX2 with -march on x86, NEON on ARM) without
// intrinsics headers. Loads and stores go through memcpy because rows need not be 32-byte aligned.
typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));

inline f32x8 load8(const float* p) {
  f32x8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store8(float* p, f32x8 v) { std::memcpy(p, &v, sizeof v); }
inline f32x8 splat(float x) { return f32x8{x, x, x, x, x, x, x, x}; }
inline float hsum(f32x8 v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

// exp(x) for x in about [-87, 88]: x = n ln2 + r with |r| <= ln2/2, exp(r) by its Taylor series to
// degree 7 (truncation error < 1e-8 relative), times 2^n built in the exponent bits. Inputs below
// -87.3 give 0, as exp would underflow there anyway.
inline f32x8 exp8(f32x8 x) {
  const f32x8 hi = splat(88.3762626647949f), lo = splat(-87.3365447505531f);
  i32x8 underflow = x < lo;
  x = x > hi ? hi : x;
  x = x < lo ? lo : x;
  // Round x / ln2 to nearest by the 1.5 * 2^23 trick.
  const f32x8 magic = splat(12582912.0f);
  f32x8 n = (x * splat(1.44269504088896341f) + magic) - magic;
  f32x8 r = x - n * splat(0.693359375f);  // ln2 split in two for an exact first product
  r = r - n * splat(-2.12194440e-4f);
  f32x8 p = splat(1.0f / 5040.0f);
  p = p * r + splat(1.0f / 720.0f);
  p = p * r + splat(1.0f / 120.0f);
  p = p * r + splat(1.0f / 24.0f);
  p = p * r + splat(1.0f / 6.0f);
  p = p * r + splat(0.5f);
  p = p * r + splat(1.0f);
  p = p * r + splat(1.0f);
  i32x8 exponent = (__builtin_convertvector(n, i32x8) + 127) << 23;
  f32x8 result = p * (f32x8)exponent;  // a vector cast reinterprets the bits
  return underflow ? splat(0.0f) : result;
}

inline float exp1(float x) {
  f32x8 v = exp8(splat(x));
  return v[0];
}

// Rows per micro-tile, and the blocking of the reduction (kKc floats of a panel = 16 KB, in L1)
// and of the rows (kMc rows of x stay in L2 while every panel passes over them).
constexpr int kMr = 6;
constexpr int kKc = 256;
constexpr int kMc = 96;

// c[m][0..16) (+)= a[m][0..kc) . panel over one k block, for MR rows; all accumulators in registers.
template <int MR>
void micro_kernel(const float* a, size_t lda, const float* panel, int kc, float* c, size_t ldc, int n_valid,
                  bool accumulate) {
  f32x8 acc[MR][2];
  for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = splat(0.0f);
  for (int k = 0; k < kc; ++k) {
    f32x8 b0 = load8(panel + kPanel * k);
    f32x8 b1 = load8(panel + kPanel * k + 8);
    for (int m = 0; m < MR; ++m) {
      f32x8 av = splat(a[m * lda + k]);
      acc[m][0] += av * b0;
      acc[m][1] += av * b1;
    }
  }
  for (int m = 0; m < MR; ++m) {
    float* row = c + m * ldc;
    if (n_valid == kPanel) {
      if (accumulate) {
        acc[m][0] += load8(row);
        acc[m][1] += load8(row + 8);
      }
      store8(row, acc[m][0]);
      store8(row + 8, acc[m][1]);
    } else {
      float tile[kPanel];
      store8(tile, acc[m][0]);
      store8(tile + 8, acc[m][1]);
      for (int n = 0; n < n_valid; ++n) row[n] = accumulate ? row[n] + tile[n] : tile[n];
    }
  }
}

void micro_kernel_rows(int rows, const float* a, size_t lda, const float* panel, int kc, float* c, size_t ldc,
                       int n_valid, bool accumulate) {
  switch (rows) {
    case 6: micro_kernel<6>(a, lda, panel, kc, c, ldc, n_valid, accumulate); break;
    case 5: micro_kernel<5>(a, lda, panel, kc, c, ldc, n_valid, accumulate); break;
    case 4: micro_kernel<4>(a, lda, panel, kc, c, ldc, n_valid, accumulate); break;
    case 3: micro_kernel<3>(a, lda, panel, kc, c, ldc, n_valid, accumulate); break;
    case 2: micro_kernel<2>(a, lda, panel, kc, c, ldc, n_valid, accumulate); break;
    default: micro_kernel<1>(a, lda, panel, kc, c, ldc, n_valid, accumulate); break;
  }
}

}  // namespace

void pack_panel(const float* rows, int n_rows, int in, float* panel) {
  // Blocks of 64 input indexes: the 16 source rows stream through cache while the panel is written in order.
  constexpr int kBlock = 64;
  for (int k0 = 0; k0 < in; k0 += kBlock) {
    const int k1 = std::min(in, k0 + kBlock);
    for (int k = k0; k < k1; ++k) {
      float* dst = panel + static_cast<size_t>(k) * kPanel;
      int j = 0;
      for (; j < n_rows; ++j) dst[j] = rows[static_cast<size_t>(j) * in + k];
      for (; j < kPanel; ++j) dst[j] = 0.0f;
    }
  }
}

PackedMatrix pack_matrix(const float* weight, int out, int in, std::vector<float> bias) {
  PackedMatrix packed;
  packed.out = out;
  packed.in = in;
  packed.bias = std::move(bias);
  const int n_panels = (out + kPanel - 1) / kPanel;
  packed.panels.resize(static_cast<size_t>(n_panels) * in * kPanel);
  for (int p = 0; p < n_panels; ++p)
    pack_panel(weight + static_cast<size_t>(p) * kPanel * in, std::min(kPanel, out - p * kPanel), in,
               packed.panels.data() + static_cast<size_t>(p) * in * kPanel);
  return packed;
}

void matmul(ThreadPool& pool, const float* x, size_t x_stride, int rows, const PackedMatrix& w, float* y,
            size_t y_stride) {
  if (rows <= 0) return;
  const int n_panels = (w.out + kPanel - 1) / kPanel;
  // A few contiguous panel ranges per thread, taken dynamically: a thread that gets less CPU time
  // (a busy machine) takes fewer ranges instead of holding everyone up. Each task writes its own columns.
  const int n_tasks = std::min(n_panels, 4 * pool.size());
  pool.run(n_tasks, [&](int task, int) {
    const int first = n_panels * task / n_tasks;
    const int last = n_panels * (task + 1) / n_tasks;
    for (int m0 = 0; m0 < rows; m0 += kMc) {
      const int mc = std::min(kMc, rows - m0);
      for (int k0 = 0; k0 < w.in; k0 += kKc) {
        const int kc = std::min(kKc, w.in - k0);
        for (int p = first; p < last; ++p) {
          const float* panel = w.panels.data() + (static_cast<size_t>(p) * w.in + k0) * kPanel;
          const int n_valid = std::min(kPanel, w.out - p * kPanel);
          for (int m = 0; m < mc; m += kMr) {
            const int mr = std::min(kMr, mc - m);
            micro_kernel_rows(mr, x + (m0 + m) * x_stride + k0, x_stride, panel, kc,
                              y + (m0 + m) * y_stride + p * kPanel, y_stride, n_valid, k0 > 0);
          }
        }
      }
      if (!w.bias.empty()) {
        for (int m = m0; m < m0 + mc; ++m)
          for (int o = first * kPanel; o < std::min(last * kPanel, w.out); ++o) y[m * y_stride + o] += w.bias[o];
      }
    }
  });
}

void rmsnorm(const float* x, const float* weight, int n, float eps, float* out) {
  double sum_sq = 0.0;
  for (int i = 0; i < n; ++i) sum_sq += static_cast<double>(x[i]) * x[i];
  const float scale = 1.0f / std::sqrt(static_cast<float>(sum_sq / n) + eps);
  for (int i = 0; i < n; ++i) out[i] = weight[i] * (x[i] * scale);
}

void silu_mul(float* gate, const float* up, size_t n) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    f32x8 g = load8(gate + i);
    f32x8 sig = splat(1.0f) / (splat(1.0f) + exp8(-g));
    store8(gate + i, g * sig * load8(up + i));
  }
  for (; i < n; ++i) gate[i] = gate[i] / (1.0f + exp1(-gate[i])) * up[i];
}

void gelu_tanh_mul(float* gate, const float* up, size_t n) {
  // 1 + tanh(y) = 2 sigmoid(2y): the same sigmoid as silu, of z = 2 sqrt(2/pi) (x + 0.044715 x^3).
  const float k2 = static_cast<float>(2.0 * std::sqrt(2.0 / M_PI)), kappa = 0.044715f;
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    f32x8 g = load8(gate + i);
    f32x8 z = splat(k2) * (g + splat(kappa) * g * g * g);
    f32x8 sig = splat(1.0f) / (splat(1.0f) + exp8(-z));
    store8(gate + i, g * sig * load8(up + i));
  }
  for (; i < n; ++i) {
    const float g = gate[i], z = k2 * (g + kappa * g * g * g);
    gate[i] = g / (1.0f + exp1(-z)) * up[i];
  }
}

float exp_shift_sum(float* x, int n, float max) {
  f32x8 total = splat(0.0f);
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    f32x8 e = exp8(load8(x + i) - splat(max));
    store8(x + i, e);
    total += e;
  }
  float sum = hsum(total);
  for (; i < n; ++i) {
    x[i] = exp1(x[i] - max);
    sum += x[i];
  }
  return sum;
}

void attention_scores(const float* q, const float* keys, size_t stride, int n, int dim, float scale, float* out) {
  const int vec_end = dim - dim % 8;
  int j = 0;
  // Four keys at a time: four independent accumulator chains hide the FMA latency.
  for (; j + 4 <= n; j += 4) {
    const float* k0 = keys + size_t(j) * stride;
    const float* k1 = k0 + stride;
    const float* k2 = k1 + stride;
    const float* k3 = k2 + stride;
    f32x8 a0 = splat(0.0f), a1 = splat(0.0f), a2 = splat(0.0f), a3 = splat(0.0f);
    for (int d = 0; d < vec_end; d += 8) {
      const f32x8 qv = load8(q + d);
      a0 += qv * load8(k0 + d);
      a1 += qv * load8(k1 + d);
      a2 += qv * load8(k2 + d);
      a3 += qv * load8(k3 + d);
    }
    float s0 = hsum(a0), s1 = hsum(a1), s2 = hsum(a2), s3 = hsum(a3);
    for (int d = vec_end; d < dim; ++d) {
      s0 += q[d] * k0[d];
      s1 += q[d] * k1[d];
      s2 += q[d] * k2[d];
      s3 += q[d] * k3[d];
    }
    out[j] = s0 * scale;
    out[j + 1] = s1 * scale;
    out[j + 2] = s2 * scale;
    out[j + 3] = s3 * scale;
  }
  for (; j < n; ++j) {
    const float* k = keys + size_t(j) * stride;
    f32x8 acc = splat(0.0f);
    for (int d = 0; d < vec_end; d += 8) acc += load8(q + d) * load8(k + d);
    float s = hsum(acc);
    for (int d = vec_end; d < dim; ++d) s += q[d] * k[d];
    out[j] = s * scale;
  }
}

void weighted_sum(const float* weights, const float* values, size_t stride, int n, int dim, float* out) {
  // 32 output dims at a time stay in registers while every value row streams past.
  int d0 = 0;
  for (; d0 + 32 <= dim; d0 += 32) {
    f32x8 a0 = splat(0.0f), a1 = splat(0.0f), a2 = splat(0.0f), a3 = splat(0.0f);
    for (int j = 0; j < n; ++j) {
      const float* v = values + size_t(j) * stride + d0;
      const f32x8 w = splat(weights[j]);
      a0 += w * load8(v);
      a1 += w * load8(v + 8);
      a2 += w * load8(v + 16);
      a3 += w * load8(v + 24);
    }
    store8(out + d0, a0);
    store8(out + d0 + 8, a1);
    store8(out + d0 + 16, a2);
    store8(out + d0 + 24, a3);
  }
  for (; d0 < dim; ++d0) {
    float acc = 0.0f;
    for (int j = 0; j < n; ++j) acc += weights[j] * values[size_t(j) * stride + d0];
    out[d0] = acc;
  }
}

}  // namespace sinkcheck
