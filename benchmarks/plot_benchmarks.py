"""One image of a card's committed GPU results (CPU only: reads the JSON, measures nothing).

    python benchmarks/plot_benchmarks.py [--card nvidia-h100-80gb-hbm3] [--out PNG]

Three panels from benchmarks/results/<card>/:
- kernels.json: µs per Llama-3-8B layer (7 linears) against activation rows M, every method,
  with the copy-rate floor of bf16's and int4 g128's bytes (each method's GB/s x µs is the bytes
  it reads, so floor = bytes / the run's copy rate);
- generate.json: end-to-end decode tokens/s per weight format and prompt, each bar's roofline
  (the run's copy rate / the bytes a token reads) marked;
- long_context.json: decode tokens/s of int4 weights against context for KV 16 / 8 / 4,
  with each row's bytes-per-token limit.
Each panel names its commit; a file that is missing leaves its panel out.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lowbit.engine.plot import PlotUnavailable, require_matplotlib

RESULTS = Path(__file__).resolve().parent / "results"
FLOOR_METHODS = ("bf16-cublas", "lowbit-int4-g128")


class ResultsError(ValueError):
    """The card's results cannot be plotted (no folder, or no file this script reads)."""


def _load(folder: Path, name: str) -> dict | None:
    path = folder / name
    return json.loads(path.read_text()) if path.exists() else None


def _kernels(ax, doc: dict) -> None:
    copy = doc["limits"]["copy_GBps"]
    by_method: dict[str, list[dict]] = {}
    for row in doc["rows"]:
        by_method.setdefault(row["method"], []).append(row)
    for method, rows in by_method.items():
        rows.sort(key=lambda r: r["M"])
        line, = ax.plot([r["M"] for r in rows], [r["us"] for r in rows], marker="o",
                        markersize=3, label=method)
        if method in FLOOR_METHODS:  # the weights' bytes at the copy rate
            floors = [r["GBps"] * r["us"] / copy for r in rows]
            ax.plot([r["M"] for r in rows], floors, linestyle=":", color=line.get_color())
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("activation rows M")
    ax.set_ylabel("µs per layer (7 linears)")
    ax.set_title(f"decode/prefill matmuls, dotted: bytes at {copy / 1e3:.2f} TB/s\n"
                 f"commit {doc['commit']}", fontsize=9)
    ax.legend(fontsize=7)


def _generate(ax, doc: dict) -> None:
    copy = doc["limits"]["copy_GBps"]
    rows = [r for r in doc["rows"] if r.get("decode_GBps")]  # lowbit rows carry their bytes
    labels = [f"{r['weights']}\n{r['prompt']}" for r in rows]
    xs = range(len(rows))
    ax.bar(xs, [r["decode_tok_s"] for r in rows], color="tab:blue", label="measured")
    limits = [copy / r["decode_GBps"] * r["decode_tok_s"] for r in rows]
    ax.scatter(xs, limits, marker="_", s=300, color="black", label="copy-rate limit")
    for x, r in zip(xs, rows):
        ax.annotate(f"{r['decode_tok_s']:.0f}", (x, r["decode_tok_s"]), ha="center",
                    va="bottom", fontsize=7)
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set_ylabel("decode tokens/s (batch 1)")
    ax.set_title(f"Llama-3-8B shape end to end (weights / prompt)\ncommit {doc['commit']}",
                 fontsize=9)
    ax.legend(fontsize=7)


def _long_context(ax, doc: dict) -> None:
    rows = [r for r in doc["rows"] if r["bench"] == "generate"]
    for kv in dict.fromkeys(r["kv"] for r in rows):
        mine = sorted((r for r in rows if r["kv"] == kv), key=lambda r: r["context"])
        line, = ax.plot([r["context"] for r in mine], [r["decode_tok_s"] for r in mine],
                        marker="o", label=f"KV {kv}")
        ax.plot([r["context"] for r in mine], [r["limit_tok_s"] for r in mine], linestyle=":",
                color=line.get_color())
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens, cache filled at random)")
    ax.set_ylabel("decode tokens/s, int4 weights")
    ax.set_title(f"long contexts, dotted: bytes-per-token limit\ncommit {doc['commit']}",
                 fontsize=9)
    ax.legend(fontsize=7)


PANELS = (("kernels.json", _kernels), ("generate.json", _generate),
          ("long_context.json", _long_context))


def plot(card: str, out: Path) -> Path:
    folder = RESULTS / card
    if not folder.is_dir():
        raise ResultsError(f"no results for card {card!r} under {RESULTS}")
    docs = [(fn, doc) for name, fn in PANELS if (doc := _load(folder, name)) is not None]
    if not docs:
        raise ResultsError(f"{folder} holds none of {', '.join(n for n, _ in PANELS)}")
    figure_cls, canvas_cls = require_matplotlib()
    fig = figure_cls(figsize=(5.2 * len(docs), 4.4))
    canvas_cls(fig)
    axes = fig.subplots(1, len(docs), squeeze=False)[0]
    for ax, (fn, doc) in zip(axes, docs):
        fn(ax, doc)
    fig.suptitle(docs[0][1]["card"], fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{out.suffix}")
    fig.savefig(tmp, dpi=110)
    tmp.replace(out)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--card", default="nvidia-h100-80gb-hbm3")
    ap.add_argument("--out", type=Path, default=None,
                    help="PNG to write (default benchmarks/results/<card>/benchmarks.png)")
    args = ap.parse_args()
    try:
        path = plot(args.card, args.out or RESULTS / args.card / "benchmarks.png")
    except (ResultsError, PlotUnavailable, json.JSONDecodeError, KeyError) as e:
        sys.exit(f"plot_benchmarks: {e}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
