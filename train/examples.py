"""Training examples from human-labelled items, with the paper's augmentations.

Every example is (item, criterion, target level). Its text is the runtime's own prompt plus the
answer (runtime/prompt.py: render_example), so training sees exactly what annotate-cli will.
Augmentation is drawn from a generator seeded by (seed, epoch, example), never from a running
state, so a resumed run renders the very same examples as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_annotator.runtime.data import check_item, iter_rows, ratings_of
from edge_annotator.runtime.metrics import nearest_level
from edge_annotator.runtime.prompt import RenderOptions, prompt_segments, render_example
from edge_annotator.runtime.spec import TaskSpec

from .config import Augment

Value = int | float | str


@dataclass
class Item:
    id: str
    fields: dict[str, str]
    ratings: list[dict[str, Value]]


@dataclass(frozen=True)
class Example:
    item: int
    """Index into the item list."""
    criterion: int
    """Index into spec.criteria."""
    value: int | str
    """Target level."""


def load_items(path: str | Path, spec: TaskSpec) -> list[Item]:
    """Items with their human ratings; rows sharing an id are merged (one row per rater)."""
    by_id: dict[str, Item] = {}
    for row in iter_rows(path):
        it = check_item(row, spec)
        rs = ratings_of(row, spec)
        if it.id in by_id:
            by_id[it.id].ratings.extend(rs)
        else:
            by_id[it.id] = Item(it.id, it.fields, rs)
    return [it for it in by_id.values() if it.ratings]


def split_items(items: list[Item], val_fraction: float, seed: int) -> tuple[list[Item], list[Item]]:
    """Split by item before any augmentation: no item (and none of its ratings) is on both sides."""
    def key(it: Item) -> str:
        return hashlib.sha256(f"{seed}:{it.id}".encode()).hexdigest()

    ordered = sorted(items, key=key)
    n_val = max(1, round(len(items) * val_fraction))
    val_ids = {it.id for it in ordered[:n_val]}
    return [it for it in items if it.id not in val_ids], [it for it in items if it.id in val_ids]


def build_examples(items: list[Item], spec: TaskSpec, raters: str) -> list[Example]:
    """each: one example per rating and criterion; majority/median: one per item and criterion."""
    out: list[Example] = []
    for i, it in enumerate(items):
        for ci, c in enumerate(spec.criteria):
            vals = [r[c.name] for r in it.ratings if c.name in r]
            if not vals:
                continue
            if raters == "each":
                targets = [nearest_level(c, v) for v in vals]
            elif raters == "median" and c.level != "nominal":
                s = sorted(float(v) for v in vals)
                targets = [nearest_level(c, s[(len(s) - 1) // 2])]  # lower median
            else:  # majority (for labels, the only consensus there is); ties go to the spec's first level
                targets = [_mode(c.values, [nearest_level(c, v) for v in vals])]
            out.extend(Example(i, ci, v) for v in targets)  # type: ignore[arg-type]
    return out


def _mode(order: list[Any], vals: list[Any]) -> Any:
    counts = {v: vals.count(v) for v in vals}
    top = max(counts.values())
    return next(v for v in order if counts.get(v) == top)


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 7]).permutation(n)


def example_stream(n: int, seed: int, start: int, count: int) -> list[tuple[int, int]]:
    """(epoch, example index) for positions start..start+count of the endless shuffled stream."""
    out: list[tuple[int, int]] = []
    for k in range(start, start + count):
        epoch, j = divmod(k, n)
        out.append((epoch, int(epoch_order(n, seed, epoch)[j])))
    return out


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    """-100 on prompt tokens; the answer's token ids on the answer."""


def render(ex: Example, items: list[Item], spec: TaskSpec, tokenizer: Any, aug: Augment | None,
           rng: np.random.Generator) -> Encoded:
    """Tokens of one (possibly augmented) example; the prompt part is exactly the runtime's prompt."""
    c = spec.criteria[ex.criterion]
    fields = items[ex.item].fields
    opts = RenderOptions()
    if aug is not None:
        opts = RenderOptions(
            template=int(rng.integers(len(spec.templates))) if aug.templates else 0,
            input_order=tuple(int(x) for x in rng.permutation(len(spec.inputs))) if aug.permute_inputs else None,
            level_orders={cc.name: tuple(int(x) for x in rng.permutation(len(cc.scale))) for cc in spec.criteria}
            if aug.shuffle_labels else None)
    prompt, completion = render_example(spec, fields, c, ex.value, opts)
    p_ids = tokenizer(prompt)["input_ids"]
    full = tokenizer(prompt + completion)["input_ids"]
    if full[: len(p_ids)] != p_ids:
        raise ValueError(f"answer {completion!r} re-tokenizes the prompt of criterion {c.name}; change answer_cue")
    ids = list(full)
    td = aug.token_dropout if aug is not None else None
    if td is not None and td.prob > 0 and rng.random() < td.fraction:
        instr, inputs, _ = prompt_segments(spec, fields, c, opts)
        lo = len(tokenizer(instr)["input_ids"])
        hi = len(tokenizer(instr + inputs)["input_ids"])
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.unk_token_id
        drop = rng.random(hi - lo) < td.prob
        for k in np.nonzero(drop)[0]:
            ids[lo + int(k)] = pad
    labels = [-100] * len(p_ids) + ids[len(p_ids):]
    return Encoded(ids, labels)


def steps_per_epoch(n_examples: int, batch_size: int) -> int:
    return math.ceil(n_examples / batch_size)


def data_sha256(*paths: str | Path | None) -> str:
    h = hashlib.sha256()
    for p in paths:
        if p:
            h.update(Path(p).read_bytes())
    return h.hexdigest()
