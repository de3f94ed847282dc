"""The LoRA training loop: answer-only loss, validation by alpha, best checkpoint, resume.

    annotate-cli train configs/tiny-lora-cpu.yaml            # or: make train CONFIG=...

Writes into cfg.output:
    log.jsonl          one record per step (loss, lr, tokens/s) and per validation (alpha)
    checkpoint/        adapter, optimizer, scheduler and RNG state after the last validation
    best-adapter/      the adapter with the best validation alpha so far
    merged/            the best adapter merged into the base weights (train/merge.py)

Determinism: examples, their order and their augmentation are functions of (seed, step), and
the checkpoint holds torch's RNG state, so the same config and seed give the same adapter on a
CPU, and a run resumed from its last checkpoint ends where an uninterrupted one does.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge_annotator.runtime.spec import load_spec

from .config import TrainConfig
from .evaluate import selection_alpha, validate
from .examples import (
    Encoded,
    build_examples,
    example_stream,
    load_items,
    render,
    split_items,
    steps_per_epoch,
)
from .from_gguf import atomic_dir
from .model import add_lora, answer_logits, build_tiny, load_base, load_tokenizer, pick_device

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    step: int = 0
    best_alpha: float = -math.inf
    best_step: int = -1
    bad_evals: int = 0
    baseline: dict[str, Any] | None = None
    """Validation report of the untrained model (LoRA B = 0, so exactly the base)."""
    best_report: dict[str, Any] | None = None
    stopped_early: bool = False


@dataclass
class TrainResult:
    output: Path
    state: TrainState
    steps: int
    seconds: float
    tokens_per_s: float
    history: list[dict[str, Any]] = field(default_factory=list)


def set_seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def collate(batch: list[Encoded], pad: int) -> Batch:
    """Right-padded ids and mask, and for every answer token the (row, col) that predicts it."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    rows, cols, targets = [], [], []
    for r, e in enumerate(batch):
        ids[r, : len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[r, : len(e.input_ids)] = 1
        for k, lab in enumerate(e.labels):
            if lab != -100:
                rows.append(r)
                cols.append(k - 1)  # the logits at k-1 predict token k
                targets.append(lab)
    return ids, mask, torch.tensor(rows), torch.tensor(cols), torch.tensor(targets)


def _lora_state(model: Any) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}


