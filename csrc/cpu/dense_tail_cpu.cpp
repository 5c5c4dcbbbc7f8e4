// CPU kernels of dense_tail_norm (forward) and dense_tail_norm_backward.
//
// Forward: rows in parallel, one pass over memory per row (h and x read, out written); the row is
// kept in a thread-local buffer for the three sweeps LayerNorm needs (mean, variance, output).
// Backward: chunks of kRowsPerChunk rows in parallel; each chunk writes grad_h for its rows (and,
// when asked, a copy of grad_out) and its partial sums of the three parameter gradients, which are
// then added over the chunks in the order of dense_tail.h (per group of chunks, then the groups).
// Row sums follow the 32-lane order of dense_tail.h, so results match the CUDA kernels bit for bit.
//
// Two implementations of the rows: a vector path (float arithmetic, widths that are a multiple of
// 8: float32, float16 and bfloat16 rows, e.g. GFM-RAG's 64 and 512) and a scalar path for the
// others (float64, other widths). Both do the same operations in the same order.
#include "../dense_tail.h"
#include "cpu_clones.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace gfmrag_fast {
namespace {

// A parameter as an acc_t row, LayerNorm's identity (`fallback`) where it is absent.
template <typename acc_t, typename param_t>
std::vector<acc_t> param_row(const std::optional<at::Tensor>& param, int64_t dim, acc_t fallback) {
  std::vector<acc_t> row(dim, fallback);
  if (param) {
    const param_t* p = param->const_data_ptr<param_t>();
    for (int64_t c = 0; c < dim; ++c) row[c] = static_cast<acc_t>(p[c]);
  }
  return row;
}

// Σ_c value(c) in the order of dense_tail.h: lane k sums channels k, k + 32, ... in turn, then the
// lanes are combined with offsets 16, 8, 4, 2, 1.
template <typename acc_t, typename F>
inline acc_t lane_sum(int64_t dim, const F& value) {
  acc_t lanes[kTailLanes] = {};
  int64_t c0 = 0;
  for (; c0 + kTailLanes <= dim; c0 += kTailLanes) {
    for (int k = 0; k < kTailLanes; ++k) lanes[k] = add_rn(lanes[k], value(c0 + k));
  }
  for (int k = 0; c0 + k < dim; ++k) lanes[k] = add_rn(lanes[k], value(c0 + k));
  for (int offset = kTailLanes / 2; offset > 0; offset /= 2) {
    for (int k = 0; k < offset; ++k) lanes[k] = add_rn(lanes[k], lanes[k + offset]);
  }
  return lanes[0];
}

// The per-row work is compiled twice on x86-64 GCC (GFMRAG_CPU_CLONES, cpu_clones.h).

// The rows' tensors as raw pointers, and the parameters as acc_t rows (LayerNorm's identity where
// one is absent).
template <typename scalar_t>
struct TailRows {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* h;         // [M, d]
  const scalar_t* x;         // [M, d] (the short cut) or nullptr
  const scalar_t* grad_out;  // [M, d] (backward)
  const acc_t* stats;        // [M, 2] mean, rstd (backward)
  scalar_t* grad_out_copy;   // [M, d] receives a copy of grad_out (backward), or nullptr
  const acc_t* bias;         // [d]
  const acc_t* gamma;        // [d]
  const acc_t* beta;         // [d]
  int64_t dim;
};

// Calls row(r, hr) for r in [begin, end), hr = row r of h. The row lambdas are always inlined,
// so that they are compiled for the target of each clone of their caller (they hold the channel
// loops that should vectorise); the rows they write are __restrict__ arguments of the caller,
// which tells the compiler that nothing they read aliases them.
template <typename scalar_t, typename Row>
C10_ALWAYS_INLINE void for_each_tail_row(const TailRows<scalar_t>& t, int64_t begin, int64_t end, const Row& row) {
  for (int64_t r = begin; r < end; ++r) row(r, t.h + r * t.dim);
}

template <typename scalar_t>
GFMRAG_CPU_CLONES void forward_rows(const TailRows<scalar_t>& t, at::opmath_type<scalar_t> eps, int64_t begin,
                                    int64_t end, scalar_t* __restrict__ out, at::opmath_type<scalar_t>* __restrict__ stats,
                                    at::opmath_type<scalar_t>* __restrict__ v) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t dim = t.dim;
  const acc_t width = static_cast<acc_t>(dim);
  const acc_t *b = t.bias, *gamma = t.gamma, *beta = t.beta;
  for_each_tail_row(t, begin, end, [&](int64_t r, const scalar_t* __restrict__ hr) GFMRAG_INLINE_LAMBDA {
    for (int64_t c = 0; c < dim; ++c) v[c] = add_rn(static_cast<acc_t>(hr[c]), b[c]);
    const acc_t mean = lane_sum<acc_t>(dim, [&](int64_t c) { return v[c]; }) / width;
    const acc_t var = lane_sum<acc_t>(dim, [&](int64_t c) {
                        const acc_t centred = sub_rn(v[c], mean);
                        return mul_rn(centred, centred);
                      }) / width;
    const acc_t rstd = tail_rstd(var, eps);
    scalar_t* __restrict__ o = out + r * dim;
    acc_t xhat;
    if (t.x != nullptr) {
      const scalar_t* __restrict__ xr = t.x + r * dim;
      for (int64_t c = 0; c < dim; ++c) {
        const acc_t y = tail_relu(tail_normalise(v[c], mean, rstd, gamma[c], beta[c], xhat));
        o[c] = static_cast<scalar_t>(add_rn(y, static_cast<acc_t>(xr[c])));
      }
    } else {
      for (int64_t c = 0; c < dim; ++c) {
        o[c] = static_cast<scalar_t>(tail_relu(tail_normalise(v[c], mean, rstd, gamma[c], beta[c], xhat)));
      }
    }
    stats[2 * r] = mean;
    stats[2 * r + 1] = rstd;
  });
}

