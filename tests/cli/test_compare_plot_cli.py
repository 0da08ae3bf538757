"""`lowbit compare` with bitsandbytes variants, the per-phase diagnosis in its JSON and --plot."""
import json
import sys

import pytest
from click.testing import CliRunner
from helpers import cache_test_device_limits, write_tiny_llama

from lowbit.cli.compare import compare, parse_variants

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TEXT = "The quick brown fox jumps over the lazy dog. Quantization saves bandwidth. " * 20


@pytest.fixture
def setup(tmp_path, monkeypatch):
    """A tiny model, a text, and cached device limits (no test spends seconds measuring)."""
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    cache_test_device_limits()
    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    return write_tiny_llama(tmp_path / "tiny"), text


def run(*args):
    return CliRunner().invoke(compare, [str(a) for a in args])


def test_bnb_specs_parse_to_their_methods():
    nf4, int8 = parse_variants(("bnb-nf4,bnb-int8",), ("16",), None)
    assert (nf4.name, int8.name) == ("bnb-nf4 kv16", "bnb-int8 kv16")
    assert (nf4.quant.weight_bits, nf4.quant.group_size) == (4, 64)


def test_json_carries_each_variants_phases_and_plot_is_a_png(setup, tmp_path):
    pytest.importorskip("matplotlib")
    model, text = setup
    out, png = tmp_path / "cmp.json", tmp_path / "report.png"
    result = run(model, "--text", text, "--weights", "16,int8,bnb-nf4", "--windows", "2",
                 "--window-len", "32", "--gen-tokens", "4", "--device", "cpu", "--json", out,
                 "--plot", png)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    for row in [data["reference"], *data["variants"]]:
        phases = row["phases"]
        assert phases["device"]["copy_GBps"] == 20.0
        assert phases["prefill"]["tokens"] > 0 and phases["decode"]["tokens"] == 3
        assert phases["decode"]["verdict"] in ("memory-bound", "compute-bound")
    assert data["variants"][1]["name"] == "bnb-nf4 kv16"
    assert data["variants"][1]["weight_bytes"] < data["reference"]["weight_bytes"]
    assert png.read_bytes().startswith(PNG_MAGIC)


def test_missing_matplotlib_is_refused_before_the_run(setup, tmp_path, monkeypatch):
    model, text = setup
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    out = tmp_path / "cmp.json"
    result = run(model, "--text", text, "--weights", "int8", "--device", "cpu", "--json", out,
                 "--plot", tmp_path / "report.png")
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "Error: plots need matplotlib, which is not installed: pip install 'lowbit[plot]'"]
    assert not out.exists()


def test_bad_plot_path_is_one_line(setup, tmp_path):
    model, text = setup
    result = run(model, "--text", text, "--plot", tmp_path / "report.txt")
    assert result.exit_code == 1 and "plot files end in .png" in result.output
    assert len(result.output.strip().splitlines()) == 1
