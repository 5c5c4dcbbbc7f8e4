// CPU kernels of dense_tail_norm (forward) and dense_tail_norm_backward.
//
// Forward: rows in parallel, one pass over memory per row (h and x read, out written); the row is
// kept in a thread-local buffer for the three sweeps LayerNorm needs (mean, variance, output).
// Backward: chunks of kRowsPerChunk rows in parallel; each chunk writes grad_h for its rows and its
// partial sums of the three parameter gradients, which are then added over the chunks in the
// order of dense_tail.h (per group of chunks, then the groups).
// Row sums follow the 32-lane order of dense_tail.h, so results match the CUDA kernels bit for bit.
#include "../dense_tail.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

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
// lanes are combined with offsets 16, 8, 4, 2, 1. The lane loop is contiguous, so it vectorises.
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

// The per-row work, compiled twice on x86-64 GCC: for AVX2 and for the baseline, picked at run
// time. AVX2 without FMA: vector width changes no result, and products are never fused into sums,
// so the rounding stays the CUDA kernels'.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define GFMRAG_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define GFMRAG_CPU_CLONES
#endif

// The rows' tensors as raw pointers, and the parameters as acc_t rows (LayerNorm's identity where
// one is absent).
template <typename scalar_t>
struct TailRows {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* h;         // [M, d]
  const scalar_t* x;         // [M, d] (the short cut) or nullptr
  const scalar_t* grad_out;  // [M, d] (backward)
  const acc_t* stats;        // [M, 2] mean, rstd (backward)
  const acc_t* bias;         // [d]
  const acc_t* gamma;        // [d]
  const acc_t* beta;         // [d]
  int64_t dim;
};

// Calls row(r, hr) for r in [begin, end), hr = row r of h. The row lambdas are always inlined,
// so that they are compiled for the target of each clone of their caller (they hold the channel
// loops that should vectorise); the rows they write are __restrict__ arguments of the caller,
// which tells the compiler that nothing they read aliases them.
#define GFMRAG_INLINE_LAMBDA __attribute__((always_inline))
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
  at::parallel_for(0, num_row_chunks(rows), 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    std::vector<acc_t> xhat(dim), grad_xhat(dim);
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      acc_t* p = partials + chunk * kNumParamGrads * dim;
      const int64_t begin = chunk * kRowsPerChunk, end = std::min(rows, begin + kRowsPerChunk);
      backward_rows<scalar_t>(t, begin, end, grad_h + begin * dim, p, p + dim, p + 2 * dim, xhat.data(),
                              grad_xhat.data());
    }
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
  t.dim = dim;
  return t;
}

// The forward over all rows, rows in parallel: out and stats.
template <typename scalar_t>
void forward_all(const TailRows<scalar_t>& t, double eps, int64_t rows, at::Tensor& out, at::Tensor& stats) {
  using acc_t = at::opmath_type<scalar_t>;
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  acc_t* s = stats.mutable_data_ptr<acc_t>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / t.dim), [&](int64_t begin, int64_t end) {
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

std::tuple<at::Tensor, at::Tensor> dense_tail_norm_backward_cpu(const at::Tensor& grad_out, const at::Tensor& h,
                                                                const at::Tensor& stats,
                                                                const std::optional<at::Tensor>& bias,
                                                                const std::optional<at::Tensor>& ln_weight,
                                                                const std::optional<at::Tensor>& ln_bias) {
  const DenseTailArgs a = check_dense_tail_norm_backward_inputs(grad_out, h, stats, bias, ln_weight, ln_bias);
  at::Tensor grad_h = at::empty_like(h);
  at::Tensor grad_params = at::empty({kNumParamGrads, a.dim}, h.options().dtype(a.param_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "dense_tail_norm_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_param_type<scalar_t>(a.param_dtype, [&](auto tag) {
      using param_t = typename decltype(tag)::type;
      const TailParams<scalar_t, param_t> params(bias, ln_weight, ln_bias, a.dim);
      TailRows<scalar_t> t = tail_rows<scalar_t>(h, nullptr, &grad_out, &stats, a.dim);
      params.into(t);
      const int64_t num_chunks = num_row_chunks(a.rows);
      std::vector<acc_t> partials(num_chunks * kNumParamGrads * a.dim);
      backward_chunks(t, a.rows, grad_h.mutable_data_ptr<scalar_t>(), partials.data());
      combine_partials(partials, num_chunks, a.dim, grad_params.mutable_data_ptr<param_t>());
    });
  });
  return {grad_h, grad_params};
}

}  // namespace

TORCH_LIBRARY_IMPL(gfmrag_fast, CPU, m) {
  m.impl("dense_tail_norm", &dense_tail_norm_cpu);
  m.impl("dense_tail_norm_backward", &dense_tail_norm_backward_cpu);
}

}  // namespace gfmrag_fast
