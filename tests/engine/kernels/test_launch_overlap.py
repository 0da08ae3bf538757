"""Programmatic dependent launch (triton_common.pdl_options / await_inputs): when it is on, and
that a decode with it is token for token and bit for bit the decode without it (GPU)."""
import dataclasses

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

from lowbit.engine.kernels import triton_common  # noqa: E402
from lowbit.quant.config import QuantConfig  # noqa: E402
from helpers import run_sm90_compile, triton_gpu_only  # noqa: E402

OFF = {"PDL": False, "launch_pdl": False}
ON = {"PDL": True, "launch_pdl": True}


def test_pdl_only_on_hopper_cuda_and_not_when_disabled(monkeypatch):
    cuda = torch.device("cuda", 0)
    assert triton_common.pdl_options(torch.device("cpu")) == OFF
    monkeypatch.setattr(triton_common, "interpreting", lambda: False)
    monkeypatch.setattr(triton_common, "_capability", lambda device: 9)
    monkeypatch.delenv("LOWBIT_PDL", raising=False)
    assert triton_common.pdl_options(cuda) == ON
    monkeypatch.setenv("LOWBIT_PDL", "0")
    assert triton_common.pdl_options(cuda) == OFF
    monkeypatch.setenv("LOWBIT_PDL", "1")
    monkeypatch.setattr(triton_common, "_capability", lambda device: 8)  # A100: no griddepcontrol
    assert triton_common.pdl_options(cuda) == OFF
    monkeypatch.setattr(triton_common, "_capability", lambda device: 9)
    monkeypatch.setattr(torch.version, "hip", "6.2")  # an MI300 says 9.4 too
    assert triton_common.pdl_options(cuda) == OFF
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(triton_common, "interpreting", lambda: True)
    assert triton_common.pdl_options(cuda) == OFF


COMPILE_SCRIPT = r"""
from lowbit.engine.kernels import (triton_gemv_tc as TC, triton_int4_matmul as I4,
                                   triton_int8_matmul as I8, triton_rms_norm as RN,
                                   triton_rotary as RO, triton_silu_mul as SM)

def ptx(fn, pointers, consts, floats=()):
    return build(fn, pointers, consts, floats=floats).asm["ptx"]

mm = {"ws_ptr": "fp32", "lock_ptr": "i32", "z_ptr": "u8"}
split = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SPLIT_K=4, HAS_BIAS=False, EVEN_K=True,
             DOT_PRECISION="tf32", PDL=True)
texts = [
    ptx(TC._tc_matmul_kernel, dict(mm, q_ptr="u8"),
        dict(split, BITS=4, GROUP_SIZE=128, BLOCK_M=8, SYMMETRIC=False, BIAS=128.0, ASM=True,
             PREFETCH_GROUPS=8)),
    ptx(I4._int4_matmul_kernel, dict(mm, w_ptr="i32"),
        dict(split, GROUP_SIZE=128, SYMMETRIC=True, USE_DOT=True, SCALE_IN_TILE=False,
             PREFETCH=False)),
    ptx(I8._int8_matmul_kernel, dict(mm, w_ptr="i32"),
        dict(split, GROUP_SIZE=0, BLOCK_M=1, USE_DOT=False, SCALE_IN_TILE=False, PREFETCH=True)),
    ptx(RN._rms_norm_kernel, {}, dict(ADD=True, BLOCK=4096, PDL=True), floats=("eps",)),
    ptx(RO._rotary_kernel, {"pos_ptr": "i64"},
        dict(HALF=64, H_P=32, HKV_P=8, BLOCK=64, WRITE_CACHE=True, PDL=True)),
    ptx(SM._silu_mul_kernel, {}, dict(BLOCK=1024, PDL=True)),
]
print("waits", [t.count("griddepcontrol.wait") for t in texts])
print("tc prefetches", texts[0].count("prefetch.global.L1"))
print("split-K", [(t.count("atom.global.gpu.release.add"), t.count("ld.global.gpu.acquire"))
                  for t in texts[:3]])
"""


def test_pdl_kernels_compile_their_wait_for_sm90():
    """Each matmul and elementwise kernel launched with PDL compiles for an H100 (sm_90, no GPU
    needed) with its griddepcontrol wait in the PTX, the tc kernel with its L1 prefetches and the
    split-K matmuls with one release and one acquire. The decode attention and KV-write kernels
    are compiled with PDL on by test_triton_attention's test_kernels_compile_for_sm90."""
    done = run_sm90_compile(COMPILE_SCRIPT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "waits [1, 1, 1, 1, 1, 1]" in done.stdout, done.stdout
    # the tc kernel asks L1 for its scale and zero lines (one prefetch each a thread) before the
    # wait; split-K programs release their partials, and only the last one acquires
    assert "tc prefetches 2" in done.stdout, done.stdout
    assert "split-K [(1, 1), (1, 1), (1, 1)]" in done.stdout, done.stdout


@pytest.mark.gpu
@triton_gpu_only()
@pytest.mark.parametrize("weights,kv_bits", [
    (None, 16), (QuantConfig(weight_bits=4, group_size=128), 16),
    (QuantConfig(weight_bits=8, group_size=None), 8),
    (QuantConfig(weight_bits=4, group_size=128), 4)], ids=["bf16", "int4", "int8-kv8", "int4-kv4"])
def test_gpu_decode_with_pdl_equals_without(monkeypatch, weights, kv_bits):
    """Four Llama-3-8B-shaped layers: the same kernels launched with and without PDL, in the
    CUDA graph and eagerly, give the same tokens and the same logits, bit for bit."""
    from lowbit.engine.generate import Generation
    from lowbit.engine.kv_cache import create_cache
    from lowbit.engine.model_configs import named_config
    from lowbit.engine.random_model import random_model
    cfg = dataclasses.replace(named_config("llama-3-8b")[1], num_layers=4, vocab_size=4096)
    device = torch.device("cuda")
    if torch.cuda.get_device_capability(device)[0] < 9:
        pytest.skip("PDL needs sm_90 or above")
    model = random_model(cfg, device, torch.bfloat16, weights, seed=5)
    prompt = torch.randint(0, cfg.vocab_size, (40,), generator=torch.Generator().manual_seed(1))
    runs = []
    for pdl in ("0", "1"):
        monkeypatch.setenv("LOWBIT_PDL", pdl)
        tokens = list(Generation(model, prompt.tolist(), max_new_tokens=24, kv_bits=kv_bits))
        cache = create_cache(kv_bits, cfg, 1, 64, torch.bfloat16, device)
        ids = prompt.to(device)[None]
        with torch.no_grad():
            model(ids[:, :-1], torch.arange(39, device=device), cache, kv_len=39)
            step = model(ids[:, -1:], torch.tensor([39], device=device), cache, kv_len=None)
        runs.append((tokens, step))
    assert runs[0][0] == runs[1][0]
    assert torch.equal(runs[0][1], runs[1][1])
