// Schemas of the dense_tail op family, the one input check its kernels share, and the composite
// ops that put the matrix products (BLAS / cuBLAS) around the fused kernels.
#include "dense_tail.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <array>
#include <tuple>
#include <vector>

namespace gfmrag_fast {

at::ScalarType stats_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

namespace {

bool is_reduced_float(at::ScalarType dtype) { return dtype == at::kHalf || dtype == at::kBFloat16; }

// bias, ln_weight, ln_bias: [dim] each, on like's device, all in one dtype that is like's or, for
// float16/bfloat16 tensors (autocast), float32. Returns that dtype (like's when none is given).
at::ScalarType check_params(const char* op, const at::Tensor& like, int64_t dim,
                            const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& ln_weight,
                            const std::optional<at::Tensor>& ln_bias, bool need_contiguous) {
  std::optional<at::ScalarType> dtype;
  const std::array<std::pair<const char*, const std::optional<at::Tensor>*>, 3> params = {
      {{"bias", &bias}, {"ln_weight", &ln_weight}, {"ln_bias", &ln_bias}}};
  for (const auto& [name, param] : params) {
    if (!param->has_value()) continue;
    const at::Tensor& p = **param;
    TORCH_CHECK_VALUE(p.dim() == 1 && p.size(0) == dim, op, ": ", name, " must have shape [d_out] = [", dim,
                      "], got ", p.sizes());
    TORCH_CHECK_VALUE(p.device() == like.device(), op, ": ", name, " is on ", p.device(), " but x is on ",
                      like.device(), "; move both to the same device");
    TORCH_CHECK_VALUE(p.scalar_type() == like.scalar_type() ||
                          (p.scalar_type() == at::kFloat && is_reduced_float(like.scalar_type())),
                      op, ": ", name, " has dtype ", p.scalar_type(), " but x has ", like.scalar_type(),
                      " (parameters must match x, or be float32 for float16/bfloat16 x)");
    TORCH_CHECK_VALUE(!dtype || *dtype == p.scalar_type(), op, ": bias, ln_weight and ln_bias must share one dtype, ",
                      name, " has ", p.scalar_type(), " but another has ", *dtype);
    TORCH_CHECK_VALUE(!need_contiguous || p.is_contiguous(), op, ": ", name, " must be contiguous");
    dtype = p.scalar_type();
  }
  return dtype.value_or(like.scalar_type());
}

void check_floating(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble ||
                        is_reduced_float(t.scalar_type()),
                    op, ": ", name, " must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
}

void check_like(const char* op, const char* name, const at::Tensor& t, const char* like_name,
                const at::Tensor& like) {
  TORCH_CHECK_VALUE(t.device() == like.device(), op, ": ", name, " is on ", t.device(), " but ", like_name,
                    " is on ", like.device(), "; move both to the same device");
  TORCH_CHECK_VALUE(t.scalar_type() == like.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
                    " but ", like_name, " has ", like.scalar_type());
}

void check_eps(const char* op, double eps) {
  TORCH_CHECK_VALUE(eps >= 0.0 && std::isfinite(eps), op, ": eps must be finite and >= 0, got ", eps);
}

}  // namespace

DenseTailArgs check_dense_tail_inputs(const at::Tensor& x, const at::Tensor& update, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias,
                                      const std::optional<at::Tensor>& ln_weight,
                                      const std::optional<at::Tensor>& ln_bias, double eps, bool residual) {
  constexpr const char* op = "dense_tail";
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) > 0, op, ": x must have shape [..., d_in] with d_in > 0, got ",
                    x.sizes());
  check_floating(op, "x", x);
  const int64_t d_in = x.size(-1), rows = x.numel() / d_in;
  TORCH_CHECK_VALUE(update.sizes() == x.sizes(), op, ": update must have shape [..., d_in] = ", x.sizes(),
                    " like x, got ", update.sizes());
  check_like(op, "update", update, "x", x);
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == 2 * d_in, op,
                    ": weight must have shape [d_out, 2 * d_in] = [d_out, ", 2 * d_in, "], got ", weight.sizes());
  check_like(op, "weight", weight, "x", x);
  const int64_t dim = weight.size(0);
  TORCH_CHECK_VALUE(dim > 0, op, ": weight must have d_out > 0 rows, got shape ", weight.sizes());
  TORCH_CHECK_VALUE(!residual || dim == d_in, op, ": residual=True adds x to the output and needs d_out == d_in, got d_out = ",
                    dim, " and d_in = ", d_in);
  check_eps(op, eps);
  DenseTailArgs args{};
  args.rows = rows;
  args.dim = dim;
  args.param_dtype = check_params(op, x, dim, bias, ln_weight, ln_bias, /*need_contiguous=*/false);
  args.has_bias = bias.has_value();
  args.has_ln_weight = ln_weight.has_value();
  args.has_ln_bias = ln_bias.has_value();
  args.has_residual = residual;
  return args;
}

