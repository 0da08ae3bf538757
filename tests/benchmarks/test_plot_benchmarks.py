"""benchmarks/plot_benchmarks.py on the committed results (CPU: it only reads JSON)."""
import importlib.util
import shutil
from pathlib import Path

import pytest

pytest.importorskip("matplotlib", reason="the plot needs matplotlib (lowbit[plot])")
SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "plot_benchmarks.py"
CARD = "nvidia-h100-80gb-hbm3"


@pytest.fixture(scope="module")
def plot_benchmarks():
    spec = importlib.util.spec_from_file_location("plot_benchmarks", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_results_plot_to_a_png(plot_benchmarks, tmp_path):
    out = plot_benchmarks.plot(CARD, tmp_path / "b.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000
    assert [p.name for p in tmp_path.iterdir()] == ["b.png"]  # no temporary left behind


def test_missing_files_leave_their_panels_out(plot_benchmarks, tmp_path, monkeypatch):
    card = tmp_path / "results" / "somecard"
    card.mkdir(parents=True)
    shutil.copy(plot_benchmarks.RESULTS / CARD / "generate.json", card)
    monkeypatch.setattr(plot_benchmarks, "RESULTS", tmp_path / "results")
    assert plot_benchmarks.plot("somecard", tmp_path / "one.png").stat().st_size > 0
    (card / "generate.json").unlink()
    with pytest.raises(plot_benchmarks.ResultsError, match="holds none of"):
        plot_benchmarks.plot("somecard", tmp_path / "none.png")
    with pytest.raises(plot_benchmarks.ResultsError, match="no results for card"):
        plot_benchmarks.plot("othercard", tmp_path / "x.png")

