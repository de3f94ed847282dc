"""The grid a GGUF base's weights lie on: read from its quantized blocks, trained on, written back.

    g = read_grid(raw, GGMLQuantizationType.Q4_K)      # raw: a tensor's bytes, (rows, bytes per row)
    w = g.dequantize(g.codes)                          # the weights, as gguf-py dequantizes them
    q = g.encode(w_trained)                            # each trained weight's code on the same grid
    raw2 = g.with_codes(q)                             # the blocks with their scales kept, codes replaced

A quantized GGUF tensor stores, per block of weights along a row, a scale (and for the K-quants
with a minimum, an offset) and one small integer code per weight: w = scale * (code - zero) - min.
The base this project trains is dequantized from such a file (train/from_gguf.py), so each base
weight is exactly one point of its block's grid. Quantization-aware training (`qat: true`) keeps
the grid of every adapted matrix fixed, with the base file's scales, and lets the forward pass see
base + LoRA update snapped to it (a straight-through gradient, `snap`); the export then writes the
trained codes into the base file's blocks (export/grid_route.py). The annotator is one file with the
base's tensor types and size, and it is exactly the model that was trained and validated.

Layouts (ggml-quants.c, gguf-py's quants.py; block size / bytes, codes):
  Q8_0  32 / 34   int8 -128..127, w = d * q
  Q4_0  32 / 18   0..15, w = d * (q - 8)
  Q5_0  32 / 22   0..31, w = d * (q - 16); bit 4 of weight j is bit j of a 32-bit word
  Q4_K  256 / 144 0..15, 8 sub-blocks of 32: w = (d * sc) * q - dmin * m, 6-bit sc and m packed in 12 bytes
  Q5_K  256 / 176 0..31, as Q4_K with a fifth bit per weight in 32 bytes
  Q6_K  256 / 210 0..63, 16 sub-blocks of 16: w = (d * sc) * (q - 32), int8 sc
The scales are computed in float32 in the order gguf-py's dequantizers use, so `dequantize` gives
the same floats as `gguf.quants.dequantize` (tests/test_grid.py checks every type against it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as T

from edge_annotator.runtime.errors import UserError


@dataclass(frozen=True)
class Layout:
    block: int
    """Weights per block (one set of stored scales)."""
    size: int
    """Bytes per block."""
    sub: int
    """Weights per scale within a block."""
    qmin: int
    qmax: int
    zero: int
    """The code of a zero weight before the min (w = scale * (q - zero) - min)."""


LAYOUTS: dict[T, Layout] = {
    T.Q8_0: Layout(32, 34, 32, -128, 127, 0),
    T.Q4_0: Layout(32, 18, 32, 0, 15, 8),
    T.Q5_0: Layout(32, 22, 32, 0, 31, 16),
    T.Q4_K: Layout(256, 144, 32, 0, 15, 0),
    T.Q5_K: Layout(256, 176, 32, 0, 31, 0),
    T.Q6_K: Layout(256, 210, 16, 0, 63, 32),
}
"""The types a grid can be read from: every type llama.cpp's Q4_K_M, Q5_K_M, Q4_0 and Q8_0 files
give a matrix."""


class GridError(UserError, ValueError):
    pass


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 8 six-bit scales and mins from their 12 packed bytes (gguf-py: Q4_K.get_scale_min)."""
    n = s.shape[0]
    s = s.reshape(n, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def _nibbles(b: np.ndarray, groups: int, width: int) -> np.ndarray:
    """(n, groups * width) bytes -> (n, groups * 2 * width) codes: per group its low nibbles, then its high."""
    n = b.shape[0]
    b = b.reshape(n, groups, 1, width) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    return (b & 0x0F).reshape(n, -1)


def _pack_nibbles(q: np.ndarray, groups: int, width: int) -> np.ndarray:
    """The inverse of _nibbles for codes' low four bits."""
    n = q.shape[0]
    q = (q.astype(np.uint8) & 0x0F).reshape(n, groups, 2, width)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, -1)


def _bits(b: np.ndarray, groups: int, width: int, per: int) -> np.ndarray:
    """(n, width) bytes holding `groups` fields of `per` bits each -> (n, groups * width): field g
    of byte l is the high part of weight g * width + l."""
    n = b.shape[0]
    shifts = (np.arange(groups, dtype=np.uint8) * per).reshape(1, groups, 1)
    return ((b.reshape(n, 1, width) >> shifts) & ((1 << per) - 1)).reshape(n, -1)


def _pack_bits(hi: np.ndarray, groups: int, width: int, per: int) -> np.ndarray:
    n = hi.shape[0]
    hi = hi.astype(np.uint8).reshape(n, groups, width)
    shifts = (np.arange(groups, dtype=np.uint8) * per).reshape(1, groups, 1)
    return np.bitwise_or.reduce(hi << shifts, axis=1)