DenseTailArgs check_dense_tail_norm_inputs(const at::Tensor& h, const std::optional<at::Tensor>& x,
                                           const std::optional<at::Tensor>& bias,
                                           const std::optional<at::Tensor>& ln_weight,
                                           const std::optional<at::Tensor>& ln_bias, double eps) {
  constexpr const char* op = "dense_tail_norm";
  TORCH_CHECK_VALUE(h.dim() >= 1 && h.size(-1) > 0, op, ": h must have shape [..., d] with d > 0, got ", h.sizes());
  check_floating(op, "h", h);
  TORCH_CHECK_VALUE(h.is_contiguous(), op, ": h must be contiguous");
  if (x) {
    TORCH_CHECK_VALUE(x->sizes() == h.sizes(), op, ": x (the short cut) must have shape ", h.sizes(),
                      " like h, got ", x->sizes());
    check_like(op, "x", *x, "h", h);
    TORCH_CHECK_VALUE(x->is_contiguous(), op, ": x must be contiguous");
  }
  check_eps(op, eps);
  DenseTailArgs args{};
  args.dim = h.size(-1);
  args.rows = h.numel() / args.dim;
  args.param_dtype = check_params(op, h, args.dim, bias, ln_weight, ln_bias, /*need_contiguous=*/true);
  args.has_bias = bias.has_value();
  args.has_ln_weight = ln_weight.has_value();
  args.has_ln_bias = ln_bias.has_value();
  args.has_residual = x.has_value();
  return args;
}

DenseTailArgs check_dense_tail_norm_backward_inputs(const at::Tensor& grad_out, const at::Tensor& h,
                                                    const at::Tensor& stats,
                                                    const std::optional<at::Tensor>& bias,
                                                    const std::optional<at::Tensor>& ln_weight,
                                                    const std::optional<at::Tensor>& ln_bias) {
  constexpr const char* op = "dense_tail_norm_backward";
  DenseTailArgs args = check_dense_tail_norm_inputs(h, std::nullopt, bias, ln_weight, ln_bias, 0.0);
  TORCH_CHECK_VALUE(grad_out.sizes() == h.sizes(), op, ": grad_out must have shape ", h.sizes(), " like h, got ",
                    grad_out.sizes());
  check_like(op, "grad_out", grad_out, "h", h);
  TORCH_CHECK_VALUE(grad_out.is_contiguous(), op, ": grad_out must be contiguous");
  TORCH_CHECK_VALUE(stats.dim() == 2 && stats.size(0) == args.rows && stats.size(1) == 2, op,
                    ": stats must have shape [rows, 2] = [", args.rows, ", 2] (the forward's mean and rstd), got ",
                    stats.sizes());
  TORCH_CHECK_VALUE(stats.device() == h.device() && stats.scalar_type() == stats_dtype(h.scalar_type()) &&
                        stats.is_contiguous(),
                    op, ": stats must be the contiguous ", stats_dtype(h.scalar_type()),
                    " tensor the forward returned, on h's device");
  return args;
}

