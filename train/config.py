"""Training configs: typed, documented, validated with every problem reported at once.

    from edge_annotator.train.config import load_config
    cfg = load_config("configs/tiny-lora-cpu.yaml")

Each field's docstring is its documentation. Paths are relative to the current directory.
QLoRA is a flag on the one LoRA path: `quantization: nf4`.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from edge_annotator.runtime.errors import UserError

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class ConfigError(UserError, ValueError):
    def __init__(self, source: str, problems: list[str]):
        self.problems = problems
        super().__init__(f"{source}: invalid training config ({len(problems)} problem(s)):\n"
                         + "\n".join(f"  - {p}" for p in problems))


@dataclass
class TinyModel:
    """A small model built from scratch with the base folder's tokenizer (tests, smoke runs)."""

    layers: int = 2
    """Decoder layers."""
    hidden: int = 64
    """Hidden size."""
    intermediate: int = 128
    """MLP width."""
    heads: int = 2
    """Attention heads."""
    kv_heads: int = 1
    """Key/value heads (fewer than heads: grouped-query attention)."""
    head_dim: int = 32
    """Size of each attention head."""
    embed_std: float = 0.25
    """Std of the (tied) embedding init. With the usual 0.02, a 64-wide model's head caps every
    logit near 1 (|h| = 8 after the final norm, |e| = 0.16) and nothing it learns can show; at
    1.0 logits of +-60 swamp the loss. 0.25 lets answers reach logits of about 15."""


@dataclass
class LoraSettings:
    r: int = 16
    """LoRA rank."""
    alpha: int = 32
    """LoRA scaling numerator: the update is (alpha / r) * B @ A."""
    dropout: float = 0.05
    """Dropout on the LoRA input."""
    target_modules: list[str] = field(default_factory=lambda: list(ALL_PROJECTIONS))
    """Linear layers that get adapters; the paper adapts every attention and MLP projection."""
    layers: list[int] | None = None
    """Decoder layers (0-based) whose target modules get adapters; None: every layer. Adapting only
    upper layers also spares the backward pass through the layers below them."""
    lr_ratio: float = 1.0
    """Learning rate of the B matrices relative to `lr` (LoRA+, Hayou et al. 2024, who use 16:
    B starts at zero and learns features faster with a larger step)."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained in full beside the adapters, e.g. [norm] (the final norm) for a model built
    from scratch, whose random head otherwise caps every logit near zero."""


@dataclass
class TokenDropout:
    prob: float = 0.0
    """Probability that a token of the item's inputs is replaced by the pad token (no content)."""
    fraction: float = 0.0
    """Share of training sequences that get token dropout at all."""


@dataclass
class Augment:
    templates: bool = True
    """Draw one of the spec's paraphrased instruction templates per example."""
    permute_inputs: bool = True
    """Shuffle the order of the input fields per example."""
    shuffle_labels: bool = True
    """Shuffle the order in which each criterion's levels are listed in the rubric."""
    token_dropout: TokenDropout = field(default_factory=TokenDropout)

    @property
    def keeps_contexts(self) -> bool:
        """Items that share a context render it alike (no permuted input fields, no token dropout),
        so one token tree can hold it once (TrainConfig.share_contexts)."""
        return not self.permute_inputs and not (self.token_dropout.prob > 0 and self.token_dropout.fraction > 0)


