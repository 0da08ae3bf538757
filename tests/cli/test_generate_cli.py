"""`lowbit generate` and `lowbit info` as a user runs them: streamed text on stdout, statistics on
stderr, and one clear line with a non-zero exit for every kind of bad input."""
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import assert_one_line_error, write_tiny_gguf, write_tiny_llama
from safetensors.torch import load_file, save_file

from lowbit.cli.main import cli


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result


def test_generate_streams_text_and_stats(tiny):
    result = run("generate", "--model", tiny, "--device", "cpu", "-n", "12", "--json", "hello")
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stderr.strip().splitlines()[-1])
    assert stats["prompt_tokens"] > 0 and 1 <= stats["new_tokens"] <= 12
    for key in ("prefill_s", "ttft_s", "decode_tok_s", "prefill_tok_s", "peak_mem_bytes",
                "weight_bytes", "kv_bytes_per_token"):
        assert key in stats
    assert result.stdout.endswith("\n")


def test_generate_human_stats_on_stderr(tiny):
    result = run("generate", "--model", tiny, "--device", "cpu", "-n", "4", "hello")
    assert result.exit_code == 0
    assert "prefill" in result.stderr and "decode" in result.stderr
    assert "prefill" not in result.stdout


def test_seeded_sampling_is_reproducible(tiny):
    args = ("generate", "--model", tiny, "--device", "cpu", "-n", "16", "--temperature", "1.0",
            "--top-k", "50", "--top-p", "0.9", "--seed", "7", "hello")
    a, b = run(*args), run(*args)
    assert a.exit_code == 0 and a.stdout == b.stdout


def test_chat_template_is_applied(tiny):
    result = run("generate", "--model", tiny, "--device", "cpu", "-n", "2", "--chat", "--json", "hi")
    plain = run("generate", "--model", tiny, "--device", "cpu", "-n", "2", "--json", "hi")
    chat_tokens = json.loads(result.stderr.strip().splitlines()[-1])["prompt_tokens"]
    plain_tokens = json.loads(plain.stderr.strip().splitlines()[-1])["prompt_tokens"]
    assert chat_tokens > plain_tokens + 4  # <|im_start|>user\n ... <|im_end|>\n<|im_start|>assistant\n


def test_info_describes_model(tiny):
    result = run("info", tiny)
    assert result.exit_code == 0
    assert "llama" in result.output and "parameters" in result.output and "context" in result.output


def test_missing_model_path(tmp_path):
    assert_one_line_error(run("generate", "--model", tmp_path / "nope", "hi"), "nope")


def test_directory_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run("generate", "--model", tmp_path / "empty", "hi"), "config.json")


def test_unsupported_architecture(tmp_path):
    path = write_tiny_llama(tmp_path / "gpt2", model_type="gpt2")
    assert_one_line_error(run("info", path), "gpt2")


def test_truncated_safetensors(tmp_path):
    path = write_tiny_llama(tmp_path / "m")
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert_one_line_error(run("generate", "--model", path, "--device", "cpu", "hi"), "model.safetensors")


def test_tensor_with_wrong_shape(tmp_path):
    path = write_tiny_llama(tmp_path / "m")
    tensors = load_file(str(path / "model.safetensors"))
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name] = tensors[name][:-1].clone()
    save_file(tensors, str(path / "model.safetensors"))
    assert_one_line_error(run("generate", "--model", path, "--device", "cpu", "hi"), name)


def test_gguf_of_unsupported_architecture(tmp_path):
    hf = write_tiny_llama(tmp_path / "m")
    gguf_path = write_tiny_gguf(tmp_path / "m.gguf", hf, arch="gpt2")
    assert_one_line_error(run("generate", "--model", gguf_path, "--device", "cpu", "hi"), "gpt2")


def test_empty_prompt(tiny):
    assert_one_line_error(run("generate", "--model", tiny, "--device", "cpu", ""), "empty")


def test_prompt_beyond_context(tiny):
    long_prompt = "word " * 400  # the tiny model's context is 256 positions
    assert_one_line_error(run("generate", "--model", tiny, "--device", "cpu", long_prompt),
                          "exceeds the model's context of 256")


def test_unknown_backend(tiny):
    assert_one_line_error(run("generate", "--model", tiny, "--backend", "cuda-magic", "hi"),
                          "cuda-magic")


def test_forced_backend_that_cannot_run_says_why(tiny):
    # torch's packed int8 CPU kernel has one scale per row: grouped int8 cannot run on it
    result = run("generate", "--model", tiny, "--device", "cpu", "--dtype", "bf16", "--weights",
                 "int8", "--group-size", "32", "--backend", "cpu-packed", "hi")
    assert_one_line_error(result, "cpu-packed", "cannot run", "per-channel")
