"""How fast a Triton kernel can stream an int4 layer's bytes in decode-matmul tiles, doing no
arithmetic on them (GPU only): the ceiling for any Triton decode GEMV with that tiling.

    python benchmarks/bench_tile_stream.py [--out DIR]

Llama-3-8B's gate projection in int4 (14336 x 4096: 29.4 MB of codes), 8 rotating copies (no L2
reuse). Each program XORs (block_n rows x chunk bytes) tiles over its share of K (split programs
per row tile, as the split-K matmuls do) and stores one word a row. "rows" reads the canonical
layout (row stride K/2 bytes); "contig" reads a layout where each program's tile is one
contiguous block (what a load-time repack could give). Prints microseconds and GB/s per layout
and tiling, beside the device's copy rate; JSON to tile-stream.json.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import graph_bench_us, measure_copy_GBps, write_results  # noqa: E402

N, K = 14336, 4096
COPIES = 8
# (block_n rows, chunk bytes a row, split programs per row tile, warps)
TILINGS = [(128, 64, 8, 4), (64, 64, 16, 4), (128, 128, 4, 4), (128, 256, 2, 8), (64, 256, 4, 4),
           (256, 64, 8, 8), (128, 64, 1, 4), (32, 256, 4, 4)]


@triton.jit
def _stream_kernel(q_ptr, out_ptr, stride, chunks_per_split, BN: tl.constexpr,
                   BYTES: tl.constexpr, CONTIG: tl.constexpr, NCHUNK: tl.constexpr):
    """XOR of the program's (BN, BYTES) tiles over its chunks, one int32 a row (int32 words)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = tl.arange(0, BN)
    offs_b = tl.arange(0, BYTES // 4)
    acc = tl.zeros((BN, BYTES // 4), tl.int32)
    c0 = pid_k * chunks_per_split
    for c in range(c0, c0 + chunks_per_split):
        if CONTIG:  # tile (pid_n, c) stored as one block of BN * BYTES bytes
            base = q_ptr + ((pid_n * NCHUNK + c) * BN) * (BYTES // 4)
            p = base + offs_n[:, None] * (BYTES // 4) + offs_b[None, :]
        else:
            p = q_ptr + (pid_n * BN + offs_n)[:, None] * stride + c * (BYTES // 4) + offs_b[None, :]
        acc ^= tl.load(p)
    tl.store(out_ptr + pid_n * BN + offs_n, tl.sum(acc, axis=1))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="directory for the JSON (default benchmarks/results/<card>)")
    args = ap.parse_args()
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("bench_tile_stream needs CUDA and the Triton compiler (TRITON_INTERPRET unset)")
    copy = measure_copy_GBps()
    print(torch.cuda.get_device_name(), f"copy {copy:.0f} GB/s")
    words = torch.randint(-2**31, 2**31 - 1, (COPIES, N, K // 8), dtype=torch.int32, device="cuda")
    out = torch.empty(N, dtype=torch.int32, device="cuda")
    nbytes = N * K // 2
    rows = []
    for contig in (False, True):
        for bn, chunk, split, warps in TILINGS:
            nchunk = K // 2 // chunk

            def run():
                for i in range(COPIES):
                    _stream_kernel[(N // bn, split)](words[i], out, K // 8, nchunk // split, BN=bn,
                                                     BYTES=chunk, CONTIG=contig, NCHUNK=nchunk,
                                                     num_warps=warps, num_stages=3)
            us = graph_bench_us(run, 10, 40)[0] / COPIES
            rows.append({"layout": "contig" if contig else "rows", "block_n": bn,
                         "chunk_bytes": chunk, "split": split, "warps": warps,
                         "us": round(us, 2), "GBps": round(nbytes / us / 1e3, 1)})
            print(f"{rows[-1]['layout']:6s} bn{bn} chunk{chunk}B split{split} w{warps}: "
                  f"{us:.2f} us {nbytes / us / 1e3:.0f} GB/s", flush=True)
    print(f"wrote {write_results('tile-stream', rows, {'copy_GBps': round(copy, 1)}, args.out)}")


if __name__ == "__main__":
    main()
