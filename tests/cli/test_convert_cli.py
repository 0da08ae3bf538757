"""`lowbit convert`: prints a summary and exits 0; user errors are one line and exit 1."""
import pytest
import torch
from click.testing import CliRunner
from helpers import write_tiny_llama

from lowbit.cli.convert import convert
from lowbit.quant.checkpoint import read_checkpoint


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("src") / "m", dtype=torch.float16)


def run(*args):
    return CliRunner().invoke(convert, [str(a) for a in args])


def one_error_line(result) -> str:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def test_convert_prints_summary_and_writes_checkpoint(src, tmp_path):
    out = tmp_path / "out"
    result = run(src, out, "--weights", "int4", "--group-size", "32", "--symmetric",
                 "--keep-16bit", "*.down_proj", "--kv", "8")
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.stdout
    assert "(16-bit) →" in result.stdout and "smaller" in result.stdout
    assert "bits/weight" in result.stdout and "peak RSS" in result.stdout
    assert "converting" in result.stderr and "done in" in result.stderr
    ckpt = read_checkpoint(out)
    q = ckpt.quant
    assert (q.weight_bits, q.group_size, q.symmetric, q.kv_bits) == (4, 32, True, 8)
    assert q.keep_16bit == ("model.embed_tokens", "*.down_proj")
    assert ckpt.linear_format("model.layers.0.mlp.down_proj") is None


def test_int8_defaults_to_per_channel(src, tmp_path):
    result = run(src, tmp_path / "out", "--weights", "int8")
    assert result.exit_code == 0, result.output
    assert read_checkpoint(tmp_path / "out").quant.group_size is None


@pytest.mark.parametrize("args,message", [
    (["--weights", "int3"], "unknown --weights 'int3'"),
    (["--weights", "int4", "--group-size", "100"], "power of two"),
    (["--weights", "int4", "--group-size", "2048"], "power of two"),
    (["--kv", "3"], "KV bits"),
    (["--calib", "calib.txt"], "need --method search or gptq"),
])
def test_bad_options_exit_1_with_one_line(src, tmp_path, args, message):
    line = one_error_line(run(src, tmp_path / "out", *args))
    assert message in line
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_force(src, tmp_path):
    out = tmp_path / "out"
    assert run(src, out, "--weights", "int8").exit_code == 0
    assert "--force" in one_error_line(run(src, out, "--weights", "int4"))
    assert read_checkpoint(out).quant.weight_bits == 8
    assert run(src, out, "--weights", "int4", "--force").exit_code == 0
    assert read_checkpoint(out).quant.weight_bits == 4


def test_bad_source_and_arity(tmp_path):
    assert "no such file" in one_error_line(run(tmp_path / "missing", tmp_path / "out"))
    assert "[SRC] OUT" in one_error_line(run())
    assert "[SRC] OUT" in one_error_line(run("a", "b", "c"))


@pytest.mark.slow
def test_one_positional_converts_the_default_model(tmp_path):
    """`lowbit convert OUT`: the embedded SmolLM2-135M, int4 g128 (tied: lm_head quantized)."""
    result = run(tmp_path / "smol")
    assert result.exit_code == 0, result.output
    ckpt = read_checkpoint(tmp_path / "smol")
    assert ckpt.source["kind"] == "default-model"
    names = ckpt.tensor_names()
    assert "model.layers.29.mlp.down_proj.qweight" in names
    assert not any(n.startswith("lm_head.") for n in names)  # tied: the embedding is the head


def test_quantize_tied_lm_head_flag(tmp_path):
    from click.testing import CliRunner
    from helpers import write_tiny_llama

    from lowbit.cli.convert import convert
    from lowbit.quant.checkpoint import read_checkpoint
    src = write_tiny_llama(tmp_path / "src", tie=True)
    result = CliRunner().invoke(convert, [str(src), str(tmp_path / "out"), "--weights", "int4",
                                          "--group-size", "32", "--quantize-tied-lm-head"])
    assert result.exit_code == 0, result.output
    ckpt = read_checkpoint(tmp_path / "out")
    assert ckpt.quant.quantize_tied_lm_head and "lm_head.qweight" in ckpt.tensor_names()
