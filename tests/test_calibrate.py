"""Calibrated scores: fitting (train/calibrate.py), the spec carrying the map, annotate applying it."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA, TASKS

from edge_annotator.runtime.annotator import calibrate, criterion_score
from edge_annotator.runtime.spec import SpecError, load_spec, parse_spec, spec_from_json
from edge_annotator.train.calibrate import affine_knots, fit_criterion, isotonic_knots, with_calibration

EMO = load_spec(TASKS / "emobank.yaml")
V = EMO.criteria[0]


def test_a_squeezed_score_that_follows_the_raters_is_stretched_back_onto_their_scale() -> None:
    """Scores that rank the items but spread over a sliver (sd 0.05 against the raters' 0.8): alpha
    near 0 raw; the affine map found by cross-validation puts them on the scale."""
    rng = np.random.default_rng(0)
    mean = np.clip(rng.normal(3.0, 0.8, 300), 1, 5)
    raw = 3.0 + 0.06 * (mean - 3.0) + rng.normal(0, 0.02, 300)
    cal = fit_criterion(V, raw, mean)
    assert cal.method in ("affine", "isotonic") and cal.cv_alpha["identity"] < 0.2
    assert cal.cv_alpha[cal.method] > 0.6
    xs, ys = zip(*cal.knots)
    assert all(b > a for a, b in zip(xs, xs[1:])) and all(b >= a for a, b in zip(ys, ys[1:]))
    assert min(ys) >= 1 and max(ys) <= 5


def test_the_identity_stays_where_the_scores_are_already_on_scale() -> None:
    rng = np.random.default_rng(1)
    mean = np.clip(rng.normal(3.0, 0.8, 200), 1, 5)
    raw = mean + rng.normal(0, 0.3, 200)
    cal = fit_criterion(V, raw, mean)
    assert cal.method == "identity" and cal.knots == ()


def test_affine_and_isotonic_recover_known_maps() -> None:
    x = np.linspace(2.9, 3.1, 50)
    y = 1 + 20 * (x - 2.9)  # 1 .. 5 over the raw range
    knots = affine_knots(x, y, 1, 5)
    assert knots is not None
    assert np.allclose(np.interp([2.9, 3.0, 3.1], *zip(*knots)), [1, 3, 5], atol=1e-6)
    assert affine_knots(x, -y, 1, 5) is None  # a falling map is no calibration
    steps = np.where(x < 3.0, 2.0, 4.0)
    iso = isotonic_knots(x, steps, 1, 5)
    assert iso is not None and [k[1] for k in iso] == [2.0, 2.0, 4.0, 4.0]
    assert np.interp([2.9, 2.99, 3.01, 3.1], *zip(*iso)).tolist() == [2.0, 2.0, 4.0, 4.0]


def test_the_spec_carries_the_map_and_hashes_as_before_without_one() -> None:
    knots = ((2.8, 1.0), (3.2, 5.0))
    cal = with_calibration(EMO, [type("C", (), {"criterion": "Valence", "knots": knots})()])  # type: ignore[list-item]
    assert cal.criteria[0].calibration == knots and cal.criteria[1].calibration == ()
    assert cal.sha256 != EMO.sha256 and "calibration" not in json.loads(EMO.to_json())["criteria"][0]
    back = spec_from_json(cal.to_json())
    assert back == cal and back.sha256 == cal.sha256
    assert calibrate(back.criteria[0], 3.0) == pytest.approx(3.0) and calibrate(back.criteria[0], 9) == 5.0
    import yaml

    raw = yaml.safe_load((TASKS / "emobank.yaml").read_text())
    raw["criteria"][0]["calibration"] = [[3.0, 2.0], [2.0, 4.0]]
    with pytest.raises(SpecError, match="raw values must increase"):
        parse_spec(raw)


def test_criterion_score_applies_the_map_and_keeps_the_raw_score() -> None:
    c = replace(V, calibration=((2.0, 1.0), (4.0, 5.0)))
    probs = [0.1, 0.2, 0.4, 0.2, 0.1]  # raw score 3.0
    s = criterion_score(c, probs)
    assert s.raw_score == pytest.approx(3.0) and s.score == pytest.approx(3.0) and s.label == 3
    s = criterion_score(c, [0.0, 0.0, 0.5, 0.5, 0.0])  # raw 3.5 -> 4.0
    assert s.score == pytest.approx(4.0) and s.raw_score == pytest.approx(3.5)
    assert criterion_score(V, probs).raw_score is None  # no map: no raw_scores in the record


@pytest.mark.slow
def test_annotate_writes_calibrated_scores_and_the_raw_ones(tmp_path: Path, gemma_path: Path) -> None:
    """A model file whose embedded spec carries a map: `scores` are mapped, `raw_scores` are the
    scores the same file without the map gives, labels and probabilities unchanged."""
    import io

    from edge_annotator.export.metadata import embed_spec
    from edge_annotator.runtime.jobs import JobOptions, annotate_file

    knots = ((1.2, 1.0), (2.0, 3.0), (3.0, 5.0))
    cal = replace(EMO, criteria=(replace(V, calibration=knots), *EMO.criteria[1:]))
    plain = embed_spec(gemma_path, tmp_path / "plain.gguf", EMO, {"test": True})
    mapped = embed_spec(gemma_path, tmp_path / "mapped.gguf", cal, {"test": True})
    out = {}
    for name, m in (("plain", plain), ("mapped", mapped)):
        buf = io.StringIO()
        few = tmp_path / "few.jsonl"
        few.write_text("".join((DATA / "emobank-test-50.jsonl").read_text().splitlines(keepends=True)[:6]))
        annotate_file(m, few, buf, JobOptions(threads=2))
        out[name] = [json.loads(x) for x in buf.getvalue().splitlines()]
    for a, b in zip(out["plain"], out["mapped"]):
        assert a["labels"] == b["labels"] and a["probs"] == b["probs"] and "raw_scores" not in a
        assert b["raw_scores"] == {"Valence": a["scores"]["Valence"]}
        assert b["scores"]["Valence"] == pytest.approx(float(np.interp(a["scores"]["Valence"], *zip(*knots))),
                                                       abs=1e-5)  # the raw score is rounded
        assert b["scores"]["Arousal"] == a["scores"]["Arousal"]
