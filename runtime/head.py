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

The rows' place in the file comes from the GGUF file layer (runtime/gguf_file.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf.quants import dequantize

from .gguf_file import GGUFFormatError, TensorInfo, read_tensor_infos


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
