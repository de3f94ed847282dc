"""annotate's JSONL and agree --json on the shipped EmoBank sample, byte for byte as recorded
before the redesign (issue 16); parity --json's record is in tests/test_export.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import DATA, TASKS
from golden import check_golden

from edge_annotator.runtime.cli import cli

pytestmark = pytest.mark.slow


def test_annotate_and_agree_output_bytes_are_as_recorded(tmp_path: Path, gemma_path: Path) -> None:
    items, spec, out = DATA / "emobank-test-50.jsonl", TASKS / "emobank.yaml", tmp_path / "out.jsonl"
    r = CliRunner().invoke(cli, ["annotate", str(gemma_path), str(items), "--spec", str(spec), "--threads", "2",
                                 "-o", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    check_golden("annotate-emobank-test-50.jsonl", out.read_text())
    r = CliRunner().invoke(cli, ["agree", str(out), str(items), "--spec", str(spec), "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    check_golden("agree-emobank-test-50.json", r.stdout)
