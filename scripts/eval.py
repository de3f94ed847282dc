"""The evaluation table: the shipped CPU recipes trained, exported and scored on full test splits,
and two tasks of long items through `annotate-cli fit` as a user's own: USR PersonaChat and
EmoBank passages (data/emobank_passages-train-400.jsonl).

    make eval            # python scripts/eval.py --shared ../shared/data --out models/eval

For every recipe: the full splits are converted from the authors' releases (prepare_data.py),
the recipe is trained and merged (train_and_merge, as annotate-cli train) and exported to Q4_K_M
(export, as annotate-cli export), and the
full test split is annotated twice: by the zero-shot base (its spec given on the command line)
and by the fine-tuned file. Then, per criterion: one held-out rater against the consensus of the
others beside the annotator against that same consensus (averaged over draws of the held-out
rater), alpha with the consensus of all raters for the label and (rating scales) for the score,
the raters' own alpha, macro-F1 for label sets, and a 95% bootstrap interval for each (items
resampled, 1000 times, seed 0). USR PersonaChat (no license: evaluated, never shipped) goes
through `fit` whole: split by conversation, trained, calibrated, exported, parity-checked and
scored on its own test items; so do the 400 shipped items of EmoBank passages (a sentence in the
passage it comes from: scripts/prepare_data.py). The table goes to
OUT/eval.md and OUT/eval.json. Each step is skipped when its output exists (--fresh redoes all),
so an interrupted evaluation continues where it stopped.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, NamedTuple

import click
import numpy as np
import yaml
from prepare_data import convert, release, write_items

from edge_annotator.export.route import export_annotator
from edge_annotator.runtime.data import read_human
from edge_annotator.runtime.jobs import JobOptions, annotate_file
from edge_annotator.runtime.metrics import _alpha, _code, _macro_f1, bootstrap, consensus, leave_one_out, nearest_level
from edge_annotator.runtime.records import by_id, read_predictions
from edge_annotator.runtime.spec import Criterion, TaskSpec, load_spec
from edge_annotator.train.config import load_config
from edge_annotator.train.job import print_validations, train_and_merge

# recipe -> (dataset, test split)
RECIPES = {
    "configs/gemma3-270m-lora-cpu-emobank.yaml": ("emobank", "test"),
    "configs/gemma3-270m-lora-cpu-convabuse.yaml": ("convabuse", "test"),
    "configs/gemma3-270m-lora-cpu-goemotions.yaml": ("goemotions", "test"),
}
class FitTask(NamedTuple):
    spec: str
    group: str  # the field fit splits by
    select_by: str  # what checkpoints are chosen by: label (levels) or score (rating scales)
    data: str | None  # the labelled items, or None: the release's one split, "all"
    test_split: str | None = None  # a split of the release to score on, rather than fit's own test items


FIT_TASKS = {"usr_personachat": FitTask("tasks/usr-personachat.yaml", "context_id", "label", None),
             "emobank_passages": FitTask("tasks/emobank-passages.yaml", "context_id", "score",
                                         "data/emobank_passages-train-400.jsonl", "test")}
"""Tasks evaluated as a user brings them (annotate-cli fit on all their items)."""
SPLITS = {"emobank": ("train", "dev", "test"), "convabuse": ("train", "valid", "test"),
          "goemotions": ("train", "dev", "test")}


def convert_split(shared: Path, data_dir: Path, name: str, split: str) -> Path:
    """DATA_DIR/NAME-SPLIT.jsonl, converted from the release under SHARED unless it is there."""
    out = data_dir / f"{name}-{split}.jsonl"
    if not out.exists():
        items = convert(name, release(shared, name), split)
        write_items(items, out)
        print(f"{len(items)} {name} {split} items -> {out}", file=sys.stderr)
    return out


def convert_splits(shared: Path, data_dir: Path, name: str) -> None:
    for split in SPLITS[name]:
        convert_split(shared, data_dir, name, split)


def _ci(stat: Any, n: int) -> dict[str, Any]:
    point = stat(np.arange(n))
    lo, hi = bootstrap(stat, n)
    return {"value": point, "ci95": [lo, hi]}


class Judged(NamedTuple):
    """The items humans rated on one criterion, aligned: their ratings, the model's label code and
    score (nan where it gave none), the consensus code and the raters' mean (nan for a nominal
    criterion, whose values are names)."""
    ids: list[str]
    ratings: list[list[Any]]
    label: np.ndarray
    score: np.ndarray
    consensus: np.ndarray
    mean: np.ndarray


def judged(c: Criterion, ids: list[str], labels: dict[str, dict[str, Any]],
           scores: dict[str, dict[str, float]], humans: dict[str, list[dict[str, Any]]]) -> Judged:
    rated = [i for i in ids if any(c.name in r for r in humans.get(i, []))]
    hum = [[r[c.name] for r in humans[i] if c.name in r] for i in rated]
    return Judged(rated, hum,
                  label=np.array([_code(c, labels[i][c.name]) for i in rated]),
                  score=np.array([scores.get(i, {}).get(c.name, np.nan) for i in rated]),
                  consensus=np.array([_code(c, consensus(c, h)) for h in hum]),
                  mean=np.array([np.nan if c.level == "nominal" else np.mean([float(v) for v in h]) for h in hum]))


def criterion_table(c: Criterion, ids: list[str], labels: dict[str, dict[str, Any]],
                    scores: dict[str, dict[str, float]], humans: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Label and score alpha with the consensus, the humans' own alpha, macro-F1; each with its interval."""
    rated, hum, lab, sc, cons, mean = judged(c, ids, labels, scores, humans)
    max_r = max(len(h) for h in hum)
    H = np.array([[_code(c, h[k]) if k < len(h) else np.nan for h in hum] for k in range(max_r)])
    out: dict[str, Any] = {"items": len(rated), "raters_max": max_r,
                           "label_alpha": _ci(lambda ix: _alpha([lab[ix], cons[ix]], c.level), len(rated))}
    if max_r >= 2:
        out["humans_alpha"] = _ci(lambda ix: _alpha(H[:, ix], c.level), len(rated))
    if c.level == "nominal":
        gold = [c.values[int(v)] for v in cons]
        pred = [c.values[int(v)] for v in lab]
        out["macro_f1"] = _ci(lambda ix: _macro_f1(c, [gold[k] for k in ix], [pred[k] for k in ix]), len(rated))
        out["label_counts"] = {str(v): int((lab == k).sum()) for k, v in enumerate(c.values) if (lab == k).any()}
    else:
        if not np.isnan(sc).any():
            out["score_alpha"] = _ci(lambda ix: _alpha([sc[ix], mean[ix]], "interval"), len(rated))
            out["score_sd"], out["consensus_sd"] = float(sc.std()), float(mean.std())
        out["label_counts"] = {str(v): int(sum(nearest_level(c, float(x)) == v for x in lab)) for v in c.values}
    if max_r >= 2:  # like for like: one held-out rater and the model, each against the others' consensus
        by = {i: h for i, h in zip(rated, hum)}
        sc_of = {i: scores[i][c.name] for i in rated if c.name in scores.get(i, {})}
        out["leave_one_out"] = leave_one_out(c, {i: labels[i][c.name] for i in rated}, by,
                                             sc_of if judged_by_score(c) and len(sc_of) == len(rated) else None)
    return out


