"""Shared by the GPU benchmarks: the card's measured limits, timing, and the results JSON.

Every results file has one shape (DESIGN.md, "Measuring"):
  {"card", "commit", "date", "torch", "limits": {"copy_GBps", "matmul_TFLOPs"}, "rows": [...]}
written atomically to benchmarks/results/<card-slug>/<name>.json (or a directory given).
"""
from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).parent / "results"


def card_name(device: int | None = None) -> str:
    return torch.cuda.get_device_name(device)


def card_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def git_commit() -> str:
    """HEAD of the checkout the benchmark runs from, '+dirty' when tracked files differ;
    LOWBIT_COMMIT overrides (a copy of the tree without its .git, on a remote machine)."""
    if os.environ.get("LOWBIT_COMMIT"):
        return os.environ["LOWBIT_COMMIT"]
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root,
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty.strip() else "")


def bench_us(fn: Callable[[], object], warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median microseconds of fn() on the current stream (CUDA events, triton.testing.do_bench;
    it flushes L2 between repeats)."""
    import triton.testing
    return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median") * 1e3


def graph_bench_us(fn: Callable[[], object], warmup_ms: float = 25,
                   rep_ms: float = 100) -> tuple[float, bool]:
    """(median microseconds of fn, whether it ran as a CUDA graph). A graph replay times the
    device work without Python launch overhead (decode runs captured, DESIGN.md); fn that cannot
    be captured (a host sync inside) is timed eagerly instead."""
    fn()  # compile, allocate workspaces, pick algorithms: none of it may happen in the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError:
        torch.cuda.synchronize()
        return bench_us(fn, warmup_ms, rep_ms), False
    return bench_us(graph.replay, warmup_ms, rep_ms), True


def measure_copy_GBps(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy of `nbytes`, counting bytes read plus bytes written."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = bench_us(lambda: dst.copy_(src))
    return 2 * nbytes / us / 1e3


def measure_matmul_TFLOPs(n: int = 8192) -> float:
    """bf16 n x n x n product through cuBLAS on random data (zeros run faster)."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    us = bench_us(lambda: torch.mm(a, b))
    return 2 * n ** 3 / us / 1e6


def measure_limits() -> dict[str, float]:
    return {"copy_GBps": round(measure_copy_GBps(), 1),
            "matmul_TFLOPs": round(measure_matmul_TFLOPs(), 1)}


def run_header(limits) -> dict:
    """{card, commit, date, torch, limits, pdl} for a results file written by hand; `limits` is
    a dict or an object with copy_GBps and matmul_TFLOPs attributes; pdl: whether the Triton
    kernels were launched with programmatic dependent launch (LOWBIT_PDL)."""
    if not isinstance(limits, dict):
        limits = {"copy_GBps": limits.copy_GBps, "matmul_TFLOPs": limits.matmul_TFLOPs}
    card = card_name() if torch.cuda.is_available() else "cpu"
    return {"card": card, "commit": git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "limits": limits, "pdl": _pdl()}


def _pdl() -> bool:
    if not torch.cuda.is_available():
        return False
    from lowbit.engine.kernels.triton_common import pdl_options
    return pdl_options(torch.device("cuda"))["PDL"]


def results_path(name: str, card: str | None = None) -> Path:
    """benchmarks/results/<card-slug>/<name>, the folder created; card defaults to this GPU."""
    directory = RESULTS / card_slug(card or card_name())
    directory.mkdir(parents=True, exist_ok=True)
    return directory / name


def write_results(name: str, rows: list[dict], limits: dict[str, float],
                  out_dir: str | Path | None = None, **extra) -> Path:
    """Write {card, commit, date, torch, limits, rows, **extra} to <out_dir or
    results/<card-slug>>/<name>.json through a temporary file and a rename."""
    directory = Path(out_dir) if out_dir else RESULTS / card_slug(card_name())
    directory.mkdir(parents=True, exist_ok=True)
    doc = {**run_header(limits), "rows": rows, **extra}
    path = directory / f"{name}.json"
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    return path


def format_table(rows: list[dict], columns: list[str]) -> str:
    """Rows as an aligned text table; floats with 3 significant digits (at least 1 decimal)."""
    def cell(v):
        if isinstance(v, float):
            return f"{v:.1f}" if abs(v) >= 100 else f"{v:.3g}"
        return str(v)
    body = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c)
              for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(b, widths)) for b in body]
    return "\n".join(lines)
