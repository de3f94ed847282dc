"""Recorded outputs that refactors must leave byte for byte (tests/golden/).

    check_golden("annotate-emobank-test-50.jsonl", text)   # fails on any difference

EDGE_ANNOTATOR_RECORD_GOLDEN=1 writes the files anew instead: only for a change of output that is
meant, named in its commit.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

GOLDEN = Path(__file__).parent / "golden"


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("EDGE_ANNOTATOR_RECORD_GOLDEN") == "1":
        path.write_text(text)
        return
    want = path.read_text()
    if text != want:
        diff = "".join(list(difflib.unified_diff(want.splitlines(True), text.splitlines(True), str(path), "now"))[:40])
        raise AssertionError(f"output differs from {path}:\n{diff}")
