import pytest
import torch
from helpers import one_torch_thread, tiny_tokenizer, write_tiny_llama

from lowbit.engine.calibrate import CalibrationSettings, calibrate
from lowbit.engine.tokenizer import Tokenizer
from lowbit.quant.calibration_text import CalibrationTextError, calibration_text
from lowbit.quant.checkpoint import quantized_linears
from lowbit.quant.config import QuantConfig
from lowbit.quant.formats import Int8Weight
from lowbit.quant.quantize import quantize_weight
from lowbit.quant.sources import open_source

QUANT = QuantConfig(weight_bits=4, group_size=32)


@pytest.fixture(autouse=True)
def one_thread():
    """Calibration runs thousands of small ops; on a loaded 2-core machine two OpenMP threads
    make them ~8x slower (measured: 69 s vs 8 s for this file's tiny model), so these tests run
    single-threaded."""
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    # hidden 96 = 2 x 32 + 32, intermediate 160 = 5 x 32: ragged-free; 200 below is ragged
    path = write_tiny_llama(tmp_path_factory.mktemp("tiny"), hidden=96, intermediate=200,
                            layers=2, tie=True)
    return open_source(path)


def windows(seed, n=4, length=48):
    return torch.randint(3, 300, (n, length), generator=torch.Generator().manual_seed(seed))


def rtn_formats(source, quant):
    out = {}
    for name in quantized_linears(source.model_config, quant):
        tensor = "model.embed_tokens.weight" if name == "lm_head" else name + ".weight"
        w = source.get_tensor(tensor).to(source.dtype())  # as `lowbit convert` casts it
        out[name] = quantize_weight(w, quant.for_module(name))
    return out


@pytest.mark.parametrize("method", ["search", "gptq"])
def test_every_linear_in_file_order_with_canonical_tensors(source, method):
    got = list(calibrate(source, QUANT, CalibrationSettings(method), windows(0), progress=False))
    want = rtn_formats(source, QUANT)
    assert [name for name, _ in got] == list(want)
    for name, fmt in got:
        assert {k: (t.dtype, t.shape, t.device) for k, t in fmt.tensors().items()} == \
            {k: (t.dtype, t.shape, t.device) for k, t in want[name].tensors().items()}, name


def test_deterministic(source):
    settings = CalibrationSettings("gptq")
    one = list(calibrate(source, QUANT, settings, windows(1), progress=False))
    two = list(calibrate(source, QUANT, settings, windows(1), progress=False))
    for (n1, f1), (n2, f2) in zip(one, two):
        assert n1 == n2
        for k, t in f1.tensors().items():
            assert torch.equal(t, f2.tensors()[k]), (n1, k)


def test_keep_8bit_layers_come_back_per_channel_int8(source):
    quant = QuantConfig(weight_bits=4, group_size=32, keep_8bit=("*.down_proj", "lm_head"),
                        quantize_tied_lm_head=True)
    got = dict(calibrate(source, quant, CalibrationSettings("search"), windows(2),
                         progress=False))
    assert "lm_head" in got
    for name, fmt in got.items():
        want_int8 = name.endswith("down_proj") or name == "lm_head"
        assert isinstance(fmt, Int8Weight) == want_int8, name
        if want_int8:
            assert fmt.group_size is None and fmt.scales.shape == (fmt.out_features, 1)


def test_keep_16bit_layers_are_skipped(source):
    quant = QuantConfig(weight_bits=4, group_size=32,
                        keep_16bit=("model.embed_tokens", "lm_head", "*.q_proj"))
    names = [n for n, _ in calibrate(source, quant, CalibrationSettings("search"), windows(3),
                                     progress=False)]
    assert "lm_head" not in names and not any(n.endswith("q_proj") for n in names)
    assert len(names) == 2 * 6


# ---------------------------------------------------------------- calibration text


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer(tiny_tokenizer(), {}, {})


def corpus(tmp_path, n_docs=40, words=60, seed=0):
    gen = torch.Generator().manual_seed(seed)
    vocab = ["news", "fire", "rain", "court", "minister", "market", "team", "storm", "police",
             "river", "talks", "vote", "north", "south", "city", "report"]
    lines = [" ".join(vocab[i] for i in torch.randint(0, len(vocab), (words,), generator=gen))
             + "." for _ in range(n_docs)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines) + "\n")
    return path, lines


