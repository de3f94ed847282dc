"""Does the outcome depend on the seed? `annotate-cli fit` on one learning-curve cell's items (the
items a user with N labelled items would have), once per seed, each annotator scored on the full
test split by the figure its dataset is judged by (scripts/learning_curve.py: HEADLINE).

    python scripts/seed_spread.py --cell emobank-300 --cell convabuse-300 --seeds 5 --route head \\
        --out models/seeds --markdown docs/recipes.md

The seed is fit's own: it draws the split of the N items into training, validation and test, the
cross-validation folds of the heads, and (--route lora) the fine-tune's initialisation and order.
Each seed's run folder, annotator and test predictions stay under OUT/CELL-ROUTE/seed-S; a seed
already scored is read back, so an interrupted run continues.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import click
from eval import evaluate
from learning_curve import DATASETS, HEADLINE, cell_data

from edge_annotator.bench.markdown import write_section
from edge_annotator.runtime.jobs import JobOptions, annotate_file
from edge_annotator.runtime.spec import load_spec
from edge_annotator.train.fit import FitOptions, fit


def run_seed(name: str, items: Path, test: Path, cell: Path, seed: int, route: str, base: str,
             threads: int) -> dict[str, Any]:
    """fit on ITEMS with SEED, then the annotator on the full TEST split."""
    done = cell / f"seed-{seed}" / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    out = cell / f"seed-{seed}" / f"{name}.gguf"
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    state = fit(DATASETS[name][0], items, out, FitOptions(base=base, threads=threads, route=route, seed=seed),
                resume=out.with_name(f"{name}.run").exists())
    fit_s = time.perf_counter() - t0
    pred = out.with_name("test.jsonl")
    annotate_file(out, test, str(pred), JobOptions(threads=threads), resume=pred.exists())
    res = evaluate(load_spec(DATASETS[name][0]), pred, test)
    figures = {label: res["criteria"][c][m] for c, m, label in HEADLINE[name]}
    result = {"seed": seed, "route": route, "fit_s": round(fit_s, 1), "test_items": res["items"],
              "figures": figures, "split": state["split"]}
    done.write_text(json.dumps(result, indent=1))
    return result


def summarise(cell: str, route: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    names = list(runs[0]["figures"])
    stats = {}
    for k in names:
        xs = [r["figures"][k]["value"] for r in runs]
        stats[k] = {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
                    "min": min(xs), "max": max(xs), "each": xs}
    return {"cell": cell, "route": route, "seeds": len(runs), "figures": stats,
            "fit_s": statistics.fmean(r["fit_s"] for r in runs), "test_items": runs[0]["test_items"]}


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| cell | route | figure (full test split) | seeds | mean | standard deviation | lowest - highest | "
             "each seed | fit, mean |", "|---|---|---|---:|---:|---:|---|---|---:|"]
    for r in rows:
        for k, s in r["figures"].items():
            each = ", ".join(f"{x:.3f}" for x in s["each"])
            lines.append(f"| {r['cell']} | {r['route']} | {k} | {r['seeds']} | {s['mean']:.3f} | {s['std']:.3f} | "
                         f"{s['min']:.3f} - {s['max']:.3f} | {each} | {r['fit_s'] / 60:.1f} min |")
    return "\n".join(lines)


@click.command()
@click.option("--cell", "cells", multiple=True, required=True, metavar="DATASET-N",
              help="A learning-curve cell: emobank-300, convabuse-300, goemotions-300, ...")
@click.option("--seeds", type=click.IntRange(2), default=5, show_default=True)
@click.option("--route", type=click.Choice(["lora", "head", "auto"]), default="head", show_default=True)
@click.option("--data", "data_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("models/data"),
              show_default=True, help="Where the converted splits are (make eval writes them).")
@click.option("--base", default="models/gemma-3-270m-hf", show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("models/seeds"),
              show_default=True)
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--markdown", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Rewrite the table's section (<!-- begin seeds -->) of this page.")
def main(cells: tuple[str, ...], seeds: int, route: str, data_dir: Path, base: str, out: Path, threads: int,
         markdown: Path | None) -> None:
    """fit at one cell's items under SEEDS seeds, each scored on the full test split (see the module's
    docstring).

    \b
    Examples:
      python scripts/seed_spread.py --cell emobank-300 --seeds 5 --route head
      python scripts/seed_spread.py --cell convabuse-300 --seeds 5 --route lora --markdown docs/recipes.md
    """
    rows = []
    for c in cells:
        name, n = c.rsplit("-", 1)
        if name not in DATASETS:
            raise click.BadParameter(f"{c}: the dataset is one of {', '.join(DATASETS)}", param_hint="--cell")
        cell = out / f"{c}-{route}"
        cell.mkdir(parents=True, exist_ok=True)
        train, _ = cell_data(name, int(n), data_dir, cell)
        runs = []
        for s in range(seeds):
            runs.append(run_seed(name, train, data_dir / f"{name}-test.jsonl", cell, s, route, base, threads))
            figs = ", ".join(f"{k} {v['value']:.3f}" for k, v in runs[-1]["figures"].items())
            print(f"{c} {route} seed {s}: {figs} (fit {runs[-1]['fit_s']:.0f} s)", file=sys.stderr)
        rows.append(summarise(c, route, runs))
        (cell / "summary.json").write_text(json.dumps(rows[-1], indent=1))
    text = table(rows)
    click.echo(text)
    if markdown:
        write_section(markdown, "seeds", text, "# Recipes")


if __name__ == "__main__":
    main()
