"""runtime/jobs.py: the input as typed events, and annotate_file, the one job function that
annotate-cli, bench and the determinism check call."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import pytest
from conftest import DATA, TASKS
from golden import check_golden

from edge_annotator.runtime.data import InputError, Item
from edge_annotator.runtime.errors import OutputError
from edge_annotator.runtime.jobs import Fatal, IdTable, JobOptions, JobStats, Skipped, annotate_file, plan
from edge_annotator.runtime.spec import load_spec

SPEC = TASKS / "emobank.yaml"


def _records(tmp_path: Path) -> Path:
    good = [json.loads(line) for line in (DATA / "emobank-test-50.jsonl").read_text().splitlines()[:3]]
    rows = [good[0], {"id": "no-text"}, good[1], good[1], {**good[1], "text": "other words"}, good[2]]
    p = tmp_path / "in.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_plan_turns_each_record_into_one_typed_event(tmp_path: Path) -> None:
    """An item, a bad record (skipped or fatal), a repeated row of one item (dropped, counted), and
    the same id with other inputs (bad); groups of `batch` items; nothing is read after a Fatal."""
    spec, path = load_spec(SPEC), _records(tmp_path)
    stats = JobStats()
    chunks = list(plan(path, spec, 2, "skip", None, stats))
    events = [e for c in chunks for e in c]
    assert [type(e).__name__ for e in events] == ["Item", "Skipped", "Item", "Skipped", "Item"]
    assert [sum(isinstance(e, Item) for e in c) for c in chunks] == [2, 1]
    bad = [e.error for e in events if isinstance(e, Skipped)]
    assert (bad[0].line, bad[0].field) == (2, "text") and (bad[1].line, bad[1].field) == (5, "id")
    assert stats.duplicates == 1
    events = [e for c in plan(path, spec, 2, "fail", None, JobStats()) for e in c]
    assert [type(e).__name__ for e in events] == ["Item", "Fatal"] and isinstance(events[-1], Fatal)


def test_an_input_error_keeps_everything_across_records_and_processes() -> None:
    err = InputError("in.jsonl", 7, "is empty", "text", "item-7")
    back = InputError.from_record(json.loads(json.dumps(err.to_record())), "item-7")
    again = pickle.loads(pickle.dumps(err))
    for e in (back, again):
        assert (e.path, e.line, e.reason, e.field, e.item_id, str(e)) == \
            (err.path, err.line, err.reason, err.field, err.item_id, str(err))


@pytest.mark.slow
def test_annotate_file_writes_what_annotate_cli_writes(tmp_path: Path, gemma_path: Path) -> None:
    """The library call into a stream gives the recorded CLI output byte for byte; into a path it
    refuses to overwrite, and resumes a cut-off job to the same bytes."""
    items, opts = DATA / "emobank-test-50.jsonl", JobOptions(spec=SPEC, threads=2)
    buf = io.StringIO()
    stats = annotate_file(gemma_path, items, buf, opts)
    want = buf.getvalue()
    check_golden("annotate-emobank-test-50.jsonl", want)
    assert stats.written == 50
    out = tmp_path / "out.jsonl"
    out.write_text("".join(want.splitlines(keepends=True)[:20]))
    with pytest.raises(OutputError):
        annotate_file(gemma_path, items, str(out), opts)
    stats = annotate_file(gemma_path, items, str(out), opts, resume=True)
    assert out.read_text() == want and (stats.resumed, stats.written) == (20, 30)


def test_id_table_finds_every_id_across_growth() -> None:
    t = IdTable(capacity=4)
    for i in range(5000):
        assert t.setdefault(f"id-{i}", i * 7 + 1, i + 1) is None  # new: stored
    assert t.n == 5000 and len(t.keys) == 8192
    assert all(t.setdefault(f"id-{i}", 0, 0) == (i * 7 + 1, i + 1) for i in range(5000))  # seen: the first values
    assert t.setdefault("id-5000", 1, 1) is None and t.setdefault("\udcff", 1, 1) is None
    assert t.n == 5002
