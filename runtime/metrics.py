"""Agreement between the annotator and human raters.

Per criterion, at the spec's level of measurement:

- ``alpha``: Krippendorff's alpha between the model and the human consensus of each item
  (mean for interval, lower median for ordinal, most frequent label for nominal);
- ``alpha_humans``: alpha among the human raters alone (items with two or more ratings);
- ``alpha_humans_plus_model``: alpha of the humans with the model as one more rater;
- ``exact``: share of items where the model's label equals the consensus rounded to a level;
- ``macro_f1`` for labels (nominal) and ``mae`` (model vs consensus) for scales.

``pooled`` treats every (item, criterion) pair as one unit when all criteria share a level of
measurement, and is the mean of the per-criterion values otherwise.
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
    a = float(krippendorff.alpha(reliability_data=data, level_of_measurement=level))
    return None if math.isnan(a) else a


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
                        humans: Mapping[str, Sequence[Value]]) -> dict[str, Any]:
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
    return out


def agreement(spec: TaskSpec, preds: Mapping[str, Mapping[str, Value]],
              humans: Mapping[str, Sequence[Mapping[str, Value]]]) -> dict[str, Any]:
    """The full report: per criterion and pooled."""
    per = []
    for c in spec.criteria:
        p = {i: labels[c.name] for i, labels in preds.items() if c.name in labels}
        h = {i: [r[c.name] for r in rs if c.name in r] for i, rs in humans.items()}
        per.append(criterion_agreement(c, p, h))
    report: dict[str, Any] = {"spec": spec.name, "criteria": per, "pooled": _pooled(spec, preds, humans, per)}
    report["items_predicted"] = len(preds)
    report["items_with_humans"] = sum(1 for i in preds if humans.get(i))
    return report


def _pooled(spec: TaskSpec, preds: Mapping[str, Mapping[str, Value]],
            humans: Mapping[str, Sequence[Mapping[str, Value]]], per: list[dict[str, Any]]) -> dict[str, Any]:
    levels = {c.level for c in spec.criteria}
    keys = ("alpha", "alpha_humans", "alpha_humans_plus_model", "exact", "macro_f1", "mae")
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
    for c in spec.criteria:
        for i, labels in preds.items():
            rs = [r[c.name] for r in humans.get(i, []) if c.name in r]
            if c.name not in labels or not rs:
                continue
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
    return out
