"""Peak host memory of `lowbit convert`: does streaming really keep it near one tensor?

Converts (a) the embedded default model and (b) a synthetic Llama-shaped fp16 model of 4.5 GB
(hidden 4096, 14 layers, 32/8 heads, intermediate 8192, vocab 32000: 2.26 G parameters, random
weights written tensor by tensor, so the generator never holds the model) to int4 g128, each in a
fresh subprocess, and reports that process's peak RSS (VmHWM: exact, kept by the kernel; not
ru_maxrss, which Linux carries over from the forking parent) beside the peaks of its two parts,
sampled every 5 ms from /proc/self/status (so a short spike can escape them):
  RssAnon  memory the process owns (tensors, quantization scratch, torch itself)
  RssFile  file pages mapped into it, e.g. the source's safetensors, which safe_open maps
           whole; clean, so the kernel can drop them under pressure, but counted in RSS.
Row (c) repeats (b) with a source that opens the file afresh for every tensor, so each
mapping is released with its tensor: the behaviour proposed for HFDirectorySource.

    python benchmarks/convert_memory.py [--workdir DIR]

Writes benchmarks/results/cpu/convert_memory.json; deletes the synthetic model afterwards.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "cpu" / "convert_memory.json"
SYNTHETIC = {"hidden": 4096, "intermediate": 8192, "layers": 14, "heads": 32, "kv_heads": 8,
             "vocab": 32000}
# source 4.52 GB + int4 output 1.45 GB + margin
DISK_NEEDED = 7_000_000_000


def synthetic_config() -> dict:
    s = SYNTHETIC
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": s["vocab"], "hidden_size": s["hidden"],
            "intermediate_size": s["intermediate"], "num_hidden_layers": s["layers"],
            "num_attention_heads": s["heads"], "num_key_value_heads": s["kv_heads"],
            "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 8192,
            "tie_word_embeddings": False, "torch_dtype": "float16"}


def write_synthetic(directory: Path) -> int:
    """A random fp16 HF directory, one tensor in memory at a time; returns its weight bytes.
    The tokenizer files are the default model's (conversion copies them, never reads them)."""
    from lowbit.quant.architecture import ModelConfig
    from lowbit.quant.checkpoint import SafetensorsWriter, TensorSpec
    from lowbit.quant.default_model import default_model_dir
    from lowbit.quant.sources import TOKENIZER_FILES

    directory.mkdir(parents=True)
    cfg = synthetic_config()
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    for name in TOKENIZER_FILES:
        shutil.copy(default_model_dir() / name, directory / name)
    shapes = ModelConfig.from_hf(cfg).tensor_shapes()
    specs = {n: TensorSpec(torch.float16, tuple(s)) for n, s in shapes.items()}
    gen = torch.Generator().manual_seed(0)
    with SafetensorsWriter(directory / "model.safetensors", specs, {"format": "pt"}) as writer:
        for name, spec in specs.items():
            if name.endswith("norm.weight"):
                t = torch.ones(spec.shape, dtype=torch.float16)
            else:
                t = (0.02 * torch.randn(spec.shape, generator=gen)).half()
            writer.write(name, t)
            del t
    return sum(s.nbytes for s in specs.values())


# ---------------------------------------------------------------- measured child process


class _PeakSampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.peaks = {"RssAnon": 0, "RssFile": 0}
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            with open("/proc/self/status") as f:
                for line in f:
                    key, _, value = line.partition(":")
                    if key in self.peaks:
                        self.peaks[key] = max(self.peaks[key], int(value.split()[0]) * 1024)
            time.sleep(0.005)


def _reopening_source(path: str):
    """HFDirectorySource whose get_tensor maps the file afresh each time, so a tensor's pages
    leave the process with the tensor (the cached handle keeps every page touched so far)."""
    from safetensors import safe_open

    from lowbit.quant.hf_source import HFDirectorySource

    class ReopeningSource(HFDirectorySource):
        def get_tensor(self, name):
            with safe_open(str(self.path / self._file(name)), framework="pt") as f:
                return f.get_tensor(name)

    return ReopeningSource(path)


