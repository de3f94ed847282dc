"""Agreement between the annotator and human raters.

Per criterion, at the spec's level of measurement:

- ``alpha``: Krippendorff's alpha between the model and the human consensus of each item
  (mean for interval, lower median for ordinal, most frequent label for nominal);
- ``alpha_humans``: alpha among the human raters alone (items with two or more ratings);
- ``alpha_humans_plus_model``: alpha of the humans with the model as one more rater;
- ``exact``: share of items where the model's label equals the consensus rounded to a level;
- ``macro_f1`` for labels (nominal) and ``mae`` (model vs consensus) for scales.

Where the predictions carry scores (annotate's probability-weighted mean of the levels, rating
scales only), the same report gains ``score_alpha`` (interval alpha of the score against the
raters' mean), ``score_mae`` and ``score_alpha_humans_plus_model`` beside the label's figures.

``mean`` is the mean of the per-criterion figures: what checkpoints are chosen by, since each
criterion is agreement on its own scale. ``pooled`` treats every (item, criterion) pair as one
unit when all criteria share a level of measurement (it rises as soon as a model learns each
criterion's mean, without telling items apart), and is the mean otherwise.

``leave_one_out`` (agree, the report) is the like-for-like yardstick: one held-out human rating
per item against the consensus of the others, beside the model against that same consensus,
averaged over draws of the held-out rating, with bootstrap intervals and a verdict.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import krippendorff
import numpy as np

from .spec import Criterion, TaskSpec

Value = int | float | str


def _alpha(rows: Sequence[Sequence[float]], level: Any) -> float | None:
    """alpha over a raters x units matrix (NaN = missing); None where it is undefined."""
    data = np.asarray(rows, dtype=float)
    if data.size == 0 or data.shape[1] == 0:
        return None
    pairable = (np.sum(~np.isnan(data), axis=0) >= 2).sum()
    values = data[~np.isnan(data)]
    if pairable == 0 or len(np.unique(values)) < 2:
        return None  # no pairable unit, or every value alike: alpha is 0/0
    if level == "interval":
        return _interval_alpha(data)
    a = float(krippendorff.alpha(reliability_data=data, level_of_measurement=level))
    return None if math.isnan(a) else a


def _interval_alpha(data: np.ndarray) -> float | None:
    """Krippendorff's interval alpha in closed form (equal to the krippendorff package's, tested).

    With squared differences, the sum over a unit's ordered value pairs is 2 m SS (SS: squares
    about the unit's mean), so D_o = (1/n) sum_u 2 m_u SS_u / (m_u - 1) and D_e = 2 SS / (n - 1)
    over the n pairable values: O(values) where the package builds a values x values matrix, which
    matters for scores (every one distinct) and for bootstrap intervals."""
    ok = ~np.isnan(data)
    m = ok.sum(axis=0)
    cols = m >= 2
    x, ok, m = np.where(ok, data, 0.0)[:, cols], ok[:, cols], m[cols]
    n = float(m.sum())
    mean_u = x.sum(axis=0) / m
    ss_u = (np.where(ok, x - mean_u, 0.0) ** 2).sum(axis=0)
    vals = x[ok]
    ss = float(((vals - vals.mean()) ** 2).sum())
    if ss == 0:
        return None
    d_o = float((2 * m * ss_u / (m - 1)).sum()) / n
    d_e = 2 * ss / (n - 1)
    return 1.0 - d_o / d_e


def _code(c: Criterion, v: Value) -> float:
    """Numeric code for alpha: the value itself on scales, the class index for labels."""
    if c.level == "nominal":
        return float(c.values.index(v))  # type: ignore[arg-type]
    return float(v)


def consensus(c: Criterion, ratings: Sequence[Value]) -> Value:
    if c.level == "interval":
        return float(np.mean([float(r) for r in ratings]))
    if c.level == "ordinal":
        s = sorted(float(r) for r in ratings)
        v = s[(len(s) - 1) // 2]  # lower median: always a level of the scale
        return int(v) if v.is_integer() else v
    counts = Counter(ratings)
    top = max(counts.values())
    return next(x for x in c.values if counts.get(x, 0) == top)  # ties go to the spec's first class


def nearest_level(c: Criterion, v: Value) -> Value:
    if c.level == "nominal":
        return v
    return min(c.values, key=lambda x: (abs(float(x) - float(v)), float(x)))  # type: ignore[arg-type]


def _macro_f1(c: Criterion, gold: Sequence[Value], pred: Sequence[Value]) -> float:
    f1s = []
    for cls in c.values:
        tp = sum(1 for g, p in zip(gold, pred) if g == cls and p == cls)
        fp = sum(1 for g, p in zip(gold, pred) if g != cls and p == cls)
        fn = sum(1 for g, p in zip(gold, pred) if g == cls and p != cls)
        if tp + fp + fn == 0:
            continue  # class absent from both: it says nothing about this sample
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1s)) if f1s else float("nan")


def criterion_agreement(c: Criterion, preds: Mapping[str, Value],
                        humans: Mapping[str, Sequence[Value]],
                        scores: Mapping[str, float] | None = None) -> dict[str, Any]:
    ids = [i for i in preds if humans.get(i)]
    out: dict[str, Any] = {"criterion": c.name, "level": c.level, "items": len(ids)}
    if not ids:
        return out
    max_r = max(len(humans[i]) for i in ids)
    cons = [consensus(c, humans[i]) for i in ids]
    model = [preds[i] for i in ids]
    out["alpha"] = _alpha([[_code(c, v) for v in model], [_code(c, v) for v in cons]], c.level)
    human_rows = [[_code(c, humans[i][k]) if k < len(humans[i]) else np.nan for i in ids] for k in range(max_r)]
    if max_r >= 2:
        out["alpha_humans"] = _alpha(human_rows, c.level)
        out["alpha_humans_plus_model"] = _alpha(human_rows + [[_code(c, v) for v in model]], c.level)
        out["raters_per_item"] = round(float(np.mean([len(humans[i]) for i in ids])), 2)
    gold = [nearest_level(c, v) for v in cons]
    out["exact"] = float(np.mean([g == p for g, p in zip(gold, model)]))
    if c.level == "nominal":
        out["macro_f1"] = _macro_f1(c, gold, model)
    else:
        out["mae"] = float(np.mean([abs(float(p) - float(h)) for p, h in zip(model, cons)]))
        if scores is not None:
            out |= _score_agreement([scores.get(i) for i in ids], [humans[i] for i in ids])
    return out


def _pearson(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Pearson's r; None where either side is constant. Tells early in training whether the score
    follows the raters at all, before its spread is wide enough for alpha to show it."""
    if len(a) < 2 or float(np.std(a)) == 0.0 or float(np.std(b)) == 0.0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def _score_agreement(scores: Sequence[float | None], ratings: Sequence[Sequence[Value]]) -> dict[str, Any]:
    """Interval alpha and MAE of scores against the raters' mean, and alpha with the score as one
    more rater. Units without a score (older records) are left out."""
    pairs = [(float(s), [float(v) for v in rs]) for s, rs in zip(scores, ratings) if s is not None and rs]
    if not pairs:
        return {}
    sc = [p[0] for p in pairs]
    mean = [float(np.mean(p[1])) for p in pairs]
    out: dict[str, Any] = {"score_alpha": _alpha([sc, mean], "interval"),
                           "score_mae": float(np.mean([abs(a - b) for a, b in zip(sc, mean)])),
                           "score_r": _pearson(sc, mean)}
    max_r = max(len(p[1]) for p in pairs)
    if max_r >= 2:
        rows = [[p[1][k] if k < len(p[1]) else np.nan for p in pairs] for k in range(max_r)]
        out["score_alpha_humans_plus_model"] = _alpha(rows + [sc], "interval")
    return out


