"""The lowbit checkpoint: a directory laid out like a Hugging Face model, read, validated and
written atomically here.

    config.json, tokenizer.json, tokenizer_config.json, generation_config.json   (copied)
    lowbit.json         {"format_version": 1, "quant": QuantConfig.to_dict(),
                         "source": {"path", "fingerprint", "kind"},
                         "dtype": "float16" | "bfloat16",
                         "tensors": {name: {"dtype": "uint8", "shape": [N, K // 2]}, ...}}
    model.safetensors   every tensor below; its __metadata__["lowbit"] is lowbit.json as a string

A linear stored quantized (every linear not kept 16-bit, see `quantized_linears`) becomes
`<module>.qweight`, `<module>.scales`, `<module>.zeros` (asymmetric int4 only) and `<module>.bias`
(when the layer has one), laid out as `lowbit.quant.formats` documents. Every other tensor
(embedding, norms, linears kept 16-bit, biases) keeps its HF name and shape in `dtype`.

A tied model's lm_head has no tensor of its own in the source. By default it stays the 16-bit
embedding (QuantConfig.stays_16bit); with quantize_tied_lm_head the checkpoint stores a quantized
`lm_head` made from the embedding (what the engine's module swap does on the fly): the embedding
is a gather (one row a token), lm_head a full matmul (all V x H weights a token: 57 MB of the
default model's 16-bit 270 MB), so that trades memory and accuracy for decode bandwidth.

Reading validates lowbit.json, config.json and every tensor's name, dtype, shape and byte range
against the set `expected_tensors` derives from config.json and the QuantConfig alone, before
any tensor is used. Nothing is ever unpickled.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .architecture import ModelConfig, UnsupportedModelError
from .bnb import BnbWeight, bnb_from_tensors, expected_bnb_tensors
from .config import BNB_METHODS, QuantConfig, QuantConfigError
from .formats import FormatError, Int4Weight, Int8Weight
from .primitives import num_groups
from .sources import LOWBIT_MARKER

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
METADATA_KEY = "lowbit"
STORED_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
SAFETENSORS_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32",
                      torch.uint8: "U8", torch.int8: "I8"}
_DTYPE_NAMES = {d: str(d).removeprefix("torch.") for d in SAFETENSORS_DTYPES}
# A header is a few hundred bytes a tensor; 100 MB means a corrupt length field, not a model.
MAX_HEADER_BYTES = 100_000_000


class CheckpointError(ValueError):
    """A lowbit checkpoint that cannot be read or written: missing, corrupt, truncated or
    inconsistent files; the message names the file or tensor."""


@dataclass(frozen=True)
class TensorSpec:
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n

    def to_json(self) -> dict:
        return {"dtype": _DTYPE_NAMES[self.dtype], "shape": list(self.shape)}

    def describe(self) -> str:
        return f"{_DTYPE_NAMES[self.dtype]} {list(self.shape)}"


@dataclass(frozen=True)
class StoredItem:
    """One source tensor and what the checkpoint stores for it: `linear` names the module when
    the tensor is a weight stored quantized (then `outputs` holds qweight/scales[/zeros])."""

    source_name: str
    linear: str | None
    outputs: dict[str, TensorSpec]


def quantized_linears(mc: ModelConfig, cfg: QuantConfig) -> dict[str, tuple[int, int]]:
    """Module name → (out_features, in_features) of every linear stored quantized: those no
    keep_16bit pattern names; a tied model's lm_head only with quantize_tied_lm_head."""
    if cfg.weight_bits == 16:
        return {}
    shapes = dict(mc.linear_shapes())
    if mc.tie_word_embeddings:
        shapes["lm_head"] = (mc.vocab_size, mc.hidden_size)
    tied = mc.tie_word_embeddings
    return {name: s for name, s in shapes.items() if not cfg.stays_16bit(name, tied)}


