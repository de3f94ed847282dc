"""Which labels to trust without review: a rule per criterion, fitted on held-out items, that
accepts a label only where the annotator is confident enough, with a stated bound on how often the
accepted labels disagree with the experts.

What is controlled. For a criterion, each labelled item gets a confidence c (below) and a verdict:
it *disagrees* when its label is not one the raters chose most often (labels), or when its score is
further than `tolerance` from the raters' mean (rating scales; default half a scale step). A
threshold t accepts the items with c >= t. The rule picks t so that, with probability at least
1 - delta over the draw of the held-out items, the disagreement rate among accepted items of the
same kind is at most `target`:

    P( P(disagree | c >= t) <= target ) >= 1 - delta

How: Learn then Test (Angelopoulos, Bates, Candes, Jordan, Lei, 2021) over a grid of K thresholds
fixed before any data is seen (GRID). For each t, the n accepted held-out items and their k
disagreements give the exact binomial p-value of "the rate exceeds target",
P(Binomial(n, target) <= k): given how many are accepted, the accepted items are an i.i.d. sample
of accepted items, so this holds without any model of the confidences. The thresholds are tested
strictest first by the fallback procedure (Wiens, 2003): each at delta / K, plus the level of the
one before it where that one was shown safe; all K together hold with probability 1 - delta
(family-wise), and the rule takes the safe t that accepts the most. Not the plain fixed sequence
LTT also allows: the strictest thresholds accept a handful of items, can never be shown safe, and
would stop it before it reached the useful ones; the fallback passes them by and still gives a run
of safe thresholds more level than Bonferroni's delta / K each.
Nothing here assumes the confidences are calibrated; a better-ranked confidence only accepts more.

The confidence: for labels, the chosen label's probability; for rating scales, the probability the
model puts on levels within `tolerance` of its score (how much of its belief lies where it would
count as agreeing).

Where it cannot promise (too few held-out items, or an annotator that disagrees too often
everywhere), the rule accepts nothing and says so: the best bound it can state, and about how many
held-out items at the observed rate would reach the target.

    rule = fit_rule(confidences, disagrees, target=0.1, delta=0.1)
    accepted = accepts(rule, confidence(criterion, rule["tolerance"], label, score, probs))

Score intervals (rating scales). Beside the accept mark, the rule holds a split conformal interval
(Vovk et al.; Lei et al., 2018) for the raters' mean: on the same held-out items, the residual
|mean - score| divided by the annotator's own spread (the standard deviation of its probabilities
over the levels, plus a floor of a quarter step), and q the ceil((n + 1) * coverage)-th smallest of
those n ratios. A new item's interval is score -+ q * (spread + floor), cut to the scale. For an
item exchangeable with the held-out ones it holds the raters' mean with probability at least
`coverage` (at most coverage + 1 / (n + 1) without ties), whatever the model; the spread only
decides where the interval is wide, so an annotator unsure of an item gets a wider one. With too
few items for the coverage (ceil((n + 1) * coverage) > n), q is null and the interval the whole
scale, which is all that can be promised.

    rule |= fit_interval(scores, spreads, means, coverage=0.9)
    lo, hi = interval(criterion, rule, score, probs)

Label sets (labels). The same promise for a label criterion: a split conformal prediction set (Vovk
et al.; the least ambiguous set-valued classifier of Sadinle, Lei and Wasserman, 2019) that holds a
label the raters chose most often. On the held-out items, the nonconformity is 1 - the probability
the annotator gave the likeliest of those majority labels (ties between raters: the best of them
counts, as `disagrees` counts any of them as agreeing), and q the ceil((n + 1) * coverage)-th
smallest. A new item's set is every label whose probability is at least 1 - q, and always the
label written: for an item exchangeable with the held-out ones it holds a majority label with
probability at least `coverage`. One label where the annotator is sure, several where it is torn
between them; too few items for the coverage, and the set is every label.

    rule |= fit_set(top_probs, coverage=0.9)
    members = label_set(criterion, rule, label, probs)
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .records import Prediction
    from .spec import Criterion

GRID: tuple[float, ...] = (0.99, 0.98, 0.97, 0.96, 0.95, 0.94, 0.93, 0.92, 0.91, 0.9, 0.88, 0.86, 0.84, 0.82,
                           0.8, 0.775, 0.75, 0.725, 0.7, 0.675, 0.65, 0.625, 0.6, 0.575, 0.55, 0.525, 0.5,
                           0.45, 0.4, 0.35, 0.3, 0.25, 0.2, 0.1, 0.0)
"""The thresholds tested, strictest first; 0.0 accepts every item. Fixed, so the guarantee holds."""
METHOD = "learn-then-test: fallback procedure over a fixed grid of thresholds, exact binomial p-values"


def tolerance_of(c: Criterion, given: float | None = None) -> float:
    """How far a score may be from the raters' mean and still agree: GIVEN, else half the smallest
    step between two levels of the scale (0 for labels: only the same label agrees)."""
    if given is not None:
        return float(given)
    if not c.is_numeric:
        return 0.0
    values = [float(v) for v in c.values]
    steps = [b - a for a, b in zip(values, values[1:]) if b > a]
    return min(steps) / 2 if steps else 0.5


def confidence(c: Criterion, tolerance: float, label: Any, score: float | None,
               probs: Mapping[str, float]) -> float:
    """How sure the annotator is of this criterion's label: the chosen label's probability (labels),
    or the probability on levels within TOLERANCE of the score (rating scales)."""
    if not c.is_numeric or score is None:
        return float(probs.get(str(label), 0.0))
    return float(sum(p for v, p in probs.items() if abs(float(v) - score) <= tolerance + 1e-12))


def disagrees(c: Criterion, tolerance: float, label: Any, score: float | None, ratings: Sequence[Any]) -> bool:
    """Whether a prediction disagrees with the raters: a label none of the most frequent human labels
    (labels), or a score further than TOLERANCE from their mean (rating scales)."""
    if not c.is_numeric or score is None:
        return str(label) not in most_frequent(ratings)
    mean = sum(float(r) for r in ratings) / len(ratings)
    return abs(score - mean) > tolerance + 1e-12


def most_frequent(ratings: Sequence[Any]) -> set[str]:
    """The labels (as text) the raters chose most often: several where they tie."""
    counts = Counter(str(r) for r in ratings)
    top = max(counts.values())
    return {k for k, n in counts.items() if n == top}


def conformal_quantile(scores: Sequence[float], coverage: float) -> float | None:
    """Split conformal's threshold: the ceil((n + 1) * COVERAGE)-th smallest of the n held-out
    SCORES; None where n is too few for COVERAGE (see conformal_items_needed)."""
    if not 0 < coverage < 1:
        raise ValueError(f"coverage {coverage} must lie strictly between 0 and 1")
    ranked = sorted(scores)
    k = math.ceil((len(ranked) + 1) * coverage - 1e-9)
    return ranked[k - 1] if k <= len(ranked) else None


def conformal_items_needed(coverage: float) -> int:
    """The fewest held-out items for which conformal_quantile is not None at COVERAGE."""
    return math.ceil(coverage / (1 - coverage) - 1e-9)


def rated(c: Criterion, preds: Sequence[Prediction], ratings: Mapping[str, Sequence[Mapping[str, Any]]]
          ) -> list[tuple[str, Prediction, list[Any]]]:
    """(id, prediction, the human ratings for C) of every item that has a prediction and a rating for
    C, in id order, so what is fitted on them does not depend on the files' order."""
    by_id = {p.id: p for p in preds if p.error is None}
    rows = []
    for item_id in sorted(set(by_id) & set(ratings)):
        got = [r[c.name] for r in ratings[item_id] if r.get(c.name) is not None]
        if got:
            rows.append((item_id, by_id[item_id], got))
    return rows


