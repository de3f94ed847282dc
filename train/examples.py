"""Training examples from human-labelled items, with the paper's augmentations.

An example is an item with a target distribution over each criterion's levels (hf/tree.py
scores all its criteria from one pass). Its text is the runtime's own prompt followed by the
answer tokens, so training sees exactly what annotate-cli will. The order of examples is drawn
from generators seeded by (seed, epoch) and augmentation from (seed, step, micro-batch), never
from a running state, so a resumed run renders the very same examples as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_annotator.hf.tree import Unit
from edge_annotator.runtime.data import Item
from edge_annotator.runtime.labels import read_labelled
from edge_annotator.runtime.metrics import nearest_level
from edge_annotator.runtime.prompt import RenderOptions
from edge_annotator.runtime.spec import TaskSpec

from .config import Augment


@dataclass(frozen=True)
class Example:
    """One training unit: an item (or, with raters: each, one rater's ratings of it) and, per
    criterion in spec order, the distribution over its levels to learn, or None where unrated.

    All of a unit's criteria are scored from one pass over the item (hf/tree.py), so they
    travel together; `queries` counts the (item, criterion) targets, the "examples" that
    batch_size is measured in."""

    item: int
    """Index into the item list."""
    targets: tuple[np.ndarray | None, ...]

    @property
    def queries(self) -> int:
        return sum(t is not None for t in self.targets)


def load_items(path: str | Path, spec: TaskSpec) -> list[Item]:
    """Items with their human ratings; rows sharing an id are merged (one row per rater). A file
    in which a criterion has no rating at all stops here, naming its columns (data.Coverage)."""
    return [it for it in read_labelled(path, spec, strict=True).items if it.ratings]


def split_items(items: list[Item], val_fraction: float, seed: int) -> tuple[list[Item], list[Item]]:
    """Split by item before any augmentation: no item (and none of its ratings) is on both sides."""
    def key(it: Item) -> str:
        return hashlib.sha256(f"{seed}:{it.id}".encode()).hexdigest()

    ordered = sorted(items, key=key)
    n_val = max(1, round(len(items) * val_fraction))
    val_ids = {it.id for it in ordered[:n_val]}
    return [it for it in items if it.id not in val_ids], [it for it in items if it.id in val_ids]


def build_examples(items: list[Item], spec: TaskSpec, raters: str) -> list[Example]:
    """distribution: one unit per item, each criterion's target the raters' empirical distribution
    over its levels (soft targets: five raters cost one pass, not five); median / majority: one
    unit per item with the consensus level as target; each: one unit per rating record, its own
    levels as targets."""
    out: list[Example] = []
    for i, it in enumerate(items):
        if raters == "each":
            for r in it.ratings:
                targets = tuple(_distribution(c, [r[c.name]]) if c.name in r else None for c in spec.criteria)
                if any(t is not None for t in targets):
                    out.append(Example(i, targets))
            continue
        targets_l: list[np.ndarray | None] = []
        for c in spec.criteria:
            vals = [r[c.name] for r in it.ratings if c.name in r]
            if not vals:
                targets_l.append(None)
            elif raters == "distribution":
                targets_l.append(_distribution(c, vals))
            elif raters == "median" and c.level != "nominal":
                s = sorted(float(v) for v in vals)
                targets_l.append(_distribution(c, [s[(len(s) - 1) // 2]]))  # lower median
            else:  # majority (for labels, the only consensus there is); ties go to the spec's first level
                targets_l.append(_distribution(c, [_mode(c.values, [nearest_level(c, v) for v in vals])]))
        if any(t is not None for t in targets_l):
            out.append(Example(i, tuple(targets_l)))
    return out


def _distribution(c: Any, vals: list[Any]) -> np.ndarray:
    """The empirical distribution of `vals` (each snapped to its nearest level) over c's levels."""
    t = np.zeros(len(c.scale))
    for v in vals:
        t[c.values.index(nearest_level(c, v))] += 1
    return t / t.sum()


def _mode(order: list[Any], vals: list[Any]) -> Any:
    counts = {v: vals.count(v) for v in vals}
    top = max(counts.values())
    return next(v for v in order if counts.get(v) == top)


class ExampleStream:
    """The endless shuffled stream of examples: epoch e is a permutation drawn from (seed, e).

    Position k of the stream is a function of (seed, k) alone, so a resumed run sees the very
    examples an uninterrupted one does; each epoch's permutation is drawn once, not per example."""

    def __init__(self, n: int, seed: int, groups: list[list[int]] | None = None):
        """groups: the example indices that share a context (runtime/prompt.py: shared_groups); an epoch
        then visits the groups in a shuffled order, each group's examples together and shuffled,
        so consecutive examples share their context and a tree holds it once."""
        self.n, self.seed, self.groups = n, seed, groups
        self._epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch, 7])
        if not self.groups:
            return rng.permutation(self.n)
        return np.concatenate([rng.permutation(self.groups[g]) for g in rng.permutation(len(self.groups))])

    def take(self, start: int, count: int) -> list[tuple[int, int]]:
        """(epoch, example index) for positions start .. start + count - 1."""
        out = []
        for k in range(start, start + count):
            epoch, j = divmod(k, self.n)
            if epoch != self._epoch:
                self._epoch, self._order = epoch, self._permutation(epoch)
            out.append((epoch, int(self._order[j])))
        return out


def augment_options(spec: TaskSpec, aug: Augment | None, rng: np.random.Generator) -> RenderOptions:
    """The instruction's augmentation, shared by a micro-batch: a paraphrased template and the
    order in which each criterion's levels are listed."""
    if aug is None:
        return RenderOptions()
    return RenderOptions(
        template=int(rng.integers(len(spec.templates))) if aug.templates else 0,
        level_orders={c.name: tuple(int(x) for x in rng.permutation(len(c.scale))) for c in spec.criteria}
        if aug.shuffle_labels else None)


def unit_of(ex: Example, items: list[Item], spec: TaskSpec, aug: Augment | None,
            rng: np.random.Generator) -> Unit:
    """An example as it enters a tree, with its own augmentation: input order and token dropout."""
    order = None
    drop = 0.0
    if aug is not None:
        if aug.permute_inputs:
            order = tuple(int(x) for x in rng.permutation(len(spec.inputs)))
        td = aug.token_dropout
        if td.prob > 0 and rng.random() < td.fraction:
            drop = td.prob
    return Unit(items[ex.item].fields, ex.targets, input_order=order, drop_prob=drop, rng=rng)


def steps_per_epoch(n_units: int, units_per_step: int) -> int:
    return math.ceil(n_units / units_per_step)


def data_sha256(*paths: str | Path | None) -> str:
    h = hashlib.sha256()
    for p in paths:
        if p:
            h.update(Path(p).read_bytes())
    return h.hexdigest()