// --- The vector path: float arithmetic (float32, or float16/bfloat16 rows), width a multiple of 8.
// Channel c = 8 i + j of a row is element j of vector i, and lane c mod 32 = 8 (i mod 4) + j of the
// row sum: the 32 lanes of dense_tail.h are four vectors, each still summing its channels in
// order. GCC's vector extensions spell the per-element operations out, so every clone runs them
// as whole vectors (the scalar loops above mostly did not vectorise); each operation is the
// scalar path's, in the same order, so the results are the same bits.
// GCC warns that returning a 32-byte vector changes the ABI for callers without AVX; these helpers
// are always inlined into each clone, so no such call exists.
#pragma GCC diagnostic ignored "-Wpsabi"
typedef float f32x8 __attribute__((vector_size(32)));
constexpr int64_t kVec = 8;

C10_ALWAYS_INLINE f32x8 load8(const float* p) {
  f32x8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <typename T>
C10_ALWAYS_INLINE f32x8 load8(const T* p) {
  f32x8 v;
  for (int j = 0; j < kVec; ++j) v[j] = static_cast<float>(p[j]);
  return v;
}
C10_ALWAYS_INLINE void store8(float* p, const f32x8& v) { std::memcpy(p, &v, sizeof v); }
template <typename T>
C10_ALWAYS_INLINE void store8(T* p, const f32x8& v) {
  for (int j = 0; j < kVec; ++j) p[j] = static_cast<T>(v[j]);
}

// bfloat16 as whole vectors (c10's per-element conversions, which GCC does not vectorise, spelled
// out): a bfloat16 is the upper half of a float32, so widening is a shift; narrowing rounds to
// nearest even, NaN becoming 0x7FC0 (c10's round_to_nearest_even).
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));
C10_ALWAYS_INLINE f32x8 load8(const at::BFloat16* p) {
  u16x8 raw;
  std::memcpy(&raw, p, sizeof raw);
  const u32x8 bits = __builtin_convertvector(raw, u32x8) << 16;
  f32x8 v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}
