"""The GGUF file layer, read without llama.cpp: the tensor directory, chosen values of the
metadata, the tensors' data, the byte layout a copy is made from, and a file's sha256. The modules
above it (head: the output rows; adapter: an adapter's base; gguf_meta: the annotator's metadata;
export: embedding the spec, the grid route) read files through it.

gguf-py's GGUFReader parses every metadata array element into Python objects (35 s for Gemma 3's
262,144-token vocabulary on a 2-core EPYC), so the directory is read here with gguf-py's constants
instead, stepping over the arrays:

    infos = read_tensor_infos("model.gguf")          # name -> shape, type, offset of the data
    kv = read_values("model.gguf", {"general.type"})   # the values asked for, nothing else
    w = tensor_data("model.gguf", infos["token_embd.weight"])  # a read-only view, as GGUFReader's
"""

from __future__ import annotations

import hashlib
import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFValueType, Keys

from .errors import UserError

_SCALAR = {GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H",
           GGUFValueType.INT16: "h", GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i",
           GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "?", GGUFValueType.UINT64: "Q",
           GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d"}

_PLAIN = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
          GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
          GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
          GGMLQuantizationType.I64: np.int64}
"""Types whose data reads as numbers; the others read as bytes, a row of blocks per row (as gguf-py)."""


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

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def n_bytes(self) -> int:
        return self.row_bytes * math.prod(self.shape[1:])

    @property
    def data_shape(self) -> tuple[tuple[int, ...], type]:
        """numpy's shape and dtype of the data, as gguf-py's reader gives them: the dims reversed for
        plain types; for quantized ones uint8, the last dim a row's bytes."""
        rows = tuple(reversed(self.shape[1:]))
        if self.qtype in _PLAIN:
            return rows + (self.shape[0],), _PLAIN[self.qtype]
        return rows + (self.row_bytes,), np.uint8


@dataclass(frozen=True)
class Layout:
    """Where a GGUF's parts lie, for a copy that keeps the bytes it does not change."""

    version: int
    kv: tuple[tuple[str, int, int], ...]  # each entry: key, its first byte, the byte after it
    infos: tuple[int, int]  # the tensor directory's bytes
    alignment: int
    data_start: int
    tensors: dict[str, TensorInfo]


def read_layout(path: str | Path) -> Layout:
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        return _parse(mm, str(path))  # slices of an mmap are bytes: nothing outlives the map


def read_tensor_infos(path: str | Path) -> dict[str, TensorInfo]:
    """The GGUF file's tensor directory: name -> shape, type and file offset of the data."""
    return read_layout(path).tensors


def read_values(path: str | Path, keys: set[str]) -> dict[str, str | int | float | bool]:
    """The string and scalar values of KEYS in a GGUF's metadata (absent keys and arrays left out),
    read without parsing the arrays (a vocabulary of 262,144 tokens is stepped over, not decoded)."""
    found: dict[str, str | int | float | bool] = {}
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        _parse(mm, str(path), keys, found)
    return found


def read_strings(path: str | Path, keys: set[str]) -> dict[str, str]:
    """The string values of KEYS in a GGUF's metadata (absent keys left out)."""
    return {k: v for k, v in read_values(path, keys).items() if isinstance(v, str)}


def tensor_data(path: str | Path, info: TensorInfo) -> np.ndarray:
    """One tensor's data, a read-only view of the file (shape and dtype: TensorInfo.data_shape)."""
    shape, dtype = info.data_shape
    return np.memmap(path, dtype=dtype, mode="r", offset=info.offset, shape=shape)


def _parse(buf: mmap.mmap, where: str, want: set[str] | None = None,
           found: dict[str, str | int | float | bool] | None = None) -> Layout:
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
        if version > 0xFFFF:
            raise GGUFFormatError(f"{where}: a big-endian GGUF, which llama.cpp on this machine does not read")
        n_tensors, n_kv = int(take("Q")), int(take("Q"))
        alignment = GGUF_DEFAULT_ALIGNMENT
        kv = []
        for _ in range(n_kv):
            first = p
            key = string()
            vtype = int(take("I"))
            if want and found is not None and key in want and vtype == GGUFValueType.STRING:
                found[key] = string()
            else:
                value = skip(vtype)
                if want and found is not None and key in want and value is not None:
                    found[key] = value
                if key == Keys.General.ALIGNMENT and value is not None:
                    alignment = int(value)
            kv.append((key, first, p))
        infos_start = p
        raw = []
        for _ in range(n_tensors):
            name = string()
            n_dims = int(take("I"))
            shape = tuple(int(take("Q")) for _ in range(n_dims))
            raw.append((name, shape, int(take("I")), int(take("Q"))))
    except struct.error as e:
        raise GGUFFormatError(f"{where}: truncated GGUF header ({e})") from e
    start = (p + alignment - 1) // alignment * alignment
    tensors = {name: TensorInfo(name, shape, GGMLQuantizationType(qt), start + off) for name, shape, qt, off in raw}
    return Layout(version, tuple(kv), (infos_start, p), alignment, start, tensors)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
