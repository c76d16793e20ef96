// y = (x @ q.T) * scale for int8 weights q (N, K), fp32 activations x (M, K), fp32 scales (N,):
// weight-only int8 matrix-vector products for decoding on AVX2 CPUs (see plinth/infer/quant.py).
// Each weight is widened int8 -> int32 -> fp32 in registers and fused-multiply-added with fp32
// activations, so the only rounding is the weights' own; 4 output rows at a time keep enough
// independent accumulators to hide the FMA latency, and rows are split across torch's threads.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>

static inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_hadd_ps(lo, lo);
  lo = _mm_hadd_ps(lo, lo);
  return _mm_cvtss_f32(lo);
}

static inline void widen16(const int8_t* p, __m256& a, __m256& b) {
  // two 8-byte loads widened straight from memory (no shuffle to reach the upper half)
  a = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  b = _mm256_cvtepi32_ps(
      _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8))));
}

// One activation row against 4 weight rows: 8 independent accumulators (FMA latency hidden),
// everything in registers.
#ifndef PF
#define PF 16
#endif
static inline void row1x4(const float* xr, const int8_t* q0, int64_t K, int64_t K16,
                          const float* sc, float* out) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
  const int8_t *q1 = q0 + K, *q2 = q1 + K, *q3 = q2 + K;
  for (int64_t k = 0; k < K16; k += 16) {
    // the weights are read once: fetch the rows a few blocks ahead so DRAM latency overlaps
    // the arithmetic (the hardware prefetcher alone reached ~5.6 GB/s here)
    _mm_prefetch(reinterpret_cast<const char*>(q0 + PF * K + 4 * k), _MM_HINT_T0);
    __m256 xa = _mm256_loadu_ps(xr + k), xb = _mm256_loadu_ps(xr + k + 8), wa, wb;
    widen16(q0 + k, wa, wb); a0 = _mm256_fmadd_ps(wa, xa, a0); b0 = _mm256_fmadd_ps(wb, xb, b0);
    widen16(q1 + k, wa, wb); a1 = _mm256_fmadd_ps(wa, xa, a1); b1 = _mm256_fmadd_ps(wb, xb, b1);
    widen16(q2 + k, wa, wb); a2 = _mm256_fmadd_ps(wa, xa, a2); b2 = _mm256_fmadd_ps(wb, xb, b2);
    widen16(q3 + k, wa, wb); a3 = _mm256_fmadd_ps(wa, xa, a3); b3 = _mm256_fmadd_ps(wb, xb, b3);
  }
  float s[4] = {hsum(_mm256_add_ps(a0, b0)), hsum(_mm256_add_ps(a1, b1)),
                hsum(_mm256_add_ps(a2, b2)), hsum(_mm256_add_ps(a3, b3))};
  const int8_t* rows[4] = {q0, q1, q2, q3};
  for (int j = 0; j < 4; ++j) {
    for (int64_t k = K16; k < K; ++k) s[j] += xr[k] * static_cast<float>(rows[j][k]);
    out[j] = s[j] * sc[j];
  }
}

torch::Tensor int8_mm(torch::Tensor x, torch::Tensor q, torch::Tensor scale) {
  TORCH_CHECK(x.dim() == 2 && q.dim() == 2 && x.size(1) == q.size(1), "int8_mm: shapes");
  TORCH_CHECK(x.scalar_type() == at::kFloat && q.scalar_type() == at::kChar &&
              scale.scalar_type() == at::kFloat, "int8_mm: dtypes");
  x = x.contiguous();
  q = q.contiguous();
  scale = scale.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t K16 = K - K % 16;
  at::parallel_for(0, (N + 3) / 4, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t n0 = blk * 4, nn = std::min<int64_t>(4, N - n0);
      if (nn == 4) {  // the common case: each activation row against these 4 weight rows
        for (int64_t i = 0; i < M; ++i) {
          float out[4];
          row1x4(xp + i * K, qp + n0 * K, K, K16, sp + n0, out);
          for (int j = 0; j < 4; ++j) yp[i * N + n0 + j] = out[j];
        }
        continue;
      }
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int64_t mm = std::min<int64_t>(4, M - m0);
        __m256 acc[4][4];
        for (int i = 0; i < 4; ++i)
          for (int j = 0; j < 4; ++j) acc[i][j] = _mm256_setzero_ps();
        for (int64_t k = 0; k < K16; k += 16) {
          __m256 wa[4], wb[4];
          for (int j = 0; j < 4; ++j) {
            if (j < nn) widen16(qp + (n0 + j) * K + k, wa[j], wb[j]);
            else wa[j] = wb[j] = _mm256_setzero_ps();
          }
          for (int64_t i = 0; i < mm; ++i) {
            const float* xr = xp + (m0 + i) * K + k;
            __m256 xa = _mm256_loadu_ps(xr), xb = _mm256_loadu_ps(xr + 8);
            for (int j = 0; j < 4; ++j) {
              acc[i][j] = _mm256_fmadd_ps(wa[j], xa, acc[i][j]);
              acc[i][j] = _mm256_fmadd_ps(wb[j], xb, acc[i][j]);
            }
          }
        }
        for (int64_t i = 0; i < mm; ++i) {
          for (int64_t j = 0; j < nn; ++j) {
            float s = hsum(acc[i][j]);
            const int8_t* row = qp + (n0 + j) * K;
            const float* xr = xp + (m0 + i) * K;
            for (int64_t k = K16; k < K; ++k) s += xr[k] * static_cast<float>(row[k]);
            yp[(m0 + i) * N + n0 + j] = s * sp[n0 + j];
          }
        }
      }
    }
  });
  return y;
}

