"""`lowbit compare --checkpoint`: lowbit checkpoints (rtn and gptq, converted here from a tiny
random model) as variants beside those quantized on the fly, scored against the 16-bit model they
came from; a bad checkpoint, or one from another model, is one line and a non-zero exit; a
checkpoint whose calibration text may overlap the evaluated windows is flagged."""
import json
import math
import os
import shutil
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from helpers import one_torch_thread, cache_test_device_limits, assert_one_line_error, write_tiny_llama

from lowbit.cli.compare import compare
from lowbit.cli.main import cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
WORDS = ["news", "fire", "rain", "court", "minister", "market", "team", "storm", "police",
         "river", "talks", "vote", "north", "south", "city", "report"]


def convert(*args):
    result = CliRunner().invoke(cli, ["convert", *map(str, args)])
    assert result.exit_code == 0, result.output


def run(*args):
    return CliRunner().invoke(compare, [str(a) for a in args])


def write_calibration_text(path, n_docs=20, words=60):
    """One random-word document a line: shares no 32-token run with the news corpus."""
    gen = torch.Generator().manual_seed(0)
    lines = [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (words,), generator=gen))
             + "." for _ in range(n_docs)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model runs thousands of small ops (calibration most): on this loaded 2-core
    machine two OpenMP threads made one comparison take 3.7 s of CPU, one thread 0.74 s."""
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny fp16 model, its int8 and int4 rtn and int4 gptq checkpoints, and cached device
    limits (no test spends seconds measuring them)."""
    root = tmp_path_factory.mktemp("ckpt")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOWBIT_CACHE", str(root / "cache"))
        cache_test_device_limits()
        src = write_tiny_llama(root / "src", dtype=torch.float16)
        calib = write_calibration_text(root / "calib.txt")
        convert(src, root / "int8", "--weights", "int8")
        convert(src, root / "rtn4", "--weights", "int4", "--group-size", "32")
        convert(src, root / "gptq4", "--weights", "int4", "--group-size", "32", "--method",
                "gptq", "--calib", calib, "--calib-tokens", "256", "--device", "cpu")
        yield SimpleNamespace(root=root, src=src, calib=calib, int8=root / "int8",
                              rtn4=root / "rtn4", gptq4=root / "gptq4")


@pytest.fixture(scope="module")
def main_run(env):
    """Every checkpoint beside on-the-fly int4 g32, on the news corpus."""
    out = env.root / "cmp.json"
    result = run(env.src, "--checkpoint", env.int8, "--checkpoint", env.rtn4, "--checkpoint",
                 env.gptq4, "--weights", "16,int4-g32", "--windows", "2",
                 "--window-len", "64", "--gen-tokens", "2", "--device", "cpu", "--json", out)
    assert result.exit_code == 0, result.output
    return result, json.loads(out.read_text())


def rows_by_name(data):
    return {row["name"]: row for row in data["variants"]}


def test_checkpoint_rows_are_scored_like_the_others(main_run, env):
    result, data = main_run
    names = [row["name"] for row in data["variants"]]
    assert names == ["int4-g32-asym kv16", "int8: int8-pc rtn kv16",
                     "rtn4: int4-g32-asym rtn kv16", "gptq4: int4-g32-asym gptq kv16"]
    table = result.stdout.split("roofline")[0]
    for name in names:
        assert name in table
    rows = rows_by_name(data)
    for name in names[1:]:
        row = rows[name]
        assert math.isfinite(row["kl_mean"]) and row["kl_mean"] > 0
        assert math.isfinite(row["ppl"]) and row["decode_tok_s"] > 0 and row["phases"]
        assert row["calibration_overlap"] is None  # gptq calibrated off the evaluated tokens
    assert rows["gptq4: int4-g32-asym gptq kv16"]["checkpoint"] == str(env.gptq4)
    assert rows["gptq4: int4-g32-asym gptq kv16"]["method"] == "gptq"
    assert rows["int4-g32-asym kv16"]["checkpoint"] is None
    int8, rtn4 = rows["int8: int8-pc rtn kv16"], rows["rtn4: int4-g32-asym rtn kv16"]
    assert int8["kl_mean"] < rtn4["kl_mean"]  # 4-bit rounding error is ~16x int8's
    assert int8["kl_mean"] < rows["gptq4: int4-g32-asym gptq kv16"]["kl_mean"]
    assert int8["weight_bytes"] > rtn4["weight_bytes"]
    assert 4 < rtn4["bits_per_weight"] < int8["bits_per_weight"] < 16


def test_rtn_checkpoint_matches_the_same_rtn_done_on_the_fly(main_run):
    # the checkpoint's scales are fp16 (the source's dtype), on-the-fly ones follow the run
    # dtype: the two differ in rounding only
    rows = rows_by_name(main_run[1])
    ckpt, fly = rows["rtn4: int4-g32-asym rtn kv16"], rows["int4-g32-asym kv16"]
    assert ckpt["bits_per_weight"] == fly["bits_per_weight"]
    assert ckpt["kl_mean"] == pytest.approx(fly["kl_mean"], rel=0.1)


