"""`annotate-cli trust`: fit the trust rule (runtime/trust.py) on held-out items and write it into
the annotator.

    annotate-cli annotate support.gguf heldout.jsonl -o heldout-pred.jsonl
    annotate-cli trust support.gguf heldout-pred.jsonl heldout-ratings.csv --target 0.1 -o support-trust.gguf
    annotate-cli annotate support-trust.gguf new.jsonl -o new-pred.jsonl    # records carry "accept"
    annotate-cli select new-pred.jsonl --unaccepted -n 500 --as items -o to-review.jsonl

The held-out items must be ones the annotator did not learn from (fit's test split, or items rated
since): the guarantee is about items like them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from edge_annotator.runtime.errors import UserError
from edge_annotator.runtime.options import Command
from edge_annotator.runtime.records import Prediction
from edge_annotator.runtime.spec import TaskSpec
from edge_annotator.runtime.trust import (
    describe,
    fit_interval,
    fit_rule,
    fit_set,
    held_out,
    held_out_scores,
    held_out_sets,
    interval_floor,
    tolerance_of,
)

COVERAGE = 0.9
"""The default coverage of the score intervals (the raters' mean inside at least 90% of the time)
and of the label sets (a majority label inside at least 90% of the time)."""


def fit_rules(spec: TaskSpec, preds: list[Prediction], ratings: dict[str, list[dict[str, Any]]], target: float,
              delta: float, tolerance: float | None = None, coverage: float | None = COVERAGE
              ) -> dict[str, dict[str, Any]]:
    """Per criterion, the rule fitted on the predictions of the items that have human ratings for
    it (each item once, in id order, so the rule does not depend on the files' order); with a
    COVERAGE, its score interval (rating scales) or label set (labels) too (None: neither)."""
    rules = {}
    for c in spec.criteria:
        tol = tolerance_of(c, tolerance)
        rows = held_out(c, tol, preds, ratings)
        if not rows:
            raise UserError(f"no item has both a prediction and a human rating for {c.name}: the ids of the "
                            f"predictions and of the ratings must match")
        rules[c.name] = fit_rule([x[1] for x in rows], [x[2] for x in rows], target, delta, tol, [x[0] for x in rows])
        if c.is_numeric and coverage is not None:
            sc = held_out_scores(c, preds, ratings)
            rules[c.name] |= fit_interval([x[1] for x in sc], [x[2] for x in sc], [x[3] for x in sc], coverage,
                                          interval_floor(c))
        elif coverage is not None:
            rules[c.name] |= fit_set([p for _, p in held_out_sets(c, preds, ratings)], coverage)
    return rules


def with_rules(spec: TaskSpec, rules: dict[str, dict[str, Any]]) -> TaskSpec:
    return replace(spec, criteria=tuple(replace(c, trust=rules.get(c.name, c.trust)) for c in spec.criteria))


def write_trusted(model: Path, pred: Path, human: Path, out: Path, target: float, delta: float,
                  tolerance: float | None = None, coverage: float | None = COVERAGE) -> dict[str, dict[str, Any]]:
    """MODEL with the rules fitted on PRED (annotate's output of MODEL on held-out items) and HUMAN
    (their ratings) written as OUT; returns the rules. The caller checks OUT may be written."""
    from edge_annotator.runtime.gguf_file import read_strings, sha256_file
    from edge_annotator.runtime.gguf_meta import Keys, embedded_spec
    from edge_annotator.runtime.labels import read_labelled
    from edge_annotator.runtime.records import read_predictions
    from edge_annotator.runtime.untrusted import JSONError, loads

    from .heads import write_annotator

    spec = embedded_spec(model)
    preds = read_predictions(pred, spec)
    sha = sha256_file(model)
    other = next((p for p in preds if p.error is None and p.model_sha256 != sha), None)
    if other is not None:
        raise UserError(f"{pred}:{other.line}: made by model {other.model_sha256[:16]}..., not {model.name} "
                        f"({sha[:16]}...): annotate the held-out items with {model.name}")
    labelled = read_labelled(human, spec, strict=False)
    ratings = {it.id: it.ratings for it in labelled.items if it.ratings}
    rules = fit_rules(spec, preds, ratings, target, delta, tolerance, coverage)
    try:  # the model's own provenance, read without loading it (an adapter's base need not be at hand)
        before = loads(read_strings(model, {Keys.PROVENANCE}).get(Keys.PROVENANCE) or "{}")
    except JSONError:
        before = {}
    provenance = (before if isinstance(before, dict) else {}) | {"trust": {
        "predictions": pred.name, "predictions_sha256": hashlib.sha256(pred.read_bytes()).hexdigest(),
        "ratings": human.name, "ratings_sha256": hashlib.sha256(human.read_bytes()).hexdigest()}}
    write_annotator(model, out, with_rules(spec, rules), provenance)
    return rules


@click.command("trust", cls=Command)
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("pred", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("human", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The annotator GGUF to write: MODEL with the rule in its spec.")
@click.option("--target", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.1, show_default=True,
              help="The most disagreement with the raters allowed among accepted labels.")
@click.option("--delta", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.1, show_default=True,
              help="The chance, over the held-out items drawn, that the promise fails.")
@click.option("--tolerance", type=click.FloatRange(min=0), default=None,
              help="Rating scales: how far a score may be from the raters' mean and agree [default: half a "
                   "scale step].")
@click.option("--coverage", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=COVERAGE,
              show_default=True, help="How often the score interval (rating scales) or label set (labels) each "
                                      "record carries must hold the raters' mean or most frequent label.")
@click.option("--json", "as_json", is_flag=True, help="Print the rules as JSON on stdout.")
@click.option("--force", is_flag=True, help="Replace an existing output file (never MODEL, PRED or HUMAN).")
def trust_command(model: Path, pred: Path, human: Path, out: Path, target: float, delta: float,
                  tolerance: float | None, coverage: float, as_json: bool, force: bool) -> None:
    """Fit, per criterion, which labels MODEL may give without review: the confidence threshold above
    which its labels disagree with the raters at most --target of the time, promised with
    probability 1 - --delta. PRED is annotate's output on held-out items MODEL did not learn from;
    HUMAN their ratings (any layout `fit` reads). Writes MODEL with the rule as OUT; annotate then
    marks each record's "accept", and `select --unaccepted` picks the rest for the experts. On rating
    scales each record also carries "intervals": where the raters' mean lies, at --coverage; on
    labels "sets": the labels among which the raters' most frequent one lies, at --coverage.

    How the rule is fitted and what it promises: runtime/trust.py (Learn then Test over a fixed grid
    of thresholds, exact binomial tests; split conformal intervals scaled by the annotator's own
    spread, and split conformal label sets). Where it cannot promise the target, it accepts nothing
    and says how many held-out items would do.

    \b
    Examples:
      annotate-cli annotate support.gguf heldout.jsonl -o heldout-pred.jsonl
      annotate-cli trust support.gguf heldout-pred.jsonl heldout.csv -o support-trust.gguf
      annotate-cli trust support.gguf heldout-pred.jsonl heldout.csv --target 0.05 --delta 0.05 -o s.gguf
    """
    from edge_annotator.runtime.files import check_output

    check_output(out, [model, pred, human], force)
    rules = write_trusted(model, pred, human, out, target, delta, tolerance, coverage)
    for name, rule in rules.items():
        click.echo(describe(name, rule), err=True)
    if as_json:
        click.echo(json.dumps(rules, indent=2, sort_keys=True))
    click.echo(f"wrote {out}", err=True)
