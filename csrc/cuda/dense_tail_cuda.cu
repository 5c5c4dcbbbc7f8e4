// CUDA kernels of dense_tail_norm (forward) and dense_tail_norm_backward.
//
// Forward: one warp per row. Lane l owns channels l, l + 32, ... and keeps them in registers for
// the three sweeps of LayerNorm (mean, variance, output), so h and x are read once and out written
// once; the row sums are warp butterflies. Backward: one warp per chunk of kRowsPerChunk rows,
// rows in order; per row the same register-resident sweeps write grad_h, and each lane adds its
// channels' parameter-gradient terms to per-chunk partial sums in registers. A second kernel adds
// the [chunks, 3, d] partials in a fixed order (per group of chunks, then the groups): no atomics.
//
// The arithmetic is dense_tail.h's, whose _rn intrinsics keep nvcc from contracting products and
// sums into FMAs, and the row sums follow its 32-lane order: results equal the CPU kernels' bit
// for bit (tools/cuda_emulator checks this). Rows are limited to CUDA_MAX_DIM = 1024 channels
// (32 per lane in registers).
#include "../dense_tail.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zero.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace gfmrag_fast {
namespace {

constexpr int kWarpSize = 32;
constexpr int kBlockThreads = 128;  // 4 warps
constexpr int kWarpsPerBlock = kBlockThreads / kWarpSize;
constexpr int64_t kMaxDim = 1024;
constexpr int64_t kMaxGridBlocks = std::numeric_limits<int32_t>::max();  // grid.x limit
static_assert(kWarpSize == kTailLanes, "the row sums' lane count is the warp size");

// Calls f(std::integral_constant<int, P>{}) with P channels per lane, the smallest of 2, 4, ...,
// 32 that holds a row of `dim` channels.
template <typename F>
void with_channels_per_lane(int64_t dim, F&& f) {
  if (dim <= 2 * kWarpSize) f(std::integral_constant<int, 2>{});
  else if (dim <= 4 * kWarpSize) f(std::integral_constant<int, 4>{});
  else if (dim <= 8 * kWarpSize) f(std::integral_constant<int, 8>{});
  else if (dim <= 16 * kWarpSize) f(std::integral_constant<int, 16>{});
  else f(std::integral_constant<int, 32>{});
}

dim3 grid_of_warps(int64_t warps) {
  return dim3(static_cast<unsigned int>(std::min((warps + kWarpsPerBlock - 1) / kWarpsPerBlock, kMaxGridBlocks)));
}

// Σ over the warp, butterfly with offsets 16, 8, 4, 2, 1: every lane gets lane 0's value of the
// shuffle-down tree, which is the CPU kernels' lane combination.
template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v = add_rn(v, __shfl_xor_sync(0xffffffffu, v, offset));
  }
  return v;
}

template <typename param_t, typename acc_t>
__device__ __forceinline__ acc_t param_at(const param_t* p, int64_t c, acc_t fallback) {
  return p != nullptr ? static_cast<acc_t>(p[c]) : fallback;
}

// Grid-stride over warps: calls f(item) for items warp, warp + warps, ... < count. The item is
// uniform across a warp, so whole warps take part in every shuffle.
template <typename F>
__device__ __forceinline__ void for_each_warp_item(int64_t count, F&& f) {
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarpSize);
  for (int64_t item = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarpSize; item < count;
       item += warps) {
    f(item);
  }
}

template <typename scalar_t, typename param_t, int P>
__global__ void forward_kernel(const scalar_t* __restrict__ h, const scalar_t* __restrict__ x,
                               const param_t* __restrict__ bias, const param_t* __restrict__ gamma,
                               const param_t* __restrict__ beta, at::opmath_type<scalar_t> eps, int64_t rows,
                               int64_t dim, scalar_t* __restrict__ out, at::opmath_type<scalar_t>* __restrict__ stats) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % kWarpSize;
  const acc_t width = static_cast<acc_t>(dim);
  for_each_warp_item(rows, [&](int64_t r) {
    const int64_t base = r * dim;
    acc_t v[P];
    acc_t sum = 0;
#pragma unroll
    for (int i = 0; i < P; ++i) {
      const int64_t c = lane + i * kWarpSize;
      if (c < dim) {
        v[i] = add_rn(static_cast<acc_t>(h[base + c]), param_at(bias, c, acc_t(0)));
        sum = add_rn(sum, v[i]);
      }
    }
    const acc_t mean = warp_sum(sum) / width;
    acc_t squares = 0;
#pragma unroll
    for (int i = 0; i < P; ++i) {
      if (lane + i * kWarpSize < dim) {
        const acc_t centred = sub_rn(v[i], mean);
        squares = add_rn(squares, mul_rn(centred, centred));
      }
    }
    const acc_t rstd = tail_rstd(warp_sum(squares) / width, eps);
#pragma unroll
    for (int i = 0; i < P; ++i) {
      const int64_t c = lane + i * kWarpSize;
      if (c < dim) {
        acc_t xhat;
        acc_t y = tail_relu(tail_normalise(v[i], mean, rstd, param_at(gamma, c, acc_t(1)),
                                           param_at(beta, c, acc_t(0)), xhat));
        if (x != nullptr) y = add_rn(y, static_cast<acc_t>(x[base + c]));
        out[base + c] = static_cast<scalar_t>(y);
      }
    }
    if (lane == 0) {
      stats[2 * r] = mean;
      stats[2 * r + 1] = rstd;
    }
  });
}