MEAN_KEYS = ("alpha", "alpha_humans", "alpha_humans_plus_model", "exact", "macro_f1", "mae",
             "score_alpha", "score_mae", "score_r", "score_alpha_humans_plus_model")


def agreement(spec: TaskSpec, preds: Mapping[str, Mapping[str, Value]],
              humans: Mapping[str, Sequence[Mapping[str, Value]]],
              scores: Mapping[str, Mapping[str, float]] | None = None, loo: bool = False,
              seed: int = 0) -> dict[str, Any]:
    """The full report: per criterion, their mean and pooled; `scores` (id -> criterion -> score)
    adds the score's figures for rating scales; `loo` the leave-one-rater-out yardstick (seeded)."""
    per = []
    for c in spec.criteria:
        p = {i: labels[c.name] for i, labels in preds.items() if c.name in labels}
        h = {i: [r[c.name] for r in rs if c.name in r] for i, rs in humans.items()}
        sc = None if scores is None else {i: s[c.name] for i, s in scores.items() if c.name in s}
        per.append(criterion_agreement(c, p, h, sc))
        if loo and (got := leave_one_out(c, p, h, sc, seed=seed)) is not None:
            per[-1]["leave_one_out"] = got
    mean: dict[str, Any] = {"method": "mean over criteria"}
    for k in MEAN_KEYS:
        vals = [r[k] for r in per if r.get(k) is not None]
        if vals and len(vals) == sum(k in r for r in per):
            mean[k] = float(np.mean(vals))
    report: dict[str, Any] = {"spec": spec.name, "criteria": per, "mean": mean,
                              "pooled": _pooled(spec, preds, humans, per, scores)}
    report["items_predicted"] = len(preds)
    report["items_with_humans"] = sum(1 for i in preds if humans.get(i))
    return report