def judged_by_score(c: Criterion) -> bool:
    """The figure a criterion is judged by: the score for interval scales (EmoBank's means), the
    label for ordinal and nominal ones (ConvAbuse's severity, USR's qualities, GoEmotions)."""
    return c.level == "interval"


def judged_arrays(spec: TaskSpec, pred: Path, test: Path) -> dict[str, tuple[list[str], np.ndarray, np.ndarray, str]]:
    """Per criterion: the test ids, the model's figure (score, or label code) and the human
    consensus (raters' mean, or consensus code), and the alpha level they are compared at."""
    labels, scores = by_id(read_predictions(pred, spec))
    humans = read_human(test, spec)
    out = {}
    for c in spec.criteria:
        j = judged(c, sorted(labels), labels, scores, humans)
        out[c.name] = ((j.ids, j.score, j.mean, "interval") if judged_by_score(c)
                       else (j.ids, j.label, j.consensus, c.level))
    return out


def paired_gain(spec: TaskSpec, pred_a: Path, pred_b: Path, test: Path) -> dict[str, Any]:
    """Per criterion: alpha(A) - alpha(B) on the same test items, with a paired 95% bootstrap interval."""
    a, b = judged_arrays(spec, pred_a, test), judged_arrays(spec, pred_b, test)
    out = {}
    for k, (ids, xa, ya, level) in a.items():
        ids_b, xb, yb, _ = b[k]
        if ids != ids_b:
            raise ValueError(f"{pred_a} and {pred_b} scored different test items for {k}")

        def gain(ix: np.ndarray) -> float | None:
            ga, gb = _alpha([xa[ix], ya[ix]], level), _alpha([xb[ix], yb[ix]], level)
            return None if ga is None or gb is None else ga - gb

        lo, hi = bootstrap(gain, len(ids))
        out[k] = {"value": gain(np.arange(len(ids))), "ci95": [lo, hi]}
    return out


