"""Write any model source as a plain Hugging Face directory: config.json, model.safetensors
(every tensor in the source's 16-bit dtype) and the tokenizer files. Used for `lowbit export-hf`
and to cache the embedded default model's dequantized GGUF as an HF directory.

Written into a temporary sibling directory and renamed into place, so an interrupted export never
leaves a directory that looks complete.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import save_file

from .sources import ModelSource, ModelSourceError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_hf_files(source: ModelSource, out: Path, extra_files: dict[str, bytes] | None = None) -> int:
    """Write the HF files of `source` into the existing, empty directory `out`; returns the bytes
    of weights written.

    save_file needs every tensor at once, so peak host memory is the whole 16-bit model
    (270 MB for the 135M default model, plus one fp32 temporary of the largest tensor while it is
    dequantized: 113 MB for its 49152×576 embedding).
    """
    dtype = source.dtype()
    config = dict(source.config)
    config.pop("dtype", None)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    tensors = {name: source.get_tensor(name).to(dtype).contiguous()
               for name in source.tensor_names()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    for name, data in {**source.tokenizer_files(), **(extra_files or {})}.items():
        (out / name).write_bytes(data)
    # safetensors creates its file 0600; make it as readable as any file the user writes
    (out / "model.safetensors").chmod(0o666 & ~_umask())
    return sum(t.numel() * t.element_size() for t in tensors.values())


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished `tmp` to `out`, replacing what is there (already agreed by the caller)."""
    if out.is_dir() and not out.is_symlink():
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, trash / out.name)
        os.replace(tmp, out)
        shutil.rmtree(trash)
    else:
        if out.exists() or out.is_symlink():
            out.unlink()
        os.replace(tmp, out)


def export_hf(source: ModelSource, out: str | Path, force: bool = False,
              extra_files: dict[str, bytes] | None = None) -> int:
    """Export `source` to the HF directory `out`; refuses an existing `out` unless `force`.
    Returns the bytes of weights written."""
    out = Path(out).expanduser()
    if out.exists() and not force:
        raise ModelSourceError(f"{out} already exists; pass --force to replace it")
    if out.resolve() == source.path.resolve() or source.path.resolve().is_relative_to(out.resolve()):
        raise ModelSourceError(f"{out}: cannot export over the source itself")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it 0700; the export is an ordinary directory
    except OSError as e:
        raise ModelSourceError(f"{out}: cannot create ({e.strerror})") from None
    try:
        nbytes = write_hf_files(source, tmp, extra_files)
        replace_dir(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelSourceError(f"{out}: cannot write ({e.strerror or e})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return nbytes
