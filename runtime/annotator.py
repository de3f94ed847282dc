"""Scoring items: the label and the probability of every allowed label, from restricted logits.

The model never writes free text. For each criterion the allowed answers are tokenized after the
prompt and arranged in a token trie; at every node where answers part ways, the next-token
logits are restricted to the children and normalised. An answer's probability is the product
along its path, so the probabilities of the allowed labels sum to one and no invalid label can
come out. Single-token answers (the common case) need one evaluation per item and criterion.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .engine import LlamaEngine
from .prompt import prompt_segments, render_prompt
from .spec import Criterion, SpecError, TaskSpec

log = logging.getLogger(__name__)

ANSWER_SEP = " "
"""Between the answer cue and the answer: 'Valence (1-5): 3'. Training appends the same."""

PROB_DIGITS = 6  # probabilities are rounded for readable output; labels use the unrounded values


@dataclass(frozen=True)
class AnswerTrie:
    criterion: Criterion
    paths: tuple[tuple[int, ...], ...]
    """Token ids of each level's answer, in the spec's level order."""
    branches: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]
    """(prefix, distinct next tokens) for every node where answers diverge, in depth-first order."""

    @property
    def evaluations(self) -> int:
        return len(self.branches)


def answer_suffix(engine: LlamaEngine, prompt: str, answer: str) -> list[int] | None:
    """Tokens that `answer` adds after `prompt`, or None if joining them re-tokenizes the prompt."""
    base = engine.tokenize(prompt)
    full = engine.tokenize(prompt + ANSWER_SEP + answer)
    if full[: len(base)] != base:
        return None
    return full[len(base):]


def build_trie(engine: LlamaEngine, spec: TaskSpec, c: Criterion) -> AnswerTrie:
    # Any item will do: the answers follow the fixed cue line, which ends every prompt.
    probe = render_prompt(spec, {f.name: "example" for f in spec.inputs}, c)
    problems = []
    paths = []
    for lv in c.scale:
        toks = answer_suffix(engine, probe, lv.answer)
        if toks is None:
            problems.append(f"answer {lv.answer!r} merges with the answer cue when tokenized; change answer_cue")
        elif not toks:
            problems.append(f"answer {lv.answer!r} tokenizes to nothing")
        else:
            paths.append(tuple(toks))
    for i, a in enumerate(paths):
        for b in paths[i + 1:]:
            short, long_ = sorted((a, b), key=len)
            if long_[: len(short)] == short:
                pa = [engine.piece(t) for t in short]
                problems.append(f"answers {_answer_of(c, paths, a)!r} and {_answer_of(c, paths, b)!r} do not "
                                f"tokenize to distinct tokens (one is {pa} followed by more); make each "
                                f"answer distinct in its first token, e.g. a letter or a number per level")
    if problems:
        raise SpecError(f"spec '{spec.name}', criterion '{c.name}'", problems)
    nodes: dict[tuple[int, ...], list[int]] = {}
    for path in paths:
        for d in range(len(path)):
            kids = nodes.setdefault(path[:d], [])
            if path[d] not in kids:
                kids.append(path[d])
    branches = tuple((prefix, tuple(kids)) for prefix, kids in sorted(nodes.items()) if len(kids) > 1)
    return AnswerTrie(c, tuple(paths), branches)


def _answer_of(c: Criterion, paths: list[tuple[int, ...]], p: tuple[int, ...]) -> str:
    return c.scale[paths.index(p)].answer


def _softmax(x: np.ndarray) -> np.ndarray:
    z = x.astype(np.float64) - np.max(x)
    e = np.exp(z)
    return e / e.sum()


@dataclass(frozen=True)
class Score:
    label: int | str
    probs: dict[int | str, float]


class Annotator:
    """A spec bound to a loaded model. `score(fields)` -> {criterion: Score}."""

    def __init__(self, engine: LlamaEngine, spec: TaskSpec):
        self.engine = engine
        self.spec = spec
        self.tries = {c.name: build_trie(engine, spec, c) for c in spec.criteria}
        self.max_answer_len = max(len(p) for t in self.tries.values() for p in t.paths)
        self._heads: dict[str, list[int]] = {}  # tokens of the instruction, and of instruction + current item

    def prompt_tokens(self, fields: Mapping[str, Any], c: Criterion) -> tuple[list[int], tuple[int, ...]]:
        """The prompt's tokens and its segment boundaries (end of instruction, end of item)."""
        instr, inputs, cue = prompt_segments(self.spec, fields, c)
        tokens = self.engine.tokenize(instr + inputs + cue)
        bounds = []
        for text in (instr, instr + inputs):
            head = self._heads.get(text)
            if head is None:
                if len(self._heads) >= 8:  # the instruction and the current item: a handful is plenty
                    self._heads.clear()
                head = self._heads[text] = self.engine.tokenize(text)
            # a boundary counts only where the text's own tokens are a prefix of the prompt's
            if tokens[: len(head)] == head:
                bounds.append(len(head))
        return tokens, tuple(bounds)

    def score(self, fields: Mapping[str, Any]) -> dict[str, Score]:
        out = {}
        for c in self.spec.criteria:
            trie = self.tries[c.name]
            prompt, bounds = self.prompt_tokens(fields, c)
            cond: dict[tuple[int, ...], dict[int, float]] = {}
            for prefix, kids in trie.branches:
                lg = self.engine.logits(prompt + list(prefix), want=np.asarray(kids, dtype=np.int64),
                                        bounds=bounds + (len(prompt),))
                cond[prefix] = dict(zip(kids, _softmax(lg).tolist()))
            probs = []
            for path in trie.paths:
                p = 1.0
                for d in range(len(path)):
                    node = cond.get(path[:d])
                    if node is not None:
                        p *= node[path[d]]
                probs.append(p)
            best = int(np.argmax(probs))  # ties go to the first level in spec order
            out[c.name] = Score(c.scale[best].value,
                                {lv.value: round(p, PROB_DIGITS) for lv, p in zip(c.scale, probs)})
        return out

    def record(self, item_id: str, fields: Mapping[str, Any]) -> dict[str, Any]:
        scores = self.score(fields)
        return {"id": item_id,
                "labels": {k: s.label for k, s in scores.items()},
                "probs": {k: {str(v): p for v, p in s.probs.items()} for k, s in scores.items()}}

