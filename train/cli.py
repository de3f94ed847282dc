"""`annotate-cli train CONFIG.yaml`: fine-tune, validate, keep the best adapter, merge.

Rows of runtime/commands.py's table; they need the train extra.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from edge_annotator.runtime.options import Command
from edge_annotator.runtime.trust import describe

from .recipe import AUGMENTATIONS

err = Console(stderr=True)


@click.command(cls=Command)
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--output", type=click.Path(file_okay=False), default=None, help="Run folder (overrides the config's).")
@click.option("--max-steps", type=click.IntRange(1), default=None, help="Stop after this many optimizer steps.")
@click.option("--resume", is_flag=True, help="Continue from the run folder's last checkpoint.")
@click.option("--no-merge", is_flag=True, help="Keep the best adapter only; do not write merged/.")
@click.option("--merge-only", is_flag=True,
              help="Do not train: merge the run folder's best adapter (e.g. one trained on a GPU machine and "
                   "copied back with RUN/checkpoint/state.json) into the config's base.")
@click.option("--check", "check_only", is_flag=True,
              help="Do not train: check the config (types, paths, data, tokenizer, lengths), time two steps "
                   "and a validation, and print the estimated time of the run.")
def train(config: Path, output: str | None, max_steps: int | None, resume: bool, no_merge: bool,
          merge_only: bool, check_only: bool) -> None:
    """Fine-tune a base model on human-labelled items (LoRA; QLoRA with quantization: nf4).

    Validates with the runtime's own scoring and Krippendorff's alpha, keeps the best adapter,
    stops early, and merges the best adapter into the base weights (RUN/merged). With several
    raters per item, `raters: distribution` (the default) trains each item and criterion once
    against the raters' distribution over the levels; `select_by: score` (the default) chooses
    checkpoints by the alpha of the score annotate-cli writes (the probability-weighted mean).

    \b
    Examples:
      annotate-cli train configs/tiny-lora-cpu.yaml
      annotate-cli train configs/gemma3-270m-lora-cpu-emobank.yaml --output runs/emobank
      annotate-cli train configs/gemma3-270m-lora-cpu-emobank.yaml --output runs/emobank --resume
      annotate-cli train configs/gemma3-270m-qlora-gpu-emobank.yaml --merge-only   # adapter from a GPU
      annotate-cli train my-config.yaml --check          # valid? how long? (nothing is trained)
    """
    from .config import load_config
    from .job import merge_run, train_and_merge

    cfg = load_config(config, output=output, max_steps=max_steps)
    if check_only:
        from .check import check_lines, check_run

        for line in check_lines(cfg, check_run(cfg)):
            err.print(line)
        return
    if merge_only:
        t0 = time.perf_counter()
        err.print(f"merged model: {merge_run(cfg)} ({time.perf_counter() - t0:.0f}s)")
        return
    with _progress_bar() as on_log:
        done = train_and_merge(cfg, resume=resume, merge_after=not no_merge, progress=on_log)
    st, r = done.result.state, done.result
    base = None if done.baseline_alpha is None else round(done.baseline_alpha, 3)
    err.print(f"best validation {cfg.select_by} alpha {st.best_alpha:.3f} at step {st.best_step} (untrained: {base}); "
              f"{r.steps} steps, {r.tokens_per_s:.0f} tokens/s, {r.examples_per_s:.1f} examples/s")
    if done.calibration:
        from .job import calibration_lines

        err.print("calibration (RUN/merged/spec.json):")
        for line in calibration_lines(done.calibration):
            err.print(line)
    if done.merged:
        err.print(f"merged model: {done.merged}")
    err.print(f"done in {done.timing['total_s']:.0f}s (RUN/timing.json)")


@contextmanager
def _progress_bar() -> Iterator[Callable[[dict[str, Any]], None]]:
    """A progress bar over training steps, with each validation printed above it."""
    from .job import validation_line

    with Progress(TextColumn("[bold]training[/] {task.fields[info]}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=err) as bar:
        task = bar.add_task("train", total=None, info="")

        def on_log(rec: dict[str, Any]) -> None:
            if rec["event"] == "train":
                bar.update(task, completed=rec["step"], total=rec["total"],
                           info=f"loss {rec['loss']:.3f} lr {rec['lr']:.2e} {rec['tokens_per_s']:.0f} tok/s "
                                f"{rec['examples_per_s']:.1f} ex/s")
            elif line := validation_line(rec):
                bar.console.print(line)

        yield on_log


def _duration(text: str) -> float:
    """'20m', '90s', '1.5h' or plain seconds."""
    t = text.strip().lower()
    unit = {"s": 1, "m": 60, "h": 3600}.get(t[-1:], None)
    try:
        return float(t[:-1]) * unit if unit else float(t)
    except ValueError:
        raise click.BadParameter(f"{text!r}: a duration such as 20m, 90s or 1.5h") from None


@click.command(cls=Command)
@click.argument("spec", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("labels", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The annotator to write (.gguf); its run folder is OUTPUT without .gguf, plus .run/.")
@click.option("--budget", default="20m", show_default=True, help="Training time to size the recipe for.")
@click.option("--base", "base", default="models/gemma-3-270m-hf", show_default=True,
              type=click.Path(file_okay=False), help="HF base folder (annotate-cli base gemma3-270m DIR).")
@click.option("--test-fraction", "test", type=float, default=0.2, show_default=True,
              help="Items held out for the test and the report.")
@click.option("--val-fraction", "val", type=float, default=0.1, show_default=True,
              help="Items for validation: checkpoint choice, early stopping, calibration, parity.")
@click.option("--group", default=None, help="Keep items sharing this field's value in one split.")
@click.option("--quant", default="Q4_K_M", show_default=True)
@click.option("--augment", type=click.Choice(list(AUGMENTATIONS)), default="none", show_default=True,
              is_flag=False, flag_value="all",
              help="The paper's augmentations: all three (--augment alone), one alone, or none (measured in "
                   "docs/recipes.md).")
@click.option("--select-by", type=click.Choice(["score", "label"]), default="score", show_default=True,
              help="What checkpoints are chosen by: the score's alpha (rating scales) or the label's.")
@click.option("--qat", is_flag=True,
              help="Train on the base GGUF's own 4-bit grid: the annotator is one file (the base's blocks with "
                   "the trained codes) instead of the base and an adapter beside it (docs/export.md).")
@click.option("--top-layers", type=click.IntRange(1), default=None,
              help="LoRA on this many top layers only: the layers below run once per token and are kept, so "
                   "later passes cost the top layers alone (long items: several times the passes in --budget; "
                   "docs/benchmarks.md).")
@click.option("--route", type=click.Choice(["lora", "head", "auto"]), default="lora", show_default=True,
              help="lora: fine-tune for --budget; head: no training, a linear head per criterion on the base's own "
                   "states, in minutes (docs/recipes.md compares them); auto: the heads first (OUTPUT in minutes), "
                   "then the fine-tune, and OUTPUT is whichever agrees better on the validation items.")
@click.option("--trust-target", type=click.FloatRange(0, 1, max_open=True), default=0.1, show_default=True,
              help="The trust rule fitted on the test items: at most this disagreement among the labels it "
                   "accepts without review (annotate-cli trust; 0: no rule).")
@click.option("--trust-delta", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.1,
              show_default=True, help="The chance that the trust rule's promise fails.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=click.IntRange(1), default=None)
@click.option("--resume", is_flag=True, help="Continue the run folder's stages where they stopped.")
@click.option("--tiny", is_flag=True, help="A 2-layer model built from scratch with the base's tokenizer: smoke "
                                           "runs and tests only (it learns little).")
def fit(spec: Path, labels: Path, output: Path, budget: str, base: str, test: float, val: float, group: str | None,
        quant: str, augment: str, select_by: str, qat: bool, top_layers: int | None, route: str, trust_target: float,
        trust_delta: float, seed: int, threads: int | None, resume: bool, tiny: bool) -> None:
    """From human ratings to a parity-checked annotator and its agreement report, in one command.

    Splits LABELS by item (train / validation / test, seeded), sizes the recipe from the item count,
    their lengths and a timed step (cut to --budget), trains, merges, calibrates, exports, checks
    parity on the validation items, annotates the test items and writes the agreement report
    (beside the leave-one-rater-out human figure), then fits on those test items the trust rule
    that marks which labels to accept without review (annotate-cli trust). OUTPUT appears only
    when parity passes. With
    --route head nothing is trained: a linear head per criterion on the base's own states, fitted
    on the train and validation items, in minutes. With --route auto both: the heads' annotator
    is OUTPUT minutes in, then training, and OUTPUT ends as whichever agrees better with the
    humans on the validation items (the heads fitted without them), tested and ruled.

    \b
    Examples:
      annotate-cli fit tasks/support.yaml ratings.csv -o support.gguf
      annotate-cli fit tasks/support.yaml ratings.jsonl -o support.gguf --budget 40m --group ticket_id
      annotate-cli fit tasks/support.yaml ratings.csv -o support.gguf --resume    # after an interrupt
      annotate-cli fit tasks/support.yaml ratings.csv -o support.gguf --qat       # one 4-bit file
      annotate-cli fit tasks/support.yaml ratings.csv -o support.gguf --route head   # minutes, no training
      annotate-cli fit tasks/support.yaml ratings.csv -o support.gguf --route auto   # heads, then the better
      annotate-cli fit tasks/support.yaml ratings.csv -o support.gguf --top-layers 4 # long items: more passes
    """

    from .fit import FitOptions, check_out, r3, run_dir
    from .fit import fit as run_fit
    from .job import calibration_lines

    opts = FitOptions(base=base, budget_s=_duration(budget), test=test, val=val, seed=seed, group=group, quant=quant,
                      threads=threads, augment=augment, tiny=tiny, select_by=select_by, qat=qat,
                      top_layers=top_layers, route=route,
                      trust_target=trust_target or None, trust_delta=trust_delta)
    if not Path(base, "config.json").is_file():
        raise click.ClickException(f"{base}: no HF base folder; make one with annotate-cli base gemma3-270m {base}")
    check_out(spec, labels, output, resume)
    t0 = time.perf_counter()

    def say(name: str, what: str) -> None:
        err.print(f"[bold]{name}[/]: {what} ({time.perf_counter() - t0:.0f}s)")

    with _progress_bar() as on_log:
        state = run_fit(spec, labels, output, opts, resume=resume, stage=say, progress=on_log)
    run = run_dir(output)
    for name, h in (state.get("heads") or {}).get("criteria", {}).items():
        err.print(f"head {name}: {h['head'] or 'none'}, 5-fold alpha {r3(h['cv_alpha'])} on {h['items']} items")
    if r := state.get("route"):
        lo, hi = r["ci95"]
        err.print(f"route {r['chose']}: validation alpha {r3(r['head'])} for the heads on the base, {r3(r['lora'])} "
                  f"for the fine-tune (the heads' gain {r3(r['gain'])} [{r3(lo)}, {r3(hi)}], {r['items']} items)")
    tr = state.get("train", {})
    if tr.get("calibration"):
        err.print("calibration:")
        for line in calibration_lines(tr["calibration"]):
            err.print(line)
    for name, c in state.get("test", {}).get("criteria", {}).items():
        loo = c.get("leave_one_out") or {}
        kind = "score" if c.get("score_alpha") is not None else "label"
        fig = c.get("score_alpha") if kind == "score" else c.get("alpha")
        err.print(f"test {name}: {kind} alpha {r3(fig)}, label alpha {r3(c.get('alpha'))}"
                  + (f"; one human vs the rest {loo['human_alpha']:.3f}, the model's {loo['model_figure']} "
                     f"{loo['model_alpha']:.3f}: {loo.get('verdict', 'n/a')}" if loo else ""))
    for name, rule in (state.get("trust") or {}).get("criteria", {}).items():
        err.print(f"trust {describe(name, rule)}", markup=False)
    what = "heads fitted" if (state.get("route") or {}).get("chose", route) == "head" else "parity passed"
    err.print(f"{output}: {what}; run folder {run}/ (fit.json, report/report.html) in {time.perf_counter() - t0:.0f}s")
