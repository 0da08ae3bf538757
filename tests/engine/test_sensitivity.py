import pytest
import torch
from helpers import write_tiny_llama

from lowbit.engine.load import load_model
from lowbit.engine.sensitivity import sensitivity
from lowbit.quant.checkpoint import quantized_linears
from lowbit.quant.config import QuantConfig
from lowbit.quant.quantize import quantize_weight

from test_calibrate import one_thread  # noqa: F401

QUANT = QuantConfig(weight_bits=4, group_size=32)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    path = write_tiny_llama(tmp_path_factory.mktemp("tiny"), hidden=64, intermediate=96,
                            layers=2, tie=True)
    return load_model(path, device="cpu", dtype="fp32", fuse=False)


def formats_for(model):
    modules = dict(model.named_modules())
    return {name: quantize_weight(modules[name].weight.detach(), QUANT)
            for name in quantized_linears(model.config, QUANT)}


def test_one_row_per_linear_most_sensitive_first(loaded):
    windows = torch.randint(3, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    report = sensitivity(loaded.model, formats_for(loaded.model), windows)
    names = {s.name for s in report.layers}
    assert names == set(quantized_linears(loaded.config, QUANT))
    kls = [s.kl for s in report.layers]
    assert kls == sorted(kls, reverse=True) and min(kls) >= 0 and report.kl_all > 0
    assert report.tokens == 2 * 39
    rows = report.trade_off(ks=(0, 3))
    assert rows[0]["bits_per_weight"] < rows[1]["bits_per_weight"]
    assert rows[0]["kl_estimate"] == pytest.approx(report.kl_all)


def test_an_exactly_representable_linear_costs_nothing(loaded):
    """Put v_proj of layer 1 on its own int4 grid: quantizing it again changes nothing, so its KL
    and relative error are ~0 while the others' are not; and the model is left as it was."""
    model = loaded.model
    name = "model.layers.1.self_attn.v_proj"
    module = dict(model.named_modules())[name]
    original = module.weight.detach().clone()
    module.weight.data.copy_(quantize_weight(original, QUANT).dequantize(torch.float32))
    try:
        before = {n: p.clone() for n, p in model.state_dict().items()}
        windows = torch.randint(3, 300, (2, 40), generator=torch.Generator().manual_seed(1))
        report = sensitivity(model, formats_for(model), windows)
        by_name = {s.name: s for s in report.layers}
        other = by_name["model.layers.0.self_attn.v_proj"]
        assert by_name[name].kl < 1e-3 * other.kl  # fp32 log-softmax noise, not zero
        assert by_name[name].rel_error < 1e-9 < other.rel_error
        for n, p in model.state_dict().items():
            assert torch.equal(p, before[n]), n
    finally:
        module.weight.data.copy_(original)


@pytest.mark.parametrize("granularity,count", [("layer", 2), ("type", 7)])
def test_units_by_layer_and_by_type(loaded, granularity, count):
    windows = torch.randint(3, 300, (1, 40), generator=torch.Generator().manual_seed(2))
    formats = formats_for(loaded.model)
    report = sensitivity(loaded.model, formats, windows, granularity)
    assert len(report.layers) == count
    assert sum(s.weights for s in report.layers) == sum(
        f.out_features * f.in_features for f in formats.values())
    if granularity == "type":
        assert {s.name for s in report.layers} >= {"*.mlp.down_proj", "*.self_attn.q_proj"}
    else:
        assert {s.name for s in report.layers} == {"model.layers.0.*", "model.layers.1.*"}
