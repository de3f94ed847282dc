"""Recorded outputs that refactors must leave byte for byte (tests/golden/).

    check_golden("annotate-emobank-test-50.jsonl", text)   # fails on any difference

Bytes hold within one build and CPU kernel set: llama.cpp's kernels (AVX2 or AVX-512, repacked or
not) round differently. `golden/KERNELS.json` names the kernel set the files were recorded with
(llama.cpp's CPU features and whether its extra buffer types were on). On that set any difference
fails. On another the records must still hold what does not depend on rounding: the same ids,
keys, labels, counts and texts, and every number within `TOLERANCE` of the recorded one.

EDGE_ANNOTATOR_RECORD_GOLDEN=1 writes the files anew instead: only for a change of output that is
meant, named in its commit.
"""

from __future__ import annotations

import difflib
import json
import math
import os
from pathlib import Path
from typing import Any

GOLDEN = Path(__file__).parent / "golden"
KERNELS = GOLDEN / "KERNELS.json"
# How far numbers may move across kernel sets, by the record key they sit under. Measured on the
# zero-shot base and the EmoBank sample: the same build with and without llama.cpp's repacked
# kernels (tests/test_cpu.py): probabilities up to 0.086, scores up to 0.30 (near-uniform answers
# are sensitive), no label of 150; agree's alphas up to 0.02, Pearson r up to 0.043. AVX2 kernels
# (an AMD EPYC without AVX-512) against the recorded AVX-512 ones: probabilities up to 0.121,
# scores up to 0.298, no label of 150.
TOLERANCE = {"probs": 0.15, "scores": 0.35}
DEFAULT_TOLERANCE = 0.05


def kernel_set() -> dict[str, Any]:
    """What this machine's llama.cpp computes with: the features its CPU kernels use, and whether a
    model loads with the extra (repacked) buffer types."""
    from edge_annotator.runtime.cpu import extra_buffers_setting, features

    return {"features": sorted(k for k, v in features().items() if v), "extra_buffers": extra_buffers_setting()}


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("EDGE_ANNOTATOR_RECORD_GOLDEN") == "1":
        path.write_text(text)
        KERNELS.write_text(json.dumps(kernel_set(), indent=1) + "\n")
        return
    want = path.read_text()
    if text == want:
        return
    diff = "".join(list(difflib.unified_diff(want.splitlines(True), text.splitlines(True), str(path), "now"))[:40])
    recorded = json.loads(KERNELS.read_text())
    if kernel_set() == recorded:
        raise AssertionError(f"output differs from {path} on the kernel set it was recorded with:\n{diff}")
    problems = close_records(want, text)
    if problems:
        raise AssertionError(f"output differs from {path} beyond what another kernel set explains "
                             f"(recorded with {recorded}, now {kernel_set()}):\n" + "\n".join(problems[:20]))


def close_records(want: str, got: str, tol: float | None = None) -> list[str]:
    """Where two JSON documents (or JSONL files) differ other than in numbers within the tolerance
    of their key (TOLERANCE), or within tol for every number."""
    if want.lstrip().startswith("{") and "\n{" not in want.strip():
        return _close(json.loads(want), json.loads(got), "$", tol)
    a, b = want.splitlines(), got.splitlines()
    if len(a) != len(b):
        return [f"{len(b)} lines, recorded {len(a)}"]
    return [p for i, (x, y) in enumerate(zip(a, b)) for p in _close(json.loads(x), json.loads(y), f"line {i + 1}", tol)]


def _close(a: Any, b: Any, where: str, tol: float | None) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        if list(a) != list(b):
            return [f"{where}: keys {list(b)}, recorded {list(a)}"]
        return [p for k in a for p in _close(a[k], b[k], f"{where}.{k}", TOLERANCE.get(k, tol))]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: {len(b)} elements, recorded {len(a)}"]
        return [p for i, (x, y) in enumerate(zip(a, b)) for p in _close(x, y, f"{where}[{i}]", tol)]
    if isinstance(a, float) and isinstance(b, float):
        tol = DEFAULT_TOLERANCE if tol is None else tol
        same = math.isclose(a, b, abs_tol=tol) or (math.isnan(a) and math.isnan(b))
        return [] if same else [f"{where}: {b}, recorded {a} (tolerance {tol})"]
    # everything else must be equal: labels, counts, ids, texts, hashes, and a number's type
    return [] if type(a) is type(b) and a == b else [f"{where}: {b!r}, recorded {a!r}"]
