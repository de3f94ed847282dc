"""Every reader of outside data, fuzzed: no record, however made, ends in anything but a named error.

Hypothesis draws records shaped like each reader's input (items, human labels, predictions, Label
Studio exports, Argilla records, embedded specs, serve's tasks and webhook events), with values of
every JSON type, and mutates their bytes (truncated, invalid UTF-8, NUL, NaN, a 5,000-digit
integer, nesting 100,000 deep). Each reader must accept a record or raise an error of the
UserError family (runtime/errors.py), which annotate-cli prints as one line naming the file, line
and field; the CLI cases check that it exits 1 and changes no file. A reader's records are counted
and printed with the seed:

    EDGE_ANNOTATOR_FUZZ_RECORDS=100000 EDGE_ANNOTATOR_FUZZ_SEED=7 pytest tests/test_fuzz.py -s

`make test` runs the default, 10,000 records a reader, seed 0 (about two minutes on 2 cores).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import TASKS
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from edge_annotator.runtime.errors import UserError

SEED = int(os.environ.get("EDGE_ANNOTATOR_FUZZ_SEED", "0"))
RECORDS = int(os.environ.get("EDGE_ANNOTATOR_FUZZ_RECORDS", "10000"))
PER_EXAMPLE = 25
SPEC_PATH = TASKS / "emobank.yaml"
LABELS_SPEC_PATH = TASKS / "goemotions.yaml"


def _spec() -> Any:
    from edge_annotator.runtime.spec import load_spec

    return load_spec(SPEC_PATH)


CRITERIA = ["Valence", "Arousal", "Dominance"]

_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(10 ** 110), 10 ** 110),
                  st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12),
                  st.sampled_from(["", " ", "\x00", "3", "4.5", "1e999", "NaN", "caf\u00e9", "\u202e", "1", "5"]))
JSON = st.recursive(_leaf, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids,
                                                                                     max_size=3), max_leaves=8)
LEVEL = st.one_of(st.integers(-1, 7), st.sampled_from(["1", "3", "5", "3.5", "", "high"]), st.floats(0, 6), JSON)
LABELS = st.one_of(st.dictionaries(st.sampled_from([*CRITERIA, "Nope"]), LEVEL, max_size=4), JSON)
ID = st.one_of(st.text(max_size=6), st.integers(-5, 10 ** 30), st.sampled_from(["s1", "s2", "s1"]), JSON)
TEXT = st.one_of(st.text(max_size=40), st.sampled_from(["We won the cup!", "  ", "\x00", ""]), JSON)

ITEM = st.fixed_dictionaries({}, optional={
    "id": ID, "text": TEXT, "labels": LABELS, "rater": JSON, "x": JSON, "Valence": LEVEL,
    "ratings": st.one_of(st.lists(st.fixed_dictionaries({}, optional={"labels": LABELS, "rater": JSON}), max_size=3),
                         JSON)})
PROBS = st.one_of(st.dictionaries(st.sampled_from(["1", "2", "3", "4", "5", "9"]),
                                  st.one_of(st.floats(-0.5, 1.5), JSON), max_size=5), JSON)
PREDICTION = st.fixed_dictionaries({}, optional={
    "id": ID, "labels": LABELS, "scores": st.one_of(st.dictionaries(st.sampled_from([*CRITERIA, "x"]), LEVEL), JSON),
    "probs": st.one_of(st.dictionaries(st.sampled_from([*CRITERIA, "x"]), PROBS, max_size=3), JSON),
    "error": JSON, "model_sha256": JSON, "spec_sha256": JSON})
RESULT = st.fixed_dictionaries({}, optional={
    "from_name": st.one_of(st.sampled_from([*CRITERIA, "x"]), JSON), "type": JSON,
    "value": st.one_of(st.fixed_dictionaries({}, optional={"rating": LEVEL, "choices": st.one_of(
        st.lists(LEVEL, max_size=2), JSON)}), JSON)})
TASK = st.fixed_dictionaries({}, optional={
    "id": ID, "data": st.one_of(st.fixed_dictionaries({}, optional={"id": ID, "text": TEXT}), JSON),
    "annotations": st.one_of(st.lists(st.one_of(st.fixed_dictionaries({}, optional={
        "was_cancelled": JSON, "completed_by": JSON, "result": st.one_of(st.lists(RESULT, max_size=3), JSON)}), JSON),
        max_size=3), JSON)})
ARGILLA = st.fixed_dictionaries({}, optional={
    "id": ID, "fields": st.one_of(st.fixed_dictionaries({}, optional={"text": TEXT}), JSON),
    "responses": st.one_of(st.dictionaries(st.sampled_from([*CRITERIA, "x"]), st.one_of(st.lists(
        st.fixed_dictionaries({}, optional={"value": LEVEL, "user_id": JSON, "status": JSON}), max_size=2), JSON),
        max_size=3), JSON)})


@st.composite
def _near(draw: Any, valid: st.SearchStrategy[dict[str, Any]]) -> dict[str, Any]:
    """A valid record with up to two values, at any depth, replaced by any JSON or removed: what
    gets past the first checks and into the deeper ones."""
    d = copy.deepcopy(draw(valid))
    for _ in range(draw(st.integers(0, 2))):
        node: Any = d
        while True:
            keys = list(node) if isinstance(node, dict) else list(range(len(node)))
            if not keys:
                break
            k = draw(st.sampled_from(keys))
            if isinstance(node[k], dict | list) and node[k] and draw(st.booleans()):
                node = node[k]
                continue
            if isinstance(node, dict) and draw(st.integers(0, 4)) == 0:
                del node[k]
            else:
                node[k] = draw(JSON)
            break
    return d


_P = st.floats(0, 1)
VALID_ITEM = st.fixed_dictionaries({"id": st.sampled_from(["s1", "s2", "s3", 4]), "text": st.text(min_size=1,
                                                                                                 max_size=20),
                                    "rater": st.sampled_from(["a", "b", 3]),
                                    "labels": st.dictionaries(st.sampled_from(CRITERIA), st.integers(1, 5),
                                                              min_size=1)})
VALID_PREDICTION = st.fixed_dictionaries({
    "id": st.sampled_from(["s1", "s2", "s3", 4]),
    "labels": st.fixed_dictionaries({c: st.integers(1, 5) for c in CRITERIA}),
    "scores": st.fixed_dictionaries({c: st.floats(1, 5) for c in CRITERIA}),
    "probs": st.fixed_dictionaries({c: st.fixed_dictionaries({str(v): _P for v in range(1, 6)}) for c in CRITERIA}),
    "model_sha256": st.just("ab" * 32), "spec_sha256": st.just("cd" * 32)})
VALID_TASK = st.fixed_dictionaries({
    "id": st.integers(1, 9), "data": st.fixed_dictionaries({"id": st.sampled_from(["s1", "s2"]),
                                                             "text": st.text(min_size=1, max_size=20)}),
    "annotations": st.lists(st.fixed_dictionaries({
        "completed_by": st.sampled_from([1, "a@x", {"email": "e@x"}]), "was_cancelled": st.booleans(),
        "result": st.lists(st.fixed_dictionaries({"from_name": st.sampled_from(CRITERIA), "type": st.just("rating"),
                                                  "value": st.fixed_dictionaries({"rating": st.integers(1, 5)})}),
                           max_size=3)}), max_size=2)})
VALID_ARGILLA = st.fixed_dictionaries({
    "id": st.sampled_from(["s1", "s2"]), "fields": st.fixed_dictionaries({"text": st.text(min_size=1, max_size=20)}),
    "responses": st.dictionaries(st.sampled_from(CRITERIA), st.lists(st.fixed_dictionaries({
        "value": st.integers(1, 5), "user_id": st.sampled_from(["u1", "u2"]), "status": st.just("submitted")}),
        max_size=2), max_size=3)})
ITEM = st.one_of(ITEM, _near(VALID_ITEM))
PREDICTION = st.one_of(PREDICTION, _near(VALID_PREDICTION))
TASK = st.one_of(TASK, _near(VALID_TASK))
ARGILLA = st.one_of(ARGILLA, _near(VALID_ARGILLA))


@st.composite
def _mutated(draw: Any, records: st.SearchStrategy[Any]) -> bytes:
    """One JSONL line: a drawn record as JSON, often with its bytes broken the ways files break."""
    raw = json.dumps(draw(records), ensure_ascii=draw(st.booleans())).encode()
    op = draw(st.sampled_from(["none", "none", "none", "truncate", "insert", "bom", "deep", "bigint", "nan"]))
    at = draw(st.integers(0, len(raw)))
    if op == "truncate":
        return raw[:at]
    if op == "insert":
        return raw[:at] + draw(st.sampled_from([b"\xff", b"\x00", b"\xe9", b'"', b"{", b"]", b",", b"\\"])) + raw[at:]
    if op == "bom":
        return b"\xef\xbb\xbf" + raw
    if op == "deep":
        n = draw(st.sampled_from([63, 70, 1000, 100_000]))
        return b'{"id": "d", "text": ' + b"[" * n + b"]" * n + b"}"
    if op == "bigint":
        return b'{"id": ' + b"9" * draw(st.sampled_from([101, 4301, 5000])) + b', "text": "x"}'
    if op == "nan":
        return b'{"id": "n", "text": "x", "labels": {"Valence": NaN}, "probs": {"Valence": {"1": Infinity}}}'
    return raw


def _fuzz(name: str, lines: st.SearchStrategy[Any], check: Callable[[list[Any]], None]) -> None:
    """Draw RECORDS records, PER_EXAMPLE an example, hand each example's list to CHECK (which may raise
    only UserError); print the reader, the count and the seed."""
    count = [0]

    @seed(SEED)
    @settings(max_examples=max(1, RECORDS // PER_EXAMPLE), database=None, deadline=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(lines, min_size=PER_EXAMPLE, max_size=PER_EXAMPLE))
    def run(batch: list[Any]) -> None:
        count[0] += len(batch)
        check(batch)

    run()
    print(f"\nfuzz {name}: {count[0]:,} records, seed {SEED}, no traceback")
    assert count[0] >= RECORDS


def _each(batch: list[Any], f: Callable[[Any], Any]) -> Iterator[Any]:
    """f(x) for each x; a UserError is a named refusal (yielded as None), anything else a failure."""
    for x in batch:
        try:
            yield f(x)
        except UserError:
            yield None


def _file(tmp: Path, name: str, lines: list[bytes]) -> Path:
    p = tmp / name
    p.write_bytes(b"\n".join(lines) + b"\n")
    return p


def _whole(f: Callable[[], Any]) -> None:
    try:
        f()
    except UserError:
        pass


# -- the readers ------------------------------------------------------------------------------------

def test_fuzz_json_bounds() -> None:
    from edge_annotator.runtime.untrusted import JSONError, loads

    def check(batch: list[bytes]) -> None:
        for raw in batch:
            try:
                loads(raw)
            except JSONError:
                pass

    _fuzz("untrusted JSON", _mutated(st.one_of(ITEM, PREDICTION, TASK)), check)


def test_fuzz_items_as_annotate_reads_them(tmp_path: Path) -> None:
    """annotate's reader (runtime/jobs.plan, also serve's and Ray's): with --on-error skip every
    record is exactly one event, an item or a named error."""
    from edge_annotator.runtime.jobs import Item, JobStats, Skipped, plan

    spec = _spec()

    def check(batch: list[bytes]) -> None:
        f = _file(tmp_path, "items.jsonl", batch)
        stats = JobStats()
        events = [e for chunk in plan(f, spec, 3, "skip", 500, stats) for e in chunk]
        assert all(isinstance(e, Item | Skipped) for e in events)
        assert len(events) + stats.duplicates == sum(1 for ln in f.read_bytes().split(b"\n")[:-1]
                                                     if ln.decode("utf-8", "replace").strip()
                                                     and ln.strip() != b"\xef\xbb\xbf")

    _fuzz("items (annotate)", _mutated(ITEM), check)


def test_fuzz_human_labels_as_agree_train_and_data_read_them(tmp_path: Path) -> None:
    from edge_annotator.runtime.data import Row, check_item, ratings_of, read_human
    from edge_annotator.runtime.labels import check_labels, label_records, reshape_wide, split_labels

    spec = _spec()

    def check(batch: list[bytes]) -> None:
        f = _file(tmp_path, "labels.jsonl", batch)
        from edge_annotator.runtime.data import iter_rows

        rows: list[Row] = list(_each([None], lambda _: list(iter_rows(f))))[0] or []
        list(_each(rows, lambda r: (check_item(r, spec), ratings_of(r, spec))))
        _whole(lambda: read_human(f, spec))                      # agree, select --suspect
        _whole(lambda: check_labels(f, spec))                    # data check (the humans' alpha too)
        _whole(lambda: split_labels(f, spec, tmp_path / "split", 0.3, 0.2))  # data split, fit
        _whole(lambda: reshape_wide(f, spec, tmp_path / "long.jsonl"))       # data reshape
        _whole(lambda: list(label_records(f, spec)))             # serve's retrain round

    _fuzz("human labels (agree, data check/split/reshape, retrain)", _mutated(ITEM), check)


def test_fuzz_predictions_as_convert_select_and_agree_read_them(tmp_path: Path) -> None:
    from edge_annotator.runtime.data import iter_rows
    from edge_annotator.runtime.metrics import agreement
    from edge_annotator.runtime.records import by_id, prediction_of, read_predictions
    from edge_annotator.runtime.selection import STRATEGIES, rank
    from edge_annotator.runtime.tool_formats import argilla_records, csv_rows, label_studio_tasks

    spec = _spec()
    humans = {f"s{i}": [{"Valence": 3, "Arousal": 2}, {"Valence": 4}] for i in range(3)}

    def check(batch: list[bytes]) -> None:
        f = _file(tmp_path, "pred.jsonl", batch)
        rows = list(_each([None], lambda _: list(iter_rows(f))))[0] or []
        preds = [p for p in _each(rows, lambda r: prediction_of(r, spec)) if p is not None]
        unique = list({p.id: p for p in preds}.values())
        label_studio_tasks(unique, spec)
        argilla_records(unique, spec, None, "fuzz")
        csv_rows(unique, spec)
        for s in STRATEGIES:
            rank(unique, spec, s, 5)
        labels, scores = by_id(unique)
        agreement(spec, labels, humans, {i: s for i, s in scores.items() if s} or None)
        _whole(lambda: read_predictions(f, spec, need_probs=False))

    _fuzz("predictions (convert, select, agree)", _mutated(PREDICTION), check)


def test_fuzz_label_studio_and_argilla_exports_as_data_import_reads_them() -> None:
    from edge_annotator.runtime.feedback import records_from_argilla, records_from_tasks

    spec = _spec()

    def check(batch: list[Any]) -> None:
        for kind, recs in batch:
            _whole(lambda: (records_from_tasks if kind == "ls" else records_from_argilla)(recs, spec, None, "x"))

    _fuzz("Label Studio and Argilla exports (data import)",
          st.one_of(st.tuples(st.just("ls"), st.lists(TASK, max_size=3)),
                    st.tuples(st.just("argilla"), st.lists(ARGILLA, max_size=3))), check)


def _spec_mutations() -> st.SearchStrategy[str]:
    from edge_annotator.runtime.spec import load_spec

    bases = [load_spec(SPEC_PATH).to_dict(), load_spec(LABELS_SPEC_PATH).to_dict()]
    paths = [("name",), ("inputs",), ("inputs", 0), ("inputs", 0, "title"), ("criteria",), ("criteria", 0),
             ("criteria", 0, "scale"), ("criteria", 0, "scale", 0), ("criteria", 0, "scale", 0, "value"),
             ("criteria", 0, "scale", 1, "anchor"), ("criteria", 0, "level"), ("criteria", 0, "calibration"),
             ("templates",), ("templates", 0), ("answer_cue",), ("kind",), ("extra",), ("description",)]
    edits = st.lists(st.tuples(st.sampled_from(paths), st.one_of(
        JSON, st.sampled_from(["{rubric:>999999999}", "{rubric!r}", "no rubric", "{rubric.__class__}",
                               "{criterion} ({min}-{max}):", "labels", "interval", "x" * 30_000]),
        st.just("<delete>"))), min_size=1, max_size=3)

    @st.composite
    def one(draw: Any) -> str:
        d = copy.deepcopy(draw(st.sampled_from(bases)))
        for path, v in draw(edits):
            node: Any = d
            for k in path[:-1]:
                node = node[k] if isinstance(node, dict) and k in node or isinstance(node, list) and \
                    isinstance(k, int) and k < len(node) else None
                if node is None:
                    break
            key = path[-1]
            if isinstance(node, dict) and isinstance(key, str):
                if v == "<delete>":
                    node.pop(key, None)
                else:
                    node[key] = v
            elif isinstance(node, list) and isinstance(key, int) and key < len(node) and v != "<delete>":
                node[key] = v
        return json.dumps(d)

    return one()


def test_fuzz_embedded_specs() -> None:
    """A GGUF's edge_annotator.spec is JSON from a file anyone could write: SpecError or a spec."""
    from edge_annotator.runtime.prompt import render_instruction
    from edge_annotator.runtime.spec import spec_from_json

    def check(batch: list[str]) -> None:
        for s in _each(batch, spec_from_json):
            if s is not None:
                render_instruction(s)  # a spec that validates renders its prompt

    _fuzz("embedded specs", _spec_mutations(), check)


