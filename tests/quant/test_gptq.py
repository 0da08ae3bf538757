import pytest
import torch

from lowbit.quant.formats import Int4Weight, Int8Weight
from lowbit.quant.gptq import ORDERS, GPTQError, gptq_quantize, reconstruction_error
from lowbit.quant.search import search_quantize

from test_search import correlated_inputs, one_thread  # noqa: F401


def layer_and_inputs(seed, n=96, k=192):
    gen = torch.Generator().manual_seed(seed)
    x = correlated_inputs(1024, k, gen)
    w = torch.randn(n, k, generator=gen) * 0.05
    return w, x[:512], x[512:]


def output_error(w, fmt, x):
    return float(((x @ (w - fmt.dequantize(torch.float32)).T) ** 2).mean())


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("gs", [64, 32])
def test_lower_output_error_than_rtn_and_search_on_held_out_inputs(order, gs):
    """Measured over seeds 0-5 (gs 64): GPTQ's held-out output error is 0.28-0.40 x RTN's
    (static 0.28-0.32, group 0.31-0.36, none 0.34-0.40), the search's 0.70-0.77 x; the
    assertions leave room for 0.5 and for beating the search."""
    w, train, held_out = layer_and_inputs(0)
    h = train.T @ train / train.shape[0]
    ours = output_error(w, gptq_quantize(w, h, 4, gs, order=order), held_out)
    base = output_error(w, Int4Weight.quantize(w, gs), held_out)
    searched = output_error(w, search_quantize(w, train.square().mean(0), 4, gs), held_out)
    assert ours < 0.5 * base
    assert ours < searched


@pytest.mark.parametrize("order", ORDERS)
def test_identity_hessian_equals_the_unweighted_search(order):
    """With uncorrelated unit-variance inputs there is no error to compensate: GPTQ reduces to
    the search with equal importance (up to float ties between candidates: the search runs on
    one group at a time there, on the whole matrix here)."""
    w = (torch.randn(32, 200, generator=torch.Generator().manual_seed(6)) * 0.02).half()
    ours = gptq_quantize(w, torch.eye(200), 4, 64, order=order).dequantize(torch.float32)
    plain = search_quantize(w, torch.ones(200), 4, 64).dequantize(torch.float32)
    assert reconstruction_error(w, ours, torch.eye(200)) == pytest.approx(
        reconstruction_error(w, plain, torch.eye(200)), rel=1e-5)


@pytest.mark.parametrize("bits,gs,symmetric", [(4, 128, False), (4, 128, True), (8, None, True),
                                               (8, 64, True)])
def test_canonical_format(bits, gs, symmetric):
    w, train, _ = layer_and_inputs(1, n=20, k=576)
    w = w.half()
    h = train.T @ train / train.shape[0]
    ours = gptq_quantize(w, h, bits, gs, symmetric)
    base = Int8Weight.quantize(w, gs) if bits == 8 else Int4Weight.quantize(w, gs, symmetric)
    assert type(ours) is type(base)
    assert {n: (t.dtype, t.shape) for n, t in ours.tensors().items()} == \
        {n: (t.dtype, t.shape) for n, t in base.tensors().items()}


def test_reduces_its_own_objective():
    w, train, _ = layer_and_inputs(2)
    h = train.T @ train / train.shape[0]
    ours = reconstruction_error(w, gptq_quantize(w, h, 4, 64).dequantize(torch.float32), h)
    base = reconstruction_error(w, Int4Weight.quantize(w, 64).dequantize(torch.float32), h)
    assert ours < 0.5 * base


def test_dead_inputs_and_rank_deficient_hessian():
    """Inputs never active in calibration (diag 0) and fewer samples than columns: damping and
    the dead-column rule keep it finite, and dead columns are simply rounded."""
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(16, 128, generator=gen) * 0.05
    x = torch.randn(20, 128, generator=gen)
    x[:, :10] = 0
    fmt = gptq_quantize(w, x.T @ x / 20, 4, 32)
    assert torch.isfinite(fmt.dequantize(torch.float32)).all()


def test_deterministic():
    w, train, _ = layer_and_inputs(5)
    h = train.T @ train / train.shape[0]
    one, two = gptq_quantize(w, h, 4, 64), gptq_quantize(w, h, 4, 64)
    for name, t in one.tensors().items():
        assert torch.equal(t, two.tensors()[name])


@pytest.mark.parametrize("hessian", [torch.eye(10), torch.full((64, 64), float("nan")),
                                     -torch.eye(64)])
def test_bad_hessian_is_refused(hessian):
    with pytest.raises(GPTQError):
        gptq_quantize(torch.randn(4, 64), hessian, 4, 32)
