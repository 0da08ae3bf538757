import pytest
import torch
from helpers import one_torch_thread

from lowbit.quant.formats import Int4Weight, Int8Weight
from lowbit.quant.primitives import QuantizationError
from lowbit.quant.search import search_params, search_quantize, weighted_error

# (N, K, gs): most ragged (576 = 4 x 128 + 64, the default model's hidden size)
SHAPES = [(6, 576, 128), (9, 200, 64), (5, 96, 32), (7, 130, 16), (3, 64, 64)]


@pytest.fixture(autouse=True)
def one_thread():
    """Thousands of small tensor ops: on a loaded 2-core machine two OpenMP threads make them
    several times slower than one, so these tests run single-threaded."""
    with one_torch_thread():
        yield


def rtn(w, bits, gs, symmetric, scale_dtype):
    if bits == 8:
        return Int8Weight.quantize(w, gs, scale_dtype=scale_dtype)
    return Int4Weight.quantize(w, gs, symmetric, scale_dtype=scale_dtype)


def importance_for(k, gen, kind):
    if kind == "none":
        return None
    a = torch.rand(k, generator=gen) ** 4 * 10  # heavy-tailed, like mean x² over real activations
    if kind == "with_zeros":
        a[::7] = 0
    return a


def correlated_inputs(n, k, gen):
    """Activations with shared directions (a rank-k/4 part) and outlier channels (log-normal
    column scales), like a transformer's."""
    shared = torch.randn(n, k // 4, generator=gen) @ torch.randn(k // 4, k, generator=gen)
    x = shared / (k // 4) ** 0.5 + 0.5 * torch.randn(n, k, generator=gen)
    return x * torch.exp(0.7 * torch.randn(k, generator=gen))


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("n,k,gs", SHAPES)
@pytest.mark.parametrize("bits,symmetric", [(4, False), (4, True), (8, True)])
@pytest.mark.parametrize("kind", ["none", "random", "with_zeros"])
def test_never_worse_than_rtn_on_its_objective(seed, n, k, gs, bits, symmetric, kind):
    gen = torch.Generator().manual_seed(seed)
    scale_dtype = (torch.float16, torch.bfloat16, torch.float32)[(seed + n) % 3]
    w = (torch.randn(n, k, generator=gen) * 0.02).to(scale_dtype)
    w[0, : gs // 2] = 0  # a partly empty group
    a = importance_for(k, gen, kind)
    ours = search_quantize(w, a, bits, gs, symmetric, scale_dtype)
    base = rtn(w, bits, gs, symmetric, scale_dtype)
    e_ours = weighted_error(w, ours.dequantize(torch.float32), a)
    e_rtn = weighted_error(w, base.dequantize(torch.float32), a)
    assert e_ours <= e_rtn * (1 + 1e-6) + 1e-30


def test_all_zero_weight_is_exact():
    w = torch.zeros(4, 96)
    f = search_quantize(w, torch.rand(96), 4, 32)
    assert torch.equal(f.dequantize(torch.float32), w)


@pytest.mark.parametrize("n,k,gs", SHAPES)
@pytest.mark.parametrize("bits,symmetric,gsize", [(4, False, True), (4, True, True),
                                                  (8, True, True), (8, True, False)])
def test_canonical_format(n, k, gs, bits, symmetric, gsize):
    """Same class, tensor names, dtypes and shapes as round-to-nearest: the checkpoint and the
    kernels see no difference."""
    group = gs if gsize else None
    w = torch.randn(n, k, dtype=torch.float16) * 0.02
    ours = search_quantize(w, torch.rand(k), bits, group, symmetric)
    base = Int8Weight.quantize(w, group) if bits == 8 else Int4Weight.quantize(w, gs, symmetric)
    assert type(ours) is type(base)
    assert {n_: (t.dtype, t.shape) for n_, t in ours.tensors().items()} == \
        {n_: (t.dtype, t.shape) for n_, t in base.tensors().items()}
    rebuilt = type(base).from_tensors(ours.tensors(), group, k, symmetric or bits == 8)
    assert torch.equal(rebuilt.dequantize(torch.float32), ours.dequantize(torch.float32))


def test_lower_output_error_than_rtn_on_held_out_inputs():
    """Measured over seeds 0-5 of this setup: the search's held-out output error is 0.70-0.77 x
    RTN's; the assertion leaves room for 0.85."""
    gen = torch.Generator().manual_seed(0)
    n, k, gs = 96, 192, 64
    x = correlated_inputs(1024, k, gen)
    train, held_out = x[:512], x[512:]
    w = torch.randn(n, k, generator=gen) * 0.05

    def output_error(fmt):
        return float(((held_out @ (w - fmt.dequantize(torch.float32)).T) ** 2).mean())

    ours = output_error(search_quantize(w, train.square().mean(0), 4, gs))
    base = output_error(Int4Weight.quantize(w, gs))
    assert ours < 0.85 * base


def test_deterministic():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(40, 576, generator=gen, dtype=torch.float32).half()
    a = torch.rand(576, generator=gen)
    one, two = search_quantize(w, a, 4, 128), search_quantize(w, a, 4, 128)
    for name, t in one.tensors().items():
        assert torch.equal(t, two.tensors()[name])


def test_params_are_stored_dtype_and_integer_zeros():
    w = torch.randn(8, 200) * 0.02
    s, z = search_params(w, None, 4, 64, False, torch.bfloat16)
    assert s.dtype == torch.bfloat16 and s.shape == (8, 4) and (s > 0).all()
    assert torch.equal(z, z.round()) and int(z.min()) >= 0 and int(z.max()) <= 15


@pytest.mark.parametrize("bad", [torch.rand(10), -torch.rand(64), torch.full((64,), float("nan"))])
def test_bad_importance_is_refused(bad):
    with pytest.raises(QuantizationError):
        search_quantize(torch.randn(4, 64), bad, 4, 32)