def test_checkpoints_combine_with_kv_and_no_weights_by_default(env, tmp_path):
    out = tmp_path / "cmp.json"
    result = run(env.src, "--checkpoint", env.rtn4, "--kv", "16,8", "--windows", "1",
                 "--window-len", "32", "--gen-tokens", "2", "--device", "cpu", "--json", out)
    assert result.exit_code == 0, result.output
    table = result.stdout.split("roofline")[0].strip().splitlines()
    assert [line.split("  ")[0] for line in table[1:]] == [
        "16 kv16 (reference)", "16 kv8", "rtn4: int4-g32-asym rtn kv16",
        "rtn4: int4-g32-asym rtn kv8"]
    _, kv16, kv8 = json.loads(out.read_text())["variants"]
    assert kv16["kv_bytes_per_token"] > kv8["kv_bytes_per_token"]
    assert kv16["weight_bytes"] == kv8["weight_bytes"] and math.isfinite(kv8["kl_mean"])


def test_calibration_on_the_evaluated_text_is_flagged_in_table_json_and_plot(env, tmp_path):
    pytest.importorskip("matplotlib")
    out, png = tmp_path / "cmp.json", tmp_path / "cmp.png"
    fragment = "calibrated on this very text"
    result = run(env.src, "--checkpoint", env.gptq4, "--checkpoint", env.rtn4, "--text",
                 env.calib, "--windows", "1", "--window-len", "64", "--gen-tokens", "2",
                 "--device", "cpu", "--json", out, "--plot", png)
    assert result.exit_code == 0, result.output
    lines = result.stdout.split("roofline")[0].strip().splitlines()
    assert lines[2].startswith("gptq4: int4-g32-asym gptq kv16 *")
    assert not lines[3].endswith("*")  # rtn: no calibration text
    assert lines[4].startswith("* gptq4: int4-g32-asym gptq kv16: ") and fragment in lines[4]
    gptq, rtn = json.loads(out.read_text())["variants"]
    assert fragment in gptq["calibration_overlap"] and rtn["calibration_overlap"] is None
    assert png.read_bytes().startswith(PNG_MAGIC)


# ---------------------------------------------------------------- bad input


def broken_copy(env, tmp_path, name):
    path = tmp_path / name
    shutil.copytree(env.rtn4, path)
    return path


def corrupt_checkpoints(env, tmp_path):
    truncated = broken_copy(env, tmp_path, "truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    bad_json = broken_copy(env, tmp_path, "bad-json")
    (bad_json / "lowbit.json").write_text("{")
    gpt2 = broken_copy(env, tmp_path, "gpt2")
    config = json.loads((gpt2 / "config.json").read_text())
    (gpt2 / "config.json").write_text(json.dumps({**config, "model_type": "gpt2",
                                                  "architectures": ["GPT2LMHeadModel"]}))
    return {"hf directory": (env.src, ["not a lowbit checkpoint", "lowbit convert"]),
            "missing": (tmp_path / "nope", ["no such directory"]),
            "truncated": (truncated, ["truncated"]),
            "bad lowbit.json": (bad_json, ["lowbit.json", "invalid JSON"]),
            "unsupported architecture": (gpt2, ["unsupported architecture 'GPT2LMHeadModel'"])}


@pytest.mark.parametrize("case", ["hf directory", "missing", "truncated", "bad lowbit.json",
                                  "unsupported architecture"])
def test_bad_checkpoint_is_one_line_and_writes_no_json(env, tmp_path, case):
    path, fragments = corrupt_checkpoints(env, tmp_path)[case]
    out = tmp_path / "cmp.json"
    result = run(env.src, "--checkpoint", env.rtn4, "--checkpoint", path, "--device", "cpu",
                 "--json", out)
    assert_one_line_error(result, *fragments)
    assert not out.exists()


def test_checkpoint_of_another_model_is_refused_unless_allowed(env, tmp_path):
    other = write_tiny_llama(tmp_path / "other", dtype=torch.float16, seed=1)
    convert(other, tmp_path / "other-rtn", "--weights", "int4", "--group-size", "32")
    args = [env.src, "--checkpoint", tmp_path / "other-rtn", "--windows", "1", "--window-len",
            "32", "--gen-tokens", "2", "--device", "cpu"]
    assert_one_line_error(run(*args), f"converted from {other}", f"not from the reference "
                          f"{env.src}", "--allow-other-source")
    allowed = run(*args, "--allow-other-source")
    assert allowed.exit_code == 0, allowed.output
    assert "as asked (--allow-other-source)" in allowed.stderr
    assert "other-rtn: int4-g32-asym rtn kv16" in allowed.stdout


def test_checkpoint_of_another_architecture_is_refused_even_when_allowed(env, tmp_path):
    other = write_tiny_llama(tmp_path / "narrow", dtype=torch.float16, hidden=32)
    convert(other, tmp_path / "narrow-rtn", "--weights", "int8")
    result = run(env.src, "--checkpoint", tmp_path / "narrow-rtn", "--allow-other-source",
                 "--device", "cpu")
    assert_one_line_error(result, "hidden 32", "hidden 64", "same architecture")


def test_checkpoint_of_a_changed_source_is_refused(env, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(env.src, src)
    convert(src, tmp_path / "rtn", "--weights", "int8")
    weights = src / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # rewritten since
    result = run(src, "--checkpoint", tmp_path / "rtn", "--device", "cpu")
    assert_one_line_error(result, "has changed since", "convert it again")