def linear_specs(out_features: int, in_features: int, cfg: QuantConfig,
                 dtype: torch.dtype) -> dict[str, TensorSpec]:
    """Suffix → spec of one quantized linear's tensors (the layouts of formats.py and, for
    the bnb-* methods, of bnb.py)."""
    n, k = out_features, in_features
    if cfg.method in BNB_METHODS:
        return {s: TensorSpec(dt, shape) for s, (dt, shape)
                in expected_bnb_tensors(cfg.method, n, k).items()}
    g = 1 if cfg.group_size is None else num_groups(k, cfg.group_size)
    if cfg.weight_bits == 8:
        return {"qweight": TensorSpec(torch.int8, (n, k)), "scales": TensorSpec(dtype, (n, g))}
    specs = {"qweight": TensorSpec(torch.uint8, (n, k // 2)), "scales": TensorSpec(dtype, (n, g))}
    if not cfg.symmetric:
        specs["zeros"] = TensorSpec(torch.uint8, (n, g))
    return specs


def storage_plan(mc: ModelConfig, cfg: QuantConfig, dtype: torch.dtype) -> list[StoredItem]:
    """What to store for each source tensor, in the order conversion streams them."""
    quantized = quantized_linears(mc, cfg)
    plan = []
    for name, shape in mc.tensor_shapes().items():
        module, _, leaf = name.rpartition(".")
        if leaf == "weight" and module in quantized:
            specs = linear_specs(*quantized[module], cfg.for_module(module), dtype)
            plan.append(StoredItem(name, module, {f"{module}.{s}": t for s, t in specs.items()}))
        else:
            plan.append(StoredItem(name, None, {name: TensorSpec(dtype, tuple(shape))}))
    if mc.tie_word_embeddings and "lm_head" in quantized:
        specs = linear_specs(*quantized["lm_head"], cfg.for_module("lm_head"), dtype)
        plan.append(StoredItem("model.embed_tokens.weight", "lm_head",
                               {f"lm_head.{s}": t for s, t in specs.items()}))
    return plan


def expected_tensors(mc: ModelConfig, cfg: QuantConfig, dtype: torch.dtype) -> dict[str, TensorSpec]:
    """Every tensor a checkpoint of this model, config and 16-bit dtype must hold, and no other."""
    return {name: spec for item in storage_plan(mc, cfg, dtype) for name, spec in item.outputs.items()}


def lowbit_json(cfg: QuantConfig, dtype: torch.dtype, source: dict,
                tensors: dict[str, TensorSpec]) -> dict:
    if dtype not in STORED_DTYPES.values():
        raise CheckpointError(f"checkpoints store fp16 or bf16, not {dtype}")
    return {"format_version": FORMAT_VERSION, "quant": cfg.to_dict(), "source": source,
            "dtype": _DTYPE_NAMES[dtype], "tensors": {n: s.to_json() for n, s in tensors.items()}}


# ---------------------------------------------------------------- safetensors, streamed


class SafetensorsWriter:
    """Writes a safetensors file one tensor at a time, never holding more than that tensor.

    All names, dtypes and shapes are known before the first byte (from `expected_tensors`), so
    the header goes first: 8-byte little-endian header length, the JSON header padded with
    spaces to a multiple of 8, then the tensors back to back. Data is laid out by element size,
    largest first (16-bit, then uint8/int8), so each tensor starts aligned to its element size
    (safetensors forbids gaps, so alignment cannot come from padding); `write` seeks to the
    tensor's slot, so tensors may arrive in any order.
    """

    def __init__(self, path: Path, specs: dict[str, TensorSpec], metadata: dict[str, str]):
        self.path = Path(path)
        self.specs = specs
        order = sorted(specs, key=lambda n: -specs[n].dtype.itemsize)  # stable: plan order within a size
        header: dict = {"__metadata__": metadata}
        self.offsets: dict[str, int] = {}
        end = 0
        for name in order:
            spec = specs[name]
            header[name] = {"dtype": SAFETENSORS_DTYPES[spec.dtype], "shape": list(spec.shape),
                            "data_offsets": [end, end + spec.nbytes]}
            self.offsets[name] = end
            end += spec.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.data_start = 8 + len(raw)
        self.size = self.data_start + end
        self.pending = set(specs)
        self._file = open(self.path, "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        spec = self.specs.get(name)
        if spec is None or name not in self.pending:
            raise CheckpointError(f"{self.path}: tensor {name!r} is not expected here "
                                  f"(or was written twice)")
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise CheckpointError(f"{self.path}: tensor {name!r} is {_DTYPE_NAMES.get(tensor.dtype, tensor.dtype)} "
                                  f"{list(tensor.shape)}, the layout expects {spec.describe()}")
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        self._file.seek(self.data_start + self.offsets[name])
        self._file.write(data)
        self.pending.discard(name)

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._file.close()

    def close(self) -> None:
        """Flush to disk; refuses (and leaves the file incomplete) if a tensor was never written."""
        try:
            if self.pending:
                raise CheckpointError(f"{self.path}: {len(self.pending)} tensor(s) never written, "
                                      f"e.g. {sorted(self.pending)[0]!r}")
            self._file.flush()
            os.fsync(self._file.fileno())
        finally:
            self._file.close()


def read_safetensors_header(path: Path) -> tuple[int, dict]:
    """(data start offset, header dict) of a safetensors file, refusing a corrupt one."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise CheckpointError(f"{path}: {size} bytes, too short to be a safetensors file")
            (n,) = struct.unpack("<Q", f.read(8))
            if n > min(MAX_HEADER_BYTES, size - 8):
                raise CheckpointError(f"{path}: header length {n} does not fit the file "
                                      f"({size} bytes): truncated or corrupt")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    return 8 + n, header


# ---------------------------------------------------------------- reading


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: invalid JSON (not an object)")
    return data


def _parse_lowbit_json(path: Path, meta: dict) -> tuple[QuantConfig, torch.dtype]:
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {version!r} is not one this lowbit reads "
                              f"({FORMAT_VERSION}); convert the model again with this version")
    for key, kind in (("quant", dict), ("source", dict), ("tensors", dict), ("dtype", str)):
        if not isinstance(meta.get(key), kind):
            raise CheckpointError(f"{path}: {key!r} is missing or not a JSON {kind.__name__}")
    try:
        quant = QuantConfig.from_dict(meta["quant"])
    except (QuantConfigError, TypeError) as e:
        raise CheckpointError(f"{path}: bad quantization settings: {e}") from None
    if meta["dtype"] not in STORED_DTYPES:
        raise CheckpointError(f"{path}: dtype {meta['dtype']!r} is not float16 or bfloat16")
    return quant, STORED_DTYPES[meta["dtype"]]


def _check_names(where: str, found: set[str], expected: dict[str, TensorSpec]) -> None:
    missing = [n for n in expected if n not in found]
    if missing:
        raise CheckpointError(f"{where}: tensor {missing[0]!r} is missing"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    extra = sorted(found - set(expected))
    if extra:
        raise CheckpointError(f"{where}: unexpected tensor {extra[0]!r} for this config.json "
                              f"and quantization")


def _check_listing(path: Path, listing: dict, expected: dict[str, TensorSpec]) -> None:
    """lowbit.json's own tensor table must equal what config.json + quant imply."""
    _check_names(str(path), set(listing), expected)
    for name, spec in expected.items():
        if listing[name] != spec.to_json():
            raise CheckpointError(f"{path}: tensor {name!r} is listed as {listing[name]}, "
                                  f"config.json and the quantization imply {spec.describe()}")


def _check_weights_file(path: Path, meta: dict, expected: dict[str, TensorSpec]) -> None:
    """Header names, dtypes, shapes and byte ranges against `expected`; file size against the
    header (a shorter file is truncated); metadata against lowbit.json."""
    data_start, header = read_safetensors_header(path)
    metadata = header.pop("__metadata__", None) or {}
    try:
        repeated = json.loads(metadata.get(METADATA_KEY, "null"))
    except (TypeError, json.JSONDecodeError):
        repeated = None
    if repeated != meta:
        raise CheckpointError(f"{path}: its metadata does not repeat lowbit.json (the two files "
                              f"come from different conversions)")
    _check_names(str(path), set(header), expected)
    ranges = []
    for name, spec in expected.items():
        entry = header[name]
        if not isinstance(entry, dict):
            raise CheckpointError(f"{path}: tensor {name!r} has a corrupt header entry")
        want = {"dtype": SAFETENSORS_DTYPES[spec.dtype], "shape": list(spec.shape)}
        got = {"dtype": entry.get("dtype"), "shape": entry.get("shape")}
        if got != want:
            raise CheckpointError(f"{path}: tensor {name!r} is {got['dtype']} {got['shape']}, "
                                  f"expected {want['dtype']} {want['shape']}")
        offsets = entry.get("data_offsets")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or offsets[1] - offsets[0] != spec.nbytes):
            raise CheckpointError(f"{path}: tensor {name!r} has byte range {offsets}, "
                                  f"{spec.nbytes} bytes expected")
        ranges.append((offsets[0], offsets[1], name))
    end = 0
    for begin, stop, name in sorted(ranges):
        if begin != end:
            raise CheckpointError(f"{path}: tensor {name!r} starts at byte {begin}, expected {end}")
        end = stop
    size = path.stat().st_size
    if size != data_start + end:
        raise CheckpointError(f"{path}: {size} bytes, its header describes {data_start + end}: "
                              f"{'truncated' if size < data_start + end else 'trailing bytes'}")


class Checkpoint:
    """A validated lowbit checkpoint. Tensors are read lazily through a memory map."""

    def __init__(self, path: Path, meta: dict, quant: QuantConfig, config: dict,
                 model_config: ModelConfig, dtype: torch.dtype, specs: dict[str, TensorSpec]):
        self.path = path
        self.meta = meta
        self.quant = quant
        self.config = config
        self.model_config = model_config
        self.dtype = dtype
        self.source: dict = meta["source"]
        self.specs = specs
        self._handle = None

    @property
    def weights_path(self) -> Path:
        return self.path / WEIGHTS_FILE

    def tensor_names(self) -> list[str]:
        return list(self.specs)

    def get_tensor(self, name: str) -> torch.Tensor:
        if name not in self.specs:
            raise CheckpointError(f"{self.path}: no tensor {name!r}")
        try:
            if self._handle is None:
                self._handle = safe_open(str(self.weights_path), framework="pt")
            return self._handle.get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{self.weights_path}: cannot read tensor {name!r} ({e})") from None

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.specs:
            yield name, self.get_tensor(name)

    def quantized_linears(self) -> dict[str, tuple[int, int]]:
        return quantized_linears(self.model_config, self.quant)

    def linear_format(self, module: str) -> Int4Weight | Int8Weight | BnbWeight | None:
        """The quantized weight of linear `module`, or None if it is stored 16-bit."""
        quantized = self.quantized_linears()
        if module not in quantized:
            if module in self.model_config.linear_shapes() or module == "lm_head":
                return None
            raise CheckpointError(f"{self.path}: {module!r} is not a linear layer of this model")
        _, in_features = quantized[module]
        cfg = self.quant.for_module(module)  # a keep_8bit module is per-channel int8
        suffixes = linear_specs(*quantized[module], cfg, self.dtype)
        tensors = {s: self.get_tensor(f"{module}.{s}") for s in suffixes}
        fmt_cls = Int4Weight if cfg.weight_bits == 4 else Int8Weight
        try:
            if self.quant.method in BNB_METHODS:
                return bnb_from_tensors(self.quant.method, tensors, *quantized[module],
                                        self.dtype)
            return fmt_cls.from_tensors(tensors, cfg.group_size, in_features, cfg.symmetric)
        except FormatError as e:
            raise CheckpointError(f"{self.weights_path}: linear {module!r}: {e}") from None

    def close(self) -> None:
        self._handle = None

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {self.quant.name})"


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Open and validate a lowbit checkpoint directory; raises CheckpointError naming what is
    wrong. Reads only JSON and the safetensors header (no tensor data)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    marker = path / LOWBIT_MARKER
    meta = _read_json(marker)
    quant, dtype = _parse_lowbit_json(marker, meta)
    config = _read_json(path / "config.json")
    try:
        mc = ModelConfig.from_hf(config)
    except UnsupportedModelError as e:
        raise CheckpointError(f"{path / 'config.json'}: {e}") from None
    expected = expected_tensors(mc, quant, dtype)
    _check_listing(marker, meta["tensors"], expected)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing")
    _check_weights_file(weights, meta, expected)
    if not (path / "tokenizer.json").is_file():
        raise CheckpointError(f"{path / 'tokenizer.json'}: missing")
    return Checkpoint(path, meta, quant, config, mc, dtype, expected)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def describe_checkpoint(path: str | Path) -> dict[str, str]:
    """Rows for `lowbit info`: what the checkpoint is and what its quantization saves."""
    ckpt = read_checkpoint(path)
    mc, cfg = ckpt.model_config, ckpt.quant
    n_params = mc.num_parameters()
    quantized = ckpt.quantized_linears()
    linear_params = sum(n * k for n, k in quantized.values())
    linear_bytes = sum(spec.nbytes for name, spec in ckpt.specs.items()
                       if name.rpartition(".")[0] in quantized
                       and not name.endswith(".bias"))
    disk = sum(spec.nbytes for spec in ckpt.specs.values())
    sixteen = 2 * n_params
    bpw = f"{8 * linear_bytes / linear_params:.2f} over {len(quantized)} quantized linears" \
        if linear_params else "16 (nothing quantized)"
    kept = ", ".join(cfg.keep_16bit) or "none"
    src = ckpt.source
    return {
        "model": str(ckpt.path),
        "architecture": f"{mc.model_type} ({(ckpt.config.get('architectures') or ['?'])[0]})",
        "parameters": f"{n_params / 1e6:.1f} M",
        "quantization": f"{cfg.name} ({cfg.method}); kept 16-bit: {kept}",
        "bits per weight": bpw,
        "weight bytes on disk": _mb(disk),
        "16-bit bytes it replaces": f"{_mb(sixteen)} ({sixteen / disk:.2f}x)",
        "scales dtype": _DTYPE_NAMES[ckpt.dtype],
        "KV bits": f"{cfg.kv_bits} (default for this checkpoint)",
        "source": f"{src.get('path')} ({src.get('kind')}, fingerprint {src.get('fingerprint')})",
    }


# ---------------------------------------------------------------- atomic placement


def check_output(out: Path, force: bool) -> None:
    """Refuse an existing OUT unless `force`; with force, refuse anything but a lowbit
    checkpoint or an empty directory, so a typo never deletes a user's data."""
    if not out.exists() and not out.is_symlink():
        return
    if not force:
        raise CheckpointError(f"{out} exists; pass --force to replace it")
    if out.is_dir() and not out.is_symlink() and (
            (out / LOWBIT_MARKER).is_file() or not any(out.iterdir())):
        return
    raise CheckpointError(f"{out} exists and is not a lowbit checkpoint; refusing to replace it "
                          f"even with --force")


@contextmanager
def atomic_directory(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling `OUT.tmp-<pid>` to fill; on success move it to OUT (replacing
    an existing one when `force`: rename old away, rename new in, delete old); on an exception
    delete it. A killed process leaves only the temporary directory, which has no lowbit.json
    at OUT and so never passes for a checkpoint."""
    out = Path(out)
    check_output(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        check_output(out, force)
        if out.exists():
            old = out.with_name(f"{out.name}.old-{os.getpid()}")
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
