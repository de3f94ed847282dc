"""Which items an expert should rate next, and which human labels to look at again.

    picks = rank(preds, spec, "entropy", n=100, exclude=labelled_ids)
    review = suspects(preds, read_human("labels.jsonl", spec), spec, n=50)

The annotator's per-level probabilities (annotate's `probs`) say where it is unsure:

- `entropy`: the label distribution's entropy, over log(levels) so that 1 is uniform.
- `margin`: 1 minus the gap between the two likeliest levels (1: a tie).
- `spread`: on a rating scale, the predicted distribution's standard deviation over half the
  scale's range (1: all mass split between the two ends); on a label set, the entropy.
- `random`: a seeded hash of the id, the baseline any other strategy has to beat.

An item's value is the mean over the chosen criteria. Items are ordered by value, ties by id, so
the same predictions always give the same picks. `diverse` skips an item whose words overlap an
item already picked by at least that Jaccard share (near-duplicates use one expert rating).

`suspects` turns it round: items a human has rated where the model, confident, says otherwise.
The distance is the model's probability off the human consensus label (label sets), or its
expected distance from the human consensus over the scale's range (rating scales); an item counts
by its most contradicted criterion.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import UserError
from .metrics import consensus, nearest_level
from .records import Prediction
from .spec import Criterion, TaskSpec

STRATEGIES = ("entropy", "margin", "spread", "random")


@dataclass(frozen=True)
class Pick:
    id: str
    rank: int
    value: float
    criteria: dict[str, float]
    """Per criterion: its value (uncertainty, or for suspects the contradiction)."""
    detail: dict[str, Any] | None = None
    """suspects: the criterion, the human consensus, the model's label and its probability."""

    def record(self, strategy: str) -> dict[str, Any]:
        rec: dict[str, Any] = {"id": self.id, "rank": self.rank, "strategy": strategy, "value": round(self.value, 6),
                               "criteria": {k: round(v, 6) for k, v in self.criteria.items()}}
        return rec | (self.detail or {})


def _probs(p: Prediction, c: Criterion) -> list[float]:
    got = p.probs.get(c.name, {})
    ps = [max(float(got.get(str(v), 0.0)), 0.0) for v in c.values]
    total = sum(ps)
    return [x / total for x in ps] if total > 0 else [1.0 / len(ps)] * len(ps)


def _entropy(ps: Sequence[float]) -> float:
    return -sum(x * math.log(x) for x in ps if x > 0) / math.log(len(ps)) if len(ps) > 1 else 0.0


def _margin(ps: Sequence[float]) -> float:
    top = sorted(ps, reverse=True) + [0.0]
    return 1.0 - (top[0] - top[1])


def _spread(c: Criterion, ps: Sequence[float]) -> float:
    if not c.is_numeric:
        return _entropy(ps)
    xs = [float(v) for v in c.values]
    mean = sum(p * x for p, x in zip(ps, xs))
    sd = math.sqrt(max(sum(p * (x - mean) ** 2 for p, x in zip(ps, xs)), 0.0))
    half = (max(xs) - min(xs)) / 2
    return sd / half if half > 0 else 0.0


