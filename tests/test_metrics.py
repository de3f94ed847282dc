from __future__ import annotations

import json
from pathlib import Path

import krippendorff
import numpy as np
import pytest
from conftest import DATA, TASKS

from edge_annotator.runtime.metrics import agreement, consensus, criterion_agreement
from edge_annotator.runtime.spec import load_spec

EMO = load_spec(TASKS / "emobank.yaml")
GO = load_spec(TASKS / "goemotions.yaml")
CA = load_spec(TASKS / "convabuse.yaml")


def test_alpha_matches_krippendorff_on_model_vs_consensus() -> None:
    c = EMO.criteria[0]
    rng = np.random.default_rng(0)
    humans = {f"i{i}": [int(x) for x in rng.integers(1, 6, size=3)] for i in range(40)}
    preds = {i: int(rng.integers(1, 6)) for i in humans}
    r = criterion_agreement(c, preds, humans)
    ids = list(humans)
    expect = krippendorff.alpha(reliability_data=[[preds[i] for i in ids], [np.mean(humans[i]) for i in ids]],
                                level_of_measurement="interval")
    assert r["alpha"] == pytest.approx(expect)
    h = np.array([[humans[i][k] for i in ids] for k in range(3)], dtype=float)
    assert r["alpha_humans"] == pytest.approx(krippendorff.alpha(reliability_data=h, level_of_measurement="interval"))
    both = np.vstack([h, [[preds[i] for i in ids]]])
    assert r["alpha_humans_plus_model"] == pytest.approx(
        krippendorff.alpha(reliability_data=both, level_of_measurement="interval"))
    assert r["mae"] == pytest.approx(np.mean([abs(preds[i] - np.mean(humans[i])) for i in ids]))


def test_perfect_and_constant_predictions() -> None:
    c = EMO.criteria[0]
    humans = {f"i{i}": [v, v] for i, v in enumerate([1, 2, 3, 4, 5, 3])}
    perfect = criterion_agreement(c, {i: r[0] for i, r in humans.items()}, humans)
    assert perfect["alpha"] == pytest.approx(1.0) and perfect["exact"] == 1.0 and perfect["mae"] == 0.0
    constant = criterion_agreement(c, {i: 3 for i in humans}, humans)
    assert constant["alpha"] < 0.5


def test_consensus_rules() -> None:
    assert consensus(EMO.criteria[0], [1, 2, 4]) == pytest.approx(7 / 3)        # interval: mean
    assert consensus(CA.criteria[0], [-3, 1, 1, 0]) == 0                         # ordinal: lower median
    assert consensus(GO.criteria[0], ["joy", "anger", "anger"]) == "anger"       # nominal: mode
    assert consensus(GO.criteria[0], ["joy", "anger"]) == "anger"                # tie: the spec's first class


def test_nominal_report_has_macro_f1() -> None:
    c = GO.criteria[0]
    humans = {"a": ["joy"], "b": ["anger"], "c": ["joy"], "d": ["fear"]}
    preds = {"a": "joy", "b": "joy", "c": "joy", "d": "fear"}
    r = criterion_agreement(c, preds, humans)
    # joy: tp 2 fp 1 fn 0 -> 0.8; anger: tp 0 fn 1 -> 0; fear: 1.0
    assert r["macro_f1"] == pytest.approx((0.8 + 0 + 1) / 3)
    assert r["exact"] == 0.75 and "mae" not in r and "alpha_humans" not in r


def test_pooled_over_criteria() -> None:
    humans = {f"i{i}": [{"Valence": v, "Arousal": 6 - v, "Dominance": 3}, {"Valence": v, "Arousal": 6 - v}]
              for i, v in enumerate([1, 2, 3, 4, 5])}
    preds = {i: {"Valence": r[0]["Valence"], "Arousal": r[0]["Arousal"], "Dominance": 3} for i, r in humans.items()}
    rep = agreement(EMO, preds, humans)
    assert [c["criterion"] for c in rep["criteria"]] == ["Valence", "Arousal", "Dominance"]
    assert rep["pooled"]["method"] == "all (item, criterion) units"
    assert rep["pooled"]["alpha"] == pytest.approx(1.0)
    assert rep["items_with_humans"] == 5
    assert rep["criteria"][2]["alpha"] is None  # every value alike: alpha is undefined, not a number


