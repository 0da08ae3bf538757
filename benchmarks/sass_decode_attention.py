"""SASS instructions per cache byte in the main loop of each decode attention kernel, compiled
offline for an H100 (sm_90); no GPU needed (CPU only, TRITON_INTERPRET must be unset).

    python benchmarks/sass_decode_attention.py

For every kernel and launch variant: registers, shared memory, the length of its longest loop
(instructions a thread issues per iteration), instructions per byte of K/V that iteration reads
(thread-instructions: the loop's length x threads / bytes), and the most frequent opcodes.
Pointers and integer strides carry the divisibility-16 hints the JIT would give them (without
them loads come out scalar and the count overstates the cost). Budget: at 75% of the H100's
3.0 TB/s an SM must consume ~9.7 bytes a clock; it issues at most 128 thread-instructions a clock.
"""
from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
TARGET = GPUTarget("cuda", 90, 32)
INSTR = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
LABEL = re.compile(r"^\s*(\.L_x_\d+):")


def compile_sm90(fn, pointers: dict, consts: dict, num_warps: int, num_stages: int = 2):
    sig, attrs = {}, {}
    consts = {k: v for k, v in consts.items() if k in fn.arg_names}  # MIN_BLOCKS: where taken
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*" + pointers.get(name, "bf16")
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name == "qk_scale":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if name.startswith("stride"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    opts = make_backend(TARGET).parse_options({"num_warps": num_warps, "num_stages": num_stages})
    return triton.compile(ASTSource(fn, sig, consts, attrs), target=TARGET, options=opts.__dict__)


def _tool(name: str, *args: str) -> str:
    return subprocess.run([str(BIN / name), *args], capture_output=True, text=True).stdout


def loop_profile(kernel) -> tuple[int, collections.Counter, str]:
    """(instructions of the longest loop, opcode histogram, registers/stack)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    text = _tool("nvdisasm", "-c", f.name)
    usage = re.search(r"REG:(\d+).*?STACK:(\d+)", _tool("cuobjdump", "-res-usage", f.name))
    os.unlink(f.name)
    ops, labels = [], {}
    for line in text.splitlines():
        if m := LABEL.match(line):
            labels[m.group(1)] = len(ops)
        elif m := INSTR.search(line):
            ops.append((m.group(1), m.group(2)))
    spans = [(labels[t.group(1)], i) for i, (op, args) in enumerate(ops)
             if op.startswith("BRA") and (t := re.search(r"(\.L_x_\d+)", args))
             and labels.get(t.group(1), 1 << 30) <= i]
    a, b = max(spans, key=lambda s: s[1] - s[0])
    hist = collections.Counter(op.split(".")[0] for op, _ in ops[a:b + 1])
    regs = f"{usage.group(1)} regs, {usage.group(2)} B stack" if usage else "?"
    return b + 1 - a, hist, regs


def variants():
    """(name, kernel, pointer types, constexprs, warps, K/V bytes one iteration reads)."""
    from lowbit.engine.kernels import triton_decode_attention as A
    from lowbit.engine.kernels import triton_decode_int4 as I4
    from lowbit.engine.kernels import triton_decode_int8 as I8
    ws = {"pos_ptr": "i64", "ws_ptr": "fp32", "ml_ptr": "fp32", "lock_ptr": "i32"}
    split = dict(HKV=8, G=4, G_ST=4, D=128, SPLITS=64, SPLITS_P2=64, CHUNK=8, MIN_BLOCKS=1,
                 HAS_WINDOW=False)
    yield ("dense block 64", A._decode_dense_kernel, ws,
           dict(split, G_PAD=16, BLOCK_N=64, IEEE=False, PREFETCH=True), 4, 64 * 512)
    int8 = dict(ws, k_ptr="i8", v_ptr="i8", ks_ptr="fp16", vs_ptr="fp16")
    for w, t in ((4, 32), (4, 64), (2, 64), (8, 32)):
        yield (f"int8 {w} warps x {t}", I8.decode_int8_kernel, int8,
               dict(split, G_PAD=4, TW=t, W=w, VT=64, F16=True, ASM=True, AHEAD=1), w, w * t * 260)
    int4 = dict(ws, kp_ptr="u8", ks_ptr="fp16", kz_ptr="u8", vp_ptr="u8", vs_ptr="fp16",
                vz_ptr="u8")
    for w in (4, 2, 8):  # 32 positions (one key group) a warp and iteration
        yield (f"int4 {w} warps x 32", I4.decode_int4_kernel, int4,
               dict(split, G_PAD=4, W=w, GV=4, SINK=0, F16=True, ASM=True), w, w * 32 * 152)


def main():
    print(f"triton {triton.__version__}, sm_90, Llama-3-8B head (G = 4, D = 128)")
    for name, fn, ptrs, consts, warps, nbytes in variants():
        kernel = compile_sm90(fn, ptrs, consts, warps)
        n, hist, regs = loop_profile(kernel)
        top = " ".join(f"{op}:{c}" for op, c in hist.most_common(10))
        print(f"{name:20s} {regs:22s} smem {kernel.metadata.shared:6d}  loop {n:5d}  "
              f"{n * 32 * warps / nbytes:5.2f} instr/B  | {top}")


if __name__ == "__main__":
    main()