@dataclass
class TrainConfig:
    base_model: str
    """HF folder of the base model (Qwen3, Llama, Gemma 3); with `tiny`, only its tokenizer is used."""
    spec: str
    """Task spec YAML."""
    train_data: str
    """Human-labelled JSONL/CSV (runtime/data.py formats)."""
    output: str
    """Run folder: checkpoints, log, best adapter and the merged model."""
    val_data: str | None = None
    """Validation data; if absent, `val_fraction` of the training items (split by item)."""
    val_fraction: float = 0.2
    """Share of items held out for validation when val_data is not given."""
    tiny: TinyModel | None = None
    """Build a tiny model from scratch instead of loading base_model's weights."""
    raters: Literal["distribution", "each", "majority", "median"] = "distribution"
    """distribution: one example per item and criterion, trained with cross-entropy against the
    raters' empirical distribution over the levels (with one rater, their label); each: every
    rater's ratings are their own example; majority/median: the consensus level as one target."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    quantization: Literal["none", "nf4"] = "none"
    """nf4: QLoRA, the frozen base stored in 4-bit NF4 (bitsandbytes)."""
    keep_frozen: bool = True
    """With lora.layers above layer 0 (and no modules_to_save), keep each token's output of the
    layers below the adapter the first time a tree computes it, and run only the adapted layers
    from then on (hf/frozen.py): the same loss and gradients, later passes at the adapted layers'
    cost. False: every step runs the whole model (to measure against)."""
    qat: bool = False
    """Quantization-aware training on the base GGUF's own grid (train/qat.py): the forward pass sees
    each adapted weight, base + LoRA update, snapped to the 4-bit grid its block already has in the
    GGUF the base was made from (straight-through gradient), so the export writes the trained
    weights into that file's blocks unrounded (`export --route grid`): one file with the base's
    types and size. Needs a base made by `annotate-cli base` / `from-gguf`, and lora.dropout 0."""
    qat_start: float = 0.5
    """With qat: the share of the steps trained as plain LoRA before the training forward pass snaps
    to the grid. Validation always scores the snapped model (what the export writes), so the best
    checkpoint is one of those. From the first step (0) the demo recipe learnt nothing of the
    sentences in 360 steps (docs/export.md)."""
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    """float32 on CPUs (bf16 matmuls are over 10x slower there), bfloat16 on GPUs."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    lr: float = 5e-5
    """Peak learning rate."""
    schedule: Literal["linear", "constant"] = "linear"
    """Linear decay to 0 after warmup, or constant after warmup."""
    warmup_ratio: float = 0.05
    """Share of the steps spent warming up linearly from 0."""
    epochs: float = 5
    """Passes over the training examples."""
    batch_size: int = 32
    """Examples per optimizer step. An example is one criterion of one item; an item's criteria
    are scored from one pass and travel together, so a step takes batch_size / criteria items
    (rounded up)."""
    micro_batch: int = 8
    """Examples per forward pass (one token tree sharing the instruction); batch_size must be a
    multiple of it."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (overrides epochs)."""
    max_length: int = 512
    """Longest training sequence in tokens; longer examples are skipped with a warning."""
    seed: int = 0
    eval_every: int = 20
    """Validate every this many optimizer steps (and at the end)."""
    patience: int = 3
    """Stop after this many validations without a better validation alpha."""
    select_by: Literal["score", "label"] = "score"
    """What validation alpha measures (for early stopping and the best checkpoint): score: the
    probability-weighted mean of the levels for ordinal and interval criteria (what annotate-cli
    writes as `scores`), the label for nominal ones; label: the most probable level everywhere."""
    share_contexts: bool = True
    """Items that share their leading input fields (several responses to one dialogue, answers to
    one question) train side by side, each group in one token tree that holds the shared fields
    once: on USR PersonaChat's five responses per dialogue a step then costs about half the tokens.
    It applies when items average two or more per context and no augmentation permutes the fields
    or drops tokens; off, the examples are shuffled one by one."""
    val_max_items: int | None = None
    """Validate on at most this many items (the first, in file order)."""
    calibrate: bool = True
    """After merging, fit a monotone map per rating scale from the raw score to the raters' mean on
    the validation items (identity, affine or isotonic, chosen by cross-validation; train/calibrate.py)
    and store it in the merged model's spec, so annotate's `scores` are calibrated (`raw_scores` keep
    the values before it)."""
    augment: Augment = field(default_factory=Augment)
    name: str = ""
    """Shown in logs; defaults to the file name."""

    def validate(self, source: str = "<config>", check_paths: bool = True) -> None:
        problems: list[str] = []
        if check_paths:
            if not Path(self.base_model).is_dir():
                what = "tokenizer folder" if self.tiny else "folder"
                problems.append(f"base_model: {what} {self.base_model!r} not found")
            for key in ("spec", "train_data"):
                if not Path(getattr(self, key)).is_file():
                    problems.append(f"{key}: file {getattr(self, key)!r} not found")
            if self.val_data and not Path(self.val_data).is_file():
                problems.append(f"val_data: file {self.val_data!r} not found")
        if not 0 < self.val_fraction < 1:
            problems.append("val_fraction must be between 0 and 1")
        if self.lora.r < 1 or self.lora.alpha < 1:
            problems.append("lora.r and lora.alpha must be positive")
        if self.lora.lr_ratio <= 0:
            problems.append("lora.lr_ratio must be positive")
        if not 0 <= self.lora.dropout < 1:
            problems.append("lora.dropout must be in [0, 1)")
        if not self.lora.target_modules:
            problems.append("lora.target_modules must name at least one module")
        if self.lora.layers is not None and (not self.lora.layers or min(self.lora.layers) < 0):
            problems.append("lora.layers must list at least one layer index (0-based), or be left out")
        if self.lr <= 0:
            problems.append("lr must be positive")
        if not 0 <= self.warmup_ratio < 1:
            problems.append("warmup_ratio must be in [0, 1)")
        if self.epochs <= 0 and not self.max_steps:
            problems.append("epochs must be positive (or give max_steps)")
        if self.micro_batch < 1 or self.batch_size < 1 or self.batch_size % self.micro_batch:
            problems.append("batch_size must be a positive multiple of micro_batch")
        if self.qat:
            if self.quantization != "none":
                problems.append("qat trains on the base GGUF's grid; it does not go with quantization: nf4")
            if self.tiny is not None:
                problems.append("qat needs a base made from a GGUF; tiny builds one from scratch")
            if self.lora.dropout:
                problems.append("qat needs lora.dropout 0 (the snapped weight has no separate LoRA branch to drop)")
            if self.lora.modules_to_save:
                problems.append("qat keeps every weight on the base's grid; modules_to_save trains some in full")
        if not 0 <= self.qat_start < 1:
            problems.append("qat_start must be in [0, 1)")
        td = self.augment.token_dropout
        if not (0 <= td.prob < 1 and 0 <= td.fraction <= 1):
            problems.append("augment.token_dropout: prob must be in [0, 1) and fraction in [0, 1]")
        if self.eval_every < 1 or self.patience < 1:
            problems.append("eval_every and patience must be at least 1")
        if problems:
            raise ConfigError(source, problems)


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def top_layers(base: str | Path, k: int, n: int | None = None) -> list[int]:
    """lora.layers for the top K decoder layers of BASE, an HF folder (N: its layer count where the
    caller knows it otherwise, e.g. a tiny model built from scratch). ValueError, naming the range,
    unless 0 < K < N."""
    if n is None:
        n = int(json.loads(Path(base, "config.json").read_text())["num_hidden_layers"])
    if not 0 < k < n:
        raise ValueError(f"--top-layers {k}: {base} has {n} layers; give 1 to {n - 1}, "
                         "or leave it out to adapt every layer")
    return list(range(n - k, n))