// partials [chunks, 3, dim]: per chunk the sums of the bias, ln_weight and ln_bias gradients;
// grad_out_copy (or nullptr) receives a copy of grad_out.
template <typename scalar_t, typename param_t, int P>
__global__ void backward_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ h,
                                const at::opmath_type<scalar_t>* __restrict__ stats, const param_t* __restrict__ bias,
                                const param_t* __restrict__ gamma, const param_t* __restrict__ beta, int64_t rows,
                                int64_t dim, scalar_t* __restrict__ grad_h,
                                at::opmath_type<scalar_t>* __restrict__ partials,
                                scalar_t* __restrict__ grad_out_copy) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % kWarpSize;
  const acc_t width = static_cast<acc_t>(dim);
  for_each_warp_item(num_row_chunks(rows), [&](int64_t chunk) {
    acc_t p_bias[P], p_weight[P], p_beta[P];
#pragma unroll
    for (int i = 0; i < P; ++i) p_bias[i] = p_weight[i] = p_beta[i] = 0;
    const int64_t row_end = std::min(rows, (chunk + 1) * kRowsPerChunk);
    for (int64_t r = chunk * kRowsPerChunk; r < row_end; ++r) {
      const int64_t base = r * dim;
      const acc_t mean = stats[2 * r], rstd = stats[2 * r + 1];
      acc_t xhat[P], grad_xhat[P];
      acc_t a = 0, b = 0;
#pragma unroll
      for (int i = 0; i < P; ++i) {
        const int64_t c = lane + i * kWarpSize;
        if (c < dim) {
          const acc_t g = param_at(gamma, c, acc_t(1));
          const acc_t v = add_rn(static_cast<acc_t>(h[base + c]), param_at(bias, c, acc_t(0)));
          const acc_t y = tail_normalise(v, mean, rstd, g, param_at(beta, c, acc_t(0)), xhat[i]);
          // The ReLU's gradient: threshold_backward's rule, so a NaN output passes its gradient.
          const scalar_t go = grad_out[base + c];
          if (grad_out_copy != nullptr) grad_out_copy[base + c] = go;
          const acc_t grad_y = y <= acc_t(0) ? acc_t(0) : static_cast<acc_t>(go);
          grad_xhat[i] = mul_rn(grad_y, g);
          p_weight[i] = add_rn(p_weight[i], mul_rn(grad_y, xhat[i]));
          p_beta[i] = add_rn(p_beta[i], grad_y);
          a = add_rn(a, grad_xhat[i]);
          b = add_rn(b, mul_rn(grad_xhat[i], xhat[i]));
        }
      }
      const acc_t a_mean = warp_sum(a) / width;
      const acc_t b_mean = warp_sum(b) / width;
#pragma unroll
      for (int i = 0; i < P; ++i) {
        const int64_t c = lane + i * kWarpSize;
        if (c < dim) {
          const acc_t grad_v = tail_input_grad(grad_xhat[i], xhat[i], rstd, a_mean, b_mean);
          grad_h[base + c] = static_cast<scalar_t>(grad_v);
          p_bias[i] = add_rn(p_bias[i], grad_v);
        }
      }
    }
    acc_t* p = partials + chunk * kNumParamGrads * dim;
#pragma unroll
    for (int i = 0; i < P; ++i) {
      const int64_t c = lane + i * kWarpSize;
      if (c < dim) {
        p[c] = p_bias[i];
        p[dim + c] = p_weight[i];
        p[2 * dim + c] = p_beta[i];
      }
    }
  });
}

// out[g, j] = Σ_{i in group g} in[i, j] for groups of `group` consecutive rows of `columns` values,
// i in order: one thread per (g, j). Run twice: the chunks' partial sums per group, then the
// groups' sums into the parameter gradients (the order of dense_tail.h).
template <typename acc_t, typename out_t>
__global__ void sum_row_groups_kernel(const acc_t* __restrict__ in, int64_t rows, int64_t columns, int64_t group,
                                      out_t* __restrict__ out) {
  const int64_t item = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (item >= ceil_div(rows, group) * columns) return;
  const int64_t g = item / columns, j = item - g * columns;
  const int64_t end = rows < (g + 1) * group ? rows : (g + 1) * group;
  acc_t sum = 0;
  for (int64_t i = g * group; i < end; ++i) sum = add_rn(sum, in[i * columns + j]);
  out[item] = static_cast<out_t>(sum);
}

