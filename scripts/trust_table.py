"""The trust rule measured: per annotator, criterion and target, the share of labels it accepts and
how often the accepted ones disagree with the raters, over repeated random halvings of a full test
split (the rule fitted on one half, measured on the other), beside the promise.

    python scripts/trust_table.py \\
        --set EmoBank models/heads/emobank-300-head/annotator.gguf models/heads/emobank-300-head/test.jsonl \\
              models/data/emobank-test.jsonl \\
        --markdown docs/trust.md

Each --set is NAME MODEL PRED HUMAN: an annotator, annotate's output on a test split it did not
learn from, and that split's ratings (scripts/head_route.py writes such cells). A split is halved
--splits times by a seeded shuffle; in each, runtime/trust.py's rule is fitted on the first half
(as `annotate-cli trust` fits it) and the second half measures what it accepts. "over target"
counts the halvings whose measured rate on the accepted items exceeds the target: the rule
promises that the *true* rate does so with probability at most delta; the measured rate adds the
noise of a finite half on top.

The score intervals (rating scales) are measured the same way, in a second table (the section
<!-- begin intervals -->): fitted at --coverage on one half, the share of the other half's raters'
means inside their item's interval, and the intervals' mean width beside that of the plain split
conformal interval (one width for every item) fitted on the same half at the same coverage.

The label sets (labels) likewise, in a third table (<!-- begin sets -->): fitted at --coverage on
one half, the share of the other half's items whose set holds a label the raters chose most often,
the sets' mean size, and how often the set is the written label alone and how often that label
then agrees with the raters.
"""

from __future__ import annotations

import json
import random
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from edge_annotator.bench.markdown import write_section
from edge_annotator.runtime.gguf_meta import embedded_spec
from edge_annotator.runtime.labels import read_labelled
from edge_annotator.runtime.records import Prediction, read_predictions
from edge_annotator.runtime.spec import TaskSpec
from edge_annotator.runtime.trust import (
    disagrees,
    fit_interval,
    fit_rule,
    fit_set,
    held_out,
    held_out_scores,
    interval,
    interval_floor,
    label_set,
    majority_prob,
    rated,
    tolerance_of,
)

TARGETS = (0.05, 0.1, 0.2)


def read_set(model: Path, pred: Path, human: Path) -> tuple[TaskSpec, list[Prediction], dict[str, Any]]:
    """A set's spec (MODEL's own), predictions and ratings by item id, each file read once."""
    spec = embedded_spec(model)
    preds = read_predictions(pred, spec)
    ratings = {it.id: it.ratings for it in read_labelled(human, spec, strict=False).items if it.ratings}
    return spec, preds, ratings


def per_item(spec: TaskSpec, preds: list[Prediction], ratings: dict[str, Any]
             ) -> dict[str, tuple[float, list[tuple[str, float, bool]]]]:
    """Per criterion: its tolerance, and (id, confidence, disagrees) of every item with a prediction
    and ratings."""
    return {c.name: (tolerance_of(c), held_out(c, tolerance_of(c), preds, ratings)) for c in spec.criteria}


def per_item_scores(spec: TaskSpec, preds: list[Prediction], ratings: dict[str, Any]
                    ) -> dict[str, tuple[Any, list[tuple[str, float, float, float]], dict[str, dict[str, float]]]]:
    """Per rating criterion: the criterion, (id, score, spread, raters' mean) of every item with a
    prediction and ratings, and each item's probabilities."""
    return {c.name: (c, held_out_scores(c, preds, ratings), {p.id: p.probs.get(c.name, {}) for p in preds})
            for c in spec.criteria if c.is_numeric}