C10_ALWAYS_INLINE void store8(at::BFloat16* p, const f32x8& v) {
  u32x8 bits;
  std::memcpy(&bits, &v, sizeof bits);
  const u32x8 nan_bits = {0x7FC0, 0x7FC0, 0x7FC0, 0x7FC0, 0x7FC0, 0x7FC0, 0x7FC0, 0x7FC0};
  const u32x8 rounded = (bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16;
  const u16x8 out = __builtin_convertvector(v != v ? nan_bits : rounded, u16x8);
  std::memcpy(p, &out, sizeof out);
}

// Output rows larger than this many bytes are written with streaming (non-temporal) stores: they
// go to memory without first reading each cache line in, a third less memory traffic for a
// write, and the next op finds little of such an output in the caches anyway (they are a few MB
// per core). Smaller outputs stay in the caches for the next op.
constexpr int64_t kStreamBytes = int64_t(16) << 20;

// Whether float rows at `p` of `bytes` bytes are written with streaming stores (16-byte aligned).
inline bool stream_rows(const void* p, int64_t bytes) {
#if defined(__x86_64__)
  return bytes > kStreamBytes && reinterpret_cast<uintptr_t>(p) % 16 == 0;
#else
  return false;
#endif
}

// Stores a vector of an output row; `stream` (from stream_rows) only for float rows. 16-byte SSE
// streaming stores exist in both clones (x86-64's baseline).
C10_ALWAYS_INLINE void put8(float* p, const f32x8& v, bool stream) {
#if defined(__x86_64__)
  if (stream) {
    __m128 lo, hi;
    std::memcpy(&lo, &v, sizeof lo);
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof lo, sizeof hi);
    _mm_stream_ps(p, lo);
    _mm_stream_ps(p + 4, hi);
    return;
  }
#endif
  store8(p, v);
}
template <typename T>
C10_ALWAYS_INLINE void put8(T* p, const f32x8& v, bool) { store8(p, v); }

// copy[c, c + 8) = src[c, c + 8) unless copy is nullptr: the bits moved as they are (NaN payloads
// included, which a round trip through float would not keep for float16/bfloat16).
C10_ALWAYS_INLINE void copy8(float* copy, const float* src, int64_t c, bool stream) {
  if (copy != nullptr) put8(copy + c, load8(src + c), stream);
}
template <typename T>
C10_ALWAYS_INLINE void copy8(T* copy, const T* src, int64_t c, bool) {
  if (copy != nullptr) std::memcpy(copy + c, src + c, kVec * sizeof(T));
}

// Streaming stores are weakly ordered: fence them before the rows are handed to another thread.
inline void fence_streams(bool stream) {
#if defined(__x86_64__)
  if (stream) _mm_sfence();
#endif
}

// lane_sum for `vectors` vectors, value(i) = channels [8 i, 8 i + 8): four lane vectors, then the
// butterfly (16 and 8 between vectors, 4, 2, 1 inside the last one).
template <typename F>
C10_ALWAYS_INLINE float lane_sum8(int64_t vectors, const F& value) {
  f32x8 l0 = {}, l1 = {}, l2 = {}, l3 = {};
  int64_t i = 0;
  for (; i + 4 <= vectors; i += 4) {
    l0 += value(i);
    l1 += value(i + 1);
    l2 += value(i + 2);
    l3 += value(i + 3);
  }
  if (i < vectors) l0 += value(i);
  if (i + 1 < vectors) l1 += value(i + 1);
  if (i + 2 < vectors) l2 += value(i + 2);
  l0 += l2;
  l1 += l3;
  l0 += l1;
  const float a0 = l0[0] + l0[4], a1 = l0[1] + l0[5], a2 = l0[2] + l0[6], a3 = l0[3] + l0[7];
  return (a0 + a2) + (a1 + a3);
}

// tail_relu per element (a select, not max: NaN passes as in the scalar path).
C10_ALWAYS_INLINE f32x8 relu8(const f32x8& y) {
  const f32x8 zero = {};
  return y < zero ? zero : y;
}

// forward_rows for float arithmetic and dim % 8 == 0; v is a buffer of kRowBlock rows. Rows go in
// blocks of kRowBlock, each step (v and mean, variance, output) done for the whole block before the
// next: the rows' dependency chains (sum, divide, square root) are independent, so the core overlaps
// them instead of waiting on one row's chain at a time.
constexpr int64_t kRowBlock = 4;

