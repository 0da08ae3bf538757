import json
import os

import pytest
import torch
from helpers import write_tiny_llama
from safetensors.torch import load_file, save_file

from lowbit.quant.export_hf import export_hf
from lowbit.quant.hf_source import HFDirectorySource
from lowbit.quant.sources import ModelSourceError, is_lowbit_checkpoint, open_source


@pytest.fixture
def tiny(tmp_path):
    return write_tiny_llama(tmp_path / "tiny")


def test_hf_directory_streams_every_tensor(tiny):
    src = open_source(tiny)
    assert isinstance(src, HFDirectorySource)
    src.validate()
    ref = load_file(str(tiny / "model.safetensors"))
    assert sorted(src.tensor_names()) == sorted(src.model_config.tensor_shapes())
    for name in src.tensor_names():
        assert torch.equal(src.get_tensor(name), ref[name])
    assert set(src.tokenizer_files()) == {"tokenizer.json", "tokenizer_config.json",
                                          "generation_config.json"}
    assert src.fingerprint == open_source(tiny).fingerprint


@pytest.mark.parametrize("dtype, expected", [(torch.float32, torch.bfloat16),
                                             (torch.float16, torch.float16),
                                             (torch.bfloat16, torch.bfloat16)])
def test_dtype_is_16_bit(tmp_path, dtype, expected):
    assert open_source(write_tiny_llama(tmp_path, dtype=dtype)).dtype() == expected


@pytest.mark.parametrize("overrides", [dict(model_type="qwen2", qkv_bias=True, tie=True),
                                       dict(model_type="mistral", kv_heads=4),
                                       dict(qkv_bias=True)])
def test_family_variants_validate(tmp_path, overrides):
    open_source(write_tiny_llama(tmp_path, **overrides)).validate()


def test_sharded_directory(tiny):
    tensors = load_file(str(tiny / "model.safetensors"))
    os.remove(tiny / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:10],
              "model-00002-of-00002.safetensors": names[10:]}
    for file, part in shards.items():
        save_file({n: tensors[n] for n in part}, str(tiny / file))
    weight_map = {n: f for f, part in shards.items() for n in part}
    (tiny / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    src = open_source(tiny)
    src.validate()
    assert torch.equal(src.get_tensor(names[-1]), tensors[names[-1]])


def test_rotary_inv_freq_and_tied_lm_head_copy_are_ignored(tmp_path):
    d = write_tiny_llama(tmp_path, tie=True)
    tensors = load_file(str(d / "model.safetensors"))
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, str(d / "model.safetensors"))
    src = open_source(d)
    src.validate()
    assert "lm_head.weight" not in src.tensor_names()


def test_missing_path(tmp_path):
    with pytest.raises(ModelSourceError, match="no such file"):
        open_source(tmp_path / "nope")


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelSourceError, match="no config.json"):
        open_source(tmp_path)


def test_invalid_config_json(tiny):
    (tiny / "config.json").write_text("{not json")
    with pytest.raises(ModelSourceError, match="invalid JSON"):
        open_source(tiny)


def test_unsupported_architecture(tmp_path):
    with pytest.raises(ModelSourceError, match="unsupported architecture 'GPT2LMHeadModel'"):
        open_source(write_tiny_llama(tmp_path, model_type="gpt2"))


def test_pickled_weights_are_refused(tiny):
    os.remove(tiny / "model.safetensors")
    (tiny / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(ModelSourceError, match="never unpickles.*safetensors"):
        open_source(tiny)


def test_no_weights(tiny):
    os.remove(tiny / "model.safetensors")
    with pytest.raises(ModelSourceError, match="no model.safetensors"):
        open_source(tiny)


@pytest.mark.parametrize("keep", [0.5, 0.999, 40 / 1e9])
def test_truncated_safetensors_names_the_file(tiny, keep):
    f = tiny / "model.safetensors"
    os.truncate(f, int(f.stat().st_size * keep))
    with pytest.raises(ModelSourceError, match="model.safetensors.*truncated or corrupt"):
        open_source(tiny)


def test_wrong_shape_names_the_tensor(tiny):
    tensors = load_file(str(tiny / "model.safetensors"))
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(100, 64)
    save_file(tensors, str(tiny / "model.safetensors"))
    with pytest.raises(ModelSourceError,
                       match=r"'model.layers.1.mlp.up_proj.weight' has shape \[100, 64\].*\[128, 64\]"):
        open_source(tiny).validate()


def test_missing_and_unexpected_tensors(tiny):
    tensors = load_file(str(tiny / "model.safetensors"))
    del tensors["model.norm.weight"]
    save_file(tensors, str(tiny / "model.safetensors"))
    with pytest.raises(ModelSourceError, match="'model.norm.weight' is missing"):
        open_source(tiny).validate()
    tensors["model.norm.weight"] = torch.ones(64)
    tensors["model.layers.9.mlp.up_proj.weight"] = torch.ones(2, 2)
    save_file(tensors, str(tiny / "model.safetensors"))
    with pytest.raises(ModelSourceError, match="unexpected tensor 'model.layers.9.mlp.up_proj"):
        open_source(tiny).validate()


def test_lowbit_checkpoint_is_routed_elsewhere(tiny):
    (tiny / "lowbit.json").write_text("{}")
    assert is_lowbit_checkpoint(tiny)
    with pytest.raises(ModelSourceError, match="lowbit checkpoint.*load it as a checkpoint"):
        open_source(tiny)


def test_export_hf_round_trip_and_refusals(tiny, tmp_path):
    src = open_source(tiny)
    out = tmp_path / "exported"
    nbytes = export_hf(src, out)
    back = open_source(out)
    back.validate()
    assert back.dtype() == torch.bfloat16
    assert nbytes == 2 * src.model_config.num_parameters()
    for name in src.tensor_names():
        assert torch.equal(back.get_tensor(name), src.get_tensor(name).to(torch.bfloat16))
    assert back.tokenizer_files() == src.tokenizer_files()
    with pytest.raises(ModelSourceError, match="already exists; pass --force"):
        export_hf(src, out)
    export_hf(src, out, force=True)
    with pytest.raises(ModelSourceError, match="over the source itself"):
        export_hf(src, tiny, force=True)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_export_failure_leaves_nothing_that_looks_whole(tiny, tmp_path, monkeypatch):
    src = open_source(tiny)

    def broken(name):
        raise ModelSourceError("disk on fire")
    monkeypatch.setattr(src, "get_tensor", broken)
    with pytest.raises(ModelSourceError, match="disk on fire"):
        export_hf(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

