"""annotate-cli select: which items an expert rates next, and which human labels to review
(runtime/selection.py), on predictions built so that each strategy's order is known."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import DATA, ROOT, TASKS

from edge_annotator.runtime.cli import cli
from edge_annotator.runtime.errors import UserError
from edge_annotator.runtime.records import read_predictions
from edge_annotator.runtime.selection import rank, suspects
from edge_annotator.runtime.spec import load_spec

SPEC = TASKS / "emobank.yaml"  # three 1-5 interval scales


def _rec(item_id: str, probs: list[float]) -> dict:
    levels = {str(i + 1): p for i, p in enumerate(probs)}
    top = max(range(5), key=lambda i: probs[i]) + 1
    score = sum((i + 1) * p for i, p in enumerate(probs))
    return {"id": item_id, "labels": {c: top for c in ("Valence", "Arousal", "Dominance")},
            "scores": {c: score for c in ("Valence", "Arousal", "Dominance")},
            "probs": {c: levels for c in ("Valence", "Arousal", "Dominance")}, "model_sha256": "x"}


# Each row: (id, probabilities over levels 1-5). What each strategy must rank first is by construction:
ROWS = [
    ("sure", [0.98, 0.005, 0.005, 0.005, 0.005]),  # low on everything
    ("uniform", [0.2, 0.2, 0.2, 0.2, 0.2]),        # the highest entropy
    ("tie", [0.5, 0.5, 0.0, 0.0, 0.0]),            # margin 0 (a tie), low spread
    ("ends", [0.5, 0.0, 0.0, 0.0, 0.5]),           # the widest spread: sd = half the range
    ("lean", [0.1, 0.6, 0.2, 0.1, 0.0]),
]


@pytest.fixture
def pred(tmp_path: Path) -> Path:
    p = tmp_path / "pred.jsonl"
    p.write_text("".join(json.dumps(_rec(i, ps)) + "\n" for i, ps in ROWS)
                 + json.dumps({"id": "broken", "error": {"message": "too long"}}) + "\n")
    return p


@pytest.mark.parametrize("strategy, order", [
    ("entropy", ["uniform", "lean", "ends", "tie", "sure"]),  # ends and tie: both log 2
    ("margin", ["ends", "tie", "uniform", "lean", "sure"]),  # three at margin 0: by id
    ("spread", ["ends", "uniform", "lean", "tie", "sure"]),
])
def test_each_strategy_ranks_as_its_definition_says(pred: Path, strategy: str, order: list[str]) -> None:
    spec = load_spec(SPEC)
    picks = rank(read_predictions(pred, spec), spec, strategy, n=10)
    assert [p.id for p in picks] == order  # the error record is never picked
    assert [p.rank for p in picks] == [1, 2, 3, 4, 5]
    if strategy == "spread":
        assert picks[0].value == pytest.approx(1.0) and picks[-1].value < 0.2
    if strategy == "margin":
        assert picks[0].value == pytest.approx(1.0)
    if strategy == "entropy":
        assert picks[0].value == pytest.approx(1.0)


def test_ties_go_by_id_random_is_seeded_and_exclude_leaves_items_out(pred: Path, tmp_path: Path) -> None:
    spec = load_spec(SPEC)
    preds = read_predictions(pred, spec)
    twin = tmp_path / "twin.jsonl"  # the same distribution under two ids
    twin.write_text(json.dumps(_rec("b", ROWS[1][1])) + "\n" + json.dumps(_rec("a", ROWS[1][1])) + "\n")
    assert [p.id for p in rank(read_predictions(twin, spec), spec, "entropy", 2)] == ["a", "b"]
    r0 = [p.id for p in rank(preds, spec, "random", 5, seed=0)]
    assert r0 == [p.id for p in rank(preds, spec, "random", 5, seed=0)]
    assert sorted(r0) == sorted(i for i, _ in ROWS)
    assert any([p.id for p in rank(preds, spec, "random", 5, seed=s)] != r0 for s in (1, 2, 3))
    assert [p.id for p in rank(preds, spec, "entropy", 2, exclude={"uniform"})] == ["lean", "ends"]
    with pytest.raises(UserError, match="criterion Valance is not in spec"):
        rank(preds, spec, "entropy", 2, criteria=["Valance"])


def test_diverse_keeps_near_duplicates_apart(tmp_path: Path) -> None:
    spec = load_spec(SPEC)
    pred = tmp_path / "p.jsonl"
    pred.write_text("".join(json.dumps(_rec(i, ps)) + "\n" for i, ps in [
        ("a", [0.2] * 5), ("a-copy", [0.21, 0.2, 0.2, 0.2, 0.19]), ("b", [0.4, 0.3, 0.1, 0.1, 0.1])]))
    inputs = {"a": {"text": "The meeting was moved to Friday afternoon."},
              "a-copy": {"text": "the meeting was moved to Friday afternoon!"},
              "b": {"text": "Shares fell sharply after the report."}}
    preds = read_predictions(pred, spec)
    assert [p.id for p in rank(preds, spec, "entropy", 2)] == ["a", "a-copy"]
    assert [p.id for p in rank(preds, spec, "entropy", 2, inputs=inputs, diverse=0.6)] == ["a", "b"]
    with pytest.raises(UserError, match="--items"):
        rank(preds, spec, "entropy", 2, diverse=0.6)


def test_suspects_are_the_labels_the_model_contradicts_most_confidently(tmp_path: Path) -> None:
    spec = load_spec(SPEC)
    pred = tmp_path / "p.jsonl"
    pred.write_text("".join(json.dumps(_rec(i, ps)) + "\n" for i, ps in [
        ("agrees", [0.9, 0.05, 0.05, 0.0, 0.0]), ("contradicts", [0.9, 0.05, 0.05, 0.0, 0.0]),
        ("unsure", [0.2] * 5), ("unrated", [0.9, 0.05, 0.05, 0.0, 0.0])]))
    humans = {"agrees": [{"Valence": 1, "Arousal": 1, "Dominance": 1}] * 3,
              "contradicts": [{"Valence": 5, "Arousal": 1, "Dominance": 1}] * 2,
              "unsure": [{"Valence": 5, "Arousal": 5, "Dominance": 5}]}
    picks = suspects(read_predictions(pred, spec), humans, spec, 10)
    assert [p.id for p in picks] == ["contradicts", "unsure", "agrees"]  # unrated items are not suspects
    top = picks[0].record("suspect")
    assert top["criterion"] == "Valence" and top["human"] == 5.0 and top["model"] == 1 and top["raters"] == 2
    assert top["model_prob_of_human_level"] == 0.0
    assert top["value"] == pytest.approx((0.9 * 4 + 0.05 * 3 + 0.05 * 2) / 4)


def _cli(*args: str):
    return CliRunner().invoke(cli, ["select", *args])


def test_cli_writes_picks_predictions_items_and_csv(tmp_path: Path) -> None:
    """On the golden annotate output of 50 EmoBank test sentences: every format, --exclude, and the
    picks' predictions convert into Label Studio tasks."""
    pred = ROOT / "tests" / "golden" / "annotate-emobank-test-50.jsonl"
    items = DATA / "emobank-test-50.jsonl"
    r = _cli(str(pred), "-n", "5", "--spec", str(SPEC))
    assert r.exit_code == 0, r.output
    picks = [json.loads(ln) for ln in r.stdout.splitlines()]
    assert [p["rank"] for p in picks] == [1, 2, 3, 4, 5] and "5 of 50 items picked by entropy" in r.stderr
    assert [p["value"] for p in picks] == sorted((p["value"] for p in picks), reverse=True)
    assert _cli(str(pred), "-n", "5", "--spec", str(SPEC)).stdout == r.stdout  # deterministic

    done = tmp_path / "done.jsonl"
    done.write_text(json.dumps({"id": picks[0]["id"]}) + "\n")
    r2 = _cli(str(pred), "-n", "5", "--spec", str(SPEC), "--exclude", str(done))
    assert [json.loads(ln)["id"] for ln in r2.stdout.splitlines()] == [p["id"] for p in picks[1:]] + \
        [json.loads(r2.stdout.splitlines()[-1])["id"]]

    sel = tmp_path / "next-pred.jsonl"
    assert _cli(str(pred), "-n", "5", "--spec", str(SPEC), "--as", "predictions", "-o", str(sel)).exit_code == 0
    assert [json.loads(ln)["id"] for ln in sel.read_text().splitlines()] == [p["id"] for p in picks]
    originals = {json.loads(ln)["id"]: ln for ln in pred.read_text().splitlines()}
    assert all(ln == originals[json.loads(ln)["id"]] for ln in sel.read_text().splitlines())  # as annotate wrote them
    tasks = tmp_path / "tasks.json"
    r3 = CliRunner().invoke(cli, ["convert", str(sel), "--to", "label-studio", "--spec", str(SPEC),
                                  "--items", str(items), "-o", str(tasks)])
    assert r3.exit_code == 0, r3.output
    assert len(json.loads(tasks.read_text())) == 5

    it = tmp_path / "next.jsonl"
    assert _cli(str(pred), "-n", "5", "--spec", str(SPEC), "--as", "items", "--items", str(items),
                "-o", str(it)).exit_code == 0
    assert all("text" in json.loads(ln) for ln in it.read_text().splitlines())
    table = tmp_path / "review.csv"
    r4 = _cli(str(pred), "-n", "4", "--spec", str(SPEC), "--suspect", str(items), "--as", "csv", "-o", str(table))
    assert r4.exit_code == 0, r4.output
    rows = list(csv.DictReader(table.open()))
    assert len(rows) == 4 and rows[0]["strategy"] == "suspect" and set(rows[0]) >= {"Valence", "Arousal", "Dominance"}


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    pred = ROOT / "tests" / "golden" / "annotate-emobank-test-50.jsonl"
    r = _cli(str(pred), "-n", "5", "--spec", str(SPEC), "--as", "items")
    assert r.exit_code == 2 and "--items" in r.output
    r = _cli(str(pred), "-n", "5", "--spec", str(SPEC), "--criterion", "Valance")
    assert r.exit_code == 1 and "Valance is not in spec" in r.output and "Traceback" not in r.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"name": "x"}\n')
    r = _cli(str(pred), "-n", "5", "--spec", str(SPEC), "--exclude", str(bad))
    assert r.exit_code == 1 and "bad.jsonl:1: field 'id'" in r.output


