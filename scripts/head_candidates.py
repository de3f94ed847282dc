"""How stable the head route's choice is: every candidate head (tap, kind, penalty) of a head cell,
its k-fold cross-validated alpha on the cell's items beside its alpha on the full test split, the
candidate cross-validation chose, and the mean score of the top K candidates by cross-validation.

    python scripts/head_route.py --cell emobank-300            # the cell: its items and annotator
    python scripts/head_candidates.py --cell models/heads/emobank-300-head --spec tasks/emobank.yaml \\
        --test models/data/emobank-test.jsonl

Rating scales only (the score's interval alpha against the raters' mean, as fit_criterion compares
candidates). The states are read once per run with the base model (items x taps), about 3 minutes
for 1,330 EmoBank sentences on 2 cores; fitting every candidate takes seconds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import numpy as np

from edge_annotator.export import heads as H
from edge_annotator.runtime.labels import read_labelled
from edge_annotator.runtime.metrics import _alpha
from edge_annotator.runtime.spec import load_spec

TOP = (1, 3, 5, 10)


def measure(cell: Path, spec_path: Path, test: Path, base: Path, threads: int) -> dict[str, Any]:
    spec = load_spec(spec_path)
    train = [it for f in (cell / "train.jsonl", cell / "val.jsonl")
             for it in read_labelled(f, spec, strict=False).items if it.ratings]
    held = [it for it in read_labelled(test, spec, strict=False).items if it.ratings]
    s_train, s_test = H.states_of(base, spec, train, threads), H.states_of(base, spec, held, threads)
    groups = H.context_groups(spec, train)
    out: dict[str, Any] = {}
    for ci, c in enumerate(spec.criteria):
        if not c.is_numeric:
            continue

        def mine(states: dict[Any, np.ndarray], ci: int = ci) -> dict[Any, np.ndarray]:
            return {t: (x[:, ci] if t.per_criterion else x).astype(np.float64) for t, x in states.items()}

        x_train, x_test = mine(s_train), mine(s_test)
        rated = [[r[c.name] for r in it.ratings if c.name in r] for it in train]
        mean_test = H._targets(c, [[r[c.name] for r in it.ratings if c.name in r] for it in held])[0].tolist()
        fit = H.fit_criterion(c, x_train, rated, groups)
        mean, dist = H._targets(c, rated)
        taps = {t.name: t for t in x_train}
        scores, on_test = {}, {}
        for name in fit.cv:
            tap, kind, penalty = name.split()
            head = H._fit_one(H.Candidate(taps[tap], kind, float(penalty)), x_train[taps[tap]], mean, dist)
            scores[name] = H._predict(c, head, x_test[taps[tap]])[0]
            on_test[name] = _alpha([scores[name].tolist(), mean_test], "interval")
        ranked = sorted((n for n in fit.cv if fit.cv[n] is not None), key=lambda n: -fit.cv[n])
        out[c.name] = {
            "chosen": fit.chosen.name if fit.chosen else None, "candidates": len(fit.cv),
            "top": [{"candidate": n, "cv_alpha": round(fit.cv[n], 4), "test_alpha": round(on_test[n], 4)}
                    for n in ranked[:10]],
            "best_on_test": max(on_test, key=lambda n: on_test[n]),
            "mean_of_top": {k: round(_alpha([np.mean([scores[n] for n in ranked[:k]], axis=0).tolist(), mean_test],
                                            "interval"), 4) for k in TOP},
            "items": len(train), "test_items": len(held)}
    return out


def markdown(name: str, res: dict[str, Any]) -> str:
    lines = [f"| {name} | criterion | chosen by CV: CV alpha / test alpha | runner-up taps (CV / test) | mean score of "
             "the top 1 / 3 / 5 / 10 by CV: test alpha |", "|---|---|---|---|---|"]
    for crit, r in res.items():
        top = r["top"]
        first = top[0]
        other = next((t for t in top if t["candidate"].split()[0] != first["candidate"].split()[0]), None)
        runner = f"{other['candidate']} {other['cv_alpha']:.3f} / {other['test_alpha']:.3f}" if other else "-"
        ens = " / ".join(f"{r['mean_of_top'][k]:.3f}" for k in TOP)
        lines.append(f"| | {crit} | {first['candidate']}: {first['cv_alpha']:.3f} / {first['test_alpha']:.3f} "
                     f"| {runner} | {ens} |")
    return "\n".join(lines)


@click.command()
@click.option("--cell", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="A head cell of scripts/head_route.py (its train.jsonl and val.jsonl).")
@click.option("--spec", "spec_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True)
@click.option("--test", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="The full test split's ratings.")
@click.option("--base", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=Path("models/gemma-3-270m-q4_k_m.gguf"), show_default=True)
@click.option("--threads", type=click.IntRange(1), default=2, show_default=True)
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write every figure here.")
def main(cell: Path, spec_path: Path, test: Path, base: Path, threads: int, json_out: Path | None) -> None:
    """Every head candidate's cross-validated alpha beside its test alpha (see the module's docstring).

    \b
    Examples:
      python scripts/head_candidates.py --cell models/heads/emobank-300-head --spec tasks/emobank.yaml \\
          --test models/data/emobank-test.jsonl --json models/heads/emobank-300-candidates.json
    """
    res = measure(cell, spec_path, test, base, threads)
    if json_out:
        json_out.write_text(json.dumps(res, indent=1))
    click.echo(markdown(cell.name, res))


if __name__ == "__main__":
    main()