def _pooled(spec: TaskSpec, preds: Mapping[str, Mapping[str, Value]],
            humans: Mapping[str, Sequence[Mapping[str, Value]]], per: list[dict[str, Any]],
            scores: Mapping[str, Mapping[str, float]] | None = None) -> dict[str, Any]:
    levels = {c.level for c in spec.criteria}
    keys = MEAN_KEYS
    if len(spec.criteria) == 1:
        return {k: per[0][k] for k in keys if k in per[0]} | {"method": "single criterion"}
    if len(levels) > 1:
        out: dict[str, Any] = {"method": "mean over criteria (levels differ)"}
        for k in keys:
            vals = [p[k] for p in per if p.get(k) is not None]
            if vals:
                out[k] = float(np.mean(vals))
        return out
    # every (item, criterion) is one unit; the scales are shared, so the codes are comparable
    level = levels.pop()
    m_row: list[float] = []
    c_row: list[float] = []
    h_units: list[list[float]] = []
    exact, abs_err = [], []
    unit_scores: list[float | None] = []
    unit_ratings: list[list[Value]] = []
    for c in spec.criteria:
        for i, labels in preds.items():
            rs = [r[c.name] for r in humans.get(i, []) if c.name in r]
            if c.name not in labels or not rs:
                continue
            unit_scores.append(None if scores is None else scores.get(i, {}).get(c.name))
            unit_ratings.append(rs)
            cons = consensus(c, rs)
            m_row.append(_code(c, labels[c.name]))
            c_row.append(_code(c, cons))
            h_units.append([_code(c, v) for v in rs])
            exact.append(nearest_level(c, cons) == labels[c.name])
            if level != "nominal":
                abs_err.append(abs(float(labels[c.name]) - float(cons)))
    out = {"method": "all (item, criterion) units", "alpha": _alpha([m_row, c_row], level)}
    max_r = max((len(u) for u in h_units), default=0)
    if max_r >= 2:
        rows = [[u[k] if k < len(u) else np.nan for u in h_units] for k in range(max_r)]
        out["alpha_humans"] = _alpha(rows, level)
        out["alpha_humans_plus_model"] = _alpha(rows + [m_row], level)
    if exact:
        out["exact"] = float(np.mean(exact))
    if abs_err:
        out["mae"] = float(np.mean(abs_err))
    if scores is not None and level != "nominal":
        out |= _score_agreement(unit_scores, unit_ratings)
    return out


