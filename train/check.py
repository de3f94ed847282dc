"""A training run checked, and its time measured, before it commits: `annotate-cli train CONFIG --check`.

    got = check_run(cfg)          # types and paths (load_config), data, tokenizer, lengths, timed steps
    got["estimate_s"]             # steps x a timed step + validations + merge

It sets the run up as training would (in a throw-away folder: the run's own is never touched),
times two optimizer-free steps after a warm-up and the validation of a few items, and says what
the whole run should take on this machine. `annotate-cli fit` sizes its recipe from the same figures.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import replace
from typing import Any

from .config import TrainConfig

MERGE_S = 15.0
"""Merging and saving a 270M model on 2 cores (measured 10-14 s); the calibration scores the
validation items twice more."""


def estimate_seconds(steps: int, eval_every: int, step_s: float, val_s: float, calibrate: bool,
                     repeat_s: float | None = None, pass_steps: int | None = None) -> float:
    """A run's time: its steps, a validation before the first and every eval_every after, the
    merge, and (calibrate) two more scorings of the validation items. With the frozen layers kept
    (hf/frozen.py), the first pass's `pass_steps` steps take step_s and the later ones repeat_s."""
    if repeat_s is None or pass_steps is None:  # every step costs step_s
        repeat_s, pass_steps = step_s, steps
    first = min(steps, pass_steps)
    train_s = first * step_s + (steps - first) * repeat_s
    return train_s + (1 + math.ceil(steps / eval_every)) * val_s + MERGE_S + (2 * val_s if calibrate else 0.0)


def check_run(cfg: TrainConfig, timed_steps: int = 2) -> dict[str, Any]:
    """Set the run up (data, tokenizer check, lengths, model), time `timed_steps` steps after one
    warm-up and a validation of up to 8 items; raise CannotLearn/ValueError as training would."""
    import torch

    from edge_annotator.hf.score import score_items

    from .examples import steps_per_epoch
    from .trainer import Run, train_step

    with tempfile.TemporaryDirectory(prefix="edge-annotator-check-") as tmp:
        run = Run(replace(cfg, output=tmp))
        t0 = time.perf_counter()
        run.setup(resume=False)
        setup_s = time.perf_counter() - t0
        run.model.train()
        times, again = [], []
        batches = []
        for k in range(timed_steps + 1):
            t0 = time.perf_counter()
            batch = run.prepare(k)
            got = train_step(run.model, batch, run.frozen)
            run.model.zero_grad(set_to_none=True)
            if k:  # the first is a warm-up
                times.append(time.perf_counter() - t0)
                batches.append(batch)
        for batch in batches if run.frozen else []:  # the same items again: a later pass's step
            t0 = time.perf_counter()
            train_step(run.model, batch, run.frozen)
            run.model.zero_grad(set_to_none=True)
            again.append(time.perf_counter() - t0)
        step_s = sorted(times)[len(times) // 2]
        repeat_s = sorted(again)[len(again) // 2] if again else None  # None: nothing kept, every step alike
        val = run.data.val_items
        few = val[: min(8, len(val))]
        t0 = time.perf_counter()
        with torch.no_grad():
            score_items(run.model, run.tokenizer, run.data.spec, few)
        val_s = (time.perf_counter() - t0) / max(len(few), 1) * len(val)
        n_vals = 1 + math.ceil(run.total / cfg.eval_every)
        per_pass = steps_per_epoch(len(run.examples), run.data.units_per_step)
        estimate = estimate_seconds(run.total, cfg.eval_every, step_s, val_s, cfg.calibrate, repeat_s, per_pass)
        return {"steps": run.total, "examples": len(run.examples), "train_items": len(run.data.train_items),
                "val_items": len(val), "step_s": step_s, "repeat_step_s": repeat_s, "steps_per_pass": per_pass,
                "tokens_per_step": got["tokens"], "examples_per_step": got["examples"], "validation_s": val_s,
                "validations": n_vals, "setup_s": setup_s, "estimate_s": estimate, "max_length": cfg.max_length,
                "longest_example": run.data.longest}


def check_lines(cfg: TrainConfig, got: dict[str, Any]) -> list[str]:
    """What `train --check` prints."""
    return [f"{cfg.name or 'config'}: valid; {got['train_items']} training items ({got['examples']} examples), "
            f"{got['val_items']} validation items, max_length {got['max_length']} tokens",
            f"{got['steps']} steps of {got['examples_per_step']} examples ({got['tokens_per_step']} tokens): "
            f"{got['step_s']:.1f} s a step"
            + (f" ({got['repeat_step_s']:.1f} s once the frozen layers are kept)"
               if got["repeat_step_s"] is not None else "")
            + f", {got['validations']} validations of {got['validation_s']:.0f} s",
            f"estimated {got['estimate_s'] / 60:.1f} min on this machine (train, validate, merge)"]