def held_out(c: Criterion, tolerance: float, preds: Sequence[Prediction],
             ratings: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[tuple[str, float, bool]]:
    """(id, confidence, disagrees) of every item that has a prediction and a human rating for C, in
    id order (`rated`)."""
    rows = []
    for item_id, p, got in rated(c, preds, ratings):
        label, score = p.labels[c.name], p.scores.get(c.name)
        rows.append((item_id, confidence(c, tolerance, label, score, p.probs.get(c.name, {})),
                     disagrees(c, tolerance, label, score, got)))
    return rows


INTERVAL_METHOD = "split conformal: |raters' mean - score| / (the annotator's spread over the levels + floor)"


def spread(probs: Mapping[str, float]) -> float:
    """The standard deviation of a rating scale's level values under PROBS (as a record writes
    them, keyed by the level's text): how unsure the annotator is of the score."""
    ps = [(float(v), float(p)) for v, p in probs.items()]
    total = sum(p for _, p in ps)
    if total <= 0:
        return 0.0
    mean = sum(v * p for v, p in ps) / total
    return math.sqrt(max(0.0, sum(p * (v - mean) ** 2 for v, p in ps) / total))


def interval_floor(c: Criterion) -> float:
    """Added to every spread, so that a sure but wrong prediction does not make the ratio, and so
    every interval, unbounded: a quarter of the scale's smallest step (half the default tolerance)."""
    return tolerance_of(c) / 2


def fit_interval(scores: Sequence[float], spreads: Sequence[float], means: Sequence[float], coverage: float,
                 floor: float) -> dict[str, Any]:
    """The rule's interval keys for one rating criterion, from its held-out items' written scores,
    spreads and raters' means: q, the ceil((n + 1) * COVERAGE)-th smallest |mean - score| /
    (spread + FLOOR); None where there are too few items for COVERAGE."""
    if not len(scores) == len(spreads) == len(means):
        raise ValueError("one spread and one mean per score")
    q = conformal_quantile([abs(m - s) / (d + floor) for s, d, m in zip(scores, spreads, means)], coverage)
    return {"interval_method": INTERVAL_METHOD, "coverage": coverage, "interval_floor": round(floor, 6),
            "interval_q": None if q is None else math.ceil(q * 1e6) / 1e6,
            "interval_items_needed": conformal_items_needed(coverage)}


def interval(c: Criterion, rule: Mapping[str, Any], score: float, probs: Mapping[str, float]) -> tuple[float, float]:
    """The score interval RULE gives this prediction (the written score and probabilities): score
    -+ q * (spread + floor), cut to the scale, rounded outwards to six digits; the whole scale where
    q is null (too few held-out items to promise the coverage)."""
    values = [float(v) for v in c.values]
    lo_end, hi_end = min(values), max(values)
    q = rule.get("interval_q")
    if q is None:
        return lo_end, hi_end
    half = float(q) * (spread(probs) + float(rule["interval_floor"]))
    lo, hi = max(lo_end, score - half), min(hi_end, score + half)
    return math.floor(lo * 1e6) / 1e6, math.ceil(hi * 1e6) / 1e6


SET_METHOD = "split conformal: 1 - the probability of the likeliest label the raters chose most often"


def majority_prob(ratings: Sequence[Any], probs: Mapping[str, float]) -> float:
    """The probability PROBS (as a record writes them, keyed by the label's text) gives the likeliest
    of the labels the raters chose most often."""
    return max(float(probs.get(k, 0.0)) for k in most_frequent(ratings))


def fit_set(top_probs: Sequence[float], coverage: float) -> dict[str, Any]:
    """The rule's label-set keys for one label criterion, from its held-out items' `majority_prob`:
    set_q, the ceil((n + 1) * COVERAGE)-th smallest 1 - p, rounded up to six digits; None where there
    are too few items for COVERAGE."""
    q = conformal_quantile([1.0 - float(p) for p in top_probs], coverage)
    return {"set_method": SET_METHOD, "coverage": coverage,
            "set_q": None if q is None else min(1.0, math.ceil(q * 1e6) / 1e6),
            "set_items_needed": conformal_items_needed(coverage)}


def label_set(c: Criterion, rule: Mapping[str, Any], label: Any, probs: Mapping[str, float]) -> tuple[Any, ...]:
    """The labels RULE's set holds for this prediction (the written label and probabilities), most
    probable first (ties in the spec's order): those with 1 - p <= set_q, and LABEL always; every
    label where set_q is null (too few held-out items to promise the coverage)."""
    q = rule.get("set_q")
    p = [float(probs.get(str(lv.value), 0.0)) for lv in c.scale]
    order = sorted(range(len(c.scale)), key=lambda i: -p[i])
    return tuple(c.scale[i].value for i in order
                 if q is None or 1.0 - p[i] <= float(q) + 1e-12 or str(c.scale[i].value) == str(label))


def held_out_sets(c: Criterion, preds: Sequence[Prediction], ratings: Mapping[str, Sequence[Mapping[str, Any]]]
                  ) -> list[tuple[str, float]]:
    """(id, `majority_prob`) of every item with a prediction and a human rating for the label
    criterion C, in id order (`rated`): what fit_set takes."""
    return [(item_id, majority_prob(got, p.probs.get(c.name, {}))) for item_id, p, got in rated(c, preds, ratings)]


def held_out_scores(c: Criterion, preds: Sequence[Prediction], ratings: Mapping[str, Sequence[Mapping[str, Any]]]
                    ) -> list[tuple[str, float, float, float]]:
    """(id, written score, spread, raters' mean) of every item with a prediction and a human rating
    for the rating criterion C, in id order (`rated`): what fit_interval takes."""
    rows = []
    for item_id, p, got in rated(c, preds, ratings):
        score = p.scores.get(c.name)
        if score is not None:
            rows.append((item_id, score, spread(p.probs.get(c.name, {})), sum(float(r) for r in got) / len(got)))
    return rows


def binom_cdf(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) <= k), summed exactly in log space."""
    if k >= n:
        return 1.0
    if k < 0:
        return 0.0
    if p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    lp, lq = math.log(p), math.log1p(-p)
    i = np.arange(1, k + 1, dtype=np.float64)
    # log P(X = i) for i = 0..k, each from the one before: P(i) = P(i-1) (n-i+1)/i p/(1-p)
    terms = n * lq + np.concatenate(([0.0], np.cumsum(np.log((n - i + 1) / i) + (lp - lq))))
    top = float(terms.max())
    return min(1.0, math.exp(top) * float(np.exp(terms - top).sum()))


def upper_bound(k: int, n: int, level: float) -> float:
    """The smallest rate r with P(Binomial(n, r) <= k) <= LEVEL: a one-sided (1 - LEVEL) upper
    confidence bound on the rate behind k of n (Clopper-Pearson); 1.0 for n = 0."""
    if n == 0 or k >= n:
        return 1.0
    lo, hi = k / n, 1.0
    for _ in range(45):  # to within 3e-14
        mid = (lo + hi) / 2
        if binom_cdf(k, n, mid) > level:
            lo = mid
        else:
            hi = mid
    return hi


def items_needed(rate: float, target: float, level: float, limit: int = 1_000_000) -> int | None:
    """About how many accepted held-out items at RATE disagreeing would show a rate below TARGET at
    LEVEL; None where RATE is not below TARGET, or more than LIMIT would be needed. Doubling, then
    halving the last step down to 1%: "about", since the disagreeing count is a whole number and
    the test passes and fails by turns near the answer."""
    if rate >= target:
        return None

    def enough(n: int) -> bool:
        return binom_cdf(int(math.floor(rate * n)), n, target) <= level

    lo, hi = 0, 1  # lo falls short (or is 0), hi is enough once the doubling stops: then narrow
    while not enough(hi):
        if hi >= limit:
            return None
        lo, hi = hi, min(2 * hi, limit)
    while hi - lo > max(1, hi // 100):
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if enough(mid) else (mid, hi)
    return hi


def fit_rule(conf: Sequence[float], wrong: Sequence[bool], target: float, delta: float, tolerance: float,
             item_ids: Sequence[str] = ()) -> dict[str, Any]:
    """The rule for one criterion from its held-out items' confidences and disagreements: the
    threshold that accepts the most items among those shown safe at TARGET with confidence
    1 - DELTA (None: none is), and what it rests on. Deterministic: the same items give the same
    rule, byte for byte."""
    if not 0 < target < 1 or not 0 < delta < 1:
        raise ValueError(f"target {target} and delta {delta} must lie strictly between 0 and 1")
    if len(conf) != len(wrong):
        raise ValueError("one disagreement per confidence")
    level = delta / len(GRID)
    # accepted and disagreeing counts at every threshold, from the items sorted by confidence
    order = sorted(range(len(conf)), key=lambda i: -conf[i])
    ranked = [-conf[i] for i in order]
    wrong_before = [0]
    for i in order:
        wrong_before.append(wrong_before[-1] + bool(wrong[i]))
    counts = []
    for t in GRID:
        n = bisect.bisect_right(ranked, -t)  # items with confidence >= t
        counts.append((t, n, wrong_before[n]))
    best: tuple[float, int, int, float] | None = None
    carried = 0.0
    for t, n, k in counts:  # the fallback procedure: a threshold shown safe hands its level on to the next
        if n and binom_cdf(k, n, target) <= level + carried:
            best, carried = (t, n, k, level + carried), level + carried  # strictest first: a later t accepts more
        else:
            carried = 0.0
    ids = hashlib.sha256("\n".join(sorted(map(str, item_ids))).encode()).hexdigest()
    rule: dict[str, Any] = {"method": METHOD, "target": target, "delta": delta, "tolerance": round(tolerance, 6),
                            "items": len(conf), "items_sha256": ids}
    if best is not None:
        t, n, k, tested = best  # the bound at the level its test had: at most the target
        return rule | {"threshold": t, "accepted": n, "disagree": k, "bound": round(upper_bound(k, n, tested), 6)}
    # nothing is safe: the best that can be said, at the threshold with the lowest bound (a bound is
    # at least k / n, so a threshold whose rate is already above the best bound so far is passed by)
    bound, t, n, k = 1.0, GRID[-1], counts[-1][1], counts[-1][2]
    for t_, n_, k_ in counts:
        if n_ and k_ / n_ < bound and (b_ := upper_bound(k_, n_, level)) < bound:
            bound, t, n, k = b_, t_, n_, k_
    return rule | {"threshold": None, "accepted": 0, "disagree": 0, "bound": round(bound, 6),
                   "best_threshold": t, "best_accepted": n, "best_disagree": k,
                   "items_needed": items_needed(k / n, target, level) if n else None}


def accepts(rule: Mapping[str, Any] | None, conf: float) -> bool:
    """Whether RULE accepts a label of this confidence (no rule, or a rule that could promise
    nothing: never)."""
    if not rule or rule.get("threshold") is None:
        return False
    return conf >= float(rule["threshold"])


def describe(name: str, rule: Mapping[str, Any]) -> str:
    """describe_accept, and the interval (rating scales) or label set (labels) the rule gives."""
    line = describe_accept(name, rule)
    if "coverage" not in rule:
        return line
    if "set_method" in rule:
        if rule.get("set_q") is None:
            return line + (f"; label sets: too few held-out items for {rule['coverage']:.0%} coverage (at least "
                           f"{rule['set_items_needed']}), so each holds every label")
        return line + (f"; {rule['coverage']:.0%} label sets: every label of probability >= "
                       f"{1 - rule['set_q']:.3g}, and the one written")
    if rule.get("interval_q") is None:
        return line + (f"; score intervals: too few held-out items for {rule['coverage']:.0%} coverage (at least "
                       f"{rule['interval_items_needed']}), so each is the whole scale")
    return line + (f"; {rule['coverage']:.0%} score intervals: score -+ {rule['interval_q']:.3g} x (spread + "
                   f"{rule['interval_floor']:g})")


def describe_accept(name: str, rule: Mapping[str, Any]) -> str:
    """One line a user reads: what the rule accepts and what it promises, or why it promises nothing."""
    head = (f"{name}: at most {rule['target']:.0%} disagreement among accepted labels "
            f"(confidence {1 - rule['delta']:.0%}, tolerance {rule['tolerance']:g}), "
            f"from {rule['items']} held-out items: ")
    if rule.get("threshold") is not None:
        return head + (f"accept confidence >= {rule['threshold']:g}: {rule['accepted']} of {rule['items']} "
                       f"({rule['accepted'] / max(rule['items'], 1):.0%}) accepted, {rule['disagree']} of them "
                       f"disagree, bound {rule['bound']:.3f}")
    need = rule.get("items_needed")
    more = (f"at its observed rate, about {need} accepted held-out items would reach the target" if need else
            "its disagreement rate is at or above the target at every threshold")
    return head + (f"nothing is accepted: the lowest bound is {rule['bound']:.3f} (confidence >= "
                   f"{rule.get('best_threshold')}, {rule.get('best_accepted')} items, {rule.get('best_disagree')} "
                   f"disagree); {more}")
