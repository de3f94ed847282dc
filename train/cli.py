"""`annotate-cli train CONFIG.yaml`: fine-tune, validate, keep the best adapter, merge.

Registered through the edge_annotator.commands entry-point group; needs the train extra.
"""

from __future__ import annotations

import json
import time
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
    from edge_annotator.hf.score import selection_alpha

    from .config import ConfigError, load_config
    from .merge import merge
    from .trainer import CannotLearn
    from .trainer import train as run_train

    try:
        cfg = load_config(config, output=output, max_steps=max_steps)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    if merge_only:
        _merge_only(cfg)
        return
    t0 = time.perf_counter()
    with Progress(TextColumn("[bold]training[/] {task.fields[info]}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=err) as bar:
        task = bar.add_task("train", total=None, info="")

        def on_log(rec: dict[str, Any]) -> None:
            if rec["event"] == "train":
                bar.update(task, completed=rec["step"], total=rec["total"],
                           info=f"loss {rec['loss']:.3f} lr {rec['lr']:.2e} {rec['tokens_per_s']:.0f} tok/s "
                                f"{rec['examples_per_s']:.1f} ex/s")
            else:
                def r3(d: dict[str, Any]) -> str:
                    return json.dumps({k: None if v is None else round(v, 3) for k, v in d.items()})

                bar.console.print(f"step {rec['step']}: validation {rec['select_by']} alpha {rec['alpha']:.3f} "
                                  + r3(rec["per_criterion"])
                                  + (f"; score's Pearson r {r3(rec['score_r'])}" if "score_r" in rec else ""))

        try:
            result = run_train(cfg, resume=resume, progress=on_log)
        except CannotLearn as e:
            raise click.ClickException(str(e)) from None
    st = result.state
    base_alpha = selection_alpha(st.baseline, cfg.select_by) if st.baseline else None
    err.print(f"best validation {cfg.select_by} alpha {st.best_alpha:.3f} at step {st.best_step} "
              f"(untrained: {base_alpha if base_alpha is None else round(base_alpha, 3)}); "
              f"{result.steps} steps, {result.tokens_per_s:.0f} tokens/s, {result.examples_per_s:.1f} examples/s")
    timing = {"train_s": round(time.perf_counter() - t0, 1), "steps": result.steps,
              "examples_per_s": round(result.examples_per_s, 2), "tokens_per_s": round(result.tokens_per_s, 1)}
    if not no_merge:
        t_merge = time.perf_counter()
        merged = merge(cfg, result.output, extra_provenance={
            "val_alpha": st.best_alpha, "val_alpha_untrained": base_alpha, "val_select_by": cfg.select_by,
            "best_step": st.best_step,
            "val_report": st.best_report})
        err.print(f"merged model: {merged}")
        timing["merge_s"] = round(time.perf_counter() - t_merge, 1)
    timing["total_s"] = round(time.perf_counter() - t0, 1)
    (result.output / "timing.json").write_text(json.dumps(timing, indent=2) + "\n")
    err.print(f"done in {timing['total_s']:.0f}s (RUN/timing.json)")


def _merge_only(cfg: Any) -> None:
    """Merge RUN/best-adapter as training would have, with the validation figures of
    RUN/checkpoint/state.json in the provenance where the run left them."""
    from edge_annotator.hf.score import selection_alpha

    from .merge import merge

    run = Path(cfg.output)
    if not (run / "best-adapter" / "adapter_model.safetensors").is_file():
        raise click.ClickException(f"{run / 'best-adapter'}: no adapter to merge (adapter_model.safetensors); "
                                   f"copy back the run folder's best-adapter/ from the machine that trained it")
    extra: dict[str, Any] = {"merged_apart_from_training": True}
    state = run / "checkpoint" / "state.json"
    if state.is_file():
        st = json.loads(state.read_text())
        base = st.get("baseline")
        extra |= {"val_alpha": st.get("best_alpha"), "val_select_by": cfg.select_by, "best_step": st.get("best_step"),
                  "val_alpha_untrained": selection_alpha(base, cfg.select_by) if base else None,
                  "val_report": st.get("best_report")}
    else:
        err.print(f"[yellow]{state} is missing: the merged model's provenance will lack validation figures")
    t0 = time.perf_counter()
    merged = merge(cfg, run, extra_provenance=extra)
    err.print(f"merged model: {merged} ({time.perf_counter() - t0:.0f}s)")
