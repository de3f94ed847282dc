"""Does choosing what the experts label next pay? A simulation of the loop on the shipped sets.

    make active-learning    # python scripts/active_learning.py --shared ../shared/data --out models/active

Per dataset: a seeded shuffle of the release's train split gives 100 starting items and a pool of
the next POOL items (their human labels are hidden until an item is picked). Round 0 trains the
small-data recipe on the 100 items. Then, for each arm, three rounds: the round's annotator
annotates what is left of the pool, `annotate-cli select`'s ranking (runtime/selection.py: rank)
picks the 100 items an expert would rate next, their labels join the training set, and the recipe
is trained again from the base. The `random` arm picks a seeded sample of the pool instead (it
needs no annotation). Every round's annotator is exported as `annotate-cli export` does (Q4_K_M)
and scored on the full test split, with 95% bootstrap intervals; at each round the gain of each
strategy over random gets a paired interval (the same test items resampled for both arms).

Every round trains for the same time budget (--budget, steps cut from two timed steps of round
0), so the arms differ only in which items they were given. Validation: the same `max(30, 10%)`
items of the dev split for every round and arm. Each stage is skipped where its output exists,
so an interrupted simulation continues. Writes OUT/active.md, OUT/active.json and OUT/active.png.
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path
from typing import Any

import click
import numpy as np
from eval import convert_splits, paired_gain
from learning_curve import BASE, DATASETS, cell_config, headline, score_cell, train_cell
from prepare_data import write_items

from edge_annotator.export.route import export_annotator
from edge_annotator.hf.score import hf_tokenize
from edge_annotator.runtime.jobs import JobOptions, annotate_file
from edge_annotator.runtime.metrics import consensus, nearest_level
from edge_annotator.runtime.records import read_predictions
from edge_annotator.runtime.selection import STRATEGIES, rank
from edge_annotator.runtime.spec import Criterion, TaskSpec, load_spec
from edge_annotator.train.examples import load_items
from edge_annotator.train.model import load_tokenizer
from edge_annotator.train.trainer import longest_tokens

START, STEP, ROUNDS = 100, 100, 3
FULL_RUN = {"patience": 100}
"""Every round trains its whole budget and keeps its best validated checkpoint: the recipe's early
stopping (4 validations without a gain, half of a budget-cut run) ended one 300-item round at step
65 of 99 with its best at step 13, before the run had taken off, and a round's figure then says
more about that than about the items it was given."""
ARMS = {"emobank": ("spread", "random"), "convabuse": ("entropy", "random")}
"""The arms run by default: the strategy made for the task's kind of criterion (a rating scale's
spread, a label set's entropy) against random. --arm adds others (margin, entropy on EmoBank)."""


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


Rows = list[dict[str, Any]]