def _random(item_id: str, seed: int) -> float:
    h = hashlib.sha256(f"{seed}:{item_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2 ** 64


def uncertainty(p: Prediction, criteria: Sequence[Criterion], strategy: str, seed: int = 0) -> dict[str, float]:
    """Per criterion: how unsure the prediction is by STRATEGY (higher: ask a human sooner)."""
    if strategy not in STRATEGIES:
        raise UserError(f"strategy '{strategy}': choose one of {', '.join(STRATEGIES)}")
    out = {}
    for c in criteria:
        ps = _probs(p, c)
        out[c.name] = (_entropy(ps) if strategy == "entropy" else _margin(ps) if strategy == "margin"
                       else _spread(c, ps) if strategy == "spread" else _random(p.id, seed))
    return out


def _words(fields: Mapping[str, str]) -> set[str]:
    return set(re.findall(r"\w+", " ".join(fields.values()).lower()))


def _jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def _criteria(spec: TaskSpec, names: Sequence[str] | None) -> list[Criterion]:
    if not names:
        return list(spec.criteria)
    by = {c.name: c for c in spec.criteria}
    unknown = [n for n in names if n not in by]
    if unknown:
        raise UserError(f"criterion {', '.join(unknown)} is not in spec '{spec.name}' "
                         f"(it has {', '.join(by)})")
    return [by[n] for n in names]


def _ordered(scored: Iterable[tuple[str, float, dict[str, float], dict[str, Any] | None]], n: int,
             inputs: Mapping[str, Mapping[str, str]] | None, diverse: float | None) -> list[Pick]:
    picks: list[Pick] = []
    kept: list[set[str]] = []
    for item_id, value, per, detail in sorted(scored, key=lambda t: (-t[1], t[0])):
        if len(picks) >= n:
            break
        if diverse is not None and inputs is not None:
            words = _words(inputs.get(item_id, {}))
            if any(_jaccard(words, w) >= diverse for w in kept):
                continue
            kept.append(words)
        picks.append(Pick(item_id, len(picks) + 1, value, per, detail))
    return picks


def rank(preds: Sequence[Prediction], spec: TaskSpec, strategy: str, n: int, *,
         criteria: Sequence[str] | None = None, exclude: Iterable[str] = (), seed: int = 0,
         inputs: Mapping[str, Mapping[str, str]] | None = None, diverse: float | None = None,
         unaccepted: bool = False) -> list[Pick]:
    """The N result records (error records and EXCLUDE's ids left out) an expert should rate next,
    most uncertain first. `diverse` (a Jaccard share in (0, 1]) needs `inputs`, the items' fields.
    `unaccepted`: only items with a criterion whose label the trust rule did not accept (annotate's
    `accept`; a criterion without a rule is never accepted): what goes to the experts."""
    if diverse is not None and inputs is None:
        raise UserError("diverse picks compare the items' texts: give the items file (--items)")
    cs, skip = _criteria(spec, criteria), set(exclude)
    if unaccepted and not any(p.accept for p in preds if p.error is None):
        raise UserError("the predictions carry no 'accept' marks: annotate with an annotator that holds a trust "
                        "rule (annotate-cli trust)")
    scored = []
    for p in preds:
        if unaccepted and all(p.accepted(c.name) for c in cs):
            continue
        if p.error is None and p.id not in skip:
            per = uncertainty(p, cs, strategy, seed)
            scored.append((p.id, sum(per.values()) / len(per), per, None))
    return _ordered(scored, n, inputs, diverse)


def _contradiction(c: Criterion, ps: Sequence[float], human: Any) -> float:
    if not c.is_numeric:
        return 1.0 - ps[c.values.index(human)] if human in c.values else 1.0
    xs = [float(v) for v in c.values]
    span = max(xs) - min(xs)
    return sum(q * abs(x - float(human)) for q, x in zip(ps, xs)) / span if span > 0 else 0.0


def suspects(preds: Sequence[Prediction], humans: Mapping[str, Sequence[Mapping[str, Any]]], spec: TaskSpec,
             n: int, *, criteria: Sequence[str] | None = None) -> list[Pick]:
    """The N items whose human consensus the model contradicts most confidently (items without a
    human rating, and error records, left out)."""
    cs = _criteria(spec, criteria)
    scored = []
    for p in preds:
        ratings = humans.get(p.id)
        if p.error is not None or not ratings:
            continue
        per: dict[str, float] = {}
        said: dict[str, Any] = {}
        for c in cs:
            vals = [r[c.name] for r in ratings if c.name in r]
            if not vals:
                continue
            h, ps = consensus(c, vals), _probs(p, c)
            level = nearest_level(c, h)
            per[c.name] = _contradiction(c, ps, h)
            said[c.name] = {"human": h, "human_level": level, "model": p.labels.get(c.name),
                            "model_prob_of_human_level": round(ps[c.values.index(level)], 6)  # type: ignore[arg-type]
                            if level in c.values else 0.0, "raters": len(vals)}
        if per:
            worst = max(per, key=lambda k: (per[k], k))
            scored.append((p.id, per[worst], per, {"criterion": worst, **said[worst]}))
    return _ordered(scored, n, None, None)