template <typename scalar_t>
GFMRAG_CPU_CLONES void forward_rows_vec(const TailRows<scalar_t>& t, float eps, int64_t begin, int64_t end,
                                        scalar_t* __restrict__ out, float* __restrict__ stats,
                                        float* __restrict__ v, bool stream) {
  const int64_t dim = t.dim, vectors = dim / kVec;
  const float width = static_cast<float>(dim);
  const float *b = t.bias, *gamma = t.gamma, *beta = t.beta;
  for (int64_t r0 = begin; r0 < end; r0 += kRowBlock) {
    const int64_t n = std::min(kRowBlock, end - r0);
    float mean[kRowBlock], rstd[kRowBlock];
    for (int64_t q = 0; q < n; ++q) {
      const scalar_t* __restrict__ hr = t.h + (r0 + q) * dim;
      float* __restrict__ vq = v + q * dim;
      for (int64_t i = 0; i < vectors; ++i) store8(vq + kVec * i, load8(hr + kVec * i) + load8(b + kVec * i));
      mean[q] = lane_sum8(vectors, [&](int64_t i) GFMRAG_INLINE_LAMBDA { return load8(vq + kVec * i); }) / width;
    }
    for (int64_t q = 0; q < n; ++q) {
      const float* __restrict__ vq = v + q * dim;
      const float m = mean[q];
      const float var = lane_sum8(vectors, [&](int64_t i) GFMRAG_INLINE_LAMBDA {
                          const f32x8 centred = load8(vq + kVec * i) - m;
                          return centred * centred;
                        }) / width;
      rstd[q] = tail_rstd(var, eps);
    }
    for (int64_t q = 0; q < n; ++q) {
      const int64_t r = r0 + q;
      const float* __restrict__ vq = v + q * dim;
      const float m = mean[q], s = rstd[q];
      scalar_t* __restrict__ o = out + r * dim;
      const auto y = [&](int64_t i) GFMRAG_INLINE_LAMBDA {
        const f32x8 xhat = (load8(vq + kVec * i) - m) * s;
        return relu8(xhat * load8(gamma + kVec * i) + load8(beta + kVec * i));
      };
      if (t.x != nullptr) {
        const scalar_t* __restrict__ xr = t.x + r * dim;
        for (int64_t i = 0; i < vectors; ++i) put8(o + kVec * i, y(i) + load8(xr + kVec * i), stream);
      } else {
        for (int64_t i = 0; i < vectors; ++i) put8(o + kVec * i, y(i), stream);
      }
      stats[2 * r] = m;
      stats[2 * r + 1] = s;
    }
  }
}

// backward_rows for float arithmetic and dim % 8 == 0 (same arguments, but xhat and grad_xhat hold
// kRowBlock rows). Rows go in blocks of kRowBlock as in the forward: the first sweep and the two
// row sums for every row of the block, then the second sweep; parameter partials still add row by
// row in order.
template <typename scalar_t>
GFMRAG_CPU_CLONES void backward_rows_vec(const TailRows<scalar_t>& t, int64_t begin, int64_t end,
                                         scalar_t* __restrict__ grad_h, float* __restrict__ p_bias,
                                         float* __restrict__ p_weight, float* __restrict__ p_beta,
                                         float* __restrict__ xhat, float* __restrict__ grad_xhat, bool stream) {
  const int64_t dim = t.dim, vectors = dim / kVec;
  const float width = static_cast<float>(dim);
  const float *b = t.bias, *gamma = t.gamma, *beta = t.beta;
  const f32x8 zero = {};
  for (int64_t r0 = begin; r0 < end; r0 += kRowBlock) {
    const int64_t n = std::min(kRowBlock, end - r0);
    float a_mean[kRowBlock], b_mean[kRowBlock];
    for (int64_t q = 0; q < n; ++q) {
      const int64_t r = r0 + q;
      const scalar_t* __restrict__ hr = t.h + r * dim;
      const scalar_t* __restrict__ gr = t.grad_out + r * dim;
      const float mean = t.stats[2 * r], rstd = t.stats[2 * r + 1];
      scalar_t* __restrict__ copy = t.grad_out_copy != nullptr ? t.grad_out_copy + r * dim : nullptr;
      float* __restrict__ xq = xhat + q * dim;
      float* __restrict__ gq = grad_xhat + q * dim;
      for (int64_t i = 0; i < vectors; ++i) {
        const int64_t c = kVec * i;
        copy8(copy, gr, c, stream);
        const f32x8 xh = ((load8(hr + c) + load8(b + c)) - mean) * rstd;
        const f32x8 y = xh * load8(gamma + c) + load8(beta + c);
        const f32x8 g = load8(gr + c);
        const f32x8 grad_y = y <= zero ? zero : g;  // threshold_backward's rule
        store8(xq + c, xh);
        store8(gq + c, grad_y * load8(gamma + c));
        store8(p_weight + c, load8(p_weight + c) + grad_y * xh);
        store8(p_beta + c, load8(p_beta + c) + grad_y);
      }
      a_mean[q] = lane_sum8(vectors, [&](int64_t i) GFMRAG_INLINE_LAMBDA { return load8(gq + kVec * i); }) / width;
      b_mean[q] = lane_sum8(vectors, [&](int64_t i) GFMRAG_INLINE_LAMBDA {
                    return load8(gq + kVec * i) * load8(xq + kVec * i);
                  }) / width;
    }
    for (int64_t q = 0; q < n; ++q) {
      const int64_t r = r0 + q;
      const float rstd = t.stats[2 * r + 1], a = a_mean[q], bm = b_mean[q];
      const float* __restrict__ xq = xhat + q * dim;
      const float* __restrict__ gq = grad_xhat + q * dim;
      scalar_t* __restrict__ gh = grad_h + (r - begin) * dim;
      for (int64_t i = 0; i < vectors; ++i) {
        const int64_t c = kVec * i;
        const f32x8 grad_v = rstd * ((load8(gq + c) - a) - load8(xq + c) * bm);
        put8(gh + c, grad_v, stream);
        store8(p_bias + c, load8(p_bias + c) + grad_v);
      }
    }
  }
}

