"""`lowbit bench` on tiny random models: table, JSON, settings and errors."""
import json

import click
import pytest
from click.testing import CliRunner
from helpers import cache_test_device_limits, tiny_config, write_tiny_llama

from lowbit.cli.bench import bench
from lowbit.cli.errors import LowbitGroup
from lowbit.engine import device_limits


@pytest.fixture
def cli(tmp_path, monkeypatch):
    """A group holding only `bench` (registration in cli/main.py is the lead's), with cached
    device limits so no test spends seconds measuring them."""
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    cache_test_device_limits()

    @click.group(cls=LowbitGroup)
    def group():
        pass

    group.add_command(bench)
    return group


@pytest.fixture
def shape(tmp_path):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(tiny_config()))
    return str(path)


def invoke(cli, *args):
    return CliRunner().invoke(cli, ["bench", *args], catch_exceptions=False)


def test_random_shape_json_has_every_setting_with_mean_and_std(cli, shape):
    result = invoke(cli, "--random", shape, "--device", "cpu", "--weights", "16,int4",
                    "--group-size", "32", "--kv", "16", "--pp", "8", "--tg", "4",
                    "--repetitions", "2", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["limits"]["copy_GBps"] == 20.0 and doc["card"].startswith("cpu")
    rows = doc["rows"]
    assert [(r["weights"], r["test"]) for r in rows] == [
        ("16", "pp8"), ("16", "tg4"), ("int4-g32-asym", "pp8"), ("int4-g32-asym", "tg4")]
    for r in rows:
        assert r["random_weights"] and r["model"] == "tiny (random weights)"
        assert len(r["samples_s"]) == 2 and all(s > 0 for s in r["samples_s"])
        assert r["tok_s"] == pytest.approx(sum(r["tokens"] / s for s in r["samples_s"]) / 2)
        assert r["tok_s_std"] >= 0
        assert r["phase"]["verdict"] in ("memory-bound", "compute-bound")
    assert rows[2]["size_bytes"] < rows[0]["size_bytes"]  # int4 stores fewer bytes


def test_model_directory_table(cli, tmp_path):
    model = write_tiny_llama(tmp_path / "tiny")
    result = invoke(cli, str(model), "--device", "cpu", "--weights", "int8", "--kv", "16",
                    "-p", "8", "-n", "4", "-r", "2")
    assert result.exit_code == 0, result.output
    table = [line for line in result.stdout.splitlines() if line.startswith("|")]
    assert table[0].split("|")[1].strip() == "model"
    assert len(table) == 4  # header, rule, pp8, tg4
    assert "| pp8 " in table[2] and "| tg4 " in table[3] and " ± " in table[2]
    assert "random" not in result.stdout
    assert "roofline:" in result.stdout


def test_user_errors_are_one_line(cli, shape):
    both = invoke(cli, "somewhere", "--random", shape)
    assert both.exit_code == 2 and "not both" in both.output
    unknown = invoke(cli, "--random", "llama-9-1t", "--device", "cpu")
    assert unknown.exit_code == 1 and "unknown model shape 'llama-9-1t'" in unknown.output
    assert "Traceback" not in unknown.output
    nothing = invoke(cli, "--random", shape, "--pp", "0", "--tg", "0")
    assert nothing.exit_code == 2 and "nothing to run" in nothing.output
    bad_kv = invoke(cli, "--random", shape, "--kv", "3")
    assert bad_kv.exit_code == 2 and "KV bits" in bad_kv.output


def test_corrupt_limits_cache_is_one_line_and_forced_backend_is_restored(cli, shape):
    from lowbit.engine.kernels import registry
    ok = invoke(cli, "--random", shape, "--device", "cpu", "--weights", "16", "-p", "4",
                "-n", "0", "-r", "1", "--backend", "reference")
    assert ok.exit_code == 0, ok.output
    assert registry.forced_backend() is None
    device_limits.cache_path().write_text("{not json")
    broken = invoke(cli, "--random", shape, "--device", "cpu", "-p", "4", "-n", "0")
    assert broken.exit_code == 1 and "cannot read the device limits cache" in broken.output
    assert len(broken.output.strip().splitlines()) == 1
