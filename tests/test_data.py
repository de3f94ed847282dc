"""Input formats: records, human labels, and errors that name file, line and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TASKS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_annotator.runtime.data import InputError, check_item, iter_rows, read_human
from edge_annotator.runtime.spec import load_spec

EMO = load_spec(TASKS / "emobank.yaml")
QA = load_spec(TASKS / "qa-rubric.yaml")


def _items(path: Path, spec=EMO):
    out = []
    for row in iter_rows(path):
        try:
            out.append(check_item(row, spec))
        except InputError as e:
            out.append(e)
    return out


def test_jsonl_rows_and_errors(tmp_path: Path) -> None:
    p = tmp_path / "in.jsonl"
    p.write_bytes(b'{"id": 1, "text": "fine"}\n'
                  b'{"id": 2, "text": \n'            # malformed JSON
                  b'\n'                               # blank lines are skipped
                  b'{"id": 3, "txt": "typo"}\n'      # missing field
                  b'{"id": 4, "text": "   "}\n'      # whitespace only
                  b'{"id": 5, "text": "caf\xe9"}\n'  # latin-1, not UTF-8
                  b'[1, 2]\n'                         # not an object
                  b'{"text": "no id"}\n')
    got = _items(p)
    assert got[0].id == "1" and got[0].fields == {"text": "fine"} and got[0].line == 1
    errs = [(e.line, e.field) for e in got[1:]]
    assert errs == [(2, None), (4, "text"), (5, "text"), (6, None), (7, None), (8, "id")]
    assert str(got[2]).startswith(f"{p}:4: field 'text': missing")
    assert "txt" in str(got[2])  # says what the record does have
    assert "UTF-8" in str(got[4])


def test_csv_with_embedded_newlines_reports_the_starting_line(tmp_path: Path) -> None:
    p = tmp_path / "in.csv"
    p.write_text('id,context,question,answer\n'
                 'a,"line one\nline two",Q?,A.\n'
                 'b,,Q?,A.\n'
                 'c,x,y\n', encoding="utf-8")
    got = _items(p, QA)
    assert got[0].fields["context"] == "line one\nline two"
    assert (got[1].line, got[1].field) == (4, "context")
    assert got[2].line == 5 and "columns" in str(got[2])


def test_long_text_limit(tmp_path: Path) -> None:
    p = tmp_path / "in.jsonl"
    p.write_text(json.dumps({"id": "x", "text": "a" * 5000}) + "\n")
    (row,) = iter_rows(p)
    assert check_item(row, EMO).id == "x"
    with pytest.raises(InputError, match="5,000 characters"):
        check_item(row, EMO, max_chars=1000)


def test_unknown_file_type(tmp_path: Path) -> None:
    p = tmp_path / "in.txt"
    p.write_text("x")
    with pytest.raises(InputError, match="unknown file type"):
        list(iter_rows(p))


def test_human_labels_in_every_shape(tmp_path: Path) -> None:
    p = tmp_path / "h.jsonl"
    lines = [
        {"id": "s1", "text": "t", "ratings": [{"labels": {"Valence": 4}}, {"labels": {"Valence": 5, "Arousal": 2}}]},
        {"id": "s2", "text": "t", "labels": {"Valence": 3}, "rater": "a"},
        {"id": "s2", "text": "t", "labels": {"Valence": "2"}, "rater": "b"},
        {"id": "s3", "text": "t"},
    ]
    p.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    h = read_human(p, EMO)
    assert h == {"s1": [{"Valence": 4}, {"Valence": 5, "Arousal": 2}], "s2": [{"Valence": 3}, {"Valence": 2}], "s3": []}
    c = tmp_path / "h.csv"
    c.write_text("id,text,Valence,Arousal,rater\ns1,t,4,,r1\ns1,t,3.5,2,r2\n")
    assert read_human(c, EMO) == {"s1": [{"Valence": 4}, {"Valence": 3.5, "Arousal": 2}]}


@pytest.mark.parametrize("labels, needle", [
    ({"Valence": 9}, "outside the scale 1..5"),        # out of range
    ({"Valence": "high"}, "not a number"),              # not numeric
    ({"Valance": 3}, "unknown criteria"),               # typo in criterion
])
def test_bad_human_labels(tmp_path: Path, labels: dict, needle: str) -> None:
    p = tmp_path / "h.jsonl"
    p.write_text(json.dumps({"id": "a", "text": "t"}) + "\n" + json.dumps({"id": "b", "text": "t", "labels": labels}))
    with pytest.raises(InputError, match=needle) as e:
        read_human(p, EMO)
    assert e.value.line == 2 and e.value.field and e.value.field.startswith("labels")


def test_nominal_and_ordinal_labels_must_be_levels(tmp_path: Path) -> None:
    go = load_spec(TASKS / "goemotions.yaml")
    p = tmp_path / "h.jsonl"
    p.write_text(json.dumps({"id": "a", "text": "t", "labels": {"emotion": "happiness"}}))
    with pytest.raises(InputError, match="not one of the spec's classes"):
        read_human(p, go)
    p.write_text(json.dumps({"id": "a", "answer": "t", "labels": {"Clarity": 0.5}}))
    with pytest.raises(InputError, match="not a level of the ordinal scale"):
        read_human(p, QA)


# -- the parser, fuzzed --------------------------------------------------------------------------
_json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(),
                            lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                            max_leaves=8)


# a fixed number of examples, the same ones every run (derandomize): CI is reproducible
FUZZ = dict(derandomize=True, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _parse_all(path: Path) -> tuple[int, int]:
    """Every row of a file through the reader and the item check: (items, errors); nothing else escapes."""
    items = errors = 0
    try:
        for row in iter_rows(path):
            try:
                check_item(row, EMO, max_chars=10_000)
                items += 1
            except InputError as e:
                assert e.path == str(path) and (e.line is None or e.line >= 1)
                errors += 1
    except InputError as e:  # a whole-file problem (an unreadable CSV header): named, not a crash
        assert e.path == str(path)
        errors += 1
    return items, errors


@settings(max_examples=300, **FUZZ)
@given(st.binary(max_size=400))
def test_fuzz_jsonl_bytes(tmp_path: Path, raw: bytes) -> None:
    p = tmp_path / "f.jsonl"
    p.write_bytes(raw)
    items, errors = _parse_all(p)
    # one row per line that is not blank (blank: Unicode whitespace only, as the reader decides)
    lines = raw.removeprefix(b"\xef\xbb\xbf").split(b"\n")
    assert items + errors == sum(1 for x in lines if x.decode("utf-8", "surrogateescape").strip())


@settings(max_examples=300, **FUZZ)
@given(st.dictionaries(st.sampled_from(["id", "text", "labels", "x"]) | st.text(max_size=4), _json_values, max_size=5))
def test_fuzz_jsonl_records(tmp_path: Path, rec: dict) -> None:
    p = tmp_path / "r.jsonl"
    p.write_text(json.dumps(rec) + "\n")
    items, errors = _parse_all(p)
    assert items + errors == 1


@settings(max_examples=200, **FUZZ)
@given(st.binary(max_size=300))
def test_fuzz_csv_bytes(tmp_path: Path, raw: bytes) -> None:
    p = tmp_path / "f.csv"
    p.write_bytes(b"id,text\n" + raw)
    _parse_all(p)