// ------------------------------------------------------------------------------------- fp32
// y = x @ w.T for fp32 weights w (N, K) and a few activation rows x (M, K): decoding's products.
// MKL's sgemm is tuned for large M; at M = 2..16 it computes well below the memory bandwidth
// (batch-8 decoding then costs ~3x batch 1). Here every weight is loaded once per block of 4
// activation rows and used for all of them, so batch 8 reads the weights ~twice from L1/L2 and
// once from memory.
static inline void f32_rows(const float* x, const float* w, int64_t M, int64_t K, int64_t N,
                            int64_t n0, float* y) {
  const int64_t K8 = K - K % 8;
  const float* w0 = w + n0 * K;
  const float* w1 = w0 + K;
  int64_t m0 = 0;
  for (; m0 + 4 <= M; m0 += 4) {  // 4 activation rows x 2 weight rows, all in registers
    const float *x0 = x + m0 * K, *x1 = x0 + K, *x2 = x1 + K, *x3 = x2 + K;
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00,
           c30 = c00, c31 = c00;
    for (int64_t k = 0; k < K8; k += 8) {
      if (m0 == 0) _mm_prefetch(reinterpret_cast<const char*>(w0 + PF * K + 2 * k), _MM_HINT_T0);
      __m256 a = _mm256_loadu_ps(w0 + k), b = _mm256_loadu_ps(w1 + k), v;
      v = _mm256_loadu_ps(x0 + k); c00 = _mm256_fmadd_ps(a, v, c00); c01 = _mm256_fmadd_ps(b, v, c01);
      v = _mm256_loadu_ps(x1 + k); c10 = _mm256_fmadd_ps(a, v, c10); c11 = _mm256_fmadd_ps(b, v, c11);
      v = _mm256_loadu_ps(x2 + k); c20 = _mm256_fmadd_ps(a, v, c20); c21 = _mm256_fmadd_ps(b, v, c21);
      v = _mm256_loadu_ps(x3 + k); c30 = _mm256_fmadd_ps(a, v, c30); c31 = _mm256_fmadd_ps(b, v, c31);
    }
    __m256 cs[4][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}};
    for (int64_t i = 0; i < 4; ++i) {
      float s0 = hsum(cs[i][0]), s1 = hsum(cs[i][1]);
      const float* xr = x + (m0 + i) * K;
      for (int64_t k = K8; k < K; ++k) { s0 += xr[k] * w0[k]; s1 += xr[k] * w1[k]; }
      y[(m0 + i) * N + n0] = s0;
      y[(m0 + i) * N + n0 + 1] = s1;
    }
  }
  for (; m0 < M; m0 += 4) {  // the last 1-3 activation rows
    const int64_t mm = std::min<int64_t>(4, M - m0);
    __m256 acc[4][2];
    for (int i = 0; i < 4; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K8; k += 8) {
      if (m0 == 0) _mm_prefetch(reinterpret_cast<const char*>(w0 + PF * K + 2 * k), _MM_HINT_T0);
      __m256 a = _mm256_loadu_ps(w0 + k), b = _mm256_loadu_ps(w1 + k);
      for (int64_t i = 0; i < mm; ++i) {
        __m256 xv = _mm256_loadu_ps(x + (m0 + i) * K + k);
        acc[i][0] = _mm256_fmadd_ps(a, xv, acc[i][0]);
        acc[i][1] = _mm256_fmadd_ps(b, xv, acc[i][1]);
      }
    }
    for (int64_t i = 0; i < mm; ++i) {
      float s0 = hsum(acc[i][0]), s1 = hsum(acc[i][1]);
      const float* xr = x + (m0 + i) * K;
      for (int64_t k = K8; k < K; ++k) { s0 += xr[k] * w0[k]; s1 += xr[k] * w1[k]; }
      y[(m0 + i) * N + n0] = s0;
      y[(m0 + i) * N + n0 + 1] = s1;
    }
  }
}