def test_default_split_stays_off_the_evaluation_windows(tmp_path, tokenizer):
    path, lines = corpus(tmp_path)
    text = calibration_text(tokenizer, None, n_tokens=512, window_len=128, eval_windows=4,
                            eval_window_len=128, eval_path=path)
    ids = tokenizer.encode(path.read_text(), add_special_tokens=False)
    evaluated = tokenizer.decode(ids[:4 * 128])
    assert text.windows.shape == (4, 128)
    assert text.record["excluded"]["lines"].startswith("1-")
    first_kept = int(text.record["lines"].split(",")[0].split("-")[0])
    assert sum(len(line) + 1 for line in lines[:first_kept - 1]) >= len(evaluated)
    assert text.record["tokens"] == 512 and text.record["sha256"]


def test_file_overlapping_the_evaluation_windows_is_refused(tmp_path, tokenizer):
    path, lines = corpus(tmp_path)
    copied = tmp_path / "mine.txt"
    copied.write_text("\n".join(lines[1:5]) + "\n")  # the second document is evaluated
    with pytest.raises(CalibrationTextError, match="evaluation windows"):
        calibration_text(tokenizer, copied, n_tokens=256, window_len=128, eval_windows=4,
                         eval_window_len=128, eval_path=path)


def test_disjoint_file_is_accepted_and_seeded(tmp_path, tokenizer):
    path, _ = corpus(tmp_path)
    other, _ = corpus(tmp_path / "other" if (tmp_path / "other").mkdir() is None else None,
                      seed=1)
    kwargs = dict(n_tokens=256, window_len=128, eval_windows=4, eval_window_len=128,
                  eval_path=path)
    a = calibration_text(tokenizer, other, seed=5, **kwargs)
    b = calibration_text(tokenizer, other, seed=5, **kwargs)
    c = calibration_text(tokenizer, other, seed=6, **kwargs)
    assert torch.equal(a.windows, b.windows) and not torch.equal(a.windows, c.windows)


def test_too_little_text_is_refused(tmp_path, tokenizer):
    path, _ = corpus(tmp_path, n_docs=12)
    with pytest.raises(CalibrationTextError, match="fewer than"):
        calibration_text(tokenizer, None, n_tokens=4096, window_len=128, eval_windows=2,
                         eval_window_len=128, eval_path=path)


# ---------------------------------------------------------------- checkpoints


def test_calibrated_checkpoint_is_canonical_loads_and_runs_on_every_backend(tmp_path):
    from lowbit.engine.calibrate import convert_calibrated
    from lowbit.engine.kernels import registry
    from lowbit.engine.kernels.registry import BackendUnavailable
    from lowbit.engine.kv_cache import create_cache
    from lowbit.engine.load import load_model
    from lowbit.quant.checkpoint import read_checkpoint
    from lowbit.quant.convert import convert

    src = write_tiny_llama(tmp_path / "src", hidden=96, intermediate=200, tie=True,
                           dtype=torch.bfloat16)
    calib, _ = corpus(tmp_path, n_docs=30)
    quant = QuantConfig(weight_bits=4, group_size=32)
    convert_calibrated(str(src), tmp_path / "gptq", quant, CalibrationSettings("gptq"),
                       calib=calib, calib_tokens=512, device="cpu", progress=False)
    convert(str(src), tmp_path / "rtn", quant, progress=False)
    ours, rtn = read_checkpoint(tmp_path / "gptq"), read_checkpoint(tmp_path / "rtn")
    assert ours.specs == rtn.specs  # same tensor names, dtypes and shapes
    record = ours.quant.calibration
    assert record["method"] == "gptq" and record["text"]["sha256"] and record["seed"] == 0
    assert record["text"]["tokens"] == 512
    differs = [n for n in ours.specs if n.endswith("qweight")
               and not torch.equal(ours.get_tensor(n), rtn.get_tensor(n))]
    assert differs  # calibration chose other integers

    # every backend that can run a calibrated linear agrees with the reference on it; the
    # whole model runs with the automatic choice (cpu-packed for bf16 at 24 rows)
    x = torch.randn(24, 96, generator=torch.Generator().manual_seed(0))
    tokens = torch.randint(3, 300, (1, 24), generator=torch.Generator().manual_seed(0))
    ran = set()
    for dtype, torch_dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model = load_model(tmp_path / "gptq", device="cpu", dtype=dtype).model
        linear = model.model.layers[0].self_attn.o_proj
        with torch.inference_mode():
            with registry.use_backend("reference"):
                ref = linear(x.to(torch_dtype)).float()
            for backend in registry.backends("dequant_matmul"):
                if backend == "triton" and dtype == "bf16":
                    continue  # Triton's CPU interpreter gets bf16 arithmetic wrong (DESIGN.md)
                try:
                    with registry.use_backend(backend):
                        out = linear(x.to(torch_dtype)).float()
                except BackendUnavailable:
                    continue
                ran.add(backend)
                snr = ref.square().mean() / (out - ref).square().mean().clamp_min(1e-30)
                assert snr > 1e3, (dtype, backend)
            cache = create_cache(16, model.config, 1, 24, torch_dtype, "cpu")
            logits = model(tokens, torch.arange(24), cache, kv_len=24)
        assert torch.isfinite(logits).all()
    assert {"reference", "cpu-packed"} <= ran  # and triton where the interpreter runs