def test_fuzz_serve_tasks_and_webhook_events(tmp_path: Path) -> None:
    """What /predict and /webhook do with a request body, short of the model: a task becomes an
    item or a 4xx reason; an annotation becomes records that train reads, or a 4xx reason."""
    from edge_annotator.runtime.feedback import records_from_tasks
    from edge_annotator.runtime.retrain import LabelSink
    from edge_annotator.runtime.serve_scorer import task_fields

    spec = _spec()
    sink = LabelSink(tmp_path / "labels.jsonl", spec)

    def check(batch: list[Any]) -> None:
        for i, t in enumerate(batch):
            _whole(lambda: task_fields(t, i, spec, 1000))
            if isinstance(t, dict) and isinstance(t.get("annotations"), list) and t["annotations"]:
                ann = t["annotations"][0]
                if isinstance(ann, dict):
                    _whole(lambda: sink.check(records_from_tasks([{**t, "annotations": [ann]}], spec, None,
                                                                 "webhook")[0]))

    _fuzz("serve tasks and webhook events", TASK, check)


# -- the same through the CLI: exit 0 or 1 with one line, no file changed -------------------------

@pytest.mark.parametrize("command", ["agree", "data check", "convert", "select"])
def test_fuzz_cli_commands_exit_one_line_and_change_nothing(tmp_path: Path, command: str) -> None:
    from edge_annotator.runtime.cli import cli

    humans = tmp_path / "humans.jsonl"
    humans.write_text(json.dumps({"id": "s1", "text": "x", "labels": {"Valence": 3}}) + "\n")
    n = max(1, RECORDS // 100)
    count = [0]

    @seed(SEED)
    @settings(max_examples=n, database=None, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(_mutated(PREDICTION if command in ("agree", "convert", "select") else ITEM), min_size=1,
                    max_size=4))
    def run(lines: list[bytes]) -> None:
        f = _file(tmp_path, "in.jsonl", lines)
        before = hashlib.sha256(f.read_bytes()).hexdigest()
        args = {"agree": ["agree", str(f), str(humans)], "data check": ["data", "check", str(f)],
                "convert": ["convert", str(f), "--to", "csv", "-o", str(tmp_path / "out.csv"), "--force"],
                "select": ["select", str(f), "-n", "2"]}[command] + ["--spec", str(SPEC_PATH)]
        r = CliRunner().invoke(cli, args)
        count[0] += len(lines)
        assert r.exit_code in (0, 1) and (r.exception is None or isinstance(r.exception, SystemExit)), \
            (args, r.exception, r.output[-2000:])
        if r.exit_code == 1:
            errors = [ln for ln in r.stderr.splitlines() if ln.startswith("Error: ")]
            assert len(errors) == 1 and "in.jsonl" in errors[0], r.stderr
        assert hashlib.sha256(f.read_bytes()).hexdigest() == before

    run()
    print(f"\nfuzz annotate-cli {command}: {count[0]:,} records in {n} files, seed {SEED}, no traceback")
