"""Validation with the runtime's own scoring: labels restricted to the allowed answers.

The answers' token trie is built by the runtime's `build_trie`, here with the HF tokenizer; the
probabilities are the restricted softmaxes at each branching node, multiplied along each
answer's path (the runtime's level_probs), the label is the most probable level and the score
the probability-weighted mean of the levels, calibrated where the spec says so
(runtime/annotator.py: criterion_score). Items are
scored in token trees (hf/tree.py: the instruction once per batch, each item once for all its
criteria), which give the same numbers as one prompt per item and criterion (tests/test_tree.py).
Agreement is runtime/metrics.py's Krippendorff alpha.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from edge_annotator.runtime.annotator import AnswerTrie, Score, build_trie, criterion_score
from edge_annotator.runtime.data import Item
from edge_annotator.runtime.metrics import agreement
from edge_annotator.runtime.prompt import CANONICAL, leading_inputs, shared_groups
from edge_annotator.runtime.spec import TaskSpec

from .tree import Tokens, Unit, build_tree, level_logprobs, tree_attention


def hf_tokenize(tokenizer: Any) -> Tokens:
    """Token ids as llama.cpp gives them at run time: BOS as the tokenizer adds it, and text that
    looks like a special token ("<bos>" inside an item) kept as text, not parsed into that token.
    Batched and kept (tree.Tokens)."""
    return Tokens(tokenizer)


def answer_tries(tokenizer: Any, spec: TaskSpec) -> dict[str, AnswerTrie]:
    tok = hf_tokenize(tokenizer)
    return {c.name: build_trie(tok, spec, c) for c in spec.criteria}


def pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


@torch.no_grad()
def score_items(model: Any, tokenizer: Any, spec: TaskSpec, items: Sequence[Item],
                batch: int = 16) -> list[dict[str, Score]]:
    """Per item: criterion -> Score (label, probability of each level, score), as annotate-cli gives them."""
    tok = hf_tokenize(tokenizer)
    tries = answer_tries(tokenizer, spec)
    everything = [np.ones(len(c.scale)) for c in spec.criteria]  # a target only marks what to score
    C = len(spec.criteria)
    groups = shared_groups([leading_inputs(spec, it.fields) for it in items])
    chunks = ([g[s:s + batch] for g in groups for s in range(0, len(g), batch)] if groups else
              [list(range(s, min(s + batch, len(items)))) for s in range(0, len(items), batch)])
    by_item: dict[int, dict[str, Score]] = {}
    was_training = model.training
    model.eval()
    try:
        with tree_attention(model):
            for chunk in chunks:  # items sharing a context score in one tree whose prefix holds it
                tree = build_tree(tok, spec, tries, [Unit(items[i].fields, everything) for i in chunk], CANONICAL,
                                  pad_id(tokenizer))
                probs = level_logprobs(model, tree).exp().double().cpu().numpy()
                for k, i in enumerate(chunk):
                    by_item[i] = {c.name: criterion_score(c, probs[k * C + ci, : len(c.scale)].tolist())
                                  for ci, c in enumerate(spec.criteria)}
    finally:
        if was_training:
            model.train()
    return [by_item[i] for i in range(len(items))]


def report_of(spec: TaskSpec, items: Sequence[Item], scored: Sequence[dict[str, Score]]) -> dict[str, Any]:
    """The runtime's agreement report (labels and scores) of scored items against their human ratings."""
    preds = {it.id: {k: v.label for k, v in sc.items()} for it, sc in zip(items, scored)}
    scores = {it.id: {k: v.score for k, v in sc.items() if v.score is not None} for it, sc in zip(items, scored)}
    humans = {it.id: it.ratings for it in items}
    return agreement(spec, preds, humans, scores)


def validate(model: Any, tokenizer: Any, spec: TaskSpec, items: Sequence[Item]) -> dict[str, Any]:
    return report_of(spec, items, score_items(model, tokenizer, spec, items))


def selection_alpha(report: dict[str, Any], select_by: str = "score") -> float:
    """The number checkpoints are chosen by: the mean over criteria of each one's alpha at its own
    level (a criterion whose alpha is undefined counts as -1).

    select_by "score": the score's interval alpha for rating scales and the label's alpha for
    label sets (they have no score); "label": the label's alpha everywhere. Not alpha pooled over
    (item, criterion) units: with criteria of different means, pooled rises as soon as a model
    learns each criterion's mean, without telling items apart."""
    vals = [selected_alpha(c, select_by) for c in report["criteria"]]
    return float(np.mean([-1.0 if v is None else v for v in vals])) if vals else -1.0


def selected_alpha(r: dict[str, Any], select_by: str) -> float | None:
    """One criterion's (or the pooled) alpha as select_by reads it."""
    return r["score_alpha"] if select_by == "score" and "score_alpha" in r else r.get("alpha")