def bootstrap(stat: Any, n_units: int, resamples: int = 1000, seed: int = 0,
              level: float = 0.95) -> tuple[float | None, float | None]:
    """Percentile interval of `stat(indices)` over items resampled with replacement.

    `stat` takes an index array (units drawn with replacement) and returns a number or None
    (undefined on that sample: left out). None where fewer than 90% of resamples are defined."""
    rng = np.random.default_rng(seed)
    vals = [v for v in (stat(rng.integers(0, n_units, n_units)) for _ in range(resamples)) if v is not None]
    if len(vals) < 0.9 * resamples:
        return None, None
    lo, hi = np.quantile(vals, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def leave_one_out(c: Criterion, preds: Mapping[str, Value], humans: Mapping[str, Sequence[Value]],
                  scores: Mapping[str, float] | None = None, draws: int = 20, resamples: int = 1000,
                  seed: int = 0) -> dict[str, Any] | None:
    """One held-out human against the consensus of the other raters, and the model against that
    same consensus: the like-for-like comparison (a consensus is less noisy than one rater, so the
    model's alpha with all raters' consensus is not comparable to the raters' alpha among
    themselves).

    Over the items with two or more ratings, each draw holds out one rating per item at random
    (seeded); the figures are means over `draws`. Intervals: items resampled `resamples` times, a
    fresh held-out draw in each. The model's figure is its score's (interval, against the others'
    mean) where scores exist, else its label's; `verdict` says whether the model is above, within
    or below one human, from the interval of the paired difference. None where no item has two
    ratings."""
    ids = [i for i in preds if len(humans.get(i, ())) >= 2]
    if not ids:
        return None
    ratings = [[_code(c, v) for v in humans[i]] for i in ids]
    model = np.array([_code(c, preds[i]) for i in ids])
    score = None if scores is None or c.level == "nominal" or any(i not in scores for i in ids) \
        else np.array([float(scores[i]) for i in ids])
    cons_of = {"interval": lambda xs: float(np.mean(xs)),
               "ordinal": lambda xs: sorted(xs)[(len(xs) - 1) // 2],  # lower median, as `consensus`
               "nominal": lambda xs: _mode(xs)}[c.level]
    rng = np.random.default_rng(seed)

    def one_draw(rows: np.ndarray) -> tuple[float | None, float | None]:
        held, cons, means = [], [], []
        for u in rows:
            rs = ratings[u]
            k = int(rng.integers(len(rs)))
            others = rs[:k] + rs[k + 1:]
            held.append(rs[k])
            cons.append(cons_of(others))
            means.append(float(np.mean(others)))
        human = _alpha([held, cons], c.level)
        mine = _alpha([score[rows].tolist(), means], "interval") if score is not None else \
            _alpha([model[rows].tolist(), cons], c.level)
        return human, mine

    everyone = np.arange(len(ids))
    got = [one_draw(everyone) for _ in range(draws)]
    humans_a = [h for h, _ in got if h is not None]
    model_a = [m for _, m in got if m is not None]
    if not humans_a or not model_a:
        return None
    out: dict[str, Any] = {"items": len(ids), "draws": draws, "model_figure": "score" if score is not None else "label",
                           "human_alpha": float(np.mean(humans_a)), "model_alpha": float(np.mean(model_a))}
    boot: list[tuple[float, float]] = []
    for _ in range(resamples):
        h, m = one_draw(rng.integers(0, len(ids), len(ids)))
        if h is not None and m is not None:
            boot.append((h, m))
    if len(boot) >= 0.9 * resamples:
        b = np.array(boot)
        q = [0.025, 0.975]
        out["human_alpha_ci"] = [float(x) for x in np.quantile(b[:, 0], q)]
        out["model_alpha_ci"] = [float(x) for x in np.quantile(b[:, 1], q)]
        lo, hi = (float(x) for x in np.quantile(b[:, 1] - b[:, 0], q))
        out["difference_ci"] = [lo, hi]
        out["verdict"] = "above" if lo > 0 else "below" if hi < 0 else "within"
    return out


def _mode(xs: Sequence[float]) -> float:
    counts = Counter(xs)
    top = max(counts.values())
    return min(x for x, n in counts.items() if n == top)  # ties: the smallest code, the spec's first class