namespace {

// The kernel ops, called through the dispatcher so that each device gets its own kernel.
std::tuple<at::Tensor, at::Tensor> call_norm(const at::Tensor& h, const std::optional<at::Tensor>& x,
                                             const std::optional<at::Tensor>& bias,
                                             const std::optional<at::Tensor>& ln_weight,
                                             const std::optional<at::Tensor>& ln_bias, double eps) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("gfmrag_fast::dense_tail_norm", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                           const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, double)>();
  return op.call(h, x, bias, ln_weight, ln_bias, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_norm_backward(const at::Tensor& grad_out, const at::Tensor& h,
                                                                  const at::Tensor& stats,
                                                                  const std::optional<at::Tensor>& bias,
                                                                  const std::optional<at::Tensor>& ln_weight,
                                                                  const std::optional<at::Tensor>& ln_bias,
                                                                  bool copy_grad_out) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("gfmrag_fast::dense_tail_norm_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                           const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, bool)>();
  return op.call(grad_out, h, stats, bias, ln_weight, ln_bias, copy_grad_out);
}

std::optional<at::Tensor> contiguous(const std::optional<at::Tensor>& t) {
  return t ? std::optional<at::Tensor>(t->contiguous()) : std::nullopt;
}

// The x half and the update half of weight [d_out, 2 d_in], as views (no copy: BLAS reads them
// with a leading dimension of 2 d_in).
std::pair<at::Tensor, at::Tensor> weight_halves(const at::Tensor& weight) {
  const int64_t d_in = weight.size(1) / 2;
  return {weight.narrow(1, 0, d_in), weight.narrow(1, d_in, d_in)};
}

// Inputs and outputs keep their leading dimensions ([..., d]); the products see them as [rows, d]
// views. Every returned tensor is allocated in its final shape, so none is a view: autograd can then
// accumulate into the gradients in place.
std::tuple<at::Tensor, at::Tensor, at::Tensor> dense_tail_composite(
    const at::Tensor& x, const at::Tensor& update, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& ln_weight, const std::optional<at::Tensor>& ln_bias, double eps, bool residual) {
  const DenseTailArgs a = check_dense_tail_inputs(x, update, weight, bias, ln_weight, ln_bias, eps, residual);
  const int64_t d_in = x.size(-1);
  const auto [w_x, w_update] = weight_halves(weight);
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = a.dim;
  at::Tensor h = at::empty(shape, x.options());
  // h = x W_xᵀ + update W_updateᵀ: the second product accumulates into the first inside the GEMM.
  at::Tensor h_rows = h.view({a.rows, a.dim});
  at::mm_out(h_rows, x.reshape({a.rows, d_in}), w_x.t());
  h_rows.addmm_(update.reshape({a.rows, d_in}), w_update.t());
  auto [out, stats] = call_norm(h, residual ? std::optional<at::Tensor>(x.contiguous()) : std::nullopt,
                                contiguous(bias), contiguous(ln_weight), contiguous(ln_bias), eps);
  return {out, h, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dense_tail_backward_composite(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& update, const at::Tensor& weight,
    const at::Tensor& h, const at::Tensor& stats, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& ln_weight, const std::optional<at::Tensor>& ln_bias, bool residual,
    std::array<bool, 3> output_mask) {
  const DenseTailArgs a = check_dense_tail_inputs(x, update, weight, bias, ln_weight, ln_bias, 0.0, residual);
  const int64_t d_in = x.size(-1);
  std::vector<int64_t> out_shape = x.sizes().vec();
  out_shape.back() = a.dim;
  TORCH_CHECK_VALUE(h.sizes() == at::IntArrayRef(out_shape), "dense_tail_backward: h must have shape ", at::IntArrayRef(out_shape),
                    " (the forward's h, x's leading dimensions and d_out), got ", h.sizes());
  const at::Tensor grad_out_c = grad_out.contiguous();
  // With the short cut, grad_x starts as a copy of grad_out that the norm kernel writes while it
  // reads grad_out anyway; the product then accumulates into it (no separate copy pass).
  const bool shortcut_grad = output_mask[0] && residual;
  auto [grad_h, grad_params, grad_out_copy] = call_norm_backward(
      grad_out_c, h, stats, contiguous(bias), contiguous(ln_weight), contiguous(ln_bias), shortcut_grad);
  const at::Tensor grad_h_rows = grad_h.view({a.rows, a.dim});
  const auto [w_x, w_update] = weight_halves(weight);
  // A gradient not asked for comes back as an empty tensor.
  // (The copy has h's shape, which is x's: the short cut needs d_out == d_in.)
  at::Tensor grad_x = shortcut_grad ? grad_out_copy
                                    : at::empty(output_mask[0] ? x.sizes() : at::IntArrayRef{0}, x.options());
  at::Tensor grad_update = at::empty(output_mask[1] ? update.sizes() : at::IntArrayRef{0}, update.options());
  at::Tensor grad_weight = at::empty(output_mask[2] ? weight.sizes() : at::IntArrayRef{0}, weight.options());
  if (output_mask[0]) {
    at::Tensor grad_x_rows = grad_x.view({a.rows, d_in});
    if (residual) {
      // The short cut's gradient (already in grad_x) is the GEMM's accumulator.
      grad_x_rows.addmm_(grad_h_rows, w_x);
    } else {
      at::mm_out(grad_x_rows, grad_h_rows, w_x);
    }
  }
  if (output_mask[1]) {
    at::Tensor grad_update_rows = grad_update.view({a.rows, d_in});
    at::mm_out(grad_update_rows, grad_h_rows, w_update);
  }
  if (output_mask[2]) {
    // Written straight into the two halves of one [d_out, 2 d_in] tensor: no cat.
    auto [grad_w_x, grad_w_update] = weight_halves(grad_weight);
    at::mm_out(grad_w_x, grad_h_rows.t(), x.reshape({a.rows, d_in}));
    at::mm_out(grad_w_update, grad_h_rows.t(), update.reshape({a.rows, d_in}));
  }
  return {grad_x, grad_update, grad_weight, grad_params};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(gfmrag_fast, m) {
  // relu(layer_norm(x W[:, :d_in]ᵀ + update W[:, d_in:]ᵀ + bias)) (+ x) for x, update [..., d_in].
  // Returns (out [..., d_out], h [..., d_out] the products without bias, stats [rows, 2] each row's
  // LayerNorm mean and rstd), rows = x.numel() / d_in.
  m.def(
      "dense_tail(Tensor x, Tensor update, Tensor weight, Tensor? bias, Tensor? ln_weight, Tensor? ln_bias, "
      "float eps, bool residual) -> (Tensor, Tensor, Tensor)");
  // Returns (grad_x, grad_update, grad_weight, grad_params [3, d_out]: bias, ln_weight, ln_bias);
  // output_mask picks which of the first three are computed (the others come back empty).
  m.def(
      "dense_tail_backward(Tensor grad_out, Tensor x, Tensor update, Tensor weight, Tensor h, Tensor stats, "
      "Tensor? bias, Tensor? ln_weight, Tensor? ln_bias, bool residual, bool[3] output_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // The fused kernels after the products: (out, stats) from h, and (grad_h, grad_params, grad_out's
  // copy).
  m.def(
      "dense_tail_norm(Tensor h, Tensor? x, Tensor? bias, Tensor? ln_weight, Tensor? ln_bias, float eps) "
      "-> (Tensor, Tensor)");
  // With copy_grad_out, the third output is a copy of grad_out written in the same pass (the short
  // cut's gradient); without, it is empty.
  m.def(
      "dense_tail_norm_backward(Tensor grad_out, Tensor h, Tensor stats, Tensor? bias, Tensor? ln_weight, "
      "Tensor? ln_bias, bool copy_grad_out=False) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(gfmrag_fast, CompositeExplicitAutograd, m) {
  m.impl("dense_tail", &dense_tail_composite);
  m.impl("dense_tail_backward", &dense_tail_backward_composite);
}

}  // namespace gfmrag_fast