template <typename acc_t, typename out_t>
void sum_row_groups(const acc_t* in, int64_t rows, int64_t columns, int64_t group, out_t* out, cudaStream_t stream) {
  const int64_t items = ceil_div(rows, group) * columns;
  if (items == 0) return;
  const dim3 grid(static_cast<unsigned int>(ceil_div(items, kBlockThreads)));
  sum_row_groups_kernel<acc_t, out_t><<<grid, kBlockThreads, 0, stream>>>(in, rows, columns, group, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
const T* optional_ptr(const std::optional<at::Tensor>& t) {
  return t ? t->const_data_ptr<T>() : nullptr;
}

void check_dim(const DenseTailArgs& a) {
  TORCH_CHECK_VALUE(a.dim <= kMaxDim, "dense_tail: the CUDA kernels support d_out <= ", kMaxDim, ", got ", a.dim);
}

std::tuple<at::Tensor, at::Tensor> dense_tail_norm_cuda(const at::Tensor& h, const std::optional<at::Tensor>& x,
                                                        const std::optional<at::Tensor>& bias,
                                                        const std::optional<at::Tensor>& ln_weight,
                                                        const std::optional<at::Tensor>& ln_bias, double eps) {
  const DenseTailArgs a = check_dense_tail_norm_inputs(h, x, bias, ln_weight, ln_bias, eps);
  check_dim(a);
  const at::cuda::OptionalCUDAGuard guard(device_of(h));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor out = at::empty_like(h);
  at::Tensor stats = at::empty({a.rows, 2}, h.options().dtype(stats_dtype(h.scalar_type())));
  if (a.rows == 0) return {out, stats};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "dense_tail_norm_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_param_type<scalar_t>(a.param_dtype, [&](auto tag) {
      using param_t = typename decltype(tag)::type;
      with_channels_per_lane(a.dim, [&](auto per_lane) {
        forward_kernel<scalar_t, param_t, decltype(per_lane)::value>
            <<<grid_of_warps(a.rows), kBlockThreads, 0, stream>>>(
                h.const_data_ptr<scalar_t>(), x ? x->const_data_ptr<scalar_t>() : nullptr,
                optional_ptr<param_t>(bias), optional_ptr<param_t>(ln_weight), optional_ptr<param_t>(ln_bias),
                static_cast<acc_t>(eps), a.rows, a.dim, out.mutable_data_ptr<scalar_t>(),
                stats.mutable_data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return {out, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dense_tail_norm_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& h, const at::Tensor& stats, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& ln_weight, const std::optional<at::Tensor>& ln_bias, bool copy_grad_out) {
  const DenseTailArgs a = check_dense_tail_norm_backward_inputs(grad_out, h, stats, bias, ln_weight, ln_bias);
  check_dim(a);
  const at::cuda::OptionalCUDAGuard guard(device_of(h));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor grad_h = at::empty_like(h);
  at::Tensor grad_out_copy = copy_grad_out ? at::empty_like(h) : at::empty({0}, h.options());
  at::Tensor grad_params = at::empty({kNumParamGrads, a.dim}, h.options().dtype(a.param_dtype));
  const int64_t num_chunks = num_row_chunks(a.rows);
  const int64_t columns = kNumParamGrads * a.dim;
  const int64_t num_groups = ceil_div(num_chunks, kChunksPerGroup);
  const auto acc_options = h.options().dtype(stats_dtype(h.scalar_type()));
  at::Tensor partials = at::empty({num_chunks, columns}, acc_options);
  at::Tensor groups = at::empty({num_groups, columns}, acc_options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "dense_tail_norm_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_param_type<scalar_t>(a.param_dtype, [&](auto tag) {
      using param_t = typename decltype(tag)::type;
      if (num_chunks > 0) {
        with_channels_per_lane(a.dim, [&](auto per_lane) {
          backward_kernel<scalar_t, param_t, decltype(per_lane)::value>
              <<<grid_of_warps(num_chunks), kBlockThreads, 0, stream>>>(
                  grad_out.const_data_ptr<scalar_t>(), h.const_data_ptr<scalar_t>(), stats.const_data_ptr<acc_t>(),
                  optional_ptr<param_t>(bias), optional_ptr<param_t>(ln_weight), optional_ptr<param_t>(ln_bias),
                  a.rows, a.dim, grad_h.mutable_data_ptr<scalar_t>(), partials.mutable_data_ptr<acc_t>(),
                  copy_grad_out ? grad_out_copy.mutable_data_ptr<scalar_t>() : nullptr);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      }
      if (num_chunks == 0) {
        grad_params.zero_();
        return;
      }
      sum_row_groups(partials.const_data_ptr<acc_t>(), num_chunks, columns, kChunksPerGroup,
                     groups.mutable_data_ptr<acc_t>(), stream);
      sum_row_groups(groups.const_data_ptr<acc_t>(), num_groups, columns, num_groups,
                     grad_params.mutable_data_ptr<param_t>(), stream);
    });
  });
  return {grad_h, grad_params, grad_out_copy};
}

}  // namespace

TORCH_LIBRARY_IMPL(gfmrag_fast, CUDA, m) {
  m.impl("dense_tail_norm", &dense_tail_norm_cuda);
  m.impl("dense_tail_norm_backward", &dense_tail_norm_backward_cuda);
}

}  // namespace gfmrag_fast
