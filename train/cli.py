"""`annotate-cli train CONFIG.yaml`: fine-tune, validate, keep the best adapter, merge.

Registered through the edge_annotator.commands entry-point group; needs the train extra.
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

err = Console(stderr=True)


@click.command()
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--output", type=click.Path(file_okay=False), default=None, help="Run folder (overrides the config's).")
@click.option("--max-steps", type=click.IntRange(1), default=None, help="Stop after this many optimizer steps.")
@click.option("--resume", is_flag=True, help="Continue from the run folder's last checkpoint.")
@click.option("--no-merge", is_flag=True, help="Keep the best adapter only; do not write merged/.")
@click.option("--merge-only", is_flag=True,
              help="Do not train: merge the run folder's best adapter (e.g. one trained on a GPU machine and "
                   "copied back with RUN/checkpoint/state.json) into the config's base.")
def train(config: Path, output: str | None, max_steps: int | None, resume: bool, no_merge: bool,
          merge_only: bool) -> None:
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
    """
    from .config import ConfigError, load_config
    from .job import NoAdapter, merge_run, train_and_merge
    from .trainer import CannotLearn

    try:
        cfg = load_config(config, output=output, max_steps=max_steps)
        if merge_only:
            t0 = time.perf_counter()
            err.print(f"merged model: {merge_run(cfg)} ({time.perf_counter() - t0:.0f}s)")
            return
        with _progress_bar() as on_log:
            done = train_and_merge(cfg, resume=resume, merge_after=not no_merge, progress=on_log)
    except (ConfigError, CannotLearn, NoAdapter) as e:
        raise click.ClickException(str(e)) from None
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
