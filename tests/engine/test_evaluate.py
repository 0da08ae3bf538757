"""Windowed perplexity, KL divergence and top-1 agreement; the evaluation text and its windows."""
import math

import pytest
import torch
from helpers import write_tiny_llama

from lowbit.engine.evaluate import (EvaluationError, Tally, bits_per_weight, kl_per_token,
                                    next_token_log_probs, perplexity, split_windows,
                                    top1_matches)
from lowbit.engine.kv_cache import create_cache
from lowbit.engine.load import load_model
from lowbit.quant import text as text_module
from lowbit.quant.config import QuantConfig
from lowbit.quant.text import TextError, evaluation_token_ranges, read_text


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    return write_tiny_llama(root / "a", seed=0), write_tiny_llama(root / "b", seed=1)


@pytest.fixture(scope="module")
def tiny(tiny_dirs):
    return load_model(tiny_dirs[0], device="cpu", dtype="fp32")


def window(n=48, seed=0):
    return torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(seed))


def test_perplexity_of_a_hand_made_distribution():
    probs = torch.tensor([[0.5, 0.25, 0.125, 0.125],
                          [0.1, 0.2, 0.3, 0.4]])
    targets = torch.tensor([0, 3])
    # −(ln 0.5 + ln 0.4) / 2 = 0.8047...; exp of it = 1 / sqrt(0.5 · 0.4) = 2.2360...
    assert perplexity(probs.log(), targets) == pytest.approx(1 / math.sqrt(0.2), rel=1e-6)
    uniform = torch.full((5, 7), -math.log(7))
    assert perplexity(uniform, torch.arange(5)) == pytest.approx(7.0, rel=1e-6)


def test_kl_and_top1_of_hand_made_distributions():
    p = torch.tensor([[0.5, 0.5, 0.0 + 1e-30], [0.7, 0.2, 0.1]]).log()
    q = torch.tensor([[0.25, 0.75, 1e-30], [0.7, 0.2, 0.1]]).log()
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    kl = kl_per_token(p, q)
    assert kl[0].item() == pytest.approx(expected, rel=1e-5)
    assert kl[1].item() == pytest.approx(0.0, abs=1e-7)
    assert top1_matches(p, q) == 1  # row 0: argmax 0 vs 1; row 1: same


def test_kl_is_chunked_without_changing_the_result():
    a = torch.randn(600, 11).log_softmax(-1)  # 600 rows > KL_CHUNK: several chunks
    b = torch.randn(600, 11).log_softmax(-1)
    direct = (a.exp() * (a - b)).sum(-1).double()
    torch.testing.assert_close(kl_per_token(a, b), direct)


def test_next_token_log_probs_are_the_models_normalised_logits(tiny):
    w = window()
    lp = next_token_log_probs(tiny.model, w)
    assert lp.shape == (w.numel() - 1, tiny.config.vocab_size) and lp.dtype == torch.float32
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(w.numel() - 1))
    cache = create_cache(16, tiny.config, 1, w.numel(), torch.float32, "cpu")
    with torch.inference_mode():
        logits = tiny.model(w[None], torch.arange(w.numel()), cache, kv_len=w.numel())
    torch.testing.assert_close(lp, logits[0, :-1].log_softmax(-1))
    ppl = perplexity(lp, w[1:])
    ce = torch.nn.functional.cross_entropy(logits[0, :-1], w[1:])
    assert ppl == pytest.approx(math.exp(ce.item()), rel=1e-5)


def test_identical_models_agree_exactly(tiny):
    w = window()
    ref, same = next_token_log_probs(tiny.model, w), next_token_log_probs(tiny.model, w)
    tally = Tally()
    tally.add(ref, same, w[1:])
    assert tally.kl_mean == 0.0
    assert tally.top1_agreement == 100.0
    assert tally.tokens == w.numel() - 1


def test_different_models_disagree(tiny, tiny_dirs):
    other = load_model(tiny_dirs[1], device="cpu", dtype="fp32")
    tally = Tally()
    for seed in range(2):
        w = window(seed=seed)
        tally.add(next_token_log_probs(tiny.model, w), next_token_log_probs(other.model, w), w[1:])
    assert tally.kl_mean > 1e-3
    assert tally.top1_agreement < 100.0
    assert tally.tokens == 2 * 47


def test_window_longer_than_the_context_is_refused(tiny):
    with pytest.raises(EvaluationError, match="context"):
        next_token_log_probs(tiny.model, window(tiny.config.max_position_embeddings + 1))


def test_bits_per_weight(tiny_dirs, tiny):
    assert bits_per_weight(tiny.model) == 16.0
    int8 = load_model(tiny_dirs[0], device="cpu", dtype="fp32", quant=QuantConfig(8, None))
    # every linear of the tiny model is quantized (lm_head too: untied); fp32 scale per row
    shapes = [(m.out_features, m.in_features) for m in tiny.model.modules()
              if isinstance(m, torch.nn.Linear)]
    expected = sum(n * k * 8 + n * 32 for n, k in shapes) / sum(n * k for n, k in shapes)
    assert bits_per_weight(int8.model) == pytest.approx(expected)


def test_windows_are_consecutive_from_the_start():
    ids = list(range(100))
    w = split_windows(ids, 3, 30)
    assert w.ranges == [(0, 30), (30, 60), (60, 90)] == evaluation_token_ranges(3, 30)
    assert w.tokens.shape == (3, 30) and w.tokens[1, 0].item() == 30
    assert len(w) == 3 and w.requested == 3


def test_fewer_windows_when_fewer_fit():
    w = split_windows(list(range(100)), 8, 30)
    assert len(w) == 3 and w.requested == 8


def test_text_shorter_than_one_window_is_refused():
    with pytest.raises(TextError, match="fewer than one window of 30"):
        split_windows(list(range(29)), 1, 30)


def test_read_text_validates(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("naïve café\n", encoding="utf-8")
    assert read_text(good) == "naïve café\n"
    with pytest.raises(TextError, match="no such file"):
        read_text(tmp_path / "missing.txt")
    with pytest.raises(TextError, match="not a regular file"):
        read_text(tmp_path)
    (tmp_path / "empty.txt").write_text(" \n")
    with pytest.raises(TextError, match="empty"):
        read_text(tmp_path / "empty.txt")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(TextError, match="not UTF-8.*0xe9 at offset 3"):
        read_text(tmp_path / "latin1.txt")


def test_default_text_missing_says_how_to_install(monkeypatch):
    monkeypatch.setattr(text_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(TextError, match="pip install --no-deps gensim"):
        text_module.default_text_path()
