"""runtime/records.py: the one definition of annotate-cli's output records, written and read back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import DATA, TASKS

from edge_annotator.runtime.cli import cli
from edge_annotator.runtime.data import InputError
from edge_annotator.runtime.records import Score, error_record, jsonl_line, read_predictions, result_record
from edge_annotator.runtime.spec import load_spec

SPEC = load_spec(TASKS / "emobank.yaml")
STAMP = {"model_sha256": "ab" * 32, "spec_sha256": SPEC.sha256}


def _scores(v: int) -> dict[str, Score]:
    probs = {lv.value: 0.0 for lv in SPEC.criteria[0].scale}
    probs[v] = 0.7
    probs[next(k for k in probs if k != v)] = 0.3
    return {c.name: Score(v, dict(probs), 0.7 * v + 0.3 * next(k for k in probs if k != v)) for c in SPEC.criteria}


def test_written_records_read_back_the_same(tmp_path: Path) -> None:
    path = tmp_path / "pred.jsonl"
    err = InputError(str(DATA / "x.jsonl"), 3, "missing", "text", "s3")
    path.write_text(jsonl_line(result_record("s1", _scores(2), STAMP)) + jsonl_line(error_record(err, STAMP))
                    + jsonl_line(result_record("s2", _scores(4), STAMP)))
    first = json.loads(path.read_text().splitlines()[0])
    assert list(first) == ["id", "labels", "scores", "probs", "model_sha256", "spec_sha256"]
    p1, bad, p2 = read_predictions(path, SPEC)
    assert (p1.id, p1.line, p1.labels["Valence"], p1.model_sha256) == ("s1", 1, 2, "ab" * 32)
    assert p1.scores["Valence"] == pytest.approx(0.7 * 2 + 0.3 * 1) and p1.confidence("Valence") == 0.7
    assert bad.error == {"file": str(DATA / "x.jsonl"), "line": 3, "field": "text", "message": "missing"}
    assert bad.labels == {} and p2.labels["Arousal"] == 4


def test_agree_and_convert_refuse_a_bad_record_the_same_way(tmp_path: Path) -> None:
    path = tmp_path / "pred.jsonl"
    rec = result_record("s1", _scores(2), STAMP)
    del rec["labels"]["Dominance"]
    path.write_text(jsonl_line(result_record("s0", _scores(3), STAMP)) + jsonl_line(rec))
    with pytest.raises(InputError, match=r"pred.jsonl:2: field 'labels'"):
        read_predictions(path, SPEC)
    spec = str(TASKS / "emobank.yaml")
    for args in (["agree", str(path), str(DATA / "emobank-test-50.jsonl"), "--spec", spec],
                 ["convert", str(path), "--to", "csv", "--spec", spec, "-o", str(tmp_path / "x.csv")]):
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == 1 and f"{path}:2: field 'labels'" in r.output, (args[0], r.output)


def test_agree_takes_labels_alone_and_convert_needs_the_probabilities(tmp_path: Path) -> None:
    """agree compares labels from any tool; convert exports each label's probability, so it needs them."""
    path = tmp_path / "labels-only.jsonl"
    path.write_text("".join(jsonl_line({"id": json.loads(line)["id"], "labels": {"Valence": 3, "Arousal": 3,
                                                                               "Dominance": 3}})
                            for line in (DATA / "emobank-test-50.jsonl").read_text().splitlines()[:5]))
    assert [p.probs for p in read_predictions(path, SPEC, need_probs=False)] == [{}] * 5
    spec = str(TASKS / "emobank.yaml")
    r = CliRunner().invoke(cli, ["agree", str(path), str(DATA / "emobank-test-50.jsonl"), "--spec", spec, "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["items_predicted"] == 5, r.output
    r = CliRunner().invoke(cli, ["agree", str(path), str(DATA / "emobank-test-50.jsonl"), "--spec", spec,
                                 "--report", str(tmp_path / "rep")])
    assert r.exit_code == 1 and f"{path}:1: --report needs each label's probability" in r.output, r.output
    r = CliRunner().invoke(cli, ["convert", str(path), "--to", "csv", "--spec", spec, "-o", str(tmp_path / "x.csv")])
    assert r.exit_code == 1 and f"{path}:1: field 'probs'" in r.output, r.output