// Whether rows of this type and width take the vector path.
template <typename scalar_t>
constexpr bool use_vector_path(int64_t dim) {
  return std::is_same_v<at::opmath_type<scalar_t>, float> && dim % kVec == 0;
}

// Rows [begin, end) of one chunk: grad_h (pointing at row `begin`), and the chunk's partial sums of
// the bias, ln_weight and ln_bias gradients (p_bias, p_weight, p_beta, added to in row order).
// xhat and grad_xhat are row-sized scratch buffers.
template <typename scalar_t>
GFMRAG_CPU_CLONES void backward_rows(const TailRows<scalar_t>& t, int64_t begin, int64_t end,
                                     scalar_t* __restrict__ grad_h, at::opmath_type<scalar_t>* __restrict__ p_bias,
                                     at::opmath_type<scalar_t>* __restrict__ p_weight,
                                     at::opmath_type<scalar_t>* __restrict__ p_beta,
                                     at::opmath_type<scalar_t>* __restrict__ xhat,
                                     at::opmath_type<scalar_t>* __restrict__ grad_xhat) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t dim = t.dim;
  const acc_t width = static_cast<acc_t>(dim);
  const acc_t *b = t.bias, *gamma = t.gamma, *beta = t.beta;
  for_each_tail_row(t, begin, end, [&](int64_t r, const scalar_t* __restrict__ hr) GFMRAG_INLINE_LAMBDA {
    const scalar_t* __restrict__ gr = t.grad_out + r * dim;
    if (t.grad_out_copy != nullptr) std::copy(gr, gr + dim, t.grad_out_copy + r * dim);
    const acc_t mean = t.stats[2 * r], rstd = t.stats[2 * r + 1];
    for (int64_t c = 0; c < dim; ++c) {
      acc_t xh;
      const acc_t y = tail_normalise(add_rn(static_cast<acc_t>(hr[c]), b[c]), mean, rstd, gamma[c], beta[c], xh);
      // The ReLU's gradient: threshold_backward's rule, so a NaN output passes its gradient.
      // (Loaded before the select, so that the loop has no branch and vectorises.)
      const acc_t g = static_cast<acc_t>(gr[c]);
      const acc_t grad_y = y <= acc_t(0) ? acc_t(0) : g;
      xhat[c] = xh;
      grad_xhat[c] = mul_rn(grad_y, gamma[c]);
      p_weight[c] = add_rn(p_weight[c], mul_rn(grad_y, xh));
      p_beta[c] = add_rn(p_beta[c], grad_y);
    }
    const acc_t a_mean = lane_sum<acc_t>(dim, [&](int64_t c) { return grad_xhat[c]; }) / width;
    const acc_t b_mean = lane_sum<acc_t>(dim, [&](int64_t c) { return mul_rn(grad_xhat[c], xhat[c]); }) / width;
    scalar_t* __restrict__ gh = grad_h + (r - begin) * dim;
    for (int64_t c = 0; c < dim; ++c) {
      const acc_t grad_v = tail_input_grad(grad_xhat[c], xhat[c], rstd, a_mean, b_mean);
      gh[c] = static_cast<scalar_t>(grad_v);
      p_bias[c] = add_rn(p_bias[c], grad_v);
    }
  });
}

