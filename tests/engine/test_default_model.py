"""The real default model (SmolLM2-135M-Instruct, its Q4_1 GGUF dequantized) on the real news
corpus: lowbit's perplexity equals transformers', greedy generation knows a fact, and RTN
quantization costs what it should. Slow: they run the 135M model on the CPU."""
import math

import pytest
import torch

from lowbit.engine.evaluate import Tally, next_token_log_probs, split_windows
from lowbit.engine.generate import Generation
from lowbit.engine.load import load_model
from lowbit.quant.config import DEFAULT_KEEP_16BIT, QuantConfig
from lowbit.quant.default_model import default_model_dir
from lowbit.quant.text import default_text_path, read_text

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference():
    return load_model(default_model_dir(), device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def token_ids(reference):
    return reference.tokenizer.encode(read_text(default_text_path()), add_special_tokens=False)


def test_perplexity_matches_transformers(reference, token_ids):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32)
    hf.eval()
    # 2 windows of 1024 (not the CLI's 8): the same code path per window, a quarter of the time
    windows = split_windows(token_ids, 2, 1024)
    ours, theirs = Tally(), Tally()
    for window in windows.tokens:
        lp = next_token_log_probs(reference.model, window)
        with torch.inference_mode():
            hf_lp = hf(window[None]).logits[0, :-1].float().log_softmax(-1)  # (L - 1, V)
        ours.add(lp, lp, window[1:])
        theirs.add(hf_lp, hf_lp, window[1:])
    rel = abs(ours.perplexity / theirs.perplexity - 1)
    assert rel < 0.005, (ours.perplexity, theirs.perplexity)
    assert 5 < ours.perplexity < 50  # a working 135M model on news text, not a broken one


def test_greedy_continuation_names_paris(reference):
    tok = reference.tokenizer
    gen = Generation(reference.model, tok.encode("The capital of France is"), max_new_tokens=8,
                     eos_ids=tok.eos_ids)
    assert "Paris" in tok.decode(list(gen))


def test_rtn_accuracy_bars(reference, token_ids):
    # Issue 3's bars hold with lm_head (tied to the embeddings here) kept 16-bit; quantizing it
    # too costs more (8 x 1024, measured: int4 g128 +55% instead of +32%). 2 windows of 512
    # keep this cheap; measured on them: int8 KL 0.0034, int4 g128 +31.6%.
    keep = DEFAULT_KEEP_16BIT + ("lm_head",)
    windows = split_windows(token_ids, 2, 512)
    variants = {name: load_model(default_model_dir(), device="cpu", dtype="fp32",
                                 quant=QuantConfig(bits, group, keep_16bit=keep)).model
                for name, bits, group in (("int8", 8, None), ("int4", 4, 128))}
    tallies = {name: Tally() for name in ["reference", *variants]}
    for window in windows.tokens:
        ref = next_token_log_probs(reference.model, window)
        tallies["reference"].add(ref, ref, window[1:])
        for name, model in variants.items():
            tallies[name].add(ref, next_token_log_probs(model, window), window[1:])
    ref_ppl = tallies["reference"].perplexity
    int8, int4 = tallies["int8"], tallies["int4"]
    assert int8.kl_mean < 0.004
    assert abs(int8.perplexity / ref_ppl - 1) < 0.01
    assert 0.25 < int4.perplexity / ref_ppl - 1 < 0.40
    assert math.isfinite(int4.kl_mean) and int4.kl_mean > int8.kl_mean
