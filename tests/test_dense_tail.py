"""dense_tail: parity with the reference over dtypes and options, gradients, opcheck, compile, errors."""

import pytest
import torch
from torch.library import opcheck
from torch.nn import functional as F

from helpers import DEVICES
from gfmrag_fast.ops import dense_tail, dense_tail_reference

ops = torch.ops.gfmrag_fast
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# Error allowed relative to the largest reference value: the low-precision products round h.
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 3e-2, torch.float16: 4e-3}
# (bias, ln_weight, ln_bias) present
PARAM_SETS = {"all": (True, True, True), "none": (False, False, False), "no_bias": (False, True, True),
              "ln_weight_only": (True, True, False)}


def make_inputs(device, dtype, rows=37, d_in=24, d_out=24, params=(True, True, True), param_dtype=None, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + shift).to(device, dtype)

    x, update = rand(rows, d_in), rand(rows, d_in)
    weight = rand(d_out, 2 * d_in, scale=(2 * d_in) ** -0.5)
    pdtype = param_dtype or dtype
    bias, ln_weight, ln_bias = (
        rand(d_out, scale=s, shift=m).to(pdtype) if present else None
        for present, s, m in zip(params, (0.5, 0.3, 0.3), (0.0, 1.0, 0.1))
    )
    return x, update, weight, bias, ln_weight, ln_bias


def leaves(tensors):
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in tensors]


def assert_close_scaled(actual, expected, tol, name=""):
    """|actual - expected| <= tol * (max(1, max |expected|) + |expected|), on float64 copies."""
    assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
    actual, expected = actual.double(), expected.double()
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * max(scale, 1.0), msg=name)