// out[j] = Σ_{i in [begin, end)} in[i, j], i in order, for j < columns (rows of `columns` values).
template <typename acc_t>
void sum_rows(const acc_t* in, int64_t begin, int64_t end, int64_t columns, acc_t* __restrict__ out) {
  std::fill(out, out + columns, acc_t(0));
  for (int64_t i = begin; i < end; ++i) {
    const acc_t* __restrict__ row = in + i * columns;
    for (int64_t j = 0; j < columns; ++j) out[j] = add_rn(out[j], row[j]);
  }
}

// The parameters of one call as acc_t rows, kept alive with the pointers into them.
template <typename scalar_t, typename param_t>
struct TailParams {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<acc_t> bias, gamma, beta;
  TailParams(const std::optional<at::Tensor>& b, const std::optional<at::Tensor>& g,
             const std::optional<at::Tensor>& be, int64_t dim)
      : bias(param_row<acc_t, param_t>(b, dim, acc_t(0))),
        gamma(param_row<acc_t, param_t>(g, dim, acc_t(1))),
        beta(param_row<acc_t, param_t>(be, dim, acc_t(0))) {}
  void into(TailRows<scalar_t>& t) const {
    t.bias = bias.data();
    t.gamma = gamma.data();
    t.beta = beta.data();
  }
};

// The backward over all rows, chunks in parallel: grad_h, and each chunk's partial sums of the
// parameter gradients into `partials` ([chunks, 3, d]).
template <typename scalar_t>
void backward_chunks(const TailRows<scalar_t>& t, int64_t rows, scalar_t* grad_h, at::opmath_type<scalar_t>* partials) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t dim = t.dim;
  const int64_t bytes = rows * dim * int64_t(sizeof(scalar_t));
  const bool stream = stream_rows(grad_h, bytes) && (t.grad_out_copy == nullptr || stream_rows(t.grad_out_copy, bytes));
  at::parallel_for(0, num_row_chunks(rows), 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    // row buffers: kRowBlock rows for the vector path, one for the scalar path
    std::vector<acc_t> xhat(kRowBlock * dim), grad_xhat(kRowBlock * dim);
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      acc_t* p = partials + chunk * kNumParamGrads * dim;
      const int64_t begin = chunk * kRowsPerChunk, end = std::min(rows, begin + kRowsPerChunk);
      if constexpr (std::is_same_v<acc_t, float>) {
        if (use_vector_path<scalar_t>(dim)) {
          backward_rows_vec<scalar_t>(t, begin, end, grad_h + begin * dim, p, p + dim, p + 2 * dim, xhat.data(),
                                      grad_xhat.data(), stream);
          continue;
        }
      }
      backward_rows<scalar_t>(t, begin, end, grad_h + begin * dim, p, p + dim, p + 2 * dim, xhat.data(),
                              grad_xhat.data());
    }
    fence_streams(stream);
  });
}

// grad_params [3, d] from the chunks' partial sums, in the order of dense_tail.h: per group of
// kChunksPerGroup chunks, then the groups (as the CUDA kernels add them).
template <typename acc_t, typename param_t>
void combine_partials(const std::vector<acc_t>& partials, int64_t num_chunks, int64_t dim, param_t* out) {
  const int64_t columns = kNumParamGrads * dim;
  const int64_t num_groups = ceil_div(num_chunks, kChunksPerGroup);
  std::vector<acc_t> groups(num_groups * columns);
  at::parallel_for(0, num_groups, 1, [&](int64_t group_begin, int64_t group_end) {
    for (int64_t g = group_begin; g < group_end; ++g) {
      sum_rows(partials.data(), g * kChunksPerGroup, std::min(num_chunks, (g + 1) * kChunksPerGroup), columns,
               groups.data() + g * columns);
    }
  });
  std::vector<acc_t> total(columns);
  sum_rows(groups.data(), 0, num_groups, columns, total.data());
  for (int64_t j = 0; j < columns; ++j) out[j] = static_cast<param_t>(total[j]);
}

template <typename scalar_t>
TailRows<scalar_t> tail_rows(const at::Tensor& h, const at::Tensor* x, const at::Tensor* grad_out,
                             const at::Tensor* stats, int64_t dim) {
  TailRows<scalar_t> t{};
  t.h = h.const_data_ptr<scalar_t>();
  t.x = x ? x->const_data_ptr<scalar_t>() : nullptr;
  t.grad_out = grad_out ? grad_out->const_data_ptr<scalar_t>() : nullptr;
  t.stats = stats ? stats->const_data_ptr<at::opmath_type<scalar_t>>() : nullptr;
  t.grad_out_copy = nullptr;
  t.dim = dim;
  return t;
}