def split(name: str, data_dir: Path, pool_n: int) -> tuple[Rows, Rows, Rows]:
    """The starting items, the pool and the validation items of NAME (seeded, as learning_curve.py's)."""
    rows = read_rows(data_dir / f"{name}-train.jsonl")
    random.Random(0).shuffle(rows)
    dev = read_rows(data_dir / f"{name}-{DATASETS[name][1]}.jsonl")
    random.Random(1).shuffle(dev)
    n_val = max(30, (START + ROUNDS * STEP) // 10)
    return rows[:START], rows[START:START + pool_n], dev[:n_val]


def annotator(cell: Path, cfg_f: Path) -> Path:
    """Train CELL and export its Q4_K_M annotator (skipped where it exists); the merged model is
    removed once the annotator is written (a gigabyte a round)."""
    import shutil

    gguf = cell / "annotator-Q4_K_M.gguf"
    if not gguf.exists():
        merged = train_cell(cell, cfg_f)
        export_annotator(merged, gguf, "Q4_K_M")
        shutil.rmtree(merged)
    return gguf


def picks(strategy: str, gguf: Path, spec: TaskSpec, pool: list[dict[str, Any]], have: set[str], done: Path,
          round_: int, threads: int) -> list[str]:
    """The STEP ids of POOL (less HAVE) that STRATEGY picks with GGUF's annotations of them (kept
    beside GGUF, so arms that share a round's annotator annotate its pool once); written to DONE."""
    if done.exists():
        return json.loads(done.read_text())
    left = [r for r in pool if r["id"] not in have]
    if strategy == "random":
        chosen = sorted(random.Random(f"random:{round_}").sample(sorted(r["id"] for r in left), STEP))
    else:
        pool_f, pred = gguf.parent / "pool.jsonl", gguf.parent / "pool-pred.jsonl"
        write_items(left, pool_f)
        annotate_file(gguf, pool_f, str(pred), JobOptions(threads=threads), resume=pred.exists())
        chosen = [p.id for p in rank(read_predictions(pred, spec), spec, strategy, STEP, exclude=have)]
        pool_f.unlink()
    done.parent.mkdir(exist_ok=True)
    done.write_text(json.dumps(chosen))
    return chosen


def level_of(c: Criterion, row: dict[str, Any]) -> Any:
    """The scale level nearest ROW's human consensus on criterion C."""
    return nearest_level(c, consensus(c, [x["labels"][c.name] for x in row["ratings"] if c.name in x["labels"]]))


def common_levels(rows: Rows, spec: TaskSpec) -> dict[str, Any]:
    from collections import Counter

    return {c.name: Counter(level_of(c, r) for r in rows).most_common(1)[0][0] for c in spec.criteria}


def profile(rows: Rows, spec: TaskSpec, common: dict[str, Any]) -> dict[str, Any]:
    """What a set of picked items looks like: mean characters of their fields, and per criterion
    the share whose consensus level is not the pool's most common one (COMMON)."""
    out: dict[str, Any] = {"chars": float(np.mean([sum(len(str(r[f])) for f in spec.input_names) for r in rows]))}
    for c in spec.criteria:
        out[c.name] = float(np.mean([level_of(c, r) != common[c.name] for r in rows]))
    return out


def run_dataset(name: str, arms: tuple[str, ...], data_dir: Path, out: Path, pool_n: int, budget_s: float,
                threads: int) -> list[dict[str, Any]]:
    spec_path, _, judged = DATASETS[name]
    spec = load_spec(spec_path)
    root = out / name
    root.mkdir(parents=True, exist_ok=True)
    start, pool, val = split(name, data_dir, pool_n)
    val_f = root / "val.jsonl"
    if not val_f.exists():
        write_items(val, val_f)
    longest_f = root / "longest.json"
    if not longest_f.exists():  # one micro-batch shape for every round and arm: the longest of start + pool
        tok = hf_tokenize(load_tokenizer(BASE))
        longest_f.write_text(json.dumps(max(longest_tokens(spec, load_items_of(start + pool, spec, root), tok, False))))
    longest = json.loads(longest_f.read_text())
    test = data_dir / f"{name}-test.jsonl"
    by_id_row = {r["id"]: r for r in start + pool}

    def cell_for(arm: str, round_: int, ids: list[str], timing: dict[str, float] | None
                 ) -> tuple[Path, tuple[Path, dict[str, float]]]:
        cell = root / ("start" if round_ == 0 else f"{arm}-{round_}")
        cell.mkdir(exist_ok=True)
        train = cell / "train.jsonl"
        if not train.exists():
            write_items([by_id_row[i] for i in ids], train)
        return cell, cell_config(cell, spec_path, judged, train, val_f, "none", budget_s, longest, timing, FULL_RUN)

    common = common_levels(pool, spec)
    results: list[dict[str, Any]] = []
    cell0, cfg0 = cell_for("start", 0, [r["id"] for r in start], None)
    timing = cfg0[1]
    gguf0 = annotator(cell0, cfg0[0])
    first = score_cell(cell0, spec_path, gguf0, test, threads)
    preds = {}
    for arm in arms:
        results.append(first | {"dataset": name, "arm": arm, "round": 0, "items": START})
        preds[(arm, 0)] = cell0 / "test.jsonl"
        ids, gguf, cell = [r["id"] for r in start], gguf0, cell0
        for r in range(1, ROUNDS + 1):
            print(f"{name} {arm} round {r}", file=sys.stderr, flush=True)
            done = cell / ("picked.json" if r > 1 else f"picked-{arm}.json")
            chosen = picks(arm, gguf, spec, pool, set(ids), done, r, threads)
            ids = ids + chosen
            cell, cfg = cell_for(arm, r, ids, timing)
            gguf = annotator(cell, cfg[0])
            res = score_cell(cell, spec_path, gguf, test, threads)
            results.append(res | {"dataset": name, "arm": arm, "round": r, "items": len(ids),
                                  "picked": profile([by_id_row[i] for i in chosen], spec, common)})
            preds[(arm, r)] = cell / "test.jsonl"
    if "random" in arms:
        for res in results:
            if res["arm"] != "random" and res["round"] > 0:
                res["gain_over_random"] = paired_gain(spec, preds[(res["arm"], res["round"])],
                                                      preds[("random", res["round"])], test)
    return results


def load_items_of(rows: list[dict[str, Any]], spec: TaskSpec, root: Path) -> list[Any]:
    f = root / "start-and-pool.jsonl"
    write_items(rows, f)
    try:
        return load_items(f, spec)
    finally:
        f.unlink()


def _f(x: dict[str, Any] | None) -> str:
    if not x or x.get("value") is None:
        return "n/a"
    lo, hi = x["ci95"]
    return f"{x['value']:.3f}" + ("" if lo is None else f" [{lo:.2f}, {hi:.2f}]")


def _g(x: dict[str, Any] | None) -> str:
    if not x or x.get("value") is None:
        return ""
    lo, hi = x["ci95"]
    return f"{x['value']:+.3f}" + ("" if lo is None else f" [{lo:+.2f}, {hi:+.2f}]")


def _picked(x: dict[str, Any] | None, criterion: str) -> str:
    return "" if not x else f"{x['chars']:.0f} chars, {x[criterion]:.0%} off {criterion}'s common level"


def markdown(results: list[dict[str, Any]]) -> str:
    lines = ["| data | arm | round | labelled items | figure on the full test split | gain over random (paired) "
             "| one held-out human (same test split) | the 100 picked: characters, off the common level | steps (best) "
             "| train + merge |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        figs = headline(r)
        crit = {"Valence": "Valence", "Arousal": "Arousal", "Dominance": "Dominance",
                "severity (label)": "severity", "macro-F1": "emotion"}
        gains = r.get("gain_over_random", {})
        loo = [r["criteria"][crit[k]].get("leave_one_out") or {} for k in figs]
        t = r.get("train_s")
        lines.append(
            f"| {r['dataset']} | {r['arm']} | {r['round']} | {r['items']} | "
            + "; ".join(f"{k} {_f(v)}" for k, v in figs.items()) + " | "
            + "; ".join(f"{k} {_g(gains.get(crit[k]))}" for k in figs if gains.get(crit[k])) + " | "
            + "; ".join(f"{k} {x['human_alpha']:.3f} [{x['human_alpha_ci'][0]:.2f}, {x['human_alpha_ci'][1]:.2f}]"
                        for k, x in zip(figs, loo) if x.get("human_alpha") is not None) + " | "
            + _picked(r.get("picked"), crit[next(iter(figs))]) + " | "
            + f"{r.get('steps')} ({r.get('best_step')}) | {'n/a' if t is None else f'{t / 60:.1f} min'} |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["dataset"] for r in results))
    fig, axes = plt.subplots(1, len(names), figsize=(4.6 * len(names), 3.3), squeeze=False)
    for ax, name in zip(axes[0], names):
        rows = [r for r in results if r["dataset"] == name]
        key = next(iter(headline(rows[0])))  # EmoBank: Valence, the criterion the small recipe learns
        for arm in dict.fromkeys(r["arm"] for r in rows):
            rs = sorted((r for r in rows if r["arm"] == arm), key=lambda r: r["round"])
            xs = [r["items"] for r in rs]
            h = [headline(r)[key] for r in rs]
            ax.plot(xs, [x["value"] for x in h], marker="o", label=arm)
            ax.fill_between(xs, [x["ci95"][0] for x in h], [x["ci95"][1] for x in h], alpha=0.15)
        ax.set_title(f"{name}: {key}")
        ax.set_xlabel("labelled training items")
        ax.set_xticks([START + k * STEP for k in range(ROUNDS + 1)])
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90, metadata={"Software": None})


@click.command()
@click.option("--shared", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=Path("../shared/data"), show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("models/active"),
              show_default=True)
@click.option("--dataset", "datasets", multiple=True, type=click.Choice(list(ARMS)),
              help="Only these datasets (repeat) [default: all].")
@click.option("--arm", "extra", multiple=True, type=click.Choice(STRATEGIES),
              help="Also run this strategy's arm (repeat) beside the defaults.")
@click.option("--pool", "pool_n", type=click.IntRange(ROUNDS * STEP), default=800, show_default=True,
              help="Items the strategies choose from (the training split after the starting items).")
@click.option("--budget", "budget_s", type=click.FloatRange(60), default=480.0, show_default=True,
              help="Seconds of training (steps, validations, merge) per round, the same for every round.")
@click.option("--threads", type=click.IntRange(1), default=2, show_default=True)
@click.option("--markdown", "md_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the table and the plot (--plot) into this page's active section (docs/active-learning.md).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("docs/active-learning.png"), show_default=True, help="Where --markdown's plot goes.")
def main(shared: Path, out: Path, datasets: tuple[str, ...], extra: tuple[str, ...], pool_n: int, budget_s: float,
         threads: int, md_path: Path | None, plot_path: Path) -> None:
    """Simulate the expert loop: 100 labelled items, then 3 rounds of 100 chosen by each strategy or at random.

    \b
    Examples:
      python scripts/active_learning.py --dataset emobank
      python scripts/active_learning.py --dataset convabuse --arm margin --budget 300
    """
    data_dir = Path("models/data")
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    for name in datasets or tuple(ARMS):
        convert_splits(shared, data_dir, name)
        arms = tuple(dict.fromkeys((*ARMS[name], *extra)))
        results += run_dataset(name, arms, data_dir, out, pool_n, budget_s, threads)
        (out / "active.json").write_text(json.dumps(results, indent=2, default=str))
        (out / "active.md").write_text(markdown(results))
    plot(results, out / "active.png")
    md = markdown(results)
    if md_path:
        from edge_annotator.bench.markdown import write_section

        plot(results, plot_path)
        link = os.path.relpath(plot_path, md_path.parent)
        write_section(md_path, "active", md + f"\n![active learning]({link})\n")
    print(md)


if __name__ == "__main__":
    main()
