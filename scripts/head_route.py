"""The head route measured: a linear head per criterion on the base model's own hidden states (no
fine-tuning), on the items the learning-curve cells train on, scored on the full test splits.

    python scripts/head_route.py --shared ../shared/data --out models/heads --markdown docs/recipes.md

A cell is (dataset, items). EmoBank, ConvAbuse and GoEmotions: the training and validation items
of the learning-curve cell of the same size (scripts/learning_curve.py: the first N of a seeded
shuffle, and max(30, N / 10) of the dev split), all of them given to `annotate-cli head` (its
5-fold cross-validation replaces a validation split), scored on the full test split. USR
PersonaChat: the train and validation items of `annotate-cli fit`'s split (by context_id, seed 0),
scored on its 60 test items, beside the held-out expert. Each cell writes the Q4_K_M base with its
heads into OUT/CELL/annotator.gguf, annotates the test split with it as a user would, and records
the time reading the items and fitting. The table puts the LoRA cell of the same items beside it
(docs/learning-curve.json, the record scripts/learning_curve.py keeps) and the USR fit
(docs/evaluation.md's run, passed with --usr-lora).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click
from eval import convert_splits, evaluate
from learning_curve import DATASETS, HEADLINE, cell_data
from prepare_data import convert, write_items

from edge_annotator.export.heads import head_annotator, summary
from edge_annotator.runtime.jobs import JobOptions, annotate_file
from edge_annotator.runtime.labels import read_labelled, split_labels
from edge_annotator.runtime.spec import load_spec

USR = ("usr_personachat", "tasks/usr-personachat.yaml", "context_id")


def head_cell(cell: Path, spec_path: str, labelled: list[Path], test: Path, base: Path, threads: int
              ) -> dict[str, Any]:
    """Fit heads on LABELLED's items with BASE's states, write CELL/annotator.gguf, annotate TEST."""
    spec = load_spec(spec_path)
    gguf = cell / "annotator.gguf"
    timing_f = cell / "head.json"
    if not gguf.exists():
        items = [it for f in labelled for it in read_labelled(f, spec, strict=False).items if it.ratings]
        done = head_annotator(base, spec, items, gguf, labelled[0], threads)
        timing_f.write_text(json.dumps({"items": len(items), "seconds": done.seconds, "heads": summary(done.fits)},
                                       indent=1))
    pred = cell / "test.jsonl"
    t0 = time.perf_counter()
    annotate_file(gguf, test, str(pred), JobOptions(threads=threads), resume=pred.exists())
    res = evaluate(spec, pred, test)
    res["annotate_s"] = round(time.perf_counter() - t0, 1)
    res["test_items"] = res.pop("items")
    return res | json.loads(timing_f.read_text())


def run_curve_cell(name: str, n: int, data_dir: Path, out: Path, base: Path, threads: int) -> dict[str, Any]:
    cell = out / f"{name}-{n}-head"
    cell.mkdir(parents=True, exist_ok=True)
    train, val = cell_data(name, n, data_dir, cell)
    res = head_cell(cell, DATASETS[name][0], [train, val], data_dir / f"{name}-test.jsonl", base, threads)
    return res | {"dataset": name, "train_items": n}


def run_usr(shared: Path, out: Path, base: Path, threads: int) -> dict[str, Any]:
    """USR PersonaChat split as `annotate-cli fit` splits it (fit's defaults: test 0.2, val 0.1, seed 0)."""
    name, spec_path, group = USR
    cell = out / f"{name}-head"
    cell.mkdir(parents=True, exist_ok=True)
    data = Path("models/data") / f"{name}-all.jsonl"
    if not data.exists():
        write_items(convert(name, shared / name, "all"), data)
    split = cell / "split"
    if not (split / "split.json").exists():
        split_labels(data, load_spec(spec_path), split, 0.2, 0.1, 0, group)
    res = head_cell(cell, spec_path, [split / "train.jsonl", split / "val.jsonl"], split / "test.jsonl", base, threads)
    return res | {"dataset": name, "train_items": res["items"],
                  "by_score": loo_by_score(load_spec(spec_path), cell / "test.jsonl", split / "test.jsonl")}


def loo_by_score(spec: Any, pred: Path, test: Path) -> dict[str, Any]:
    """Per criterion, the held-out expert against the others' consensus beside the annotator's score
    against it: as `fit`'s report judges a rating scale (runtime/metrics.py: leave_one_out)."""
    from edge_annotator.runtime.data import read_human
    from edge_annotator.runtime.metrics import leave_one_out
    from edge_annotator.runtime.records import by_id, read_predictions

    labels, scores = by_id(read_predictions(pred, spec))
    humans = read_human(test, spec)
    out = {}
    for c in spec.criteria:
        ids = [i for i in labels if sum(c.name in r for r in humans.get(i, [])) >= 2]
        by = {i: [r[c.name] for r in humans[i] if c.name in r] for i in ids}
        out[c.name] = leave_one_out(c, {i: labels[i][c.name] for i in ids}, by, {i: scores[i][c.name] for i in ids})
    return out


def _f(x: dict[str, Any] | None) -> str:
    if not x or x.get("value") is None:
        return "n/a"
    lo, hi = x["ci95"]
    return f"{x['value']:.3f}" + ("" if lo is None else f" [{lo:.2f}, {hi:.2f}]")


def _loo(x: dict[str, Any], who: str) -> str:
    v, ci = x.get(f"{who}_alpha"), x.get(f"{who}_alpha_ci")
    return "n/a" if v is None else f"{v:.3f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def _lora(record: list[dict[str, Any]], name: str, n: int) -> dict[str, Any] | None:
    return next((r for r in record if r["dataset"] == name and r["items"] == n and r["augment"] == "none"), None)


def markdown(results: list[dict[str, Any]], record: list[dict[str, Any]], usr_lora: dict[str, Any] | None) -> str:
    lines = ["| data | items | figure on the full test split: head on the base | the LoRA cell of the same items "
             "| the heads' 5-fold alpha | reading + fitting on 2 cores |", "|---|---|---|---|---|---|"]
    for r in results:
        if r["dataset"] == USR[0]:
            continue
        figs = "; ".join(f"{name} {_f(r['criteria'][c][m])}" for c, m, name in HEADLINE[r["dataset"]])
        lora = _lora(record, r["dataset"], r["train_items"])
        lfigs = "; ".join(f"{name} {_f(lora['criteria'][c][m])}" for c, m, name in HEADLINE[r["dataset"]]) \
            if lora else "not run"
        chosen = "; ".join(f"{k} {v['cv_alpha']:.2f}" for k, v in r["heads"].items() if v["head"])
        s = r["seconds"]
        lines.append(f"| {r['dataset']} | {r['train_items']} (+{r['items'] - r['train_items']} val) | {figs} "
                     f"| {lfigs} | {chosen} | {s['states'] / 60:.1f} + {s['fit'] / 60:.1f} min |")
    usr = next((r for r in results if r["dataset"] == USR[0]), None)
    if usr:
        s = usr["seconds"]
        lines += ["", f"USR PersonaChat, the {usr['test_items']} test items of fit's split (by context); heads fitted "
                      f"on its {usr['items']} train and validation items ({s['states'] / 60:.1f} min reading, "
                      f"{s['fit'] / 60:.1f} min fitting). Against the other experts' consensus, one held-out "
                      f"expert beside the head (20 draws, 95% bootstrap):", "",
                  "| quality | held-out expert | head, by the score | verdict | head, by the label | verdict "
                  "| LoRA through fit, by the score |", "|---|---|---|---|---|---|---|"]
        for c, t in usr["criteria"].items():
            lab, sc = t.get("leave_one_out") or {}, (usr.get("by_score") or {}).get(c) or {}
            got = (usr_lora or {}).get(c, "n/a")
            lines.append(f"| {c} | {_loo(sc, 'human')} | {_loo(sc, 'model')} | {sc.get('verdict', 'n/a')} "
                         f"| {_loo(lab, 'model')} | {lab.get('verdict', 'n/a')} | {got} |")
    return "\n".join(lines) + "\n"


@click.command()
@click.option("--shared", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=Path("../shared/data"), show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("models/heads"),
              show_default=True)
@click.option("--base", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=Path("models/gemma-3-270m-q4_k_m.gguf"), show_default=True)
@click.option("--threads", type=click.IntRange(1), default=2, show_default=True)
@click.option("--cell", "cells", multiple=True, help="Only these cells: NAME-ITEMS, or usr (repeat) "
                                                     "[default: the three sets at 300 and 1000, and usr].")
@click.option("--usr-lora", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="A JSON file {quality: figure} of the LoRA fit on the same USR split, for the table.")
@click.option("--table-only", is_flag=True, help="Run no cell: the table from OUT/heads.json as it stands.")
@click.option("--markdown", "md_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the table into this page's heads section (docs/recipes.md).")
def main(shared: Path, out: Path, base: Path, threads: int, cells: tuple[str, ...], usr_lora: Path | None,
         table_only: bool, md_path: Path | None) -> None:
    """Fit the head route per cell and score it on the full test split.

    \b
    Examples:
      python scripts/head_route.py --cell emobank-300 --cell usr
      python scripts/head_route.py --table-only --usr-lora models/heads/usr-lora.json --markdown docs/recipes.md
    """
    data_dir = Path("models/data")
    todo = [] if table_only else list(cells) or [f"{d}-{n}" for d in DATASETS for n in (300, 1000)] + ["usr"]
    out.mkdir(parents=True, exist_ok=True)
    done_f = out / "heads.json"
    results = {(r["dataset"], r["train_items"]): r for r in (json.loads(done_f.read_text()) if done_f.exists() else [])}
    for cell in todo:
        print(f"cell {cell}", file=sys.stderr, flush=True)
        if cell == "usr":
            r = run_usr(shared, out, base, threads)
        else:
            name, n = cell.rsplit("-", 1)
            convert_splits(shared, data_dir, name)
            r = run_curve_cell(name, int(n), data_dir, out, base, threads)
        results = {k: v for k, v in results.items() if k[0] != r["dataset"] or (r["dataset"] != USR[0] and
                                                                               k[1] != r["train_items"])}
        results[(r["dataset"], r["train_items"])] = r
        done_f.write_text(json.dumps(list(results.values()), indent=1, default=str))
    record_f = Path("docs/learning-curve.json")
    record = json.loads(record_f.read_text()) if record_f.exists() else []
    md = markdown(list(results.values()), record, json.loads(usr_lora.read_text()) if usr_lora else None)
    if md_path:
        from edge_annotator.bench.markdown import write_section

        write_section(md_path, "heads", md)
    print(md)


if __name__ == "__main__":
    main()
