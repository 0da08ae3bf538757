"""Reading a lowbit checkpoint: the streamed safetensors file, and refusal of corrupt,
truncated or inconsistent checkpoints with a message naming the bad file or tensor."""
import json
import struct

import pytest
import torch
from helpers import write_tiny_llama
from safetensors import safe_open

from lowbit.quant.architecture import ModelConfig
from lowbit.quant.checkpoint import (CheckpointError, SafetensorsWriter, TensorSpec,
                                     describe_checkpoint, expected_tensors, read_checkpoint,
                                     read_safetensors_header)
from lowbit.quant.config import QuantConfig
from lowbit.quant.convert import convert
from lowbit.quant.formats import Int4Weight

CFG = QuantConfig(weight_bits=4, group_size=32)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    src = write_tiny_llama(tmp_path_factory.mktemp("src") / "m", dtype=torch.float16)
    out = tmp_path_factory.mktemp("ckpt") / "c"
    convert(str(src), out, CFG, progress=False)
    return out


def copy_of(checkpoint, tmp_path):
    import shutil
    return shutil.copytree(checkpoint, tmp_path / "copy")


def test_streaming_writer_output_loads_with_safe_open(tmp_path):
    gen = torch.Generator().manual_seed(1)
    tensors = {
        "a": torch.randn(3, 5, generator=gen).to(torch.bfloat16),
        "b": torch.randint(0, 256, (7, 3), generator=gen, dtype=torch.uint8),
        "c": torch.randn(4, generator=gen, dtype=torch.float32),
        "d": torch.randint(-127, 128, (2, 9), generator=gen, dtype=torch.int8),
        "e": torch.randn(11, 1, generator=gen).half(),
    }
    specs = {n: TensorSpec(t.dtype, tuple(t.shape)) for n, t in tensors.items()}
    path = tmp_path / "x.safetensors"
    with SafetensorsWriter(path, specs, {"note": "hi"}) as w:
        for name in ("d", "a", "e", "c", "b"):  # any order
            w.write(name, tensors[name])
    data_start, header = read_safetensors_header(path)
    assert data_start % 8 == 0
    for entry in header.values():
        if "data_offsets" in entry:
            itemsize = {"F32": 4, "F16": 2, "BF16": 2, "U8": 1, "I8": 1}[entry["dtype"]]
            assert entry["data_offsets"][0] % itemsize == 0  # aligned to its element size
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"note": "hi"}
        for name, t in tensors.items():
            assert torch.equal(f.get_tensor(name), t), name


def test_writer_refuses_wrong_shape_and_missing_tensors(tmp_path):
    specs = {"a": TensorSpec(torch.float16, (2, 2)), "b": TensorSpec(torch.uint8, (3,))}
    w = SafetensorsWriter(tmp_path / "x.safetensors", specs, {})
    with pytest.raises(CheckpointError, match="'a'"):
        w.write("a", torch.zeros(2, 3, dtype=torch.float16))
    w.write("a", torch.zeros(2, 2, dtype=torch.float16))
    with pytest.raises(CheckpointError, match="never written"):
        w.close()


def test_read_checkpoint_exposes_config_and_formats(checkpoint):
    ckpt = read_checkpoint(checkpoint)
    assert ckpt.quant == CFG
    assert ckpt.dtype == torch.float16
    assert ckpt.model_config == ModelConfig.from_hf(ckpt.config)
    fmt = ckpt.linear_format("model.layers.1.mlp.down_proj")
    assert isinstance(fmt, Int4Weight) and (fmt.out_features, fmt.in_features) == (64, 128)
    assert ckpt.linear_format("lm_head") is not None
    with pytest.raises(CheckpointError, match="not a linear"):
        ckpt.linear_format("model.norm")
    names = [n for n, _ in ckpt.tensors()]
    assert names == list(expected_tensors(ckpt.model_config, CFG, torch.float16))
    assert "model.embed_tokens.weight" in names and "lm_head.zeros" in names


def test_describe_checkpoint_rows(checkpoint):
    rows = describe_checkpoint(checkpoint)
    assert rows["quantization"].startswith("int4-g32-asym (rtn)")
    # int4 + fp16 scale + uint8 zero per 32 weights = 4 + 16/32 + 8/32 = 4.75 bits
    assert rows["bits per weight"].startswith("4.75 ")
    assert {"model", "architecture", "parameters", "weight bytes on disk",
            "16-bit bytes it replaces", "KV bits", "source"} <= set(rows)


def test_truncated_weights_refused_naming_the_file(checkpoint, tmp_path):
    ckpt = copy_of(checkpoint, tmp_path)
    weights = ckpt / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated"):
        read_checkpoint(ckpt)
    weights.write_bytes(data[:20])  # header cut short
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        read_checkpoint(ckpt)


def _rewrite_header(weights, edit):
    """Apply `edit` to the safetensors header dict and write the file back, data unchanged."""
    raw = weights.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    weights.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def test_wrong_shape_refused_naming_the_tensor(checkpoint, tmp_path):
    ckpt = copy_of(checkpoint, tmp_path)
    name = "model.layers.0.self_attn.k_proj.scales"

    def transpose(header):
        header[name]["shape"] = header[name]["shape"][::-1]
    _rewrite_header(ckpt / "model.safetensors", transpose)
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        read_checkpoint(ckpt)


def test_listing_that_disagrees_with_config_refused(checkpoint, tmp_path):
    """lowbit.json and the file agree with each other but not with config.json."""
    ckpt = copy_of(checkpoint, tmp_path)
    config = json.loads((ckpt / "config.json").read_text())
    config["intermediate_size"] = 96
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="mlp"):
        read_checkpoint(ckpt)


def test_unknown_format_version_refused(checkpoint, tmp_path):
    ckpt = copy_of(checkpoint, tmp_path)
    meta = json.loads((ckpt / "lowbit.json").read_text())
    meta["format_version"] = 99
    (ckpt / "lowbit.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="format_version 99"):
        read_checkpoint(ckpt)


def test_bad_quant_settings_and_metadata_mismatch_refused(checkpoint, tmp_path):
    ckpt = copy_of(checkpoint, tmp_path)
    meta = json.loads((ckpt / "lowbit.json").read_text())
    bad = dict(meta, quant=dict(meta["quant"], group_size=100))
    (ckpt / "lowbit.json").write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match="power of two"):
        read_checkpoint(ckpt)
    other = dict(meta, source=dict(meta["source"], fingerprint="0" * 16))
    (ckpt / "lowbit.json").write_text(json.dumps(other))
    with pytest.raises(CheckpointError, match="does not repeat lowbit.json"):
        read_checkpoint(ckpt)


def test_corrupt_zero_points_refused_at_use(checkpoint, tmp_path):
    ckpt = copy_of(checkpoint, tmp_path)
    name = "model.layers.0.mlp.up_proj.zeros"
    weights = ckpt / "model.safetensors"
    data_start, header = read_safetensors_header(weights)
    begin = data_start + header[name]["data_offsets"][0]
    raw = bytearray(weights.read_bytes())
    raw[begin] = 200  # an int4 zero point must be in [0, 15]
    weights.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="up_proj"):
        read_checkpoint(ckpt).linear_format("model.layers.0.mlp.up_proj")
