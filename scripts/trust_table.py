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
"""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path
from typing import Any

import click

from edge_annotator.bench.markdown import write_section
from edge_annotator.runtime.gguf_meta import embedded_spec
from edge_annotator.runtime.labels import read_labelled
from edge_annotator.runtime.records import read_predictions
from edge_annotator.runtime.trust import fit_rule, held_out, tolerance_of

TARGETS = (0.05, 0.1, 0.2)


def per_item(model: Path, pred: Path, human: Path) -> dict[str, tuple[float, list[tuple[str, float, bool]]]]:
    """Per criterion: its tolerance, and (id, confidence, disagrees) of every item with a prediction
    and ratings."""
    spec = embedded_spec(model)
    preds = read_predictions(pred, spec)
    ratings = {it.id: it.ratings for it in read_labelled(human, spec, strict=False).items if it.ratings}
    return {c.name: (tolerance_of(c), held_out(c, tolerance_of(c), preds, ratings)) for c in spec.criteria}


def halvings(rows: list[tuple[str, float, bool]], target: float, delta: float, splits: int, seed: int,
             tolerance: float) -> dict[str, Any]:
    rng = random.Random(seed)
    share, rate, over, safe = [], [], 0, 0
    for _ in range(splits):
        order = rows[:]
        rng.shuffle(order)
        cal, test = order[: len(order) // 2], order[len(order) // 2:]
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
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write every figure here.")
@click.option("--markdown", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Rewrite the table's section (<!-- begin trust -->) of this page.")
def main(sets: tuple[tuple[str, str, str, str], ...], delta: float, splits: int, seed: int, json_out: Path | None,
         markdown: Path | None) -> None:
    """Measure the trust rule on annotators' test-split predictions (see the module's docstring).

    \b
    Examples:
      python scripts/trust_table.py --set EmoBank M.gguf pred.jsonl models/data/emobank-test.jsonl
      python scripts/trust_table.py --set ConvAbuse M.gguf pred.jsonl test.jsonl --splits 100 --markdown docs/trust.md
    """
    results = []
    for name, model, pred, human in sets:
        for crit, (tol, rows) in per_item(Path(model), Path(pred), Path(human)).items():
            for target in TARGETS:
                results.append({"set": name, "criterion": crit, "target": target,
                                **halvings(rows, target, delta, splits, seed, tol)})
                r = results[-1]
                click.echo(f"{name} {crit} target {target:.0%}: accepted {r['accepted_share']:.1%}, over target "
                           f"{r['over_target']}/{splits}", err=True)
    text = table(results, delta, splits)
    click.echo(text)
    if json_out:
        json_out.write_text(json.dumps(results, indent=1))
    if markdown:
        write_section(markdown, "trust", text, "# Which labels to trust")


if __name__ == "__main__":
    main()