def check_against_reference(device, dtype, residual, params, d_in=24, d_out=24, rows=37, param_dtype=None,
                            transform=lambda t: t):
    inputs = make_inputs(device, dtype, rows, d_in, d_out, params, param_dtype)
    ours = leaves(inputs)
    out = dense_tail(*[None if t is None else transform(t) for t in ours], eps=1e-5, residual=residual)
    assert out.dtype == dtype and out.numel() == rows * d_out and out.device.type == device
    out = out.reshape(rows, d_out)
    grad_out = torch.randn(rows, d_out, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out.backward(grad_out.to(device, dtype))
    # The reference in float64 from the same (rounded) values.
    ref = leaves([None if t is None else t.double() for t in inputs])
    expected = dense_tail_reference(*ref, eps=1e-5, residual=residual)
    expected.backward(grad_out.to(device))
    tol = TOLERANCE[dtype]
    assert_close_scaled(out, expected, tol, "out")
    for name, a, b in zip(("x", "update", "weight", "bias", "ln_weight", "ln_bias"), ours, ref):
        if a is None:
            continue
        assert a.grad.dtype == a.dtype, name
        assert_close_scaled(a.grad, b.grad, 4 * tol, name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("params", list(PARAM_SETS.values()), ids=list(PARAM_SETS))
def test_matches_reference(device, dtype, residual, params):
    check_against_reference(device, dtype, residual, params)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_float32_parameters_with_low_precision_inputs(device, dtype):
    """The autocast case: parameters stay float32 and get float32 gradients."""
    check_against_reference(device, dtype, True, PARAM_SETS["all"], param_dtype=torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_different_widths_without_residual(device, dtype):
    check_against_reference(device, dtype, False, PARAM_SETS["all"], d_in=10, d_out=33)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows,width", [(1, 1), (129, 70), (300, 64), (64 * 64 + 100, 5), (600, 520)])
def test_shapes_across_chunks_and_lanes(device, rows, width):
    """One channel, widths that are not multiples of 32, more rows than one chunk (64) and than
    one group of chunks (64 x 64) of the parameter gradients' sums."""
    check_against_reference(device, torch.float64, True, PARAM_SETS["all"], d_in=width, d_out=width, rows=rows)


@pytest.mark.parametrize("device", DEVICES)
def test_leading_dimensions(device):
    """[B, N, d] inputs give [B, N, d_out] outputs and gradients shaped like the inputs, none of
    them a view (so that autograd can accumulate into them in place)."""
    check_against_reference(device, torch.float32, True, PARAM_SETS["all"],
                            transform=lambda t: t.view(3, -1, t.shape[-1]) if t.shape[0] == 36 else t, rows=36)
    x, update, weight, bias, ln_weight, ln_bias = leaves(make_inputs(device, torch.float32, rows=12))
    x3, update3 = x.view(2, 6, 24), update.view(2, 6, 24)
    out = dense_tail(x3, update3, weight, bias, ln_weight, ln_bias)
    assert out.shape == (2, 6, 24) and out._base is None
    grads = torch.autograd.grad(out, (x3, update3), torch.ones_like(out))
    assert all(g.shape == (2, 6, 24) and g._base is None for g in grads)
    opcheck(ops.dense_tail.default, (x3.detach(), update3.detach(), weight.detach(), None, None, None, 1e-5, True))


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    def non_contiguous(t):
        if t.dim() != 2:
            return torch.stack([t, t], 1)[:, 0]
        return t.t().contiguous().t()

    check_against_reference(device, torch.float32, True, PARAM_SETS["all"], transform=non_contiguous)
    x, update, weight, bias, ln_weight, ln_bias = leaves(make_inputs(device, torch.float32))
    out = dense_tail(x, update, weight, bias, ln_weight, ln_bias)
    grad_out = torch.randn_like(out)
    (grad_x,) = torch.autograd.grad(out, x, grad_out.t().contiguous().t())
    torch.testing.assert_close(grad_x, torch.autograd.grad(dense_tail(x, update, weight, bias, ln_weight, ln_bias), x,
                                                           grad_out)[0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_no_rows(device, dtype):
    x, update, weight, bias, ln_weight, ln_bias = leaves(make_inputs(device, dtype, rows=0))
    out = dense_tail(x, update, weight, bias, ln_weight, ln_bias)
    assert out.shape == (0, 24)
    out.sum().backward()
    assert x.grad.shape == (0, 24) and update.grad.shape == (0, 24)
    for p in (weight, bias, ln_weight, ln_bias):
        assert torch.equal(p.grad, torch.zeros_like(p))


def test_gradcheck():
    for residual in (True, False):
        for params in PARAM_SETS.values():
            inputs = leaves(make_inputs("cpu", torch.float64, rows=9, d_in=5, d_out=5 if residual else 7, params=params))

            def fn(*tensors, residual=residual):
                return dense_tail(*tensors, eps=1e-5, residual=residual)

            assert torch.autograd.gradcheck(fn, tuple(inputs), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x, update, weight, bias, ln_weight, ln_bias = make_inputs(device, torch.float32, rows=40, d_in=8, d_out=8)
    for t in (x, update, weight, bias, ln_weight, ln_bias):
        t.requires_grad_(True)
    opcheck(ops.dense_tail.default, (x, update, weight, bias, ln_weight, ln_bias, 1e-5, True))
    opcheck(ops.dense_tail.default, (x, update, weight, None, None, None, 1e-5, False))
    with torch.no_grad():
        out, h, stats = ops.dense_tail(x, update, weight, bias, ln_weight, ln_bias, 1e-5, True)
    plain = [t.detach() for t in (x, update, weight, bias, ln_weight, ln_bias)]
    grad_out = torch.randn_like(out)
    opcheck(ops.dense_tail_backward.default,
            (grad_out, *plain[:3], h, stats, *plain[3:], True, [True, False, True]))
    opcheck(ops.dense_tail_norm.default, (h, plain[0], *plain[3:], 1e-5))
    opcheck(ops.dense_tail_norm_backward.default, (grad_out, h, stats, *plain[3:]))
    opcheck(ops.dense_tail_norm_backward.default, (grad_out, h, stats, *plain[3:], True))


def bits(t):
    """t's raw bytes: equal bits, NaN payloads and signed zeros included."""
    return t.contiguous().view(torch.uint8) if t.numel() else t


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,width", [(torch.float32, 64), (torch.float32, 37), (torch.bfloat16, 40),
                                         (torch.float16, 24), (torch.float64, 16)], ids=str)
def test_norm_backward_copies_grad_out(device, dtype, width):
    """copy_grad_out=True adds grad_out's exact copy (the short cut's gradient) and changes nothing else."""
    gen = torch.Generator().manual_seed(5)
    h, grad_out = (torch.randn(150, width, generator=gen).to(device, dtype) for _ in range(2))
    grad_out[3, 1], grad_out[4, :] = float("nan"), -0.0
    params = [torch.randn(width, generator=gen).to(device, dtype) for _ in range(3)]
    _, stats = ops.dense_tail_norm(h, None, *params, 1e-5)
    grad_h, grad_params, none = ops.dense_tail_norm_backward(grad_out, h, stats, *params)
    grad_h2, grad_params2, copy = ops.dense_tail_norm_backward(grad_out, h, stats, *params, True)
    assert none.numel() == 0
    assert copy.shape == grad_out.shape and copy.dtype == dtype and copy.data_ptr() != grad_out.data_ptr()
    assert torch.equal(bits(copy), bits(grad_out))
    assert torch.equal(bits(grad_h2), bits(grad_h)) and torch.equal(bits(grad_params2), bits(grad_params))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("width", [64, 63], ids=["vector-path", "scalar-path"])
def test_bfloat16_output_rounding(device, width):
    """With ln_weight = 0, x = 0 and float32 ln_bias, out = bfloat16(relu(ln_bias)): the rounding of
    float32 values to bfloat16, ties to even, overflow and NaN included, must be torch's."""
    one = 1.0
    values = torch.tensor([one + 2**-8, one + 3 * 2**-8, 3.0 + 2**-7, 2.0**-130, 3.3895314e38, 3.4028235e38,
                           float("inf"), float("nan"), 0.1, 7.0 + 2**-6, -2.0], dtype=torch.float32)
    ln_bias = values.repeat(width // values.numel() + 1)[:width].to(device)
    h = torch.randn(3, width, generator=torch.Generator().manual_seed(7)).to(device, torch.bfloat16)
    x = torch.zeros(3, width, dtype=torch.bfloat16, device=device)
    ln_weight = torch.zeros(width, device=device)
    out, _ = ops.dense_tail_norm(h, x, None, ln_weight, ln_bias, 1e-5)
    expected = ln_bias.clamp(min=0).where(~ln_bias.isnan(), ln_bias).to(torch.bfloat16).expand(3, width)
    assert torch.equal(out.isnan(), expected.isnan())
    finite = ~expected.isnan()
    assert torch.equal(bits(out[finite]), bits(expected[finite]))


def test_large_outputs_match_row_slices():
    """Outputs over 16 MB are written with streaming stores on x86 CPUs: rows must come out as the
    same rows computed alone (each row's out and grad_h depend on that row only)."""
    rows, width = 66_000, 64  # 16.9 MB per float32 tensor
    gen = torch.Generator().manual_seed(6)
    h, x, grad_out = (torch.randn(rows, width, generator=gen) for _ in range(3))
    params = [torch.randn(width, generator=gen) for _ in range(3)]
    out, stats = ops.dense_tail_norm(h, x, *params, 1e-5)
    grad_h, _, copy = ops.dense_tail_norm_backward(grad_out, h, stats, *params, True)
    assert torch.equal(copy, grad_out)
    for part in (slice(0, 700), slice(rows - 700, rows)):
        out_part, stats_part = ops.dense_tail_norm(h[part], x[part], *params, 1e-5)
        assert torch.equal(bits(out[part]), bits(out_part)) and torch.equal(stats[part], stats_part)
        grad_h_part, _, _ = ops.dense_tail_norm_backward(grad_out[part], h[part], stats_part, *params)
        assert torch.equal(bits(grad_h[part]), bits(grad_h_part))


def test_torch_compile_fullgraph():
    x, update, weight, bias, ln_weight, ln_bias = leaves(make_inputs("cpu", torch.float32, rows=50, d_in=16, d_out=16))

    @torch.compile(fullgraph=True, backend="aot_eager")
    def layer(x, update):
        return dense_tail(x * 2, update, weight, bias, ln_weight, ln_bias).sum(-1)

    out = layer(x, update)
    out.square().sum().backward()
    grads = [t.grad.clone() for t in (x, update, weight, bias)]
    for t in (x, update, weight, bias):
        t.grad = None
    expected = dense_tail(x * 2, update, weight, bias, ln_weight, ln_bias).sum(-1)
    expected.square().sum().backward()
    torch.testing.assert_close(out, expected)
    for got, t in zip(grads, (x, update, weight, bias)):
        torch.testing.assert_close(got, t.grad)


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic(device):
    """The op gives the same bits run to run; its fused passes also for any thread count (the
    products are BLAS's, whose sums may depend on the thread count)."""
    # 9,000 rows: several chunks and groups of chunks
    inputs = make_inputs(device, torch.float32, rows=9000, d_in=32, d_out=32)
    grad_out = torch.randn(9000, 32, generator=torch.Generator().manual_seed(3)).to(device)
    runs = []
    for _ in range(2):
        tensors = leaves(inputs)
        out = dense_tail(*tensors)
        runs.append([out] + list(torch.autograd.grad(out, tensors, grad_out)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)

    x, update, weight, bias, ln_weight, ln_bias = inputs
    h = update * 3 + 0.5
    threads = torch.get_num_threads()
    kernel_runs = []
    try:
        for num_threads in (threads, 1):
            torch.set_num_threads(num_threads)
            out, stats = ops.dense_tail_norm(h, x, bias, ln_weight, ln_bias, 1e-5)
            kernel_runs.append([out, stats, *ops.dense_tail_norm_backward(grad_out, h, stats, bias, ln_weight, ln_bias)])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*kernel_runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_autocast(device):
    """Under autocast the products run in bfloat16 and the output is bfloat16; LayerNorm's
    statistics and the parameters' gradients stay float32."""
    inputs = leaves(make_inputs(device, torch.float32, rows=64, d_in=32, d_out=32))
    with torch.autocast(device, dtype=torch.bfloat16):
        out = dense_tail(*inputs)
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    ref = leaves(inputs)
    expected = dense_tail_reference(*[t.to(torch.bfloat16).double() if i < 3 else t.double() for i, t in enumerate(ref)])
    assert_close_scaled(out, expected, 3e-2, "out")
    for t in inputs:
        assert t.grad.dtype == torch.float32 and torch.isfinite(t.grad).all()


def test_nan_propagates_like_the_reference():
    x, update, weight, bias, ln_weight, ln_bias = make_inputs("cpu", torch.float32, rows=4, d_in=8, d_out=8)
    x[1, 3] = float("nan")
    out = dense_tail(x, update, weight, bias, ln_weight, ln_bias)
    expected = dense_tail_reference(x, update, weight, bias, ln_weight, ln_bias)
    assert torch.equal(out.isnan(), expected.isnan())
    torch.testing.assert_close(out[~out.isnan()], expected[~expected.isnan()])


def test_bad_inputs_name_the_argument():
    x, update, weight, bias, ln_weight, ln_bias = make_inputs("cpu", torch.float32, rows=5, d_in=4, d_out=4)
    cases = [
        (dict(x=x[:, :0]), r"x must have shape \[\.\.\., d_in\] with d_in > 0"),
        (dict(x=x.long()), "x must be float32, float64, float16 or bfloat16"),
        (dict(update=update[:, :3]), r"update must have shape \[\.\.\., d_in\] = \[5, 4\] like x"),
        (dict(update=update[None]), r"update must have shape \[\.\.\., d_in\] = \[5, 4\] like x"),
        (dict(update=update.double()), "update has dtype Double but x has Float"),
        (dict(weight=weight[:, :7]), r"weight must have shape \[d_out, 2 \* d_in\] = \[d_out, 8\]"),
        (dict(bias=bias[:3]), r"bias must have shape \[d_out\] = \[4\]"),
        (dict(ln_weight=ln_weight.double()), "ln_weight has dtype Double but x has Float"),
        (dict(ln_bias=ln_bias[None]), r"ln_bias must have shape \[d_out\]"),
        (dict(weight=torch.randn(6, 8)), "residual=True .* needs d_out == d_in"),
        (dict(eps=-1.0), "eps must be finite and >= 0"),
    ]
    base = dict(x=x, update=update, weight=weight, bias=bias, ln_weight=ln_weight, ln_bias=ln_bias)
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            dense_tail(**{**base, **change})
    with pytest.raises(ValueError, match="bias, ln_weight and ln_bias must share one dtype"):
        dense_tail(x.bfloat16(), update.bfloat16(), weight.bfloat16(), bias, ln_weight.bfloat16(), None)
    with pytest.raises(TypeError, match="update must be a tensor"):
        dense_tail(x, update.tolist(), weight)
    with pytest.raises(ValueError, match="stats must have shape"):
        ops.dense_tail_norm_backward(x, x, torch.zeros(5, 3), None, None, None)
    _, h, stats = ops.dense_tail(x, update, weight, bias, ln_weight, ln_bias, 1e-5, True)
    with pytest.raises(ValueError, match=r"h must have shape \[1, 5, 4\] \(the forward.s h"):
        ops.dense_tail_backward(x[None], x[None], update[None], weight, h, stats, bias, ln_weight, ln_bias, True,
                                [True, True, True])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.cuda
def test_cuda_width_limit_and_mixed_devices():
    x, update, weight, bias, ln_weight, ln_bias = make_inputs("cuda", torch.float32, rows=3, d_in=1100, d_out=1100)
    with pytest.raises(ValueError, match="d_out <= 1024"):
        dense_tail(x, update, weight, bias, ln_weight, ln_bias)
    x, update, weight, bias, ln_weight, ln_bias = make_inputs("cuda", torch.float32, rows=3, d_in=4, d_out=4)
    with pytest.raises(ValueError, match="ln_weight is on cpu but x is on cuda"):
        dense_tail(x, update, weight, bias, ln_weight.cpu(), ln_bias)
