"""Calibrated scores: a monotone map per criterion from the raw score onto the human scale.

    cal = fit_calibration(spec, items, scored)        # items with ratings, their HF scores
    spec = with_calibration(spec, cal)                 # what merge writes into RUN/merged/spec.json

A fine-tune on a few hundred items often learns which items rate higher without learning how far
apart they are: its scores follow the raters (Pearson r 0.2-0.45 on a dialogue-summary task) but
spread over a sliver (sd 0.03-0.06 against the raters' 0.5-1.1), and alpha, which counts
distance, stays near 0. A map fitted on the validation items, per criterion, puts the scores back
on the raters' scale. Candidates: the identity, an affine map (least squares, positive slope,
clipped to the scale) and, with enough items, isotonic regression (pool adjacent violators). The
one with the best interval alpha against the raters' mean under k-fold cross-validation wins; the
identity stays unless another beats it by MARGIN. Labels and probabilities are untouched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from edge_annotator.runtime.data import Item
from edge_annotator.runtime.metrics import _alpha
from edge_annotator.runtime.records import Score
from edge_annotator.runtime.spec import Criterion, TaskSpec

FOLDS = 5
ISOTONIC_FROM = 100
"""Items needed before isotonic regression is a candidate (a step per few items overfits less)."""
MARGIN = 0.01
"""Cross-validated alpha a map must gain over the identity to be kept."""

Knots = tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class Calibration:
    """One criterion's chosen map and what cross-validation measured for each candidate."""

    criterion: str
    method: str
    knots: Knots
    cv_alpha: dict[str, float | None]
    items: int


def _apply(knots: Knots, x: np.ndarray) -> np.ndarray:
    if not knots:
        return x
    xs, ys = zip(*knots)
    return np.interp(x, xs, ys)


def affine_knots(x: np.ndarray, y: np.ndarray, lo: float, hi: float) -> Knots | None:
    """Least-squares y = a + b x over the scale [lo, hi], clipped to it, as knots; None unless b > 0
    (a flat or falling map is no calibration)."""
    if len(x) < 3 or float(np.std(x)) == 0.0:
        return None
    b, a = np.polyfit(x, y, 1)
    if b <= 0:
        return None
    f = lambda v: float(a + b * v)  # noqa: E731
    pts = {lo, hi} | {v for v in ((lo - a) / b, (hi - a) / b) if lo < v < hi}
    knots = tuple((float(v), float(min(max(f(v), lo), hi))) for v in sorted(pts))
    return knots if len(knots) >= 2 else None


def isotonic_knots(x: np.ndarray, y: np.ndarray, lo: float, hi: float) -> Knots | None:
    """Isotonic regression of y on x (pool adjacent violators), as knots at each block's mean x,
    joined by straight lines; None where fewer than two blocks remain."""
    order = np.argsort(x, kind="stable")
    xs, ys = x[order].astype(float), y[order].astype(float)
    blocks: list[list[float]] = []  # [sum_y, count, sum_x]
    for xv, yv in zip(xs, ys):
        blocks.append([yv, 1.0, xv])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            s, n, sx = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += n
            blocks[-1][2] += sx
    knots = [(sx / n, min(max(s / n, lo), hi)) for s, n, sx in blocks]
    merged: list[tuple[float, float]] = []
    for kx, ky in knots:  # equal x (tied raw scores) in two blocks cannot happen after pooling; guard anyway
        if merged and kx <= merged[-1][0]:
            continue
        merged.append((float(kx), float(ky)))
    # a flat run needs only its ends
    kept = [k for i, k in enumerate(merged) if i in (0, len(merged) - 1)
            or not merged[i - 1][1] == k[1] == merged[i + 1][1]]
    return tuple(kept) if len(kept) >= 2 else None


def _fit(method: str, x: np.ndarray, y: np.ndarray, lo: float, hi: float) -> Knots | None:
    if method == "identity":
        return ()
    return affine_knots(x, y, lo, hi) if method == "affine" else isotonic_knots(x, y, lo, hi)


def fit_criterion(c: Criterion, raw: np.ndarray, mean: np.ndarray, seed: int = 0) -> Calibration:
    """Choose the identity, affine or isotonic map for one criterion by k-fold cross-validated alpha."""
    lo, hi = float(min(c.values)), float(max(c.values))  # type: ignore[type-var, arg-type]
    methods = ["identity", "affine"] + (["isotonic"] if len(raw) >= ISOTONIC_FROM else [])
    folds = np.random.default_rng(seed).permutation(len(raw)) % FOLDS
    cv: dict[str, float | None] = {}
    for m in methods:
        pred = np.empty(len(raw))
        ok = True
        for k in range(FOLDS):
            test = folds == k
            knots = _fit(m, raw[~test], mean[~test], lo, hi)
            if knots is None:
                ok = False
                break
            pred[test] = _apply(knots, raw[test])
        cv[m] = _alpha([pred.tolist(), mean.tolist()], "interval") if ok else None
    best = "identity"
    for m in methods[1:]:
        a, base = cv.get(m), cv.get(best)
        if a is not None and (base is None or a > base + (MARGIN if best == "identity" else 0.0)):
            best = m
    knots = _fit(best, raw, mean, lo, hi)
    return Calibration(c.name, best, knots or (), cv, len(raw))


def fit_calibration(spec: TaskSpec, items: Sequence[Item], scored: Sequence[Mapping[str, Score]],
                    seed: int = 0) -> list[Calibration]:
    """Per rating scale: the map from the raw score (scored without any calibration) to the raters' mean."""
    out = []
    for c in spec.criteria:
        if c.level == "nominal":
            continue
        pairs = [(float(sc[c.name].raw_score if sc[c.name].raw_score is not None else sc[c.name].score),
                  float(np.mean([float(r[c.name]) for r in it.ratings if c.name in r])))
                 for it, sc in zip(items, scored) if any(c.name in r for r in it.ratings)
                 and sc[c.name].score is not None]
        if len(pairs) < 2 * FOLDS:
            out.append(Calibration(c.name, "identity", (), {}, len(pairs)))
            continue
        raw, mean = (np.array(v) for v in zip(*pairs))
        out.append(fit_criterion(c, raw, mean, seed))
    return out


def with_calibration(spec: TaskSpec, cals: Sequence[Calibration]) -> TaskSpec:
    """The spec with each criterion's chosen knots (the identity: none)."""
    by = {c.criterion: c.knots for c in cals}
    return replace(spec, criteria=tuple(replace(c, calibration=by.get(c.name, c.calibration)) for c in spec.criteria))


def summary(cals: Sequence[Calibration], before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What goes into provenance and train's summary: per criterion the method, the cross-validated
    alphas of the candidates, and the score's alpha on the validation items before and after."""
    b = {r["criterion"]: r.get("score_alpha") for r in before["criteria"]}
    a = {r["criterion"]: r.get("score_alpha") for r in after["criteria"]}
    return {c.criterion: {"method": c.method, "items": c.items, "cv_alpha": c.cv_alpha,
                          "knots": [list(k) for k in c.knots], "score_alpha_before": b.get(c.criterion),
                          "score_alpha_after": a.get(c.criterion)} for c in cals}
