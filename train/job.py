"""One training job as the library runs it: fine-tune, merge the best adapter, time both.

    done = train_and_merge(load_config("configs/tiny-lora-cpu.yaml"), progress=print)
    done.merged, done.timing          # RUN/merged, and RUN/timing.json's figures
    merge_run(cfg)                    # merge an adapter trained elsewhere (a GPU) into the base

`annotate-cli train` is these two functions with a progress bar; scripts/demo.py and
scripts/eval.py call them directly.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_annotator.hf.score import selection_alpha
from edge_annotator.runtime.errors import UserError

from .config import TrainConfig
from .merge import merge
from .trainer import TrainResult, train

log = logging.getLogger(__name__)


@dataclass
class Trained:
    result: TrainResult
    baseline_alpha: float | None  # the untrained model's validation alpha (select_by)
    merged: Path | None
    timing: dict[str, Any]
    calibration: dict[str, Any] | None = None  # calibrate.summary, where the spec has rating scales


def train_and_merge(cfg: TrainConfig, *, resume: bool = False, merge_after: bool = True,
                    progress: Callable[[dict[str, Any]], None] | None = None) -> Trained:
    """Train per cfg (trainer.train: raises CannotLearn), then merge the best adapter into RUN/merged
    with the validation figures in its provenance; RUN/timing.json gets the seconds of each."""
    t0 = time.perf_counter()
    result = train(cfg, resume=resume, progress=progress)
    st = result.state
    base_alpha = selection_alpha(st.baseline, cfg.select_by) if st.baseline else None
    timing: dict[str, Any] = {"train_s": round(time.perf_counter() - t0, 1), "steps": result.steps,
                              "examples_per_s": round(result.examples_per_s, 2),
                              "tokens_per_s": round(result.tokens_per_s, 1)}
    merged = None
    calibration = None
    if merge_after:
        t_merge = time.perf_counter()
        merged = merge(cfg, result.output, extra_provenance={
            "val_alpha": st.best_alpha, "val_alpha_untrained": base_alpha, "val_select_by": cfg.select_by,
            "best_step": st.best_step, "val_report": st.best_report})
        timing["merge_s"] = round(time.perf_counter() - t_merge, 1)
        if cfg.calibrate:
            t_cal = time.perf_counter()
            calibration = calibrate_merged(cfg, merged)
            timing["calibrate_s"] = round(time.perf_counter() - t_cal, 1)
    timing["total_s"] = round(time.perf_counter() - t0, 1)
    (result.output / "timing.json").write_text(json.dumps(timing, indent=2) + "\n")
    return Trained(result, base_alpha, merged, timing, calibration)


def calibrate_merged(cfg: TrainConfig, merged: Path) -> dict[str, Any] | None:
    """Score the validation items with the merged model, fit each rating scale's calibration
    (train/calibrate.py) and write it into MERGED/spec.json, with what it measured in
    MERGED/provenance.json; None where the spec has no rating scale."""
    import torch
    from transformers import AutoModelForCausalLM

    from edge_annotator.hf.score import report_of, score_items
    from edge_annotator.runtime.spec import spec_from_json

    from .calibrate import fit_calibration, summary, with_calibration
    from .model import load_tokenizer
    from .trainer import setup_data

    spec = spec_from_json((merged / "spec.json").read_text(), str(merged / "spec.json"))
    if all(c.level == "nominal" for c in spec.criteria):
        return None
    items = setup_data(cfg).val_items
    dtype = torch.bfloat16 if cfg.compute_dtype == "bfloat16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=dtype, use_safetensors=True)
    tok = load_tokenizer(merged)
    raw = score_items(model, tok, spec, items)
    cals = fit_calibration(spec, items, raw, seed=cfg.seed)
    calibrated = with_calibration(spec, cals)
    after = score_items(model, tok, calibrated, items)
    got = summary(cals, report_of(spec, items, raw), report_of(calibrated, items, after))
    (merged / "spec.json").write_text(calibrated.to_json())
    prov = json.loads((merged / "provenance.json").read_text())
    prov["calibration"] = got
    (merged / "provenance.json").write_text(json.dumps(prov, indent=2, default=str))
    return got


def calibration_lines(cal: dict[str, Any]) -> list[str]:
    """train's summary of the calibration: per criterion the map chosen and the score's alpha on the
    validation items before and after it (after: in-sample; the cross-validated figure beside it)."""
    out = []
    for name, c in cal.items():
        cv = c["cv_alpha"].get(c["method"])
        out.append(f"  {name}: {c['method']}, validation score alpha {_r(c['score_alpha_before'])} -> "
                   f"{_r(c['score_alpha_after'])} (cross-validated {_r(cv)}, {c['items']} items)")
    return out


def _r(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def validation_line(rec: dict[str, Any]) -> str | None:
    """The line to print for a trainer progress record: a validation's alphas; None for a step."""
    if rec["event"] == "train":
        return None

    def r3(d: dict[str, Any]) -> str:
        return json.dumps({k: None if v is None else round(v, 3) for k, v in d.items()})

    return (f"step {rec['step']}: validation {rec['select_by']} alpha {rec['alpha']:.3f} " + r3(rec["per_criterion"])
            + (f"; score's Pearson r {r3(rec['score_r'])}" if "score_r" in rec else ""))


def print_validations(rec: dict[str, Any]) -> None:
    """A `progress` for train_and_merge outside a progress bar: each validation's line on stderr."""
    if line := validation_line(rec):
        print(line, file=sys.stderr, flush=True)


class NoAdapter(UserError, FileNotFoundError):
    pass


def merge_run(cfg: TrainConfig) -> Path:
    """Merge RUN/best-adapter as training would have, with the validation figures of
    RUN/checkpoint/state.json in the provenance where the run left them (a warning where not)."""
    run = Path(cfg.output)
    if not (run / "best-adapter" / "adapter_model.safetensors").is_file():
        raise NoAdapter(f"{run / 'best-adapter'}: no adapter to merge (adapter_model.safetensors); "
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
        log.warning("%s is missing: the merged model's provenance will lack validation figures", state)
    return merge(cfg, run, extra_provenance=extra)
