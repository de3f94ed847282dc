"""Learning curves of the small-data recipe: what 100, 300 and 1,000 labelled items buy, and which of
the paper's augmentations pay at 300, on the full test splits with bootstrap intervals.

    make learning-curve     # python scripts/learning_curve.py --shared ../shared/data --out models/curve

A cell is (dataset, training items, augmentation). Its training items are the first N of a
seeded shuffle of the release's train split (so 100 is inside 300 inside 1,000); its validation
items, max(30, N / 10) of the dev split, as a user holding out a tenth of a few hundred labels
would have. The recipe is `annotate-cli fit`'s (train/recipe.py) with a 20-minute budget (the
steps cut to it from two timed steps); the run is trained, merged, calibrated, exported to
Q4_K_M and scored on the full test split, the same table as `make eval`. Each stage is skipped
where its output exists, so an interrupted curve continues. Writes OUT/curve.md, OUT/curve.json
and OUT/curve.png; with --markdown PAGE, the table and plot into PAGE and each cell's figures into
learning-curve.json beside it, the record from which a later run (a fresh clone, without OUT) keeps
the cells it does not run itself in the table.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import click
import yaml
from eval import convert_splits, evaluate, paired_gain
from prepare_data import write_items

from edge_annotator.export.route import export_annotator
from edge_annotator.hf.score import hf_tokenize
from edge_annotator.runtime.jobs import JobOptions, annotate_file
from edge_annotator.runtime.spec import load_spec
from edge_annotator.train.check import check_run
from edge_annotator.train.config import load_config, parse_config
from edge_annotator.train.examples import load_items
from edge_annotator.train.job import print_validations, train_and_merge
from edge_annotator.train.model import load_tokenizer
from edge_annotator.train.recipe import AUGMENTATIONS, augmentation, fit_to_budget, small_data_config
from edge_annotator.train.trainer import longest_tokens

DATASETS = {  # name -> (spec, validation split, what the task is judged by)
    "emobank": ("tasks/emobank.yaml", "dev", "score"),
    "convabuse": ("tasks/convabuse.yaml", "valid", "label"),
    "goemotions": ("tasks/goemotions.yaml", "dev", "label"),
}
BUDGET_S = 1200.0
BASE = "models/gemma-3-270m-hf"


def cell_data(name: str, n: int, data_dir: Path, out: Path) -> tuple[Path, Path]:
    """The first n training items of a seeded shuffle, and max(30, n/10) validation items."""
    train, val = out / "train.jsonl", out / "val.jsonl"
    if not train.exists():
        rows = [json.loads(x) for x in (data_dir / f"{name}-train.jsonl").read_text().splitlines()]
        random.Random(0).shuffle(rows)
        dev = [json.loads(x) for x in (data_dir / f"{name}-{DATASETS[name][1]}.jsonl").read_text().splitlines()]
        random.Random(1).shuffle(dev)
        write_items(rows[:n], train)
        write_items(dev[:max(30, n // 10)], val)
    return train, val


def cell_config(cell: Path, spec_path: str, judged: str, train: Path, val: Path, augment: str, budget_s: float,
                longest: int | None = None, timing: dict[str, float] | None = None,
                overrides: dict[str, Any] | None = None) -> tuple[Path, dict[str, float]]:
    """CELL/config.yaml: the small-data recipe for TRAIN, its steps cut to BUDGET_S from two timed
    steps (or from TIMING, the step_s and validation_s of a run of the same shape). LONGEST, when
    given, fixes the prompt length the micro-batch is sized by (else TRAIN's longest); OVERRIDES
    replace fields of the result. Returns the config's path and the timing it was cut by."""
    cfg_f = cell / "config.yaml"
    timing_f = cell / "timing-check.json"
    if not cfg_f.exists():
        spec = load_spec(spec_path)
        items = load_items(train, spec)
        if longest is None:
            tok = hf_tokenize(load_tokenizer(BASE))
            longest = max(longest_tokens(spec, items, tok, augmentation(augment)["templates"]))
        raw = small_data_config(spec_path, str(train), str(val), BASE, str(cell / "run"), items=len(items),
                                criteria=len(spec.criteria), longest=longest, augment=augment)
        raw["select_by"] = judged
        if not timing:
            got = check_run(parse_config(raw, str(cfg_f)))
            timing = {"step_s": got["step_s"], "validation_s": got["validation_s"]}
        raw = fit_to_budget(raw, timing["step_s"], timing["validation_s"], budget_s) | (overrides or {})
        timing_f.write_text(json.dumps(timing))
        cfg_f.write_text(yaml.safe_dump(raw, sort_keys=False))
    return cfg_f, json.loads(timing_f.read_text()) if timing_f.exists() else {}


def train_cell(cell: Path, cfg_f: Path) -> Path:
    """Train and merge CELL's config (skipped when the merged model exists); CELL/train.json gets the
    time, steps and best step. Returns the merged folder."""
    cfg = load_config(cfg_f)
    merged = Path(cfg.output) / "merged"
    if not (merged / "spec.json").exists():
        t0 = time.perf_counter()
        done = train_and_merge(cfg, resume=True, progress=print_validations)
        (cell / "train.json").write_text(json.dumps({"seconds": time.perf_counter() - t0, "timing": done.timing,
                                                     "best_step": done.result.state.best_step,
                                                     "steps": done.result.steps,
                                                     "calibration": done.calibration}, indent=2, default=str))
    return merged


def score_cell(cell: Path, spec_path: str, gguf: Path, test: Path, threads: int) -> dict[str, Any]:
    """Annotate TEST with GGUF into CELL/test.jsonl (resumed) and evaluate it, with CELL's training
    time and steps."""
    pred = cell / "test.jsonl"
    annotate_file(gguf, test, str(pred), JobOptions(threads=threads), resume=pred.exists())
    res = evaluate(load_spec(spec_path), pred, test)
    res["test_items"] = res.pop("items")
    tr = json.loads((cell / "train.json").read_text()) if (cell / "train.json").exists() else {}
    return res | {"train_s": tr.get("seconds"), "steps": tr.get("steps"), "best_step": tr.get("best_step")}


def cell_dir(out: Path, name: str, n: int, augment: str) -> Path:
    """OUT/NAME-ITEMS-AUGMENT, the folder of one cell (the name --cell takes)."""
    return out / f"{name}-{n}-{augment}"


def run_cell(name: str, n: int, augment: str, data_dir: Path, out: Path, threads: int) -> dict[str, Any]:
    cell = cell_dir(out, name, n, augment)
    cell.mkdir(parents=True, exist_ok=True)
    spec_path, _, judged = DATASETS[name]
    train, val = cell_data(name, n, data_dir, cell)
    cfg_f, _ = cell_config(cell, spec_path, judged, train, val, augment, BUDGET_S)
    merged = train_cell(cell, cfg_f)
    gguf = cell / "annotator-Q4_K_M.gguf"
    if not gguf.exists():
        export_annotator(merged, gguf, "Q4_K_M")
    res = score_cell(cell, spec_path, gguf, data_dir / f"{name}-test.jsonl", threads)
    res.update(dataset=name, items=n, augment=augment, config=yaml.safe_load(cfg_f.read_text()))
    gguf.unlink()  # 300 MB a cell; the merged model stays for a re-export
    return res


HEADLINE = {  # dataset -> the figures it is judged by: (criterion, figure, the table's name for it)
    "emobank": [(k, "score_alpha", k) for k in ("Valence", "Arousal", "Dominance")],
    "convabuse": [("severity", "label_alpha", "severity (label)")],
    "goemotions": [("emotion", "macro_f1", "macro-F1")],
}
RECORD_KEYS = ("dataset", "items", "augment", "test_items", "train_s", "steps", "best_step", "gain_over_none")


def headline(r: dict[str, Any]) -> dict[str, Any]:
    """The figure each dataset is judged by: EmoBank score alpha per criterion, ConvAbuse label
    alpha, GoEmotions macro-F1."""
    return {name: r["criteria"][c][m] for c, m, name in HEADLINE[r["dataset"]]}


def recorded(r: dict[str, Any]) -> dict[str, Any]:
    """What the table and the plot show of a cell: its headline figures, steps, time and gains (the
    record kept beside the page, so that a fresh clone's table keeps the cells measured elsewhere)."""
    crit = {c: {m: r["criteria"][c][m]} for c, m, _ in HEADLINE[r["dataset"]]}
    return {k: r[k] for k in RECORD_KEYS if k in r} | {"criteria": crit}


def with_gains(results: list[dict[str, Any]], data_dir: Path, out: Path) -> None:
    """Each augmented cell's gain over the cell without augmentation (same dataset and items), per
    criterion, with a paired 95% bootstrap interval: both cells' predictions on the same resampled
    test items, so the interval is about the augmentation and not about the test sample."""
    for r in results:
        plain = cell_dir(out, r["dataset"], r["items"], "none") / "test.jsonl"
        if r["augment"] != "none" and plain.exists():
            spec = load_spec(DATASETS[r["dataset"]][0])
            mine = cell_dir(out, r["dataset"], r["items"], r["augment"]) / "test.jsonl"
            r["gain_over_none"] = paired_gain(spec, mine, plain, data_dir / f"{r['dataset']}-test.jsonl")


def cell_key(r: dict[str, Any]) -> tuple[str, int, str]:
    return r["dataset"], r["items"], r["augment"]


def order_key(r: dict[str, Any]) -> tuple[int, int, int]:
    """The table's order: data set, items, then the augmentations as AUGMENTATIONS lists them."""
    return list(DATASETS).index(r["dataset"]), r["items"], list(AUGMENTATIONS).index(r["augment"])


def markdown(results: list[dict[str, Any]]) -> str:
    def f(x: dict[str, Any]) -> str:
        lo, hi = x["ci95"]
        return "n/a" if x["value"] is None else f"{x['value']:.3f}" + ("" if lo is None else f" [{lo:.2f}, {hi:.2f}]")

    def g(r: dict[str, Any]) -> str:
        gains = r.get("gain_over_none") or {}
        return "; ".join(f"{k} {x['value']:+.3f} [{x['ci95'][0]:+.2f}, {x['ci95'][1]:+.2f}]"
                         for k, x in gains.items() if x["value"] is not None and x["ci95"][0] is not None)

    lines = ["| data | items | augmentation | figure on the full test split | alpha gain over none, paired "
             "| test items | steps (best) | train + merge on 2 cores |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=order_key):
        figs = "; ".join(f"{k} {f(v)}" for k, v in headline(r).items())
        t = r.get("train_s")
        lines.append(f"| {r['dataset']} | {r['items']} | {r['augment']} | {figs} | {g(r)} | {r['test_items']} | "
                     f"{r.get('steps')} ({r.get('best_step')}) | {'n/a' if t is None else f'{t / 60:.1f} min'} |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    for ax, name in zip(axes, DATASETS):
        rows = sorted((r for r in results if r["dataset"] == name and r["augment"] == "none"), key=lambda r: r["items"])
        for k in (headline(rows[0]) if rows else {}):
            xs = [r["items"] for r in rows]
            ys = [headline(r)[k]["value"] for r in rows]
            lo = [headline(r)[k]["ci95"][0] for r in rows]
            hi = [headline(r)[k]["ci95"][1] for r in rows]
            ax.plot(xs, ys, marker="o", label=k)
            ax.fill_between(xs, lo, hi, alpha=0.15)
        ax.set_xscale("log")
        ax.set_title(name)
        ax.set_xlabel("training items")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90, metadata={"Software": None})


@click.command()
@click.option("--shared", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=Path("../shared/data"), show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("models/curve"),
              show_default=True)
@click.option("--threads", type=click.IntRange(1), default=2, show_default=True)
@click.option("--markdown", "md_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the table into this page's curve section (docs/recipes.md), the plot and the record of "
                   "every cell's figures (learning-curve.json) beside it.")
@click.option("--cell", "cells", multiple=True, help="Only these cells, NAME-ITEMS-AUGMENT (repeat) "
                                                     "[default: the sizes, then the augmentations at 300].")
@click.option("--table-only", is_flag=True, help="Run no cell: write the table and plot from OUT and the record.")
def main(shared: Path, out: Path, threads: int, md_path: Path | None, cells: tuple[str, ...], table_only: bool) -> None:
    """Train the small-data recipe per cell and score it on the full test split.

    \b
    Examples:
      python scripts/learning_curve.py --cell emobank-300-none --cell emobank-300-all
      python scripts/learning_curve.py --table-only --markdown docs/recipes.md
    """
    data_dir = Path("models/data")
    sizes = [(d, n, "none") for d in DATASETS for n in (100, 300, 1000)]
    augments = [(d, 300, a) for d in DATASETS for a in ("all", "templates", "dropout")]
    augments.append(("convabuse", 300, "permute"))  # the one set with several input fields
    named = [(name, int(n), aug) for name, n, aug in (c.rsplit("-", 2) for c in cells)]
    out.mkdir(parents=True, exist_ok=True)
    done_f = out / "curve.json"
    results = json.loads(done_f.read_text()) if done_f.exists() else []
    # cells measured elsewhere, from the record beside the page: in the table, and skipped unless
    # named with --cell (then run again here, their new figures replacing the recorded ones; a
    # recorded gain stays the one measured against the unaugmented cell of its own time)
    record_f = md_path.parent / "learning-curve.json" if md_path else None
    recorded_cells = json.loads(record_f.read_text()) if record_f and record_f.exists() else []
    replaced = {cell_key(r) for r in results} | set(named)
    kept = [r for r in recorded_cells if cell_key(r) not in replaced]
    have = {cell_key(r) for r in results + kept}
    for name, n, aug in [] if table_only else (named or sizes + augments):
        if (name, n, aug) in have:
            continue
        convert_splits(shared, data_dir, name)
        print(f"cell {name}-{n}-{aug}", file=sys.stderr, flush=True)
        results.append(run_cell(name, n, aug, data_dir, out, threads))
        done_f.write_text(json.dumps(results, indent=2, default=str))
        (out / "curve.md").write_text(markdown(results))
    with_gains(results, data_dir, out)
    done_f.write_text(json.dumps(results, indent=2, default=str))
    plot(results, out / "curve.png")
    shown = kept + [recorded(r) for r in results]
    md = markdown(shown)
    if md_path and record_f:
        from edge_annotator.bench.markdown import write_section

        plot(shown, md_path.parent / "learning-curve.png")
        write_section(md_path, "curve", md + "\n![learning curves](learning-curve.png)\n")
        record_f.write_text(json.dumps(sorted(shown, key=order_key), indent=1) + "\n")
    print(md)


if __name__ == "__main__":
    main()
