"""The LoRA training loop: token-tree batches, soft targets, validation by alpha, best checkpoint, resume.

    annotate-cli train configs/tiny-lora-cpu.yaml            # or: make train CONFIG=...

Writes into cfg.output:
    log.jsonl          one record per step (loss, lr, tokens/s, examples/s) and per validation (alpha)
    checkpoint/        adapter, optimizer, scheduler and RNG state after the last validation
    best-adapter/      the adapter with the best validation alpha so far
    merged/            the best adapter merged into the base weights (train/merge.py)

A step takes batch_size examples (one criterion of one item each; an item's criteria travel
together) in micro-batches, each one token tree (hf/tree.py) sharing one augmented
instruction. The loss is the cross-entropy between each example's target distribution and the
runtime's distribution over the allowed answers.

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
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge_annotator.hf.frozen import FrozenLayers, supported
from edge_annotator.hf.score import answer_tries, hf_tokenize, pad_id, selected_alpha, selection_alpha, validate
from edge_annotator.hf.tokcheck import check_folder
from edge_annotator.hf.tree import (
    Tokens,
    TreeBatch,
    build_tree,
    causal_model,
    item_texts,
    level_logprobs,
    runs_by_key,
    soft_cross_entropy,
    tree_attention,
)
from edge_annotator.runtime.errors import UserError
from edge_annotator.runtime.files import atomic_dir
from edge_annotator.runtime.prompt import CANONICAL, RenderOptions, leading_inputs, render_instruction, shared_groups
from edge_annotator.runtime.spec import TaskSpec, load_spec

from .config import TrainConfig
from .examples import (
    Example,
    ExampleStream,
    Item,
    augment_options,
    build_examples,
    load_items,
    split_items,
    steps_per_epoch,
    unit_of,
)
from .model import add_lora, build_tiny, load_base, load_tokenizer, pick_device, save_tokenizer

log = logging.getLogger(__name__)


class CannotLearn(UserError, RuntimeError):
    """A run that would train on nothing, or on a fraction of its data: stopped before it wastes time."""


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
    examples_per_s: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Data:
    spec: TaskSpec
    train_items: list[Item]
    val_items: list[Item]
    examples: list[Example]
    units_per_step: int
    units_per_micro: int
    longest: int = 0
    """Tokens of the longest training prompt plus its answer (set by check_lengths)."""


def set_seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def setup_data(cfg: TrainConfig) -> Data:
    """Items split by item before any augmentation, and the examples to learn from them."""
    spec = load_spec(cfg.spec)
    items = load_items(cfg.train_data, spec)
    if cfg.val_data:
        train_items, val_items = items, load_items(cfg.val_data, spec)
        overlap = {i.id for i in train_items} & {i.id for i in val_items}
        if overlap:
            raise UserError(f"{len(overlap)} item id(s) are in both train_data and val_data, "
                             f"e.g. {sorted(overlap)[0]}")
    else:
        train_items, val_items = split_items(items, cfg.val_fraction, cfg.seed)
    if cfg.val_max_items:
        val_items = val_items[: cfg.val_max_items]
    examples = build_examples(train_items, spec, cfg.raters)
    if not examples:
        raise CannotLearn(f"{cfg.train_data}: no training examples with labels for spec '{spec.name}'")
    C = len(spec.criteria)
    return Data(spec, train_items, val_items, examples, math.ceil(cfg.batch_size / C), math.ceil(cfg.micro_batch / C))


def longest_tokens(spec: TaskSpec, items: list[Item], tok: Tokens, augment_templates: bool = False) -> list[int]:
    """Per item: its longest prompt plus the answer, in tokens (what max_length must hold).

    A prompt's length is measured with the canonical instruction, plus the longest paraphrase's
    extra tokens where templates are augmented (the instruction does not depend on the item).
    The texts are the ones a canonical token tree tokenizes (each item's head and prompts), in one
    batched call, so `tok` then holds them for training."""
    extra = 0
    if augment_templates and len(spec.templates) > 1:
        lens = [len(ids) for ids in tok.many([render_instruction(spec, RenderOptions(template=t))
                                              for t in range(len(spec.templates))])]
        extra = max(lens) - lens[0]
    texts = []
    for it in items:
        _, head, fulls = item_texts(spec, it.fields, CANONICAL)
        texts.append(head)
        texts.extend(fulls)
    lens = [len(t) for t in tok.many(texts)]
    C = len(spec.criteria)
    return [max(lens[k * (C + 1) + 1: (k + 1) * (C + 1)]) + 1 + extra for k in range(len(items))]


def check_lengths(cfg: TrainConfig, data: Data, tok: Tokens) -> list[Example]:
    """Drop examples whose longest prompt plus the answer exceeds max_length, in one summary line;
    stop if more than 1% would go: that run would learn from a sliver of its data."""
    ids = sorted({e.item for e in data.examples})
    lens = longest_tokens(data.spec, [data.train_items[i] for i in ids], tok, cfg.augment.templates)
    longest = dict(zip(ids, lens))
    data.longest = max(lens, default=0)
    too_long = [e for e in data.examples if longest[e.item] > cfg.max_length]
    if not too_long:
        return data.examples
    msg = (f"{len(too_long)} of {len(data.examples)} training examples are longer than max_length "
           f"{cfg.max_length} tokens (the longest: {data.longest}); raise max_length, shorten the spec's "
           f"instruction, or check that the base folder's tokenizer is the model's own")
    if len(too_long) > 0.01 * len(data.examples):
        raise CannotLearn(msg)
    log.warning("%s: skipped", msg)
    return [e for e in data.examples if longest[e.item] <= cfg.max_length]


def setup_model(cfg: TrainConfig, out: Path, device: torch.device, tokenizer: Any) -> Any:
    """The base (or a tiny model built from scratch, kept in RUN/base) with fresh LoRA adapters."""
    if cfg.tiny:
        base_dir = out / "base"
        if not (base_dir / "config.json").exists():
            model0 = build_tiny(cfg)

            def write_base(d: Path) -> None:
                model0.save_pretrained(d, safe_serialization=True)
                save_tokenizer(tokenizer, cfg.base_model, d)

            atomic_dir(base_dir, write_base)
            del model0
        model = load_base(cfg, device, base_dir)
    else:
        model = load_base(cfg, device)
    set_seed(cfg.seed)  # LoRA's A matrices are drawn here: the same seed, the same initial adapter
    model = add_lora(model, cfg)
    if cfg.qat:
        from .qat import NoGrid, attach, base_grids

        try:
            attach(model, base_grids(cfg.base_model, model))
        except NoGrid as e:
            raise CannotLearn(str(e)) from None
    return model


def setup_optimizer(cfg: TrainConfig, model: Any, total: int) -> tuple[list[torch.nn.Parameter], Any, Any]:
    from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    b = [p for n, p in named if "lora_B" in n]
    rest = [p for n, p in named if "lora_B" not in n]
    groups = [{"params": rest, "lr": cfg.lr}, {"params": b, "lr": cfg.lr * cfg.lora.lr_ratio}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, weight_decay=0.0)
    warmup = int(round(cfg.warmup_ratio * total))
    sched = (get_linear_schedule_with_warmup(opt, warmup, total) if cfg.schedule == "linear"
             else get_constant_schedule_with_warmup(opt, warmup))
    return params, opt, sched


def resume_state(ckpt: Path, model: Any, opt: Any, sched: Any, logf: Path) -> TrainState:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(str(ckpt / "adapter.safetensors")))
    blob = torch.load(ckpt / "optim.pt", weights_only=True)
    opt.load_state_dict(blob["optimizer"])
    sched.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["torch_rng"])
    state = TrainState(**json.loads((ckpt / "state.json").read_text()))
    _truncate_log(logf, state.step)
    return state


def context_groups(cfg: TrainConfig, data: Data, examples: list[Example], tok: Tokens) -> list[list[int]] | None:
    """The examples grouped by their item's leading inputs, for a stream that keeps each group
    together (ExampleStream), or None: when cfg.share_contexts is off, when the items share too
    little (runtime/prompt.py: shared_groups), when an augmentation makes items that share a context
    render it differently (permuted fields, token dropout), so that no tree could hold it once, or
    when it would not pay: a group's tree repeats the instruction, so grouping is kept only where
    the context tokens it saves, (items - 1) x context per group on average, outnumber the
    instruction's."""
    if not cfg.share_contexts or not cfg.augment.keeps_contexts:
        return None
    keys = [leading_inputs(data.spec, data.train_items[e.item].fields) for e in examples]
    groups = shared_groups(keys)
    if groups is None:
        return None
    context = tok.many(["\n".join(keys[g[0]]) for g in groups])
    saved = sum((len(g) - 1) * len(c) for g, c in zip(groups, context)) / len(groups)
    return groups if saved > len(tok(render_instruction(data.spec))) else None


@dataclass
class StepBatch:
    """One step's token trees, built on the CPU, and the number of queries the loss is divided by."""

    trees: list[TreeBatch]
    queries: int


def prepare_step(cfg: TrainConfig, data: Data, examples: list[Example], stream: ExampleStream, tok: Tokens,
                 tries: dict[str, Any], pad: int, step: int) -> StepBatch:
    """The token trees of one step: a function of (seed, step) alone, so it can run ahead in a thread."""
    picked = stream.take(step * data.units_per_step, data.units_per_step)
    trees: list[TreeBatch] = []
    for m, s in enumerate(range(0, len(picked), data.units_per_micro)):
        rng = np.random.default_rng([cfg.seed, step, m, 11])  # one stream per micro-batch: (seed, step)
        opts = augment_options(data.spec, cfg.augment, rng)
        units = [unit_of(examples[j], data.train_items, data.spec, cfg.augment, rng)
                 for _, j in picked[s:s + data.units_per_micro]]
        if stream.groups:  # one tree per run of items sharing a context, which its prefix then holds
            keys = [leading_inputs(data.spec, u.fields) for u in units]
            trees.extend(build_tree(tok, data.spec, tries, [units[k] for k in run], opts, pad)
                         for run in runs_by_key(keys))
        else:
            trees.append(build_tree(tok, data.spec, tries, units, opts, pad))
    return StepBatch(trees, sum(examples[j].queries for _, j in picked))


def frozen_layers(cfg: TrainConfig, model: Any) -> FrozenLayers | None:
    """The kept states of the layers below the adapter (hf/frozen.py), where nothing there trains
    and an item's prompt is the same in every pass (augmentation would make every tree new: the
    layers below the adapter then run without gradients anyway, and keeping them gains nothing)."""
    layers, aug = cfg.lora.layers, cfg.augment
    if not cfg.keep_frozen or not layers or min(layers) == 0 or cfg.lora.modules_to_save:
        return None
    if aug.templates or aug.shuffle_labels or not aug.keeps_contexts:
        return None
    inner = causal_model(model).model
    if not supported(inner):
        log.info("%s cannot run a part of its layers: every step runs them all", type(inner).__name__)
        return None
    return FrozenLayers(min(layers))


def train_step(model: Any, batch: StepBatch, frozen: FrozenLayers | None = None) -> dict[str, float]:
    """Forward and backward over one step's micro-batches (no optimizer update); its loss and sizes."""
    loss_sum, tokens = 0.0, 0
    with tree_attention(model):
        for tree in batch.trees:
            loss = soft_cross_entropy(level_logprobs(model, tree, frozen), tree) / batch.queries
            loss.backward()
            loss_sum += float(loss.detach())
            tokens += tree.tokens
    return {"loss": loss_sum, "tokens": tokens, "examples": batch.queries}


def train(cfg: TrainConfig, *, resume: bool = False, progress: Callable[[dict[str, Any]], None] | None = None,
          stop_after: int | None = None) -> TrainResult:
    """Train per cfg. `stop_after` ends the process-equivalent of an interrupt after that many steps
    (checkpoints are only written at validations, as a killed run would leave them)."""
    run = Run(cfg, progress)
    run.setup(resume)
    return run.fit(stop_after)


class Run:
    """One training run: `setup` builds data, model and optimizer (or resumes them), `fit` runs the
    loop; validation, early stopping and checkpoints live in `validate_and_checkpoint`."""

    def __init__(self, cfg: TrainConfig, progress: Callable[[dict[str, Any]], None] | None = None):
        self.cfg, self.progress = cfg, progress
        self.out = Path(cfg.output)
        self.ckpt, self.logf = self.out / "checkpoint", self.out / "log.jsonl"
        self.state = TrainState()
        self.history: list[dict[str, Any]] = []
        self.tok_count = self.ex_count = 0.0

    def setup(self, resume: bool) -> None:
        cfg = self.cfg
        set_seed(cfg.seed)
        self.out.mkdir(parents=True, exist_ok=True)
        self.data = setup_data(cfg)
        self.tokenizer = load_tokenizer(cfg.base_model)
        if problem := check_folder(Path(cfg.base_model), self.tokenizer):  # ids llama.cpp would not give
            raise CannotLearn(problem)
        self.tok = hf_tokenize(self.tokenizer)
        self.examples = check_lengths(cfg, self.data, self.tok)
        self.model = setup_model(cfg, self.out, pick_device(cfg), self.tokenizer)
        self.total = cfg.max_steps or math.ceil(cfg.epochs * steps_per_epoch(len(self.examples),
                                                                             self.data.units_per_step))
        self.params, self.opt, self.sched = setup_optimizer(cfg, self.model, self.total)
        self.frozen = frozen_layers(cfg, self.model)
        if resume and (self.ckpt / "state.json").exists():
            self.state = resume_state(self.ckpt, self.model, self.opt, self.sched, self.logf)
            log.info("resumed %s at step %d", self.out, self.state.step)
        elif self.logf.exists():
            self.logf.unlink()
        self.tries = answer_tries(self.tokenizer, self.data.spec)
        groups = context_groups(cfg, self.data, self.examples, self.tok)
        self.stream = ExampleStream(len(self.examples), cfg.seed, groups)

    def write_log(self, rec: dict[str, Any]) -> None:
        with self.logf.open("a") as fh:
            fh.write(json.dumps(rec) + "\n")
        if self.progress:
            self.progress(rec)

    def prepare(self, step: int) -> StepBatch:
        return prepare_step(self.cfg, self.data, self.examples, self.stream, self.tok, self.tries,
                            pad_id(self.tokenizer), step)

    def fit(self, stop_after: int | None = None) -> TrainResult:
        """The loop. Step k + 1's trees are built in a thread while step k runs on the device
        (tokenizing and packing are CPU work a GPU step would otherwise wait for); the thread is
        waited for before each validation, so the tokenizer is never used from two threads at once."""
        state = self.state
        if state.baseline is None:
            state.baseline, state.best_alpha = self.evaluate(0, untrained=True)
            state.best_report, state.best_step = state.baseline, 0
            atomic_dir(self.out / "best-adapter", lambda d: self.model.save_pretrained(d))
        self.model.train()
        t_start, first_step = time.perf_counter(), state.step
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge-annotator-prefetch") as pool:
            ahead = pool.submit(self.prepare, state.step)
            while state.step < self.total:
                t0 = time.perf_counter()
                batch = ahead.result()
                if state.step + 1 < self.total:
                    ahead = pool.submit(self.prepare, state.step + 1)
                self.optimize(batch, t0)
                if state.step % self.cfg.eval_every == 0 or state.step == self.total:
                    wait([ahead])  # the tokenizer idle (an error in it surfaces at the next step)
                    if self.validate_and_checkpoint():
                        break
                if stop_after is not None and state.step - first_step >= stop_after:
                    break
        seconds = time.perf_counter() - t_start
        return TrainResult(self.out, state, state.step, seconds, self.tok_count / seconds if seconds else 0.0,
                           self.ex_count / seconds if seconds else 0.0, self.history)

    def optimize(self, batch: StepBatch, t0: float) -> None:
        """One optimizer step on a prepared batch, logged."""
        if self.cfg.qat:  # plain LoRA for the first qat_start of the steps, then on the grid
            from .qat import train_on_grid

            train_on_grid(self.model, self.state.step >= math.floor(self.cfg.qat_start * self.total))
        got = train_step(self.model, batch, self.frozen)
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.state.step += 1
        dt = time.perf_counter() - t0
        self.tok_count += got["tokens"]
        self.ex_count += got["examples"]
        rec = {"step": self.state.step, "event": "train", "loss": got["loss"], "lr": self.sched.get_last_lr()[0],
               "tokens_per_s": got["tokens"] / dt, "examples_per_s": got["examples"] / dt, "total": self.total}
        self.write_log(rec)
        self.history.append(rec)

    def evaluate(self, step: int, untrained: bool = False) -> tuple[dict[str, Any], float]:
        """The validation report and the alpha checkpoints are chosen by; logged."""
        cfg = self.cfg
        report = validate(self.model, self.tokenizer, self.data.spec, self.data.val_items)
        a = selection_alpha(report, cfg.select_by)
        # alpha: the mean over criteria, what selection reads; pooled over (item, criterion) units
        # beside it, reported only
        rec = {"step": step, "event": "val", "alpha": a, "select_by": cfg.select_by,
               "per_criterion": {c["criterion"]: selected_alpha(c, cfg.select_by) for c in report["criteria"]},
               "pooled": selected_alpha(report["pooled"], cfg.select_by)}
        if any("score_r" in c for c in report["criteria"]):  # is the score following the raters yet?
            rec["score_r"] = {c["criterion"]: c.get("score_r") for c in report["criteria"] if "score_r" in c}
        if untrained:
            rec["untrained"] = True
        else:
            rec["best"] = max(a, self.state.best_alpha)
        self.write_log(rec)
        return report, a

    def validate_and_checkpoint(self) -> bool:
        """Validate; keep the best adapter; checkpoint; True when patience has run out."""
        state = self.state
        report, a = self.evaluate(state.step)
        if a > state.best_alpha:
            state.best_alpha, state.best_step, state.bad_evals, state.best_report = a, state.step, 0, report
            atomic_dir(self.out / "best-adapter", lambda d: self.model.save_pretrained(d))
        else:
            state.bad_evals += 1
        state.stopped_early = state.bad_evals >= self.cfg.patience
        _save_checkpoint(self.ckpt, self.model, self.opt, self.sched, state)
        if state.stopped_early:
            log.info("no better validation alpha in %d validations: stopping at step %d", self.cfg.patience,
                     state.step)
        return state.stopped_early


def _save_checkpoint(ckpt: Path, model: Any, opt: Any, sched: Any, state: TrainState) -> None:
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    def write(d: Path) -> None:
        lora = {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}
        save_file(lora, str(d / "adapter.safetensors"))
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
