"""The output layer for the few tokens scoring reads, so llama.cpp need not compute the rest.

Scoring reads the logits of a handful of answer tokens (e.g. "1".."5") at a few positions per item,
but llama.cpp's output layer computes all of them: Gemma 3 has a 262,144-token vocabulary, so each
output row is a 640 x 262,144 matrix-vector product, 1.7x the work of a whole token through the
other layers. Measured on Gemma 3 270M Q4_K_M, 2 threads, 40 tokens after a 256-token prefix: 62 ms
with no output row, 82 ms with the three rows one item needs (a quarter of the time).

So the engine reads the final hidden state (llama.cpp's "result_norm" tensor, the output layer's
input) for the rows scoring needs, stops the graph there, and computes `W[ids] @ h` here, with W's
rows read from the GGUF file and dequantized by gguf-py:

    head = OutputHead.from_gguf("model.gguf", softcap=None)
    logits = head.logits(hidden_row, np.array([236770, 236778]))

These logits are more exact than llama.cpp's own (its CPU kernels quantize h to 8 bits before the
product: ~1% of a logit on Gemma); LlamaEngine checks them against llama.cpp's on a fixed probe
when it loads a model and falls back to llama.cpp's logits if they disagree (an architecture with an
output transform this module does not know).

gguf-py's GGUFReader parses every metadata array element into Python objects (9.3 s for Gemma 3's
262,144-token vocabulary), so the tensor directory is read here with gguf-py's constants instead.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFValueType, Keys
from gguf.quants import dequantize

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


class OutputHead:
    """Rows of the output layer (or of the tied token embeddings), dequantized on first use."""

    def __init__(self, path: str | Path, info: TensorInfo, *, softcap: float | None = None):
        self.path, self.info = Path(path), info
        self.softcap = softcap or None  # Gemma 2's final_logit_softcapping: cap * tanh(x / cap)
        self.n_embd, self.n_vocab = info.shape[0], info.shape[1]
        self._rows: dict[int, np.ndarray] = {}

    @classmethod
    def from_gguf(cls, path: str | Path, *, softcap: float | None = None) -> OutputHead:
        infos = read_tensor_infos(path)
        info = infos.get("output.weight") or infos.get("token_embd.weight")  # tied when output is absent
        if info is None or len(info.shape) != 2:
            raise GGUFFormatError(f"{path}: no output.weight or token_embd.weight matrix")
        return cls(path, info, softcap=softcap)

    def weights(self, ids: np.ndarray) -> np.ndarray:
        """float64 rows of the output matrix for token ids (kept: a job asks for the same few ids)."""
        missing = [int(t) for t in ids if int(t) not in self._rows]
        if missing:
            rb = self.info.row_bytes
            with open(self.path, "rb") as fh:
                raw = np.empty((len(missing), rb), dtype=np.uint8)
                for k, t in enumerate(missing):
                    fh.seek(self.info.offset + t * rb)
                    raw[k] = np.frombuffer(fh.read(rb), dtype=np.uint8)
            rows = dequantize(raw, self.info.qtype).reshape(len(missing), self.n_embd).astype(np.float64)
            self._rows.update(zip(missing, rows))
        return np.stack([self._rows[int(t)] for t in ids])

    def logits(self, hidden: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """float64 logits of `ids` from one final hidden state (numpy's pairwise sums: no BLAS, so
        the result does not depend on the machine's thread count)."""
        z = (self.weights(ids) * hidden.astype(np.float64)[None, :]).sum(axis=1)
        if self.softcap:
            z = self.softcap * np.tanh(z / self.softcap)
        return z
