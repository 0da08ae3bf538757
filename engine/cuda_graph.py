"""One decode step captured as a CUDA graph.

At batch 1 a decode step of a 32-layer model launches ~400 small kernels; from Python each launch
costs ~10 µs of CPU time, which alone caps decode near 200 tokens/s whatever the GPU does. A graph
replays them with one launch. The step reads the whole preallocated cache under a mask
(kv_len=None), so its shapes are static; the position lives in a device tensor.
"""
from __future__ import annotations

import torch


_warmup_streams: dict[torch.device, torch.cuda.Stream] = {}


def _warmup_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per device for every capture's warm-up. PyTorch keeps a cuBLAS workspace
    for each stream a matmul ran on until the process ends (torch._C._cuda_clearCublasWorkspaces
    is the only release), so a new stream per generation would leave one more workspace behind
    each time a 16-bit model generates."""
    device = torch.device(device)
    if device not in _warmup_streams:
        _warmup_streams[device] = torch.cuda.Stream(device)
    return _warmup_streams[device]


class GraphedDecodeStep:
    """step(token (1,) long, position int) → logits (1, V). Capture writes scratch K/V at position
    0, so build it before the prompt is prefilled (prefill overwrites that position)."""

    def __init__(self, model, cache, device: torch.device, warmup: int = 2):
        self.token = torch.zeros((1, 1), dtype=torch.long, device=device)
        self.position = torch.zeros((1,), dtype=torch.long, device=device)
        side = _warmup_stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up off the capture: autotuning, lazy allocations
            for _ in range(warmup):
                model(self.token, self.position, cache, kv_len=None)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = model(self.token, self.position, cache, kv_len=None)[:, -1]  # (1, V)

    def __call__(self, token: torch.Tensor, position: int) -> torch.Tensor:
        self.token.copy_(token.view(1, 1))
        self.position.fill_(position)
        self.graph.replay()
        return self.logits