@pytest.mark.parametrize("missing", [0.0, 0.3])
def test_interval_alpha_closed_form_equals_the_krippendorff_package(missing: float) -> None:
    from edge_annotator.runtime.metrics import _alpha

    rng = np.random.default_rng(1)
    for _ in range(5):
        data = rng.normal(size=(5, 60)).round(2) + rng.normal(size=60)  # shared item effect: alpha well above 0
        data[rng.random(data.shape) < missing] = np.nan
        want = krippendorff.alpha(reliability_data=data, level_of_measurement="interval")
        assert _alpha(data, "interval") == pytest.approx(want, abs=1e-12)


def test_scores_sit_beside_labels_in_the_report() -> None:
    """score: interval alpha and MAE against the raters' mean, and alpha with the score as one more rater."""
    c = EMO.criteria[0]
    rng = np.random.default_rng(2)
    humans = {f"i{i}": [int(x) for x in rng.integers(1, 6, size=4)] for i in range(50)}
    labels = {i: 3 for i in humans}  # the argmax sits on the central level ...
    scores = {i: float(np.mean(h)) * 0.5 + 1.5 for i, h in humans.items()}  # ... the score follows the raters
    r = criterion_agreement(c, labels, humans, scores)
    ids = list(humans)
    mean = [float(np.mean(humans[i])) for i in ids]
    assert r["score_alpha"] == pytest.approx(krippendorff.alpha(
        reliability_data=[[scores[i] for i in ids], mean], level_of_measurement="interval"))
    assert r["score_mae"] == pytest.approx(np.mean([abs(scores[i] - m) for i, m in zip(ids, mean)]))
    h = np.array([[humans[i][k] for i in ids] for k in range(4)], dtype=float)
    assert r["score_alpha_humans_plus_model"] == pytest.approx(krippendorff.alpha(
        reliability_data=np.vstack([h, [[scores[i] for i in ids]]]), level_of_measurement="interval"))
    assert r["score_alpha"] > 0.5 > r["alpha"]  # the label (constant) knows nothing, the score a lot
    rep = agreement(EMO, {i: {"Valence": 3} for i in ids}, {i: [{"Valence": v} for v in humans[i]] for i in ids},
                    {i: {"Valence": scores[i]} for i in ids})
    assert rep["pooled"]["score_alpha"] == pytest.approx(r["score_alpha"])
    # labels only (nominal) get no score figures; older records without scores neither
    assert "score_alpha" not in criterion_agreement(GO.criteria[0], {"a": "joy"}, {"a": ["joy"]})
    assert "score_alpha" not in criterion_agreement(c, labels, humans)


def test_bootstrap_interval_brackets_the_estimate() -> None:
    from edge_annotator.runtime.metrics import bootstrap

    x = np.random.default_rng(0).normal(1.0, 1.0, 400)
    lo, hi = bootstrap(lambda ix: float(x[ix].mean()), len(x), resamples=500)
    assert lo is not None and hi is not None and lo < x.mean() < hi
    assert hi - lo == pytest.approx(2 * 1.96 / np.sqrt(400), rel=0.2)  # the normal interval, roughly
    assert bootstrap(lambda ix: None, 10) == (None, None)


# -- the like-for-like yardstick: one held-out rater against the others -------------------------

def test_leave_one_out_with_two_raters_is_the_raters_own_alpha_whichever_is_held_out() -> None:
    """With two raters per item the held-out rating is compared with the other one, so every draw
    gives the raters' own alpha exactly."""
    from edge_annotator.runtime.metrics import leave_one_out

    c = CA.criteria[0]  # ordinal
    rng = np.random.default_rng(2)
    humans = {f"i{i}": [int(x) for x in rng.choice([1, 0, -1, -2, -3], size=2)] for i in range(60)}
    loo = leave_one_out(c, {i: r[0] for i, r in humans.items()}, humans, resamples=200)
    ids = list(humans)
    own = krippendorff.alpha(reliability_data=[[humans[i][0] for i in ids], [humans[i][1] for i in ids]],
                             level_of_measurement="ordinal")
    assert loo is not None and loo["human_alpha"] == pytest.approx(own) and loo["items"] == 60
    assert loo["model_figure"] == "label" and loo["human_alpha_ci"][0] <= own <= loo["human_alpha_ci"][1]


