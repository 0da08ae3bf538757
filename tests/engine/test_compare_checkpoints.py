"""engine/compare_checkpoints.py and checkpoint variants: the source check and the calibration
overlap flag on their own, without running a model (tests/cli/test_compare_checkpoint_cli.py runs
whole comparisons)."""
import hashlib

import pytest
import torch
from helpers import write_tiny_llama

from lowbit.engine.compare import Variant, checkpoint_variants
from lowbit.engine.compare_checkpoints import (CheckpointMismatchError, calibration_overlap,
                                               check_source, open_checkpoint)
from lowbit.engine.evaluate import EvaluationError
from lowbit.quant.config import QuantConfig
from lowbit.quant.convert import convert
from lowbit.quant.sources import open_source

TEXT = "Storm hits the north coast.\nMarket falls.\n" * 50


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    src = write_tiny_llama(root / "src", dtype=torch.float16)
    convert(str(src), root / "int8", QuantConfig(weight_bits=8, group_size=None), progress=False)
    return root, src


def calibrated(text_sha: str, disjoint_sha: str, disjoint_tokens: int) -> QuantConfig:
    """A gptq QuantConfig whose record says: calibrated on text_sha, kept off the first
    disjoint_tokens tokens of disjoint_sha (as engine/calibrate.py records it)."""
    record = {"method": "gptq", "text": {"sha256": text_sha, "file": "calib.txt",
                                         "disjoint_from": {"file": "news.cor",
                                                           "sha256": disjoint_sha,
                                                           "tokens": disjoint_tokens}}}
    return QuantConfig(weight_bits=4, group_size=32, method="gptq", calibration=record)


def test_overlap_is_flagged_past_the_tokens_calibration_was_kept_off():
    sha = hashlib.sha256(TEXT.encode("utf-8")).hexdigest()
    quant = calibrated("other", sha, 8192)
    assert calibration_overlap(quant, TEXT, 8192) is None
    assert "kept off only the first 8192 tokens" in calibration_overlap(quant, TEXT, 8193)
    assert "this very text" in calibration_overlap(calibrated(sha, "news", 8192), TEXT, 64)
    assert "cannot tell" in calibration_overlap(calibrated("a", "b", 8192), TEXT, 64)
    assert calibration_overlap(QuantConfig(weight_bits=4, group_size=32), TEXT, 10**6) is None


def test_text_is_hashed_as_its_file_bytes(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(TEXT + "café 東京\n", encoding="utf-8")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert calibration_overlap(calibrated("x", digest, 100), path.read_text("utf-8"), 100) is None


def test_checkpoint_variants_name_the_directory_and_share_one_model_across_kv(tiny):
    root, _ = tiny
    kv16, kv8 = checkpoint_variants([str(root / "int8"), str(root / "int8")], [16, 8])
    assert (kv16.name, kv8.name) == ("int8: int8-pc rtn kv16", "int8: int8-pc rtn kv8")
    assert kv16.weights_id == kv8.weights_id != Variant(kv16.quant, 16).weights_id


def test_not_a_checkpoint_is_refused(tiny):
    root, src = tiny
    with pytest.raises(EvaluationError, match="not a lowbit checkpoint"):
        open_checkpoint(src)


def test_source_check(tiny, tmp_path):
    root, src = tiny
    ckpt = open_checkpoint(root / "int8")
    assert check_source(ckpt, open_source(src), allow_other_source=False) is False
    twin = write_tiny_llama(tmp_path / "twin", dtype=torch.float16, seed=1)
    with pytest.raises(CheckpointMismatchError, match="not from the reference"):
        check_source(ckpt, open_source(twin), allow_other_source=False)
    assert check_source(ckpt, open_source(twin), allow_other_source=True) is True
    wide = write_tiny_llama(tmp_path / "wide", dtype=torch.float16, hidden=96)
    with pytest.raises(CheckpointMismatchError, match="same architecture"):
        check_source(ckpt, open_source(wide), allow_other_source=True)