def child(src: str | None, out: str, reopen: bool) -> None:
    from lowbit.quant.config import QuantConfig
    from lowbit.quant.convert import convert

    sampler = _PeakSampler()
    sampler.start()
    source = _reopening_source(src) if reopen else src
    summary = convert(source, Path(out), QuantConfig(weight_bits=4, group_size=128),
                      progress=False)
    sampler.stop.set()
    sampler.join()
    print(json.dumps({
        "peak_rss_bytes": summary.peak_rss_bytes, "peak_anon_bytes": sampler.peaks["RssAnon"],
        "peak_file_bytes": sampler.peaks["RssFile"], "seconds": summary.seconds,
        "parameters": summary.parameters, "bytes_before": summary.bytes_before,
        "bytes_after": summary.bytes_after}))


# ---------------------------------------------------------------- driver


def measure(label: str, src: str | None, out: Path, reopen: bool, source_bytes: int) -> dict:
    cmd = [sys.executable, __file__, "--child", "--out", str(out)]
    if src is not None:
        cmd += ["--src", src]
    if reopen:
        cmd.append("--reopen")
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"{label}: conversion failed:\n{done.stderr}")
    r = json.loads(done.stdout.strip().splitlines()[-1])
    shutil.rmtree(out)
    return {"bench": "convert_memory", "model": label, "method": "int4-g128-asym rtn",
            "source_reads": "mapped afresh per tensor" if reopen else "HFDirectorySource",
            "parameters": r["parameters"], "source_bytes": source_bytes,
            "output_bytes": r["bytes_after"], "peak_rss_bytes": r["peak_rss_bytes"],
            "peak_anon_bytes": r["peak_anon_bytes"], "peak_file_bytes": r["peak_file_bytes"],
            "rss_over_source": round(r["peak_rss_bytes"] / source_bytes, 3),
            "anon_over_source": round(r["peak_anon_bytes"] / source_bytes, 3),
            "seconds": round(r["seconds"], 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=tempfile.gettempdir())
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--src", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--reopen", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.src, args.out, args.reopen)

    from lowbit.quant.default_model import default_model_dir

    work = Path(tempfile.mkdtemp(prefix="lowbit-convert-memory-", dir=args.workdir))
    try:
        free = shutil.disk_usage(work).free
        if free < DISK_NEEDED:
            sys.exit(f"{work}: {free / 1e9:.1f} GB free, the synthetic model needs "
                     f"{DISK_NEEDED / 1e9:.1f} GB")
        default_bytes = (default_model_dir() / "model.safetensors").stat().st_size
        rows = [measure("SmolLM2-135M (default)", None, work / "out-default", False, default_bytes)]
        synth = work / "synthetic"
        t = time.perf_counter()
        synth_bytes = write_synthetic(synth)
        print(f"wrote the synthetic model ({synth_bytes / 1e9:.2f} GB) in "
              f"{time.perf_counter() - t:.0f} s", file=sys.stderr)
        label = "synthetic llama h4096 L14 (4.5 GB)"
        rows.append(measure(label, str(synth), work / "out-synth", False, synth_bytes))
        rows.append(measure(label, str(synth), work / "out-synth-reopen", True, synth_bytes))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    result = {"card": "cpu", "cpu": platform.processor() or platform.machine(), "commit": commit,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "torch": torch.__version__, "limits": None, "rows": rows}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'model':<36} {'reads':<26} {'source':>9} {'peak RSS':>9} {'anon':>8} "
          f"{'file':>8} {'RSS/src':>7} {'s':>6}")
    for r in rows:
        print(f"{r['model']:<36} {r['source_reads']:<26} {r['source_bytes'] / 1e9:>7.2f}GB "
              f"{r['peak_rss_bytes'] / 1e9:>7.2f}GB {r['peak_anon_bytes'] / 1e9:>6.2f}GB "
              f"{r['peak_file_bytes'] / 1e9:>6.2f}GB {r['rss_over_source']:>7.3f} "
              f"{r['seconds']:>6.0f}")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