// One activation row against 4 weight rows (batch-1 decoding): 8 independent accumulators.
static inline void f32_row1x4(const float* xr, const float* w0, int64_t K, float* out) {
  const int64_t K16 = K - K % 16;
  const float *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
  for (int64_t k = 0; k < K16; k += 16) {
    _mm_prefetch(reinterpret_cast<const char*>(w0 + PF * K + 4 * k), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w0 + PF * K + 4 * k + 16), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w0 + PF * K + 4 * k + 32), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w0 + PF * K + 4 * k + 48), _MM_HINT_T0);
    __m256 xa = _mm256_loadu_ps(xr + k), xb = _mm256_loadu_ps(xr + k + 8);
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + k), xa, a0);
    b0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + k + 8), xb, b0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + k), xa, a1);
    b1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + k + 8), xb, b1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + k), xa, a2);
    b2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + k + 8), xb, b2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + k), xa, a3);
    b3 = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + k + 8), xb, b3);
  }
  float s[4] = {hsum(_mm256_add_ps(a0, b0)), hsum(_mm256_add_ps(a1, b1)),
                hsum(_mm256_add_ps(a2, b2)), hsum(_mm256_add_ps(a3, b3))};
  const float* rows[4] = {w0, w1, w2, w3};
  for (int j = 0; j < 4; ++j) {
    for (int64_t k = K16; k < K; ++k) s[j] += xr[k] * rows[j][k];
    out[j] = s[j];
  }
}

// RMSNorm of each row of x (M, K) with weight g: x * g / sqrt(mean(x^2) + eps), as F.rms_norm.
static torch::Tensor rms_norm_rows(const torch::Tensor& x, const torch::Tensor& g, double eps) {
  auto out = torch::empty_like(x);
  const int64_t M = x.size(0), K = x.size(1);
  const float *xp = x.data_ptr<float>(), *gp = g.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int64_t i = 0; i < M; ++i) {
    double ss = 0;
    for (int64_t k = 0; k < K; ++k) ss += static_cast<double>(xp[i * K + k]) * xp[i * K + k];
    const float r = static_cast<float>(1.0 / std::sqrt(ss / K + eps));
    for (int64_t k = 0; k < K; ++k) op[i * K + k] = xp[i * K + k] * r * gp[k];
  }
  return out;
}

// y = norm(x) @ w.T, the norm (RMSNorm with weight g) fused in when g is given: one call per
// projection instead of five small operations.
torch::Tensor f32_mm(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> g,
                     double eps) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "f32_mm: shapes");
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "f32_mm: dtypes");
  x = x.contiguous();
  if (g.has_value()) x = rms_norm_rows(x, g->contiguous(), eps);
  w = w.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (M == 1 && N % 4 == 0) {
    at::parallel_for(0, N / 4, 16, [&](int64_t b0, int64_t b1) {
      for (int64_t blk = b0; blk < b1; ++blk) f32_row1x4(xp, wp + blk * 4 * K, K, yp + blk * 4);
    });
    return y;
  }
  at::parallel_for(0, N / 2, 32, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) f32_rows(xp, wp, M, K, N, blk * 2, yp);
  });
  if (N % 2) {  // the last row on its own
    const float* wl = wp + (N - 1) * K;
    for (int64_t i = 0; i < M; ++i) {
      float s = 0;
      for (int64_t k = 0; k < K; ++k) s += xp[i * K + k] * wl[k];
      yp[i * N + N - 1] = s;
    }
  }
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { 
  m.def("int8_mm", &int8_mm, "int8 weight-only matmul");
  m.def("f32_mm", &f32_mm, "fp32 matmul for a few activation rows (RMSNorm fused when g)",
        py::arg("x"), py::arg("w"), py::arg("g") = py::none(), py::arg("eps") = 1e-6);
}