def _arm(tmp_path: Path, name: str, rows: list[dict], score_of) -> Path:
    crits = ("Valence", "Arousal", "Dominance")
    recs = []
    for r in rows:
        s = {c: score_of(r, c) for c in crits}
        recs.append({"id": r["id"], "labels": {c: min(5, max(1, round(v))) for c, v in s.items()}, "scores": s,
                     "probs": {c: {str(k): 0.2 for k in range(1, 6)} for c in crits}, "model_sha256": name})
    p = tmp_path / f"{name}.jsonl"
    p.write_text("".join(json.dumps(x) + "\n" for x in recs))
    return p


def test_the_loop_simulation_pairs_arms_on_the_same_test_items_and_random_picks_are_seeded(tmp_path: Path) -> None:
    """scripts/active_learning.py: a strategy's gain over random is alpha(A) - alpha(B) on the same
    resampled items; random picks are seeded by round, leave out what is labelled, and are kept."""
    from active_learning import STEP, paired_gain, picks

    spec = load_spec(SPEC)
    test = DATA / "emobank-test-50.jsonl"
    rows = [json.loads(x) for x in test.read_text().splitlines()]

    def mean(r: dict, c: str) -> float:
        return sum(x["labels"][c] for x in r["ratings"]) / len(r["ratings"])

    exact = _arm(tmp_path, "exact", rows, mean)
    flat = _arm(tmp_path, "flat", rows, lambda r, c: 3.0 + (int(r["id"].encode().hex(), 16) % 7 - 3) / 10)
    up = paired_gain(spec, exact, flat, test)
    assert set(up) == {"Valence", "Arousal", "Dominance"}
    assert all(g["value"] > 0.5 and g["ci95"][0] > 0 for g in up.values()), up
    same = paired_gain(spec, exact, exact, test)
    assert all(g["value"] == 0 and g["ci95"] == [0, 0] for g in same.values()), same
    fewer = _arm(tmp_path, "fewer", rows[:-1], mean)
    with pytest.raises(ValueError, match="scored different test items"):
        paired_gain(spec, exact, fewer, test)

    pool = [json.loads(x) for x in (DATA / "emobank-train-400.jsonl").read_text().splitlines()]
    have = {r["id"] for r in pool[:150]}
    one = picks("random", tmp_path / "unused.gguf", spec, pool, have, tmp_path / "a" / "picked.json", 1, 1)
    assert len(one) == len(set(one)) == STEP and not set(one) & have
    assert one == picks("random", tmp_path / "unused.gguf", spec, pool, have, tmp_path / "b.json", 1, 1)
    assert one != picks("random", tmp_path / "unused.gguf", spec, pool, have, tmp_path / "c.json", 2, 1)
    assert json.loads((tmp_path / "a" / "picked.json").read_text()) == one
