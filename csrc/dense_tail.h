// The dense tail of a GFM-RAG layer: shared declarations and the arithmetic both kernels share.
//
//   h   = x W[:, :d_in]ᵀ + update W[:, d_in:]ᵀ                 (BLAS / cuBLAS, in the composite op)
//   v   = h + bias
//   out = relu((v - mean(v)) * rstd(v) * ln_weight + ln_bias) (+ x)   (one pass: dense_tail_norm)
//
// with the LayerNorm statistics of each row in float32 (float64 for float64 inputs). The forward
// saves h and the per-row (mean, rstd) for the backward; the backward recomputes the normalised
// row and the ReLU mask from them (dense_tail_norm_backward), so the ReLU output is never stored.
//
// Every row reduction (the mean, the variance, and the two sums of the LayerNorm backward) has
// one fixed order, the same on the CPU and the GPU: 32 lanes, lane l summing channels l, l + 32,
// l + 64, ... in turn, then lanes combined pairwise as a butterfly (offsets 16, 8, 4, 2, 1). A
// warp computes it with one lane per lane; the CPU with an array of 32 partial sums. Parameter
// gradients are summed per chunk of kRowsPerChunk rows (rows in order), the chunks' sums per group
// of kChunksPerGroup chunks (in order), then the groups' sums (in order). So CPU and CUDA results
// agree bit for bit, and no result depends on the thread count.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>

#include "rounded_arith.h"

#include <cmath>
#include <cstdint>
#include <optional>
#include <type_traits>

namespace gfmrag_fast {

constexpr int kTailLanes = 32;            // lanes of the canonical row reduction (a warp)
constexpr int64_t kRowsPerChunk = 64;     // rows per partial sum of the parameter gradients
constexpr int64_t kChunksPerGroup = 64;   // partial sums added per group, before the groups are
constexpr int kNumParamGrads = 3;         // rows of grad_params: bias, ln_weight, ln_bias

C10_HOST_DEVICE inline int64_t num_row_chunks(int64_t rows) { return ceil_div(rows, kRowsPerChunk); }

// Shapes and options of one call, after the shared checks.
struct DenseTailArgs {
  int64_t rows;    // M
  int64_t dim;     // d_out, the normalised width
  bool has_bias;
  bool has_ln_weight;
  bool has_ln_bias;
  bool has_residual;
  // dtype of bias / ln_weight / ln_bias: h's, or float32 when h is float16/bfloat16 (autocast)
  at::ScalarType param_dtype;
};

// The composite op's inputs: x [M, d_in], update [M, d_in], weight [d_out, 2 d_in], the optional
// [d_out] parameters. Errors name the argument and the expected shape.
DenseTailArgs check_dense_tail_inputs(const at::Tensor& x, const at::Tensor& update, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias,
                                      const std::optional<at::Tensor>& ln_weight,
                                      const std::optional<at::Tensor>& ln_bias, double eps, bool residual);

// The kernels' inputs: h [M, d] contiguous, x [M, d] (the short cut) or none, the parameters.
DenseTailArgs check_dense_tail_norm_inputs(const at::Tensor& h, const std::optional<at::Tensor>& x,
                                           const std::optional<at::Tensor>& bias,
                                           const std::optional<at::Tensor>& ln_weight,
                                           const std::optional<at::Tensor>& ln_bias, double eps);

// ... and the backward kernel's: grad_out like h, stats [M, 2] in h's statistics dtype.
DenseTailArgs check_dense_tail_norm_backward_inputs(const at::Tensor& grad_out, const at::Tensor& h,
                                                    const at::Tensor& stats,
                                                    const std::optional<at::Tensor>& bias,
                                                    const std::optional<at::Tensor>& ln_weight,
                                                    const std::optional<at::Tensor>& ln_bias);

template <typename T>
struct TypeTag { using type = T; };

// Calls f(TypeTag<param_t>{}) with param_t the parameters' C++ type: scalar_t, or float for
// float16/bfloat16 tensors with float32 parameters (autocast).
template <typename scalar_t, typename F>
void with_param_type(at::ScalarType param_dtype, F&& f) {
  if constexpr (std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>) {
    if (param_dtype == at::kFloat) return f(TypeTag<float>{});
  }
  f(TypeTag<scalar_t>{});
}

// dtype of the per-row statistics (and of all arithmetic): float64 for float64, else float32.
at::ScalarType stats_dtype(at::ScalarType dtype);

// --- arithmetic shared by the CPU and CUDA kernels (rounded_arith.h) -----------------------

// 1 / sqrt(var + eps), correctly rounded division and square root on both sides.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t tail_rstd(acc_t var, acc_t eps) {
  return acc_t(1) / std::sqrt(add_rn(var, eps));
}

// The ReLU, NaN passing through as in torch.relu.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t tail_relu(acc_t y) {
  return y < acc_t(0) ? acc_t(0) : y;
}

// The LayerNorm output y = (v - mean) * rstd * gamma + beta of one channel; xhat is returned too.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t tail_normalise(acc_t v, acc_t mean, acc_t rstd, acc_t gamma, acc_t beta,
                                            acc_t& xhat) {
  xhat = mul_rn(sub_rn(v, mean), rstd);
  return add_rn(mul_rn(xhat, gamma), beta);
}

// The gradient of LayerNorm's input for one channel, from gx = d loss / d xhat and the row means
// of gx (a_mean) and of gx * xhat (b_mean).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t tail_input_grad(acc_t gx, acc_t xhat, acc_t rstd, acc_t a_mean, acc_t b_mean) {
  return mul_rn(rstd, sub_rn(sub_rn(gx, a_mean), mul_rn(xhat, b_mean)));
}

}  // namespace gfmrag_fast