def halves(rows: list[Any], splits: int, seed: int) -> Iterator[tuple[list[Any], list[Any]]]:
    """SPLITS random halvings of ROWS (a seeded shuffle each): (the half a rule is fitted on, the half
    it is measured on)."""
    rng = random.Random(seed)
    for _ in range(splits):
        order = rows[:]
        rng.shuffle(order)
        yield order[: len(order) // 2], order[len(order) // 2:]


def interval_halvings(c: Any, rows: list[tuple[str, float, float, float]], probs: dict[str, dict[str, float]],
                      coverage: float, splits: int, seed: int) -> dict[str, Any]:
    covered, width, plain_covered, plain_width = [], [], [], []
    for cal, test in halves(rows, splits, seed):
        rule = fit_interval([r[1] for r in cal], [r[2] for r in cal], [r[3] for r in cal], coverage, interval_floor(c))
        spans = [interval(c, rule, r[1], probs[r[0]]) for r in test]
        covered.append(sum(lo <= r[3] <= hi for (lo, hi), r in zip(spans, test)) / len(test))
        width.append(statistics.fmean(hi - lo for lo, hi in spans))
        # one width for all: spreads of 0 and a floor of 1, so the ratio is |mean - score| itself
        one = fit_interval([r[1] for r in cal], [0.0] * len(cal), [r[3] for r in cal], coverage, 1.0)
        plain = [interval(c, one, r[1], {}) for r in test]
        plain_covered.append(sum(lo <= r[3] <= hi for (lo, hi), r in zip(plain, test)) / len(test))
        plain_width.append(statistics.fmean(hi - lo for lo, hi in plain))
    return {"items": len(rows), "coverage": coverage, "covered": statistics.fmean(covered),
            "covered_min": min(covered), "width": statistics.fmean(width),
            "plain_covered": statistics.fmean(plain_covered), "plain_width": statistics.fmean(plain_width),
            "scale_width": max(map(float, c.values)) - min(map(float, c.values)), "splits": splits}


def set_halvings(c: Any, rows: list[tuple[str, Prediction, list[Any]]], coverage: float, splits: int,
                 seed: int) -> dict[str, Any]:
    """ROWS: `rated`'s (id, prediction, ratings) of a label criterion."""
    covered, size, alone, alone_agree = [], [], [], []
    for cal, test in halves(rows, splits, seed):
        rule = fit_set([majority_prob(r, p.probs[c.name]) for _, p, r in cal], coverage)
        sets = [label_set(c, rule, p.labels[c.name], p.probs[c.name]) for _, p, _ in test]
        covered.append(sum(any(not disagrees(c, 0.0, m, None, r) for m in s) for s, (_, _, r) in zip(sets, test))
                       / len(test))
        size.append(statistics.fmean(len(s) for s in sets))
        ones = [(p, r) for (_, p, r), s in zip(test, sets) if len(s) == 1]
        alone.append(len(ones) / len(test))
        if ones:
            alone_agree.append(sum(not disagrees(c, 0.0, p.labels[c.name], None, r) for p, r in ones) / len(ones))
    return {"items": len(rows), "coverage": coverage, "covered": statistics.fmean(covered),
            "covered_min": min(covered), "size": statistics.fmean(size), "labels": len(c.scale),
            "alone": statistics.fmean(alone), "alone_agree": statistics.fmean(alone_agree) if alone_agree else None,
            "all_agree": sum(not disagrees(c, 0.0, p.labels[c.name], None, r) for _, p, r in rows) / len(rows),
            "splits": splits}


def set_table(results: list[dict[str, Any]]) -> str:
    if not results:
        return "No label criterion among the sets."
    r0 = results[0]
    lines = [f"Label sets fitted at {r0['coverage']:.0%} coverage on a random half of each full test split, measured "
             f"on the other half; {r0['splits']} halvings. The promise is about the mean over halvings (and new "
             f"items): a label the raters chose most often inside at least {r0['coverage']:.0%} of the sets.", "",
             "| annotator | criterion | items | majority label inside (mean; lowest halving) | mean size (of) | "
             "the written label alone | it agrees there | it agrees, all items |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        agree = f"{r['alone_agree']:.1%}" if r["alone_agree"] is not None else "-"
        lines.append(f"| {r['set']} | {r['criterion']} | {r['items'] // 2} + {r['items'] - r['items'] // 2} | "
                     f"{r['covered']:.1%}; {r['covered_min']:.1%} | {r['size']:.1f} ({r['labels']}) | "
                     f"{r['alone']:.1%} | {agree} | {r['all_agree']:.1%} |")
    return "\n".join(lines)


def interval_table(results: list[dict[str, Any]]) -> str:
    if not results:
        return "No rating scale among the sets."
    r0 = results[0]
    lines = [f"Intervals fitted at {r0['coverage']:.0%} coverage on a random half of each full test split, measured "
             f"on the other half; {r0['splits']} halvings. The promise is about the mean over halvings (and new "
             f"items): at least {r0['coverage']:.0%} of raters' means inside. Width in scale units; \"one width\" is "
             f"the plain split conformal interval, score -+ the same quantile of |mean - score| for every item.", "",
             "| annotator | criterion | items | raters' mean inside (mean; lowest halving) | mean width | one width: "
             "inside | one width: mean width | the scale |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['set']} | {r['criterion']} | {r['items'] // 2} + {r['items'] - r['items'] // 2} | "
                     f"{r['covered']:.1%}; {r['covered_min']:.1%} | {r['width']:.2f} | {r['plain_covered']:.1%} | "
                     f"{r['plain_width']:.2f} | {r['scale_width']:g} |")
    return "\n".join(lines)


def halvings(rows: list[tuple[str, float, bool]], target: float, delta: float, splits: int, seed: int,
             tolerance: float) -> dict[str, Any]:
    share, rate, over, safe = [], [], 0, 0
    for cal, test in halves(rows, splits, seed):
        rule = fit_rule([c for _, c, _ in cal], [w for _, _, w in cal], target, delta, tolerance)
        t = rule["threshold"]
        acc = [w for _, c, w in test if t is not None and c >= t]
        share.append(len(acc) / len(test))
        if acc:
            safe += 1
            rate.append(sum(acc) / len(acc))
            over += sum(acc) / len(acc) > target
    return {"items": len(rows), "accepted_share": statistics.fmean(share),
            "disagreement": statistics.fmean(rate) if rate else None, "over_target": over, "accepting": safe,
            "splits": splits, "all_disagreement": sum(w for _, _, w in rows) / len(rows)}


def table(results: list[dict[str, Any]], delta: float, splits: int) -> str:
    lines = [f"Rule fitted on a random half of each full test split, measured on the other half; {splits} "
             f"halvings, delta {delta} (the promise: the true rate among accepted labels is at most the target, "
             f"with probability {1 - delta:.0%}).", "",
             "| annotator | criterion | items | disagreement, all labels | target | accepted (mean) | "
             "disagreement among accepted (mean) | halvings accepting | halvings over target |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        rate = f"{r['disagreement']:.3f}" if r["disagreement"] is not None else "-"
        lines.append(f"| {r['set']} | {r['criterion']} | {r['items'] // 2} + {r['items'] - r['items'] // 2} | "
                     f"{r['all_disagreement']:.3f} | {r['target']:.0%} | {r['accepted_share']:.1%} | {rate} | "
                     f"{r['accepting']} | {r['over_target']} ({r['over_target'] / r['splits']:.0%}) |")
    return "\n".join(lines)


@click.command()
@click.option("--set", "sets", nargs=4, multiple=True, required=True, metavar="NAME MODEL PRED HUMAN",
              help="An annotator, its predictions on a test split it did not learn from, the split's ratings.")
@click.option("--delta", type=float, default=0.1, show_default=True)
@click.option("--splits", type=click.IntRange(20), default=50, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--coverage", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.9,
              show_default=True, help="The score intervals' coverage.")
@click.option("--intervals-only", is_flag=True, help="Only the score intervals' and label sets' tables (and sections).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write every figure here.")
@click.option("--markdown", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Rewrite the table's section (<!-- begin trust -->) of this page.")
def main(sets: tuple[tuple[str, str, str, str], ...], delta: float, splits: int, seed: int, coverage: float,
         intervals_only: bool, json_out: Path | None, markdown: Path | None) -> None:
    """Measure the trust rule on annotators' test-split predictions (see the module's docstring).

    \b
    Examples:
      python scripts/trust_table.py --set EmoBank M.gguf pred.jsonl models/data/emobank-test.jsonl
      python scripts/trust_table.py --set ConvAbuse M.gguf pred.jsonl test.jsonl --splits 100 --markdown docs/trust.md
    """
    read = [(name, read_set(Path(model), Path(pred), Path(human))) for name, model, pred, human in sets]
    results = []
    for name, loaded in [] if intervals_only else read:
        for crit, (tol, rows) in per_item(*loaded).items():
            for target in TARGETS:
                results.append({"set": name, "criterion": crit, "target": target,
                                **halvings(rows, target, delta, splits, seed, tol)})
                r = results[-1]
                click.echo(f"{name} {crit} target {target:.0%}: accepted {r['accepted_share']:.1%}, over target "
                           f"{r['over_target']}/{splits}", err=True)
    spans = []
    for name, loaded in read:
        for crit, (c, scored, probs) in per_item_scores(*loaded).items():
            spans.append({"set": name, "criterion": crit,
                          **interval_halvings(c, scored, probs, coverage, splits, seed)})
            r = spans[-1]
            click.echo(f"{name} {crit} intervals at {coverage:.0%}: inside {r['covered']:.1%}, width {r['width']:.2f} "
                       f"(one width: {r['plain_width']:.2f})", err=True)
    label_sets = []
    for name, (spec, preds, ratings) in read:
        for c in spec.criteria:
            if not c.is_numeric:
                label_sets.append({"set": name, "criterion": c.name,
                                   **set_halvings(c, rated(c, preds, ratings), coverage, splits, seed)})
                r = label_sets[-1]
                click.echo(f"{name} {c.name} label sets at {coverage:.0%}: inside {r['covered']:.1%}, mean size "
                           f"{r['size']:.1f}", err=True)
    text, spans_text, sets_text = table(results, delta, splits), interval_table(spans), set_table(label_sets)
    click.echo((spans_text if intervals_only else text + "\n\n" + spans_text) + "\n\n" + sets_text)
    if json_out:
        json_out.write_text(json.dumps({"rules": results, "intervals": spans, "sets": label_sets}, indent=1))
    if markdown:
        if not intervals_only:
            write_section(markdown, "trust", text, "# Which labels to trust")
        if spans:
            write_section(markdown, "intervals", spans_text, "# Which labels to trust")
        if label_sets:
            write_section(markdown, "sets", sets_text, "# Which labels to trust")


if __name__ == "__main__":
    main()
