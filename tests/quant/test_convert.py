"""Streaming conversion: every stored tensor equals quantize_weight of the source, the loaded
checkpoint gives exactly the logits of on-the-fly quantization, and no interrupted or refused
conversion leaves anything at OUT that loads."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import write_tiny_llama

from lowbit.quant.checkpoint import CheckpointError, read_checkpoint, storage_plan
from lowbit.quant.config import QuantConfig, QuantConfigError
from lowbit.quant.convert import convert, quantize_in_row_blocks
from lowbit.quant.quantize import quantize_weight
from lowbit.quant.sources import is_lowbit_checkpoint, open_source

VARIANTS = {
    "int8-pc": QuantConfig(weight_bits=8, group_size=None),
    "int8-g32": QuantConfig(weight_bits=8, group_size=32),
    "int4-g32-sym": QuantConfig(weight_bits=4, group_size=32, symmetric=True),
    "int4-g64-asym-ragged": QuantConfig(weight_bits=4, group_size=64),
}


def assert_round_trip(src, out, cfg):
    source, ckpt = open_source(src), read_checkpoint(out)
    dtype = ckpt.dtype
    for item in storage_plan(source.model_config, cfg, dtype):
        w = source.get_tensor(item.source_name).to(dtype)
        if item.linear is None:
            assert torch.equal(ckpt.get_tensor(item.source_name), w), item.source_name
            continue
        want = quantize_weight(w, cfg).tensors()
        got = ckpt.linear_format(item.linear).tensors()
        assert set(got) == set(want), item.linear
        for suffix in want:
            assert torch.equal(got[suffix], want[suffix]), f"{item.linear}.{suffix}"


@pytest.mark.parametrize("name", list(VARIANTS))
def test_round_trip_equals_quantize_weight(tmp_path, name):
    cfg = VARIANTS[name]
    hidden = 96 if "ragged" in name else 64  # 96 = 64 + a ragged group of 32
    src = write_tiny_llama(tmp_path / "src", hidden=hidden, intermediate=160, heads=4,
                           dtype=torch.bfloat16, seed=3)
    summary = convert(str(src), tmp_path / "out", cfg, progress=False)
    assert_round_trip(src, tmp_path / "out", cfg)
    assert summary.bytes_after == sum(t.numel() * t.element_size()
                                      for _, t in read_checkpoint(tmp_path / "out").tensors())
    assert summary.bytes_after < summary.bytes_before
    assert 4 < summary.bits_per_weight_linears < 9


def test_fp32_source_stored_in_bf16_and_tied_head_kept_16bit_by_default(tmp_path):
    src = write_tiny_llama(tmp_path / "src", tie=True, dtype=torch.float32)
    cfg = QuantConfig(weight_bits=4, group_size=32)
    convert(str(src), tmp_path / "out", cfg, progress=False)
    ckpt = read_checkpoint(tmp_path / "out")
    assert ckpt.dtype == torch.bfloat16
    names = ckpt.tensor_names()
    assert not any(n.startswith("lm_head.") for n in names)  # the embedding serves as lm_head
    assert_round_trip(src, tmp_path / "out", cfg)


def test_tied_head_quantized_on_request(tmp_path):
    src = write_tiny_llama(tmp_path / "src", tie=True, dtype=torch.float32)
    cfg = QuantConfig(weight_bits=4, group_size=32, quantize_tied_lm_head=True)
    convert(str(src), tmp_path / "out", cfg, progress=False)
    names = read_checkpoint(tmp_path / "out").tensor_names()
    assert "lm_head.qweight" in names and "lm_head.weight" not in names
    assert_round_trip(src, tmp_path / "out", cfg)


def test_keep_16bit_patterns_honoured(tmp_path):
    src = write_tiny_llama(tmp_path / "src", tie=True, dtype=torch.float16)
    cfg = QuantConfig(weight_bits=4, group_size=32,
                      keep_16bit=("model.embed_tokens", "lm_head", "*.down_proj"))
    convert(str(src), tmp_path / "out", cfg, progress=False)
    ckpt = read_checkpoint(tmp_path / "out")
    names = set(ckpt.tensor_names())
    assert "model.layers.1.mlp.down_proj.weight" in names
    assert "model.layers.1.mlp.down_proj.qweight" not in names
    assert "model.layers.1.mlp.up_proj.qweight" in names
    assert not any(n.startswith("lm_head") for n in names)  # tied and kept: the embedding
    assert ckpt.linear_format("model.layers.1.mlp.down_proj") is None
    assert_round_trip(src, tmp_path / "out", cfg)


def test_row_blocks_equal_whole_matrix():
    w = torch.randn(1000, 96, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    for cfg in (QuantConfig(weight_bits=4, group_size=64), QuantConfig(weight_bits=8, group_size=None)):
        blocked = quantize_in_row_blocks(w, cfg, block_weights=96 * 37).tensors()  # 37-row blocks
        whole = quantize_weight(w, cfg).tensors()
        assert all(torch.equal(blocked[k], whole[k]) for k in whole)


def logits(loaded, ids):
    from lowbit.engine.kv_cache import create_cache
    t = ids.shape[1]
    cache = create_cache(16, loaded.config, ids.shape[0], t, loaded.dtype, loaded.device)
    with torch.no_grad():
        return loaded.model(ids, torch.arange(t), cache, kv_len=t).float()


@pytest.mark.parametrize("model_type,tie,cfg", [
    ("llama", False, QuantConfig(weight_bits=4, group_size=32)),
    ("qwen2", True, QuantConfig(weight_bits=4, group_size=32, symmetric=True)),
    ("llama", True, QuantConfig(weight_bits=8, group_size=None)),
])
def test_loaded_checkpoint_logits_equal_on_the_fly_quantization(tmp_path, model_type, tie, cfg):
    from lowbit.engine.linear import QuantizedLinear
    from lowbit.engine.load import load_model

    src = write_tiny_llama(tmp_path / "src", model_type=model_type, tie=tie,
                           dtype=torch.bfloat16, seed=5)
    convert(str(src), tmp_path / "out", cfg, progress=False)
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    loaded = load_model(tmp_path / "out", device="cpu", dtype="bf16")
    fly = load_model(src, device="cpu", dtype="bf16", quant=cfg)
    assert loaded.quant == cfg
    # a tied lm_head stays the 16-bit embedding by default; an untied one is quantized
    assert isinstance(loaded.model.lm_head, QuantizedLinear) is not tie
    assert isinstance(fly.model.lm_head, QuantizedLinear) is not tie
    got, want = logits(loaded, ids), logits(fly, ids)
    assert (got - want).abs().max().item() <= 1e-6
    assert logits(load_model(tmp_path / "out", device="cpu", dtype="fp32"), ids).dtype == torch.float32


def test_tied_model_with_16bit_head_reads_the_embedding(tmp_path):
    from lowbit.engine.load import load_model

    src = write_tiny_llama(tmp_path / "src", tie=True, dtype=torch.bfloat16)
    cfg = QuantConfig(weight_bits=4, group_size=32, keep_16bit=("model.embed_tokens", "lm_head"))
    convert(str(src), tmp_path / "out", cfg, progress=False)
    loaded = load_model(tmp_path / "out", device="cpu", dtype="bf16")
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight
    ids = torch.randint(0, 300, (1, 7), generator=torch.Generator().manual_seed(1))
    fly = load_model(src, device="cpu", dtype="bf16", quant=cfg)
    assert (logits(loaded, ids) - logits(fly, ids)).abs().max().item() <= 1e-6


def test_existing_output_refused_without_force_and_replaced_with_it(tmp_path):
    src = write_tiny_llama(tmp_path / "src", dtype=torch.float16)
    out = tmp_path / "out"
    convert(str(src), out, QuantConfig(weight_bits=8, group_size=None), progress=False)
    with pytest.raises(CheckpointError, match="exists; pass --force"):
        convert(str(src), out, QuantConfig(weight_bits=4, group_size=32), progress=False)
    assert read_checkpoint(out).quant.weight_bits == 8
    convert(str(src), out, QuantConfig(weight_bits=4, group_size=32), force=True, progress=False)
    assert read_checkpoint(out).quant.weight_bits == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no tmp/old left
    with pytest.raises(CheckpointError, match="not a lowbit checkpoint"):
        convert(str(src), src, QuantConfig(weight_bits=4, group_size=32), force=True, progress=False)


def test_failed_conversion_leaves_nothing(tmp_path):
    src = write_tiny_llama(tmp_path / "src", dtype=torch.float16)
    (src / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        convert(str(src), tmp_path / "out", QuantConfig(), progress=False)
    with pytest.raises(QuantConfigError, match="calibration"):
        convert(str(src), tmp_path / "out", QuantConfig(method="gptq"), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_sigkill_mid_conversion_leaves_nothing_that_loads(tmp_path):
    from lowbit.engine.load import load_model

    # ~8M weights: long enough (≥ 0.5 s of quantizing) to be killed while the file is written
    src = write_tiny_llama(tmp_path / "src", hidden=256, intermediate=1024, layers=8, heads=4,
                           dtype=torch.float16)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-c", "from lowbit.cli.convert import convert; convert()",
         str(src), str(out), "--weights", "int4", "--group-size", "32"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    weights = tmp_path / f"out.tmp-{proc.pid}" / "model.safetensors"
    deadline = time.monotonic() + 120
    while not weights.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "conversion finished before it could be killed"
    assert not out.exists() and not is_lowbit_checkpoint(out)
    with pytest.raises(ValueError):
        load_model(out, device="cpu")
    tmp = weights.parent
    assert tmp.is_dir() and not (tmp / "lowbit.json").exists()
    with pytest.raises(CheckpointError):
        read_checkpoint(tmp)