def _build(cls: type, raw: Any, where: str, problems: list[str]) -> Any:
    """A `cls` dataclass from a YAML mapping, each value checked against its field's annotation;
    every problem is appended to `problems` (all of them, not the first)."""
    if not isinstance(raw, dict):
        problems.append(f"{where or 'config'}: expected a mapping, got {_shown(raw)}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    prefix = f"{where}." if where else ""
    kwargs: dict[str, Any] = {}
    for k, v in raw.items():
        if k not in fields:
            problems.append(f"{prefix}{k}: unknown key (allowed: {', '.join(fields)})")
            continue
        kwargs[k] = _convert(hints[k], v, f"{prefix}{k}", problems)
    for name, f in fields.items():
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and name not in kwargs:
            problems.append(f"{prefix}{name}: required")
    return None if problems else cls(**kwargs)


def _convert(tp: Any, v: Any, where: str, problems: list[str]) -> Any:
    """`v` as annotation `tp` says: dataclasses, Literal, X | None, list[X], bool, int, float, str.

    A float may be written as a string YAML 1.1 leaves unparsed ("5e-5", which PyYAML reads as
    text because it has no decimal point): it is read as the number the user meant."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if v is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for opt in options:
            trial: list[str] = []
            got = _convert(opt, v, where, trial)
            if not trial:
                return got
        if len(options) == 1:
            return _convert(options[0], v, where, problems)
        problems.append(f"{where}: expected {' or '.join(_type_name(o) for o in options)}, got {_shown(v)}")
        return None
    if origin is typing.Literal:
        if v not in args:
            problems.append(f"{where}: must be one of {', '.join(map(str, args))}, got {v!r}")
        return v
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return _build(tp, v, where, problems)
    if origin is list:
        if not isinstance(v, list):
            problems.append(f"{where}: expected a list, got {_shown(v)}")
            return None
        return [_convert(args[0], x, f"{where}[{i}]", problems) for i, x in enumerate(v)]
    if tp is bool:
        if not isinstance(v, bool):
            problems.append(f"{where}: expected true or false, got {_shown(v)}")
        return v
    if tp is int:
        if isinstance(v, bool) or not isinstance(v, int):
            problems.append(f"{where}: expected a whole number, got {_shown(v)}")
        return v
    if tp is float:
        if isinstance(v, str) and _NUMBER.fullmatch(v.strip()):
            return float(v)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            problems.append(f"{where}: expected a number, got {_shown(v)}")
            return v
        return float(v)
    if tp is str:
        if not isinstance(v, str):
            problems.append(f"{where}: expected text, got {_shown(v)}")
        return v
    return v


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if typing.get_origin(tp) is list:
        return "a list"
    return {bool: "true or false", int: "a whole number", float: "a number", str: "text"}.get(tp, str(tp))


def _shown(v: Any) -> str:
    kind = {str: "text", bool: "a boolean", int: "a whole number", float: "a number", list: "a list",
            dict: "a mapping", type(None): "nothing"}.get(type(v), type(v).__name__)
    return f"{v!r} ({kind})" if not isinstance(v, (list, dict)) else kind


def parse_config(raw: Any, source: str = "<config>", check_paths: bool = True) -> TrainConfig:
    problems: list[str] = []
    cfg = _build(TrainConfig, raw, "", problems)
    if problems or cfg is None:
        raise ConfigError(source, problems or ["could not be read"])
    cfg.name = cfg.name or Path(source).stem
    cfg.validate(source, check_paths)
    return cfg


def load_config(path: str | Path, check_paths: bool = True, **overrides: Any) -> TrainConfig:
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(str(p), ["file not found"]) from None
    except yaml.YAMLError as e:
        raise ConfigError(str(p), [f"not valid YAML: {e}"]) from None
    if isinstance(raw, dict):
        raw = {**raw, **{k: v for k, v in overrides.items() if v is not None}}
    return parse_config(raw, str(p), check_paths)
