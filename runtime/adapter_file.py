"""An annotator as a LoRA adapter over an untouched base GGUF, applied by llama.cpp at load.

The base this project trains on is dequantized from a Q4_K_M GGUF, so that file plus the adapter
is the very model that was trained: no update is rounded to a 4-bit grid. The adapter file
(`general.type = adapter`, written by `annotate-cli export --adapter-on BASE.gguf`) carries the
task spec and provenance like any annotator, and names its base by file name and sha256:

    edge_annotator.base_file     gemma-3-270m-q4_k_m.gguf
    edge_annotator.base_sha256   a5fd3b62...

The runtime looks for the base where the caller says (annotate-cli's --base-model, or
ANNOTATE_BASE_MODEL, which only the CLI reads), else beside the adapter, and refuses a file whose
sha256 differs. The recorded name is metadata from a file that may come from anyone, so it
is only ever a name: a path in it (`../../etc/x`, `/abs/x`) is cut to its last part, and nothing
outside the adapter's folder is opened because of it.
"""

from __future__ import annotations

from pathlib import Path

from .errors import ModelError
from .gguf_file import GGUFFormatError, read_strings, sha256_file

BASE_FILE = "edge_annotator.base_file"
BASE_SHA256 = "edge_annotator.base_sha256"

_checked: dict[tuple[str, int, int], str] = {}  # (path, size, mtime) -> sha256, per process


def adapter_fields(path: str | Path) -> dict[str, str] | None:
    """The adapter's base reference, or None where PATH is a whole model."""
    try:
        kv = read_strings(path, {"general.type", BASE_FILE, BASE_SHA256})
    except (GGUFFormatError, OSError):
        return None  # the loader names what is wrong with the file
    return kv if kv.get("general.type") == "adapter" else None


def base_name(kv: dict[str, str]) -> str | None:
    """The base's file name as an adapter's metadata records it, reduced to a bare name (no folder,
    either separator): metadata never names a path to open. None where it names nothing usable."""
    raw = kv.get(BASE_FILE) or ""
    name = raw.replace("\\", "/").rsplit("/", 1)[-1]
    return name if name not in ("", ".", "..") and "\x00" not in name else None


def _sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _checked:
        _checked[key] = sha256_file(path)
    return _checked[key]


def resolve_base(path: Path, base: str | Path | None = None) -> Path:
    """PATH itself for a whole model; for an adapter file, its base GGUF, checked by sha256: BASE
    where given (the CLI's --base-model or ANNOTATE_BASE_MODEL), else the recorded file name beside
    the adapter."""
    kv = adapter_fields(path)
    if kv is None:
        return path
    name, want = base_name(kv), kv.get(BASE_SHA256)
    if not name or not want:
        raise ModelError(f"{path}: a LoRA adapter that does not name its base ({BASE_FILE}, {BASE_SHA256}); "
                         f"export it with annotate-cli export --adapter-on BASE.gguf")
    candidate = Path(base) if base else path.parent / name
    if candidate.is_file():
        got = _sha256(candidate)
        if got != want:
            raise ModelError(f"{path}: its base {candidate} has sha256 {got[:16]}..., the adapter was trained on "
                             f"{name} with sha256 {want[:16]}...; give that file (--base-model PATH)")
        return candidate
    raise ModelError(f"{path}: its base model {name} (sha256 {want[:16]}...) is not at {candidate}; put it "
                     f"beside the adapter, or give its path (--base-model PATH)")
