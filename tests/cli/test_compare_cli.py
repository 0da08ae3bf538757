"""`lowbit compare` on a tiny random model: the variant list, the table, the JSON, and one clear
line with a non-zero exit (and no JSON) for every bad input."""
import json

import pytest
from click.testing import CliRunner
from helpers import assert_one_line_error, write_tiny_llama

from lowbit.cli.compare import compare, parse_variants, split_list

TEXT = ("The quick brown fox jumps over the lazy dog. Quantization trades a little accuracy for "
        "a lot of memory bandwidth. ") * 30  # ~1500 tokens of the tiny byte-level BPE
JSON_KEYS = {"reference", "variants", "device", "text", "windows", "window_len", "token_ranges",
             "commit", "date"}
ROW_KEYS = {"name", "weights", "kv", "ppl", "ppl_delta_pct", "kl_mean", "top1_agreement",
            "bits_per_weight", "weight_bytes", "kv_bytes_per_token", "prefill_tok_s",
            "decode_tok_s", "peak_mem_bytes"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "news.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def run(*args):
    return CliRunner().invoke(compare, [str(a) for a in args])


def test_variants_are_every_pair_but_the_reference():
    variants = parse_variants(("16,int8,int4",), ("16,8",), None)
    assert [v.name for v in variants] == ["16 kv8", "int8-pc kv16", "int8-pc kv8",
                                          "int4-g128-asym kv16", "int4-g128-asym kv8"]
    assert parse_variants(("16,int8", "int4"), ("16", "8"), None) == variants
    assert split_list(("16, int8,,int8", "int4")) == ["16", "int8", "int4"]


@pytest.mark.parametrize("spec, bits, group, symmetric", [
    ("int8", 8, None, True), ("int8-g128", 8, 128, True), ("int4", 4, 128, False),
    ("int4-g64", 4, 64, False), ("int4-g32", 4, 32, False), ("int4-g128-sym", 4, 128, True)])
def test_weight_specs(spec, bits, group, symmetric):
    (variant,) = parse_variants((spec,), ("16",), None)
    q = variant.quant
    assert (q.weight_bits, q.group_size, q.symmetric, variant.kv_bits) == (bits, group, symmetric, 16)


def test_group_size_applies_where_the_spec_names_none():
    a, b, c = parse_variants(("int8,int4,int4-g32",), ("16",), 64)
    assert (a.quant.group_size, b.quant.group_size, c.quant.group_size) == (64, 64, 32)


def test_keep_16bit_adds_to_the_default_and_shows_in_the_name():
    (variant,) = parse_variants(("int4",), ("16",), None, ("lm_head",))
    assert variant.name == "int4-g128-asym keep:lm_head kv16"
    assert variant.quant.keeps_16bit("lm_head") and variant.quant.keeps_16bit("model.embed_tokens")
    (plain,) = parse_variants(("int4",), ("16",), None)
    assert not plain.quant.keeps_16bit("lm_head") and plain.name == "int4-g128-asym kv16"


def test_compare_prints_a_table_and_writes_every_json_key(tiny, text_file, tmp_path):
    out = tmp_path / "cmp.json"
    result = run(tiny, "--text", text_file, "--weights", "16,int8,int4-g32", "--kv", "16",
                 "--windows", "3", "--window-len", "64", "--gen-tokens", "4", "--device", "cpu",
                 "--json", out)
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    table, phases = lines[:4], lines[4:]
    assert table[0].startswith("variant")
    assert table[1].startswith("16 kv16 (reference)") and table[3].startswith("int4-g32-asym kv16")
    assert phases[0].startswith("roofline") and "prefill" in phases[1] and "decode" in phases[1]
    assert len(phases) == 5  # limits, header, one line per variant
    assert "window 3/3" in result.stderr
    data = json.loads(out.read_text())
    assert JSON_KEYS <= set(data)
    assert data["windows"] == 3 and data["window_len"] == 64
    assert data["token_ranges"] == [[0, 64], [64, 128], [128, 192]]
    ref = data["reference"]
    assert ROW_KEYS <= set(ref)
    assert (ref["ppl_delta_pct"], ref["kl_mean"], ref["top1_agreement"], ref["bits_per_weight"]) \
        == (0.0, 0.0, 100.0, 16.0)
    assert [v["name"] for v in data["variants"]] == ["int8-pc kv16", "int4-g32-asym kv16"]
    int8, int4 = data["variants"]
    for row in data["variants"]:
        assert ROW_KEYS <= set(row)
        assert row["kl_mean"] > 0 and row["ppl"] > 0 and row["decode_tok_s"] > 0
    assert int4["kl_mean"] > int8["kl_mean"]  # 4-bit rounding error is ~16x int8's
    assert ref["weight_bytes"] > int8["weight_bytes"] > int4["weight_bytes"]
    assert 4 < int4["bits_per_weight"] < int8["bits_per_weight"] < 16


def test_kv_variants_shrink_the_cache(tiny, text_file, tmp_path):
    out = tmp_path / "cmp.json"
    result = run(tiny, "--text", text_file, "--weights", "16", "--kv", "16,8,4", "--windows", "2",
                 "--window-len", "64", "--gen-tokens", "2", "--device", "cpu", "--json", out)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    kv8, kv4 = data["variants"]
    assert (kv8["name"], kv4["name"]) == ("16 kv8", "16 kv4")
    assert data["reference"]["kv_bytes_per_token"] > kv8["kv_bytes_per_token"] \
        > kv4["kv_bytes_per_token"]
    assert kv8["weight_bytes"] == kv4["weight_bytes"] == data["reference"]["weight_bytes"]
    assert kv4["kl_mean"] > kv8["kl_mean"] > 0


def test_fewer_windows_than_asked_says_so(tiny, text_file, tmp_path):
    out = tmp_path / "cmp.json"
    result = run(tiny, "--text", text_file, "--weights", "int8", "--windows", "1000",
                 "--window-len", "200", "--gen-tokens", "2", "--device", "cpu", "--json", out)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert 1 <= data["windows"] < 1000
    assert f"{data['windows']} window(s) of 200 fit, not the 1000 asked for" in result.stderr


def bad_input_cases(tmp_path, text_file):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café au lait".encode("latin-1"))
    short = tmp_path / "short.txt"
    short.write_text("A few words only.")
    return {
        "empty": (["--text", empty], ["empty"]),
        "not utf-8": (["--text", latin1], ["not UTF-8"]),
        "missing": (["--text", tmp_path / "nope.txt"], ["no such file"]),
        "short": (["--text", short], ["fewer than one window of 64"]),
        "weights": (["--text", text_file, "--weights", "16,int3"], ["--weights", "'int3'"]),
        "weights typo": (["--text", text_file, "--weights", "fp8"], ["unknown spec 'fp8'"]),
        "group": (["--text", text_file, "--weights", "int4-g100"], ["group size 100"]),
        "kv": (["--text", text_file, "--kv", "16,7"], ["--kv", "'7'"]),
        "reference only": (["--text", text_file, "--weights", "16", "--kv", "16"], ["nothing to compare"]),
        "context": (["--text", text_file, "--window-len", "1000"], ["context of 256"]),
    }


@pytest.mark.parametrize("case", ["empty", "not utf-8", "missing", "short", "weights",
                                  "weights typo", "group", "kv", "reference only", "context"])
def test_bad_input_is_one_line_and_writes_no_json(case, tiny, text_file, tmp_path):
    args, fragments = bad_input_cases(tmp_path, text_file)[case]
    out = tmp_path / "cmp.json"
    result = run(tiny, "--window-len", "64", "--device", "cpu", "--json", out, *args)
    assert_one_line_error(result, *fragments)
    assert not out.exists()
    assert not list(tmp_path.glob(".cmp.json.*"))


def test_a_lowbit_checkpoint_is_not_a_reference(tmp_path, text_file):
    model = write_tiny_llama(tmp_path / "ckpt")
    (model / "lowbit.json").write_text("{}")
    result = run(model, "--text", text_file, "--window-len", "64", "--device", "cpu")
    assert_one_line_error(result, "lowbit checkpoint", "16-bit model it came from")
