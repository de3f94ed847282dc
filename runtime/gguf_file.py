"""The GGUF file layer, read without llama.cpp: the tensor directory, chosen string values of the
metadata, and a file's sha256. The modules above it (head: the output rows; adapter: an adapter's
base; gguf_meta: the annotator's metadata; export) read files through it.

gguf-py's GGUFReader parses every metadata array element into Python objects (9.3 s for Gemma 3's
262,144-token vocabulary), so the directory is read here with gguf-py's constants instead:

    infos = read_tensor_infos("model.gguf")          # name -> shape, type, offset of the data
    kv = read_strings("model.gguf", {"general.type"})  # the string values asked for, nothing else
"""

from __future__ import annotations

import hashlib
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFValueType, Keys

from .errors import UserError

_SCALAR = {GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H",
           GGUFValueType.INT16: "h", GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i",
           GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "?", GGUFValueType.UINT64: "Q",
           GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d"}


class GGUFFormatError(UserError, ValueError):
    pass


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order: shape[0] is the row length
    qtype: GGMLQuantizationType
    offset: int  # from the start of the file

    @property
    def row_bytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.qtype]
        return self.shape[0] // block * size


def read_tensor_infos(path: str | Path) -> dict[str, TensorInfo]:
    """The GGUF file's tensor directory: name -> shape, type and file offset of the data."""
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        return _parse(mm, str(path))  # slices of an mmap are bytes: nothing outlives the map


def read_strings(path: str | Path, keys: set[str]) -> dict[str, str]:
    """The string values of KEYS in a GGUF's metadata (absent keys left out), read without
    parsing the arrays (a vocabulary of 262,144 tokens is stepped over, not decoded)."""
    found: dict[str, str] = {}
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        _parse(mm, str(path), keys, found)
    return found


def _parse(buf: mmap.mmap, where: str, want: set[str] | None = None,
           found: dict[str, str] | None = None) -> dict[str, TensorInfo]:
    p = 0

    def take(fmt: str) -> int | float | bool:
        nonlocal p
        (v,) = struct.unpack_from("<" + fmt, buf, p)
        p += struct.calcsize(fmt)
        return v  # type: ignore[no-any-return]

    def string() -> str:
        nonlocal p
        n = int(take("Q"))
        s = buf[p:p + n].decode("utf-8", errors="replace")
        p += n
        return s

    def skip(vtype: int) -> int | float | bool | None:
        """Step over one value; scalars are returned (general.alignment is one)."""
        nonlocal p
        if vtype == GGUFValueType.STRING:
            p += 8 + int.from_bytes(buf[p:p + 8], "little")
            return None
        if vtype == GGUFValueType.ARRAY:
            etype, count = int(take("I")), int(take("Q"))
            if etype in _SCALAR:
                p += count * struct.calcsize(_SCALAR[GGUFValueType(etype)])
            else:
                for _ in range(count):  # strings or nested arrays: each carries its own length
                    skip(etype)
            return None
        if vtype not in _SCALAR:
            raise GGUFFormatError(f"{where}: unknown metadata value type {vtype} at byte {p}")
        return take(_SCALAR[GGUFValueType(vtype)])

    try:
        if buf[:4] != b"GGUF":
            raise GGUFFormatError(f"{where}: not a GGUF file")
        p = 4
        version = int(take("I"))
        if version < 2:
            raise GGUFFormatError(f"{where}: GGUF version {version} is too old (2 or later)")
        n_tensors, n_kv = int(take("Q")), int(take("Q"))
        alignment = GGUF_DEFAULT_ALIGNMENT
        for _ in range(n_kv):
            key = string()
            vtype = int(take("I"))
            if want and found is not None and key in want and vtype == GGUFValueType.STRING:
                found[key] = string()
                continue
            value = skip(vtype)
            if key == Keys.General.ALIGNMENT and value is not None:
                alignment = int(value)
        raw = []
        for _ in range(n_tensors):
            name = string()
            n_dims = int(take("I"))
            shape = tuple(int(take("Q")) for _ in range(n_dims))
            raw.append((name, shape, int(take("I")), int(take("Q"))))
    except struct.error as e:
        raise GGUFFormatError(f"{where}: truncated GGUF header ({e})") from e
    start = (p + alignment - 1) // alignment * alignment
    return {name: TensorInfo(name, shape, GGMLQuantizationType(qt), start + off) for name, shape, qt, off in raw}


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
