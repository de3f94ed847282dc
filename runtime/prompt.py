"""Prompt rendering: the one function that turns (spec, item, criterion) into model text.

Training renders its examples with the same function and appends the answer, so the tokens the
model was trained on are the tokens it sees at run time.

The prompt is laid out so that its shared parts come first and llama.cpp's KV cache can reuse them:

    [instruction + rubric]   same for every item        -> evaluated once per job
    [the item's input fields]  same for every criterion -> evaluated once per item
    [answer cue]               one short line per criterion

At run time every option below keeps its default: canonical template, the spec's input order and
label order. Training varies them (paraphrased templates, permuted inputs, shuffled labels).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .spec import Criterion, TaskSpec


@dataclass(frozen=True)
class RenderOptions:
    template: int = 0
    """Index into spec.templates; 0 is the canonical instruction."""
    input_order: tuple[int, ...] | None = None
    """Permutation of spec.inputs; None keeps the spec's order."""
    level_orders: Mapping[str, tuple[int, ...]] | None = None
    """Per criterion, a permutation of its levels as listed in the rubric; None keeps the spec's order."""


CANONICAL = RenderOptions()


def render_rubric(spec: TaskSpec, opts: RenderOptions = CANONICAL) -> str:
    blocks = []
    for c in spec.criteria:
        order = (opts.level_orders or {}).get(c.name) or tuple(range(len(c.scale)))
        head = f"{c.name}: {c.description}" if c.description else c.name
        lines = [head]
        for i in order:
            lv = c.scale[i]
            lines.append(f"  {lv.answer} = {lv.anchor}" if lv.anchor else f"  {lv.answer}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def render_instruction(spec: TaskSpec, opts: RenderOptions = CANONICAL) -> str:
    """The shared prefix: the instruction with the rubric filled in."""
    inputs = ", ".join(f.title.lower() for f in spec.inputs)
    return spec.templates[opts.template].format(rubric=render_rubric(spec, opts), inputs=inputs, name=spec.name).strip()


def render_inputs(spec: TaskSpec, item: Mapping[str, object], opts: RenderOptions = CANONICAL) -> str:
    order = opts.input_order or tuple(range(len(spec.inputs)))
    parts = []
    for i in order:
        f = spec.inputs[i]
        parts.append(f"{f.title}: {str(item[f.name]).strip()}")
    return "\n".join(parts)


def render_cue(criterion: Criterion, spec: TaskSpec) -> str:
    return spec.answer_cue.format(criterion=criterion.name, min=criterion.scale[0].answer,
                                  max=criterion.scale[-1].answer)


def prompt_segments(spec: TaskSpec, item: Mapping[str, object], criterion: Criterion,
                    opts: RenderOptions = CANONICAL) -> tuple[str, str, str]:
    """(shared instruction, this item's inputs, this criterion's cue): their concatenation is the prompt."""
    return (f"{render_instruction(spec, opts)}\n\n", f"{render_inputs(spec, item, opts)}\n\n",
            render_cue(criterion, spec))


def render_prompt(spec: TaskSpec, item: Mapping[str, object], criterion: Criterion,
                  opts: RenderOptions = CANONICAL) -> str:
    """The full prompt for one item and one criterion; the model's answer follows it directly."""
    return "".join(prompt_segments(spec, item, criterion, opts))


ANSWER_SEP = " "
"""Between the answer cue and the answer: 'Valence: 3'."""


def render_example(spec: TaskSpec, item: Mapping[str, object], criterion: Criterion, value: int | str,
                   opts: RenderOptions = CANONICAL) -> tuple[str, str]:
    """(prompt, completion) for training: the run-time prompt, and the separator plus the level's answer.

    prompt + completion is the training text; the prompt is exactly what annotate-cli evaluates.
    """
    for lv in criterion.scale:
        if lv.value == value:
            return render_prompt(spec, item, criterion, opts), ANSWER_SEP + lv.answer
    raise ValueError(f"{value!r} is not a level of criterion {criterion.name!r}: {criterion.values}")


def leading_inputs(spec: TaskSpec, fields: Mapping[str, Any]) -> tuple[str, ...]:
    """The values of all input fields but the last, in the spec's order: what items share when
    they are several answers to one context (USR PersonaChat's five responses to each dialogue,
    a QA rubric's answers to one question). Items with equal leading inputs, packed into one tree
    with the spec's input order, share those tokens in the tree's prefix."""
    return tuple(str(fields.get(f.name, "")) for f in spec.inputs[:-1])


def shared_groups(keys: Sequence[Any]) -> list[list[int]] | None:
    """The indices grouped by key (groups in order of first appearance, members in order), or None
    when items share too little for grouping to pay: fewer than two items per key on average."""
    groups: dict[Any, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    if len(groups) < 2 or 2 * len(groups) > len(keys):
        return None
    return list(groups.values())