def train(cfg: TrainConfig, *, resume: bool = False, progress: Callable[[dict[str, Any]], None] | None = None,
          stop_after: int | None = None) -> TrainResult:
    """Train per cfg. `stop_after` ends the process-equivalent of an interrupt after that many steps
    (checkpoints are only written at validations, as a killed run would leave them)."""
    set_seed(cfg.seed)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    device = pick_device(cfg)
    spec = load_spec(cfg.spec)
    items = load_items(cfg.train_data, spec)
    if cfg.val_data:
        train_items, val_items = items, load_items(cfg.val_data, spec)
        overlap = {i.id for i in train_items} & {i.id for i in val_items}
        if overlap:
            raise ValueError(f"{len(overlap)} item id(s) are in both train_data and val_data, "
                             f"e.g. {sorted(overlap)[0]}")
    else:
        train_items, val_items = split_items(items, cfg.val_fraction, cfg.seed)
    if cfg.val_max_items:
        val_items = val_items[: cfg.val_max_items]
    examples = build_examples(train_items, spec, cfg.raters)
    if not examples:
        raise ValueError(f"{cfg.train_data}: no training examples with labels for spec '{spec.name}'")

    tokenizer = load_tokenizer(cfg.base_model)
    if cfg.tiny:
        base_dir = out / "base"
        if not (base_dir / "config.json").exists():
            model0 = build_tiny(cfg)

            def write_base(d: Path) -> None:
                model0.save_pretrained(d, safe_serialization=True)
                tokenizer.save_pretrained(d)

            atomic_dir(base_dir, write_base)
            del model0
        model = load_base(cfg, device, base_dir)
    else:
        model = load_base(cfg, device)
    set_seed(cfg.seed)  # LoRA's A matrices are drawn here: the same seed, the same initial adapter
    model = add_lora(model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    total = cfg.max_steps or math.ceil(cfg.epochs * steps_per_epoch(len(examples), cfg.batch_size))
    warmup = int(round(cfg.warmup_ratio * total))
    from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup

    sched = (get_linear_schedule_with_warmup(opt, warmup, total) if cfg.schedule == "linear"
             else get_constant_schedule_with_warmup(opt, warmup))
    state = TrainState()
    ckpt = out / "checkpoint"
    logf = out / "log.jsonl"
    if resume and (ckpt / "state.json").exists():
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(model, load_file(str(ckpt / "adapter.safetensors")))
        blob = torch.load(ckpt / "optim.pt", weights_only=True)
        opt.load_state_dict(blob["optimizer"])
        sched.load_state_dict(blob["scheduler"])
        torch.set_rng_state(blob["torch_rng"])
        state = TrainState(**json.loads((ckpt / "state.json").read_text()))
        log.info("resumed %s at step %d", out, state.step)
        _truncate_log(logf, state.step)
    elif logf.exists():
        logf.unlink()

    def write_log(rec: dict[str, Any]) -> None:
        with logf.open("a") as fh:
            fh.write(json.dumps(rec) + "\n")
        if progress:
            progress(rec)

    if state.baseline is None:
        state.baseline = validate(model, tokenizer, spec, val_items, device)
        write_log({"step": 0, "event": "val", "alpha": selection_alpha(state.baseline), "untrained": True,
                   "per_criterion": {c["criterion"]: c.get("alpha") for c in state.baseline["criteria"]}})
        state.best_alpha = selection_alpha(state.baseline)
        state.best_report = state.baseline
        state.best_step = 0
        atomic_dir(out / "best-adapter", lambda d: model.save_pretrained(d))

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    model.train()
    t_start, tok_count = time.perf_counter(), 0
    history: list[dict[str, Any]] = []
    first_step = state.step
    while state.step < total:
        step = state.step
        batch_ex = example_stream(len(examples), cfg.seed, step * cfg.batch_size, cfg.batch_size)
        encoded = []
        for epoch, j in batch_ex:
            rng = np.random.default_rng([cfg.seed, epoch, j])
            enc = render(examples[j], train_items, spec, tokenizer, cfg.augment, rng)
            if len(enc.input_ids) > cfg.max_length:
                log.warning("example of item %s is %d tokens, over max_length %d: skipped",
                            train_items[examples[j].item].id, len(enc.input_ids), cfg.max_length)
                continue
            encoded.append(enc)
        n_answer = sum(sum(1 for x in e.labels if x != -100) for e in encoded)
        t0 = time.perf_counter()
        loss_sum = 0.0
        for s in range(0, len(encoded), cfg.micro_batch):
            ids, mask, rows, cols, targets = collate(encoded[s:s + cfg.micro_batch], pad)
            ids, mask, rows, cols, targets = (x.to(device) for x in (ids, mask, rows, cols, targets))
            logits = answer_logits(model, ids, mask, rows, cols, answer_only=cfg.answer_only_logits)
            loss = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum") / max(n_answer, 1)
            loss.backward()
            loss_sum += float(loss.detach())
            tok_count += int(mask.sum())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        state.step += 1
        dt = time.perf_counter() - t0
        rec = {"step": state.step, "event": "train", "loss": loss_sum, "lr": sched.get_last_lr()[0],
               "tokens_per_s": sum(len(e.input_ids) for e in encoded) / dt if dt else 0.0, "total": total}
        write_log(rec)
        history.append(rec)
        if state.step % cfg.eval_every == 0 or state.step == total:
            report = validate(model, tokenizer, spec, val_items, device)
            a = selection_alpha(report)
            better = a > state.best_alpha
            if better:
                state.best_alpha, state.best_step, state.bad_evals, state.best_report = a, state.step, 0, report
                atomic_dir(out / "best-adapter", lambda d: model.save_pretrained(d))
            else:
                state.bad_evals += 1
            write_log({"step": state.step, "event": "val", "alpha": a, "best": state.best_alpha,
                       "per_criterion": {c["criterion"]: c.get("alpha") for c in report["criteria"]}})
            if state.bad_evals >= cfg.patience:
                state.stopped_early = True
            _save_checkpoint(ckpt, model, opt, sched, state)
            if state.stopped_early:
                log.info("no better validation alpha in %d validations: stopping at step %d", cfg.patience, state.step)
                break
        if stop_after is not None and state.step - first_step >= stop_after:
            break
    seconds = time.perf_counter() - t_start
    return TrainResult(out, state, state.step, seconds, tok_count / seconds if seconds else 0.0, history)


def _save_checkpoint(ckpt: Path, model: Any, opt: Any, sched: Any, state: TrainState) -> None:
    from safetensors.torch import save_file

    def write(d: Path) -> None:
        save_file(_lora_state(model), str(d / "adapter.safetensors"))
        torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "torch_rng": torch.get_rng_state()}, d / "optim.pt")
        (d / "state.json").write_text(json.dumps(asdict(state)))

    atomic_dir(ckpt, write)


def _truncate_log(logf: Path, step: int) -> None:
    """Drop log records past the checkpoint a resumed run restarts from."""
    if not logf.exists():
        return
    keep = [line for line in logf.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    tmp = logf.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, logf)

