"""One-image report of a comparison: a roofline chart and per-variant bars.

Needs matplotlib, the optional extra `lowbit[plot]`; without it, PlotUnavailable says how to get
it. Drawn with the object-oriented API on an Agg canvas (no pyplot, no global backend switch).

Input is the JSON dict `lowbit compare --json` writes: {"reference": row, "variants": [row, ...],
"model", "device", "dtype", ...}, a row holding "name", "decode_tok_s", "ppl_delta_pct",
"kl_mean" and, for the roofline, "phases": a profile.phase_report dict (device limits, and
per phase its arithmetic intensity and achieved FLOP/s). A row whose "calibration_overlap" is set
(a checkpoint calibrated on text that may overlap the evaluation) is labelled with a "*".
"""
from __future__ import annotations

import importlib
import math
import os
import tempfile
from pathlib import Path

INSTALL_HINT = "pip install 'lowbit[plot]'"
FORMATS = (".png", ".svg", ".pdf")
PHASE_MARKERS = {"prefill": "o", "decode": "s"}


class PlotUnavailable(RuntimeError):
    """Plotting was asked for but matplotlib is not installed."""


class PlotError(ValueError):
    """The comparison cannot be plotted as asked (bad path, missing fields)."""


def require_matplotlib():
    """(Figure, FigureCanvasAgg), or PlotUnavailable naming the extra to install. Commands call
    it before a long run, so a missing extra is reported before, not after, the work."""
    try:
        figure = importlib.import_module("matplotlib.figure")
        agg = importlib.import_module("matplotlib.backends.backend_agg")
    except ImportError:
        raise PlotUnavailable(f"plots need matplotlib, which is not installed: "
                              f"{INSTALL_HINT}") from None
    return figure.Figure, agg.FigureCanvasAgg


def _rows(comparison: dict) -> list[dict]:
    try:
        return [comparison["reference"], *comparison["variants"]]
    except (KeyError, TypeError):
        raise PlotError("not a comparison: expected the dict of `lowbit compare --json` with "
                        "'reference' and 'variants'") from None


def _label(row: dict) -> str:
    return row["name"] + (" *" if row.get("calibration_overlap") else "")


def _limits(rows: list[dict]) -> dict | None:
    for row in rows:
        if row.get("phases"):
            return row["phases"]["device"]
    return None


def _roofline(ax, rows: list[dict], colors: list) -> None:
    limits = _limits(rows)
    if limits is None:
        ax.text(0.5, 0.5, "no phase diagnosis in this comparison", ha="center", va="center",
                transform=ax.transAxes)
        ax.set_axis_off()
        return
    peak = limits["matmul_TFLOPs"] * 1e12
    bandwidth = limits["copy_GBps"] * 1e9
    ridge = peak / bandwidth
    points = [(row["phases"][p]["intensity"], row["phases"][p]["flops_per_s"])
              for row in rows if row.get("phases") for p in PHASE_MARKERS
              if row["phases"][p].get("verdict")]
    xs = [x for x, _ in points] + [ridge]
    lo, hi = min(xs) / 4, max(xs) * 4
    grid = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    ax.plot(grid, [min(peak, x * bandwidth) for x in grid], color="black", lw=1.5,
            label="measured ceilings")
    if limits.get("datasheet_copy_GBps"):
        sheet_peak = limits["datasheet_matmul_TFLOPs"] * 1e12
        sheet_bw = limits["datasheet_copy_GBps"] * 1e9
        ax.plot(grid, [min(sheet_peak, x * sheet_bw) for x in grid], color="grey", lw=1,
                ls="--", label="datasheet ceilings")
    ax.axvline(ridge, color="grey", ls=":", lw=1)
    label_x = math.sqrt(lo * ridge)  # halfway up the slope (log scale), above the line
    ax.text(label_x, label_x * bandwidth * 2.5, f"copy {limits['copy_GBps']:,.0f} GB/s",
            fontsize=8, ha="center", va="bottom")
    ax.text(hi / 1.3, peak * 1.3, f"{limits['matmul_dtype']} matmul "
            f"{limits['matmul_TFLOPs']:,.2f} TFLOP/s", fontsize=8, ha="right", va="bottom")
    ax.text(ridge * 1.1, peak / 40, f"ridge {ridge:,.1f} FLOP/B", fontsize=8, color="grey")
    for row, color in zip(rows, colors):
        if not row.get("phases"):
            continue
        for phase, marker in PHASE_MARKERS.items():
            p = row["phases"][phase]
            if p.get("verdict"):
                ax.scatter(p["intensity"], p["flops_per_s"], marker=marker, color=color, s=55,
                           zorder=3, edgecolors="black", linewidths=0.5)
        ax.scatter([], [], marker="o", color=color, label=_label(row))
    for phase, marker in PHASE_MARKERS.items():
        ax.scatter([], [], marker=marker, color="white", edgecolors="black", label=phase)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(min([y for _, y in points] + [peak]) / 10, peak * 4)
    ax.set_xlabel("arithmetic intensity (FLOP/byte)")
    ax.set_ylabel("achieved FLOP/s")
    ax.set_title(f"roofline: prefill (circles) and decode (squares) · {limits['device']}",
                 fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(True, which="major", alpha=0.3)


def _bars(ax, rows, colors, key: str, title: str, fmt: str) -> None:
    names = [_label(row) for row in rows]
    values = [row.get(key) for row in rows]
    heights = [0.0 if v is None or (isinstance(v, float) and math.isnan(v)) else v
               for v in values]
    bars = ax.bar(range(len(rows)), heights, color=colors, edgecolor="black", linewidth=0.5)
    ax.bar_label(bars, labels=[format(v, fmt) if v is not None else "n/a" for v in values],
                 fontsize=7, padding=2)
    ax.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.margins(y=0.15)
    ax.grid(True, axis="y", alpha=0.3)


def check_plot_path(path: Path) -> None:
    """PlotError unless `path` names an image file lowbit can write."""
    if path.suffix.lower() not in FORMATS:
        raise PlotError(f"{path}: plot files end in {', '.join(FORMATS)}")
    if not path.parent.is_dir():
        raise PlotError(f"{path}: the folder {path.parent} does not exist")


def plot_comparison(comparison: dict, path: str | Path) -> Path:
    """Write the report image to `path` (.png, .svg or .pdf), atomically; returns the path."""
    path = Path(path)
    check_plot_path(path)
    Figure, Canvas = require_matplotlib()
    rows = _rows(comparison)
    fig = Figure(figsize=(16, 8.5), layout="constrained")
    Canvas(fig)  # attaches an Agg canvas: savefig renders without pyplot
    colors = [f"C{i % 10}" for i in range(len(rows))]
    grid = fig.add_gridspec(2, 4)
    _roofline(fig.add_subplot(grid[:, 0:2]), rows, colors)
    _bars(fig.add_subplot(grid[0, 2]), rows, colors, "decode_tok_s", "decode tokens/s", ".1f")
    _bars(fig.add_subplot(grid[0, 3]), rows, colors, "prefill_tok_s", "prefill tokens/s", ".0f")
    _bars(fig.add_subplot(grid[1, 2]), rows, colors, "ppl_delta_pct",
          "Δ perplexity vs 16-bit (%)", ".2f")
    _bars(fig.add_subplot(grid[1, 3]), rows, colors, "kl_mean",
          "mean KL vs 16-bit (nats/token)", ".4f")
    fig.suptitle(f"{Path(str(comparison.get('model', ''))).name} · {comparison.get('device', '')}"
                 f" · {comparison.get('dtype', '')}", fontsize=11)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; an image is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