def test_keep_8bit_checkpoint_mixes_int4_and_int8(tmp_path):
    from lowbit.engine.calibrate import convert_calibrated
    from lowbit.engine.linear import QuantizedLinear
    from lowbit.engine.load import load_model

    src = write_tiny_llama(tmp_path / "src", hidden=64, intermediate=128, tie=True)
    calib, _ = corpus(tmp_path, n_docs=20)
    quant = QuantConfig(weight_bits=4, group_size=32, keep_8bit=("*.down_proj",))
    convert_calibrated(str(src), tmp_path / "out", quant, CalibrationSettings("search"),
                       calib=calib, calib_tokens=256, device="cpu", progress=False)
    model = load_model(tmp_path / "out", device="cpu", dtype="fp32").model
    bits = {n: m.bits for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert {b for n, b in bits.items() if n.endswith("down_proj")} == {8}
    assert {b for n, b in bits.items() if not n.endswith("down_proj")} == {4}


def test_cli_convert_gptq_records_calibration_and_refuses_overlap(tmp_path):
    import json

    from click.testing import CliRunner

    from lowbit.cli.main import cli
    from lowbit.quant.text import default_text_path

    src = write_tiny_llama(tmp_path / "src", hidden=64, intermediate=128, tie=True)
    calib, _ = corpus(tmp_path, n_docs=20)
    result = CliRunner().invoke(cli, ["convert", str(src), str(tmp_path / "out"), "--method",
                                      "gptq", "--calib", str(calib), "--calib-tokens", "256",
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "out" / "lowbit.json").read_text())
    assert meta["quant"]["method"] == "gptq"
    assert meta["quant"]["calibration"]["text"]["tokens"] == 256

    news = default_text_path().read_text().split("\n")
    leaked = tmp_path / "leaked.txt"
    leaked.write_text("\n".join(news[:3]) + "\n")  # the start of what compare evaluates
    result = CliRunner().invoke(cli, ["convert", str(src), str(tmp_path / "bad"), "--method",
                                      "search", "--calib", str(leaked), "--calib-tokens", "256",
                                      "--device", "cpu"])
    assert result.exit_code == 1
    assert "evaluation windows" in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()


def test_cli_sensitivity_table(tmp_path):
    from click.testing import CliRunner

    from lowbit.cli.sensitivity import sensitivity

    src = write_tiny_llama(tmp_path / "src", hidden=64, intermediate=128, tie=True)
    calib, _ = corpus(tmp_path, n_docs=20)
    result = CliRunner().invoke(sensitivity, [str(src), "--group-size", "32", "--calib",
                                              str(calib), "--windows", "1", "--window-len", "64",
                                              "--device", "cpu", "--json",
                                              str(tmp_path / "s.json")])
    assert result.exit_code == 0, result.output
    assert "model.layers." in result.output and "keep int8" in result.output
    assert (tmp_path / "s.json").is_file()

    from lowbit.quant.convert import convert
    convert(str(src), tmp_path / "ckpt", QuantConfig(weight_bits=4, group_size=32),
            progress=False)
    result = CliRunner().invoke(sensitivity, ["--checkpoint", str(tmp_path / "ckpt"), "--calib",
                                              str(calib), "--windows", "1", "--window-len", "64",
                                              "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "mlp.down_proj" in result.output


def test_rtn_checkpoint_with_keep_8bit(tmp_path):
    from lowbit.engine.load import load_model
    from lowbit.quant.checkpoint import read_checkpoint
    from lowbit.quant.convert import convert

    src = write_tiny_llama(tmp_path / "src", hidden=64, intermediate=128, tie=True)
    quant = QuantConfig(weight_bits=4, group_size=32, keep_8bit=("lm_head",),
                        quantize_tied_lm_head=True)
    convert(str(src), tmp_path / "out", quant, progress=False)
    ckpt = read_checkpoint(tmp_path / "out")
    assert isinstance(ckpt.linear_format("lm_head"), Int8Weight)
    assert ckpt.linear_format("model.layers.0.mlp.up_proj").bits == 4
    load_model(tmp_path / "out", device="cpu", dtype="fp32")


def test_overlap_flag_for_compare():
    from lowbit.quant.calibration_text import overlapping_evaluation

    record = {"text": {"sha256": "aaa", "disjoint_from": {"sha256": "bbb", "tokens": 8192}}}
    assert overlapping_evaluation({}, "bbb", 8192) is None
    assert overlapping_evaluation(record, "bbb", 8192) is None
    assert "may overlap" in overlapping_evaluation(record, "bbb", 16384)
    assert "another text" in overlapping_evaluation(record, "ccc", 8192)


@pytest.mark.slow
def test_default_model_first_layer_gptq_beats_rtn_on_held_out_text():
    """Real weights, real text: layer 0 of the default model calibrated on 2048 tokens, its output
    compared with the 16-bit layer's on 512 other tokens of the news corpus. Measured: GPTQ's
    output MSE 0.034 against RTN's 0.045 (0.75x); the assertion leaves room for 0.85x."""
    import dataclasses

    from lowbit.engine.calibrate import LayerCalibrator, load_layer
    from lowbit.engine.kv_cache import DenseKVCache
    from lowbit.engine.rope import Rotary

    source = open_source(None)
    tokenizer = Tokenizer.from_files(source.tokenizer_files())
    calib = calibration_text(tokenizer, n_tokens=2048, window_len=512, seed=0).windows
    held_out = calibration_text(tokenizer, n_tokens=512, window_len=512, seed=1).windows
    quant = QuantConfig(weight_bits=4, group_size=128)
    gptq = dict(LayerCalibrator(source, quant, CalibrationSettings("gptq"), calib,
                                torch.device("cpu"), torch.float32).layer(0))
    rtn = {n: quantize_weight(source.get_tensor(n + ".weight").to(source.dtype()), quant)
           for n in gptq}
    cfg = source.model_config
    cos, sin = Rotary(cfg)(torch.arange(512), torch.float32)
    x = source.get_tensor("model.embed_tokens.weight").float()[held_out]  # (1, 512, H)

    def run(formats):
        layer = load_layer(source, 0, torch.device("cpu"), torch.float32)
        modules = dict(layer.named_modules())
        for name, fmt in (formats or {}).items():
            modules[name.removeprefix("model.layers.0.")].weight.data.copy_(
                fmt.dequantize(torch.float32))
        cache = DenseKVCache(dataclasses.replace(cfg, num_layers=1), 1, 512, torch.float32, "cpu")
        with torch.inference_mode():
            return layer(x, cos, sin, torch.arange(512), cache, 512)

    ref = run(None)
    err_gptq = (run(gptq) - ref).square().mean()
    err_rtn = (run(rtn) - ref).square().mean()
    assert err_gptq < 0.85 * err_rtn