@pytest.mark.parametrize("model, verdict", [
    ("truth", "above"),    # the noise-free value: closer to the others' mean than any noisy rater
    ("rater", "within"),   # one more rater drawn like the others
    ("random", "below"),   # labels unrelated to the items
])
def test_leave_one_out_verdict_where_the_answer_is_known(model: str, verdict: str) -> None:
    """Raters are truth + noise (sd 0.8, three per item, rounded to 1..5); a model that gives the
    truth beats one held-out rater, a fourth rater ties with them, random labels lose."""
    from edge_annotator.runtime.metrics import leave_one_out

    c = EMO.criteria[0]  # interval
    rng = np.random.default_rng(0)
    truth = rng.integers(1, 6, size=300).astype(float)
    noisy = lambda: np.clip(np.rint(truth + rng.normal(0, 0.8, truth.shape)), 1, 5)  # noqa: E731
    raters = [noisy() for _ in range(3)]
    humans = {f"i{i}": [int(r[i]) for r in raters] for i in range(len(truth))}
    pred = {"truth": truth, "rater": noisy(), "random": rng.integers(1, 6, size=truth.shape).astype(float)}[model]
    labels = {f"i{i}": int(pred[i]) for i in range(len(truth))}
    loo = leave_one_out(c, labels, humans, resamples=300, seed=1)
    assert loo is not None and loo["verdict"] == verdict, loo
    again = leave_one_out(c, labels, humans, resamples=300, seed=1)
    assert again == loo  # seeded: the same figures every run


def test_agree_json_carries_the_leave_one_out_figures_and_the_mean_over_criteria(tmp_path) -> None:
    import json

    from click.testing import CliRunner

    from edge_annotator.runtime.cli import cli

    rng = np.random.default_rng(3)
    humans, preds = [], []
    for i in range(40):
        vals = {c.name: [int(x) for x in rng.integers(1, 6, size=3)] for c in EMO.criteria}
        for k in range(3):
            humans.append({"id": f"s{i}", "text": "t", "rater": f"r{k}", "labels": {n: v[k] for n, v in vals.items()}})
        lab = {n: int(rng.integers(1, 6)) for n in vals}  # a fourth rater, independent like the others
        preds.append({"id": f"s{i}", "labels": lab, "scores": {n: float(x) for n, x in lab.items()},
                      "probs": {n: {str(lv): float(lv == x) for lv in range(1, 6)} for n, x in lab.items()}})
    (tmp_path / "h.jsonl").write_text("".join(json.dumps(r) + "\n" for r in humans))
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in preds))
    r = CliRunner().invoke(cli, ["agree", str(tmp_path / "p.jsonl"), str(tmp_path / "h.jsonl"),
                                 "--spec", str(TASKS / "emobank.yaml"), "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    for c in rep["criteria"]:
        loo = c["leave_one_out"]
        assert {"human_alpha", "model_alpha", "human_alpha_ci", "model_alpha_ci", "verdict"} <= set(loo)
        assert loo["model_figure"] == "score" and loo["verdict"] == "within"
    assert rep["mean"]["alpha"] == pytest.approx(np.mean([c["alpha"] for c in rep["criteria"]]))
    r = CliRunner().invoke(cli, ["agree", str(tmp_path / "p.jsonl"), str(tmp_path / "h.jsonl"),
                                 "--spec", str(TASKS / "emobank.yaml")])
    assert "one human" in r.output and "model is" in r.output


@pytest.mark.parametrize("spec_file, items", [("goemotions.yaml", "goemotions-test-50.jsonl"),
                                              ("convabuse.yaml", "convabuse-test-50.jsonl")])
def test_the_evaluation_table_scores_label_sets_and_ordinal_scales(tmp_path: Path, spec_file: str, items: str) -> None:
    """scripts/eval.py on a nominal and an ordinal task: an annotator that answers the consensus
    agrees with it exactly (a label set's values are names, never averaged)."""
    from eval import evaluate

    from edge_annotator.runtime.data import read_human

    spec = load_spec(TASKS / spec_file)
    test = DATA / items
    c = spec.criteria[0]
    humans = read_human(test, spec)
    pred = tmp_path / "pred.jsonl"
    recs = []
    for i, rs in humans.items():
        top = consensus(c, [r[c.name] for r in rs])
        recs.append({"id": i, "labels": {c.name: top}, "model_sha256": "x",
                     "probs": {c.name: {str(v): float(v == top) for v in c.values}}})
    pred.write_text("".join(json.dumps(x) + "\n" for x in recs))
    table = evaluate(spec, pred, test)["criteria"][c.name]
    assert table["items"] == len(humans) == 50
    assert table["label_alpha"]["value"] == pytest.approx(1.0)
    if c.level == "nominal":
        assert table["macro_f1"]["value"] == pytest.approx(1.0)