def pooled_table(spec: TaskSpec, ids: list[str], labels: dict[str, dict[str, Any]],
                 scores: dict[str, dict[str, float]], humans: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Every (item, criterion) one unit (the scales are shared); items resampled with all their criteria."""
    rows = []  # (item index, label code, consensus code, score, raters' mean, ratings)
    for k, i in enumerate(ids):
        for c in spec.criteria:
            h = [r[c.name] for r in humans.get(i, []) if c.name in r]
            if h:
                rows.append((k, _code(c, labels[i][c.name]), _code(c, consensus(c, h)),
                             scores.get(i, {}).get(c.name, np.nan), float(np.mean(h)), [float(v) for v in h]))
    level = spec.criteria[0].level
    item = np.array([r[0] for r in rows])
    by_item = [np.nonzero(item == k)[0] for k in range(len(ids))]
    lab, cons, sc, mean = (np.array([r[j] for r in rows]) for j in (1, 2, 3, 4))
    max_r = max(len(r[5]) for r in rows)
    H = np.array([[r[5][k] if k < len(r[5]) else np.nan for r in rows] for k in range(max_r)])

    def units(ix: np.ndarray) -> np.ndarray:
        return np.concatenate([by_item[k] for k in ix])

    out = {"label_alpha": _ci(lambda ix: _alpha([lab[units(ix)], cons[units(ix)]], level), len(ids)),
           "humans_alpha": _ci(lambda ix: _alpha(H[:, units(ix)], level), len(ids))}
    if not np.isnan(sc).any():
        out["score_alpha"] = _ci(lambda ix: _alpha([sc[units(ix)], mean[units(ix)]], "interval"), len(ids))
    return out


def evaluate(spec: TaskSpec, out_file: Path, test: Path) -> dict[str, Any]:
    labels, scores = by_id(read_predictions(out_file, spec))
    humans = read_human(test, spec)
    ids = [i for i in labels if humans.get(i)]
    res = {"items": len(ids), "criteria": {c.name: criterion_table(c, ids, labels, scores, humans)
                                           for c in spec.criteria}}
    if len(spec.criteria) > 1 and len({c.level for c in spec.criteria}) == 1:
        res["pooled"] = pooled_table(spec, ids, labels, scores, humans)
    return res


def run_recipe(recipe: Path, shared: Path, out: Path, base_gguf: Path, threads: int, fresh: bool) -> dict[str, Any]:
    name, split = RECIPES[str(recipe)]
    convert_splits(shared, Path("models/data"), name)
    raw = yaml.safe_load(recipe.read_text())
    spec = load_spec(raw["spec"])
    run_dir = Path(raw["output"])
    merged, gguf = run_dir / "merged", out / f"{name}-Q4_K_M.gguf"
    test = Path("models/data") / f"{name}-{split}.jsonl"
    timing = run_dir / "timing.json"  # written by annotate-cli train
    if fresh or not (merged / "config.json").exists():
        train_and_merge(load_config(recipe), progress=print_validations)
    if fresh or not gguf.exists():
        gguf.unlink(missing_ok=True)
        export_annotator(merged, gguf, "Q4_K_M")
    res: dict[str, Any] = {"recipe": str(recipe), "test": str(test), "dataset": name}
    for arm, model, spec_path in (("zero_shot", base_gguf, Path(raw["spec"])), ("fine_tuned", gguf, None)):
        dest = out / f"{name}-{arm}.jsonl"
        if fresh:
            dest.unlink(missing_ok=True)
        print(f"annotate {model} {test} -> {dest}", file=sys.stderr)
        annotate_file(model, test, str(dest), JobOptions(spec=spec_path, threads=threads), resume=True)
        res[arm] = evaluate(spec, dest, test)
    res["train_and_merge_s"] = json.loads(timing.read_text())["total_s"] if timing.exists() else None
    prov = json.loads((merged / "provenance.json").read_text())
    res["val_alpha"], res["best_step"] = prov.get("val_alpha"), prov.get("best_step")
    res["by_score"] = {c.name: judged_by_score(c) for c in spec.criteria}
    return res


def _f(x: dict[str, Any] | None) -> str:
    if not x or x.get("value") is None:
        return "n/a"
    lo, hi = x["ci95"]
    ci = "" if lo is None else f" [{lo:.2f}, {hi:.2f}]"
    return f"{x['value']:.3f}{ci}"


def _loo(x: dict[str, Any] | None, key: str) -> str:
    if not x:
        return "n/a"
    ci = x.get(f"{key}_ci")
    return f"{x[key]:.3f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def markdown(results: list[dict[str, Any]]) -> str:
    """Per criterion: the figure it is judged by, one held-out human and the annotator against the
    same consensus of the other raters (like for like), the verdict, then alpha with all raters'
    consensus, the raters' own alpha and the zero-shot base; then the recipes' time."""
    lines = ["| data (test items) | criterion | figure | one held-out human vs the rest | fine-tuned vs the same "
             "rest | verdict | fine-tuned vs all raters | raters' own alpha | zero-shot base |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        zs, ft = r["zero_shot"], r["fine_tuned"]
        for k, f in ft["criteria"].items():
            z = zs["criteria"][k]
            key = "macro_f1" if "macro_f1" in f else "score_alpha" if r.get("by_score", {}).get(k) else "label_alpha"
            name = {"macro_f1": "macro-F1", "score_alpha": "score alpha", "label_alpha": "label alpha"}[key]
            loo = f.get("leave_one_out")
            lines.append(f"| {r['dataset']} ({ft['items']}) | {k} | {name} | {_loo(loo, 'human_alpha')} | "
                         f"{_loo(loo, 'model_alpha')} | {loo.get('verdict', 'n/a') if loo else 'n/a'} | "
                         f"{_f(f.get(key))} | {_f(f.get('humans_alpha'))} | {_f(z.get(key))} |")
    lines.append("")
    lines.append("| recipe | train + merge on 2 cores | best validation step | validation alpha |")
    lines.append("|---|---|---|---|")
    for r in results:
        t = r["train_and_merge_s"]
        lines.append(f"| `{r['recipe']}` | {'n/a' if t is None else f'{t / 60:.1f} min'} | {r['best_step']} | "
                     f"{r['val_alpha'] if r['val_alpha'] is None else round(r['val_alpha'], 3)} |")
    return "\n".join(lines) + "\n"


def run_fit_task(name: str, task: FitTask, shared: Path, out: Path, base_gguf: Path, threads: int) -> dict[str, Any]:
    """A task the way a user brings it: all its labelled items through `annotate-cli fit` (split by
    the task's group, so no conversation is in both train and test), then the zero-shot base on
    fit's test items."""
    from edge_annotator.train.fit import FitOptions, fit, run_dir

    spec_path, group = task.spec, task.group
    data = Path(task.data) if task.data else convert_split(shared, Path("models/data"), name, "all")
    gguf = out / f"{name}.gguf"
    state = fit(spec_path, data, gguf, FitOptions(group=group, threads=threads, select_by=task.select_by),
                resume=run_dir(gguf).exists(), progress=print_validations)
    spec = load_spec(spec_path)
    test = run_dir(gguf) / "split" / "test.jsonl"
    res: dict[str, Any] = {"recipe": f"annotate-cli fit {spec_path} {data} (--group {group})", "test": str(test),
                           "dataset": name, "fine_tuned": evaluate(spec, run_dir(gguf) / "test-predictions.jsonl",
                                                                   test)}
    if task.test_split:  # the release's whole test split, annotated by fit's file; fit's own test items kept
        res["fit_test"], test = res["fine_tuned"], convert_split(shared, Path("models/data"), name, task.test_split)
        dest = out / f"{name}-fine_tuned.jsonl"
        annotate_file(gguf, test, str(dest), JobOptions(threads=threads), resume=True)
        res["test"], res["fine_tuned"] = str(test), evaluate(spec, dest, test)
    dest = out / f"{name}-zero_shot.jsonl"
    annotate_file(base_gguf, test, str(dest), JobOptions(spec=Path(spec_path), threads=threads), resume=True)
    res["zero_shot"] = evaluate(spec, dest, test)
    tr = state.get("train", {})
    res["train_and_merge_s"], res["val_alpha"], res["best_step"] = tr.get("seconds"), tr.get("val_alpha"), \
        tr.get("best_step")
    res["by_score"] = {c.name: judged_by_score(c) for c in spec.criteria}
    res["fit"] = {k: state.get(k) for k in ("split", "recipe", "estimate", "parity")}
    return res


@click.command()
@click.option("--shared", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=Path("../shared/data"), show_default=True, help="The three datasets' releases.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("models/eval"),
              show_default=True)
@click.option("--base-gguf", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=Path("models/gemma-3-270m-q4_k_m.gguf"), show_default=True)
@click.option("--threads", type=click.IntRange(1), default=2, show_default=True)
@click.option("--recipe", "recipes", type=click.Choice(list(RECIPES)), multiple=True,
              help="Only these recipes (repeat the option) [default: all three, and the fit tasks].")
@click.option("--task", "tasks", type=click.Choice(list(FIT_TASKS)), multiple=True,
              help="Only these fit tasks (repeat) [default: each whose data is under --shared].")
@click.option("--fresh", is_flag=True, help="Train, export and annotate again even if done.")
@click.option("--markdown", "md_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the table into this page's eval section (docs/evaluation.md).")
def main(shared: Path, out: Path, base_gguf: Path, threads: int, recipes: tuple[str, ...], tasks: tuple[str, ...],
         fresh: bool, md_path: Path | None) -> None:
    """Train the CPU recipes, export them, and score them on the full test splits with intervals.
    Rows measured before (OUT/eval.json) stay in the table until their recipe or task runs again.

    \b
    Examples:
      python scripts/eval.py --markdown docs/evaluation.md            # everything (make eval)
      python scripts/eval.py --task usr_personachat --markdown docs/evaluation.md
    """
    out.mkdir(parents=True, exist_ok=True)
    if not recipes and not tasks:
        recipes, tasks = tuple(RECIPES), tuple(t for t in FIT_TASKS if release(shared, t).is_dir())
    new = [run_recipe(Path(r), shared, out, base_gguf, threads, fresh) for r in recipes]
    new += [run_fit_task(t, FIT_TASKS[t], shared, out, base_gguf, threads) for t in tasks]
    done_f = out / "eval.json"
    order = [*(d for d, _ in RECIPES.values()), *FIT_TASKS]
    kept = {r["dataset"]: r for r in (json.loads(done_f.read_text()) if done_f.exists() else [])}
    kept.update({r["dataset"]: r for r in new})
    results = sorted(kept.values(), key=lambda r: order.index(r["dataset"]) if r["dataset"] in order else len(order))
    md = markdown(results)
    (out / "eval.md").write_text(md)
    if md_path:
        from edge_annotator.bench.markdown import write_section

        write_section(md_path, "eval", md)
    done_f.write_text(json.dumps(results, indent=2))
    print(md)


if __name__ == "__main__":
    main()
