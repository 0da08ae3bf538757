"""The comparison report image: written, a real PNG, and a clear message without matplotlib."""
import sys

import pytest

from lowbit.engine.device_limits import DeviceLimits
from lowbit.engine.plot import PlotError, PlotUnavailable, plot_comparison, require_matplotlib
from lowbit.engine.profile import analytic_layout, phase_report
from lowbit.quant.architecture import ModelConfig

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CFG = ModelConfig.from_hf({
    "model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2})
LIMITS = DeviceLimits("test device", "test", copy_GBps=20.0, matmul_TFLOPs=0.1,
                      matmul_dtype="float32", measured="2025-01-01T00:00:00+00:00")


def row(name, weights, group, decode_tok_s, dppl, kl, with_phases=True):
    r = {"name": name, "weights": weights, "kv": 16, "ppl": 10.0 * (1 + dppl / 100),
         "ppl_delta_pct": dppl, "kl_mean": kl, "prefill_tok_s": 900.0,
         "decode_tok_s": decode_tok_s}
    if with_phases:
        layout = analytic_layout(CFG, weights, 4, group_size=group)
        r["phases"] = phase_report(CFG, layout, prompt_tokens=64, new_tokens=17, prefill_s=0.01,
                                   decode_s=16 / decode_tok_s, kv_bytes_per_token=512,
                                   kv_bits=16, act_bytes=4, limits=LIMITS)
    return r


def comparison(with_phases=True):
    return {"reference": row("16 kv16", "16", None, 100.0, 0.0, 0.0, with_phases),
            "variants": [row("int8 kv16", "int8", None, 180.0, 0.2, 0.001, with_phases),
                         row("int4-g32-asym kv16", "int4", 32, 260.0, 3.1, 0.03, with_phases)],
            "model": "/models/tiny", "device": "cpu", "dtype": "fp32"}


@pytest.mark.parametrize("with_phases", [True, False])
def test_report_png_is_written(tmp_path, with_phases):
    pytest.importorskip("matplotlib")
    out = plot_comparison(comparison(with_phases), tmp_path / "report.png")
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    assert [p.name for p in tmp_path.iterdir()] == ["report.png"]  # no temp file left behind


def test_bad_target_is_refused_before_drawing(tmp_path):
    with pytest.raises(PlotError, match="end in .png"):
        plot_comparison(comparison(), tmp_path / "report.txt")
    with pytest.raises(PlotError, match="does not exist"):
        plot_comparison(comparison(), tmp_path / "missing" / "report.png")
    pytest.importorskip("matplotlib")
    with pytest.raises(PlotError, match="not a comparison"):
        plot_comparison({"rows": []}, tmp_path / "report.png")


def test_missing_matplotlib_names_the_extra(tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # `import` of a None entry raises ImportError
    with pytest.raises(PlotUnavailable, match=r"pip install 'lowbit\[plot\]'"):
        require_matplotlib()
    with pytest.raises(PlotUnavailable, match="matplotlib"):
        plot_comparison(comparison(), tmp_path / "report.png")
    assert not list(tmp_path.iterdir())