def _unpack(qtype: T, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Blocks (n, size) -> codes (n, block) int16, scales (n, block / sub) and mins (or None), float32."""
    n = b.shape[0]
    if qtype == T.Q8_0:
        return b[:, 2:].view(np.int8).astype(np.int16), _f16(b[:, :2]), None
    if qtype == T.Q4_0:
        return _nibbles(b[:, 2:], 1, 16).astype(np.int16), _f16(b[:, :2]), None
    if qtype == T.Q5_0:
        hi = ((b[:, 2:6].copy().view(np.uint32) >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)
        return (_nibbles(b[:, 6:], 1, 16) | (hi << 4)).astype(np.int16), _f16(b[:, :2]), None
    if qtype in (T.Q4_K, T.Q5_K):
        d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
        sc, m = _k_scales(b[:, 4:16])
        if qtype == T.Q4_K:
            q = _nibbles(b[:, 16:], 4, 32)
        else:
            q = _nibbles(b[:, 48:], 4, 32) | (_bits(b[:, 16:48], 8, 32, 1) << 4)
        return q.astype(np.int16), d * sc.astype(np.float32), dmin * m.astype(np.float32)
    if qtype == T.Q6_K:
        ql, qh, sc, d = b[:, :128], b[:, 128:192], b[:, 192:208], _f16(b[:, 208:210])
        lo = _nibbles(ql.reshape(n * 2, 64), 1, 64).reshape(n, 2, 128)
        hi = _bits(qh.reshape(n * 2, 32), 4, 32, 2).reshape(n, 2, 128)
        return (lo | (hi << 4)).reshape(n, 256).astype(np.int16), d * sc.view(np.int8).astype(np.float32), None
    raise GridError(f"{qtype.name}: no grid for this type (one of {', '.join(t.name for t in LAYOUTS)})")


def _pack(qtype: T, b: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Blocks B with their codes replaced by Q (n, block); every scale byte kept."""
    n, out = b.shape[0], b.copy()
    if qtype == T.Q8_0:
        out[:, 2:] = q.astype(np.int8).view(np.uint8)
    elif qtype == T.Q4_0:
        out[:, 2:] = _pack_nibbles(q, 1, 16)
    elif qtype == T.Q5_0:
        hi = ((q.astype(np.uint32) >> 4) & 1) << np.arange(32, dtype=np.uint32)
        out[:, 2:6] = np.bitwise_or.reduce(hi, axis=1).astype("<u4").reshape(n, 1).view(np.uint8)
        out[:, 6:] = _pack_nibbles(q, 1, 16)
    elif qtype == T.Q4_K:
        out[:, 16:] = _pack_nibbles(q, 4, 32)
    elif qtype == T.Q5_K:
        out[:, 16:48] = _pack_bits(q >> 4, 8, 32, 1)
        out[:, 48:] = _pack_nibbles(q, 4, 32)
    elif qtype == T.Q6_K:
        q2 = q.reshape(n * 2, 128)
        out[:, :128] = _pack_nibbles(q2, 1, 64).reshape(n, 128)
        out[:, 128:192] = _pack_bits((q2 >> 4) & 3, 4, 32, 2).reshape(n, 64)
    else:
        raise GridError(f"{qtype.name}: no grid for this type")
    return out


@dataclass(frozen=True)
class Grid:
    """One matrix's grid: per row and scale group its scale and min, and the stored codes."""

    qtype: T
    raw: np.ndarray
    """The tensor's bytes as stored, (rows, bytes per row)."""
    codes: np.ndarray
    """(rows, cols) int16."""
    scale: np.ndarray
    """(rows, cols / sub) float32."""
    min: np.ndarray | None
    """(rows, cols / sub) float32, or None where the type has none."""

    @property
    def layout(self) -> Layout:
        return LAYOUTS[self.qtype]

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        """The weights codes Q stand for, float32 (rows, cols), in gguf-py's arithmetic."""
        lay, (rows, cols) = self.layout, q.shape
        s = self.scale[:, :, None]
        v = (q.reshape(rows, -1, lay.sub) - lay.zero).astype(np.float32)
        w = s * v if self.min is None else s * v - self.min[:, :, None]
        return w.reshape(rows, cols)

    def encode(self, w: np.ndarray) -> np.ndarray:
        """The nearest code of every weight of W (rows, cols), clamped to the type's range; a weight
        whose scale is zero keeps its stored code."""
        lay, (rows, cols) = self.layout, w.shape
        s = self.scale[:, :, None]
        shifted = w.reshape(rows, -1, lay.sub).astype(np.float32)
        if self.min is not None:
            shifted = shifted + self.min[:, :, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.rint(shifted / s) + lay.zero
        q = np.where(s == 0, self.codes.reshape(rows, -1, lay.sub), q)
        return np.clip(q, lay.qmin, lay.qmax).astype(np.int16).reshape(rows, cols)

    def with_codes(self, q: np.ndarray) -> np.ndarray:
        """The tensor's bytes with codes Q and every scale as stored."""
        lay, rows = self.layout, self.raw.shape[0]
        blocks = self.raw.reshape(-1, lay.size)
        return _pack(self.qtype, blocks, q.reshape(-1, lay.block)).reshape(rows, -1)

    def rows(self, index: np.ndarray) -> Grid:
        """The grid with its rows reordered: row r of the result is row INDEX[r] of this one."""
        return replace(self, raw=self.raw[index], codes=self.codes[index], scale=self.scale[index],
                       min=None if self.min is None else self.min[index])


def read_grid(raw: np.ndarray, qtype: T | int) -> Grid:
    """The grid of one quantized tensor from its stored bytes (rows, bytes per row), as gguf-py's
    reader gives them (`ReaderTensor.data`)."""
    qtype = T(qtype)
    if qtype not in LAYOUTS:
        raise GridError(f"{qtype.name}: no grid for this type (one of {', '.join(t.name for t in LAYOUTS)})")
    lay = LAYOUTS[qtype]
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    rows = raw.shape[0]
    if raw.ndim != 2 or raw.shape[1] % lay.size:
        raise GridError(f"{qtype.name}: a row of {raw.shape[1:]} bytes is not whole blocks of {lay.size}")
    q, s, m = _unpack(qtype, raw.reshape(-1, lay.size))
    return Grid(qtype, raw, q.reshape(rows, -1), s.reshape(rows, -1), None if m is None else m.reshape(rows, -1))


def gguf_row_order(conf: dict[str, Any], hf_name: str, rows: int) -> np.ndarray | None:
    """Where llama.cpp's converter reorders a matrix's rows, INDEX with GGUF row r = HF row INDEX[r];
    else None. It does so for Llama's q and k projections, for its RoPE layout (LlamaModel.permute)."""
    llama = any(a in ("LlamaForCausalLM", "MistralForCausalLM") for a in conf.get("architectures", []))
    text = conf.get("text_config", conf)
    if llama and hf_name.endswith("q_proj.weight"):
        heads = int(text["num_attention_heads"])
    elif llama and hf_name.endswith("k_proj.weight"):
        heads = int(text.get("num_key_value_heads", text["num_attention_heads"]))
    else:
        return None
    return np.arange(rows).reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(rows)


def gguf_of(folder: str | Path) -> Path | None:
    """The GGUF an HF base FOLDER was dequantized from (`annotate-cli base` / `from-gguf` name it in
    the folder's tokenizer fingerprint), where it is found beside the folder or in it; else None."""
    from .tokcheck import FINGERPRINT

    folder = Path(folder)
    check = folder / FINGERPRINT
    if not check.is_file():
        return None
    name = json.loads(check.read_text()).get("gguf")
    if not name:
        return None
    return next((c for c in (folder.parent / name, folder / name) if c.is_file()), None)


# --- the torch side: the forward pass on the grid -----------------------------------------------


def torch_grid(g: Grid, device: Any = None) -> dict[str, Any]:
    """The tensors `snap` needs, on DEVICE: scale and min (rows, groups, 1), and the layout."""
    import torch

    lay = g.layout
    scale = torch.from_numpy(g.scale[:, :, None].copy()).to(device)
    return {"scale": scale, "inv": torch.where(scale == 0, torch.zeros_like(scale), 1.0 / scale),
            "min": None if g.min is None else torch.from_numpy(g.min[:, :, None].copy()).to(device),
            "sub": lay.sub, "zero": lay.zero, "qmin": lay.qmin, "qmax": lay.qmax}


def snap(w: Any, g: dict[str, Any]) -> Any:
    """W (rows, cols) rounded to the grid G (torch_grid): exactly the floats Grid.dequantize gives for
    the nearest codes, clamped to the type's range. A weight whose scale is zero (an all-zero block)
    maps to -min, which is what it stores. No gradient: train/qat.py passes one straight through."""
    import torch

    rows, cols = w.shape
    with torch.no_grad():
        ws = w.reshape(rows, -1, g["sub"])
        shifted = ws if g["min"] is None else ws + g["min"]
        v = (torch.round(shifted * g["inv"]) + g["zero"]).clamp(g["qmin"], g["qmax"]) - g["zero"]
        on_grid = g["scale"] * v if g["min"] is None else g["scale"] * v - g["min"]
        return on_grid.reshape(rows, cols)