// The forward over all rows, rows in parallel: out and stats.
template <typename scalar_t>
void forward_all(const TailRows<scalar_t>& t, double eps, int64_t rows, at::Tensor& out, at::Tensor& stats) {
  using acc_t = at::opmath_type<scalar_t>;
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  acc_t* s = stats.mutable_data_ptr<acc_t>();
  const bool stream = stream_rows(o, rows * t.dim * int64_t(sizeof(scalar_t)));
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / t.dim), [&](int64_t begin, int64_t end) {
    if constexpr (std::is_same_v<acc_t, float>) {
      if (use_vector_path<scalar_t>(t.dim)) {
        std::vector<float> v(kRowBlock * t.dim);
        forward_rows_vec<scalar_t>(t, static_cast<float>(eps), begin, end, o, s, v.data(), stream);
        fence_streams(stream);
        return;
      }
    }
    std::vector<acc_t> v(t.dim);
    forward_rows<scalar_t>(t, static_cast<acc_t>(eps), begin, end, o, s, v.data());
  });
}

std::tuple<at::Tensor, at::Tensor> dense_tail_norm_cpu(const at::Tensor& h, const std::optional<at::Tensor>& x,
                                                       const std::optional<at::Tensor>& bias,
                                                       const std::optional<at::Tensor>& ln_weight,
                                                       const std::optional<at::Tensor>& ln_bias, double eps) {
  const DenseTailArgs a = check_dense_tail_norm_inputs(h, x, bias, ln_weight, ln_bias, eps);
  at::Tensor out = at::empty_like(h);
  at::Tensor stats = at::empty({a.rows, 2}, h.options().dtype(stats_dtype(h.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "dense_tail_norm_cpu", [&] {
    with_param_type<scalar_t>(a.param_dtype, [&](auto tag) {
      const TailParams<scalar_t, typename decltype(tag)::type> params(bias, ln_weight, ln_bias, a.dim);
      TailRows<scalar_t> t = tail_rows<scalar_t>(h, x ? &*x : nullptr, nullptr, nullptr, a.dim);
      params.into(t);
      forward_all(t, eps, a.rows, out, stats);
    });
  });
  return {out, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dense_tail_norm_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& h, const at::Tensor& stats, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& ln_weight, const std::optional<at::Tensor>& ln_bias, bool copy_grad_out) {
  const DenseTailArgs a = check_dense_tail_norm_backward_inputs(grad_out, h, stats, bias, ln_weight, ln_bias);
  at::Tensor grad_h = at::empty_like(h);
  at::Tensor grad_out_copy = copy_grad_out ? at::empty_like(h) : at::empty({0}, h.options());
  at::Tensor grad_params = at::empty({kNumParamGrads, a.dim}, h.options().dtype(a.param_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "dense_tail_norm_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_param_type<scalar_t>(a.param_dtype, [&](auto tag) {
      using param_t = typename decltype(tag)::type;
      const TailParams<scalar_t, param_t> params(bias, ln_weight, ln_bias, a.dim);
      TailRows<scalar_t> t = tail_rows<scalar_t>(h, nullptr, &grad_out, &stats, a.dim);
      if (copy_grad_out) t.grad_out_copy = grad_out_copy.mutable_data_ptr<scalar_t>();
      params.into(t);
      const int64_t num_chunks = num_row_chunks(a.rows);
      std::vector<acc_t> partials(num_chunks * kNumParamGrads * a.dim);
      backward_chunks(t, a.rows, grad_h.mutable_data_ptr<scalar_t>(), partials.data());
      combine_partials(partials, num_chunks, a.dim, grad_params.mutable_data_ptr<param_t>());
    });
  });
  return {grad_h, grad_params, grad_out_copy};
}

}  // namespace

TORCH_LIBRARY_IMPL(gfmrag_fast, CPU, m) {
  m.impl("dense_tail_norm", &dense_tail_norm_cpu);
  m.impl("dense_tail_norm_backward", &dense_tail_norm_backward_cpu);
}

}  // namespace gfmrag_fast
