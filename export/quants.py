"""The quantization types export and parity know, in one table named by gguf-py's enums.

    from edge_annotator.export.quants import QUANTS, FILE_TYPES, ADAPTED_TYPES
    QUANTS["Q4_K_M"].file_type          # LlamaFileType.MOSTLY_Q4_K_M: what llama.cpp's quantizer makes
    QUANTS["Q8_0"].tensor_type          # GGMLQuantizationType.Q8_0: one tensor's type (--adapted-type)

Each row also holds the parity gate's bounds for a file of that type (export/parity.py says how
they were measured): the share of decisive label flips, and the mean and max change of a score.
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType as F


@dataclass(frozen=True)
class Quant:
    name: str
    bits: float
    """About how many bits a weight takes (the block scales included)."""
    file_type: F | None
    """The whole-file type llama.cpp's quantizer makes (`--quant`); None: not offered as one."""
    tensor_type: T | None
    """The type one tensor can keep (`--adapted-type`); None: not offered as one."""
    label_flip_share: float
    score_delta_mean: float
    score_delta_max: float


_8BIT = (0.01, 0.01, 0.10)  # parity bounds at 8 bits and up
_LOW = (0.02, 0.03, 0.15)  # and below

QUANTS: dict[str, Quant] = {q.name: q for q in (
    Quant("F32", 32.0, None, None, *_8BIT),
    Quant("F16", 16.0, F.MOSTLY_F16, T.F16, *_8BIT),
    Quant("BF16", 16.0, None, None, *_8BIT),
    Quant("Q8_0", 8.5, F.MOSTLY_Q8_0, T.Q8_0, *_8BIT),
    Quant("Q6_K", 6.56, None, T.Q6_K, *_LOW),
    Quant("Q5_K", 5.5, None, T.Q5_K, *_LOW),
    Quant("Q5_K_M", 5.7, F.MOSTLY_Q5_K_M, None, *_LOW),
    Quant("Q4_K_M", 4.9, F.MOSTLY_Q4_K_M, None, *_LOW),
    Quant("Q4_0", 4.5, F.MOSTLY_Q4_0, None, *_LOW),
)}

FILE_TYPES = ["Q4_K_M", "Q4_0", "Q5_K_M", "Q8_0", "F16"]
"""--quant's choices, the default first."""
ADAPTED_TYPES = ["Q8_0", "Q6_K", "Q5_K", "F16"]
"""--adapted-type's choices besides "same", the default first."""

assert all(QUANTS[n].file_type is not None for n in FILE_TYPES)
assert all(QUANTS[n].tensor_type is not None for n in ADAPTED_TYPES)
