"""An annotator as a LoRA adapter over an untouched base GGUF, applied by llama.cpp at load.

The base this project trains on is dequantized from a Q4_K_M GGUF, so that file plus the adapter
is the very model that was trained: no update is rounded to a 4-bit grid. The adapter file
(`general.type = adapter`, written by `annotate-cli export --adapter-on BASE.gguf`) carries the
task spec and provenance like any annotator, and names its base by file name and sha256:

    edge_annotator.base_file     gemma-3-270m-q4_k_m.gguf
    edge_annotator.base_sha256   a5fd3b62...

The runtime finds the base beside the adapter, or where ANNOTATE_BASE_MODEL (or a command's
--base-model) says, and refuses a file whose sha256 differs.
"""

from __future__ import annotations

import os
from pathlib import Path

from .head import GGUFFormatError, read_strings

BASE_FILE = "edge_annotator.base_file"
BASE_SHA256 = "edge_annotator.base_sha256"
BASE_ENV = "ANNOTATE_BASE_MODEL"

_checked: dict[tuple[str, int, int], str] = {}  # (path, size, mtime) -> sha256, per process


def adapter_fields(path: str | Path) -> dict[str, str] | None:
    """The adapter's base reference, or None where PATH is a whole model."""
    try:
        kv = read_strings(path, {"general.type", BASE_FILE, BASE_SHA256})
    except (GGUFFormatError, OSError):
        return None  # the loader names what is wrong with the file
    return kv if kv.get("general.type") == "adapter" else None


def _sha256(path: Path) -> str:
    from .gguf_meta import sha256_file

    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _checked:
        _checked[key] = sha256_file(path)
    return _checked[key]


def resolve_base(path: Path, base: str | Path | None = None) -> Path:
    """PATH itself for a whole model; for an adapter file, its base GGUF, checked by sha256."""
    from .engine import ModelError

    kv = adapter_fields(path)
    if kv is None:
        return path
    name, want = kv.get(BASE_FILE), kv.get(BASE_SHA256)
    if not name or not want:
        raise ModelError(f"{path}: a LoRA adapter that does not name its base ({BASE_FILE}, {BASE_SHA256}); "
                         f"export it with annotate-cli export --adapter-on BASE.gguf")
    given = base or os.environ.get(BASE_ENV)
    candidates = [Path(given)] if given else [path.parent / name]
    for c in candidates:
        if c.is_file():
            got = _sha256(c)
            if got != want:
                raise ModelError(f"{path}: its base {c} has sha256 {got[:16]}..., the adapter was trained on "
                                 f"{name} with sha256 {want[:16]}...; give that file ({BASE_ENV} or --base-model)")
            return c
    raise ModelError(f"{path}: its base model {name} (sha256 {want[:16]}...) is not at {candidates[0]}; put it "
                     f"beside the adapter, or give its path ({BASE_ENV}=PATH or --base-model PATH)")
