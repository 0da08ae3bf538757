"""`lowbit generate --backend NAME`: the forced backend runs the ops that implement it, the other
ops choose automatically, and a name no op implements is one clear error line."""
import json

import pytest
from click.testing import CliRunner
from helpers import write_tiny_llama

from lowbit.cli.main import cli
from lowbit.engine.kernels import registry


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_forced_cpu_packed_generates(tiny):
    registry.reset_chosen()  # the counts are per process: earlier tests' choices would show
    result = run("generate", "--model", tiny, "--device", "cpu", "--weights", "int8",
                 "--dtype", "bf16", "--backend", "cpu-packed", "-n", "4", "--json", "Hi")
    assert result.exit_code == 0, result.output
    backends = json.loads(result.stderr.strip().splitlines()[-1])["backends"]
    assert set(backends["dequant_matmul"]["cpu/gemv"]) == {"cpu-packed"}
    assert set(backends["kv_attention"]["cpu/gemv"]) == {"reference"}  # no cpu-packed attention
    assert registry.forced_backend() is None  # restored after the command


def test_unknown_backend_is_one_line_error(tiny):
    result = run("generate", "--model", tiny, "--device", "cpu", "--backend", "nope", "-n", "2",
                 "Hi")
    assert result.exit_code != 0
    lines = [ln for ln in (result.stderr or result.output).strip().splitlines() if ln]
    assert len(lines) == 1 and "unknown backend 'nope'" in lines[0]
    assert "Traceback" not in result.output
