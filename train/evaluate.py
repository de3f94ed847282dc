"""Validation with the runtime's own scoring: labels restricted to the allowed answers.

The answers' token trie is built by the runtime's `build_trie`, here with the HF tokenizer; the
probabilities are the restricted softmaxes at each branching node, multiplied along each
answer's path (runtime/annotator.py: level_probs), and the label is the most probable level.
Agreement is runtime/metrics.py's Krippendorff alpha.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from edge_annotator.runtime.annotator import AnswerTrie, build_trie, level_probs
from edge_annotator.runtime.metrics import agreement
from edge_annotator.runtime.prompt import render_prompt
from edge_annotator.runtime.spec import TaskSpec

from .examples import Item
from .model import answer_logits


def hf_tokenize(tokenizer: Any) -> Any:
    return lambda text: list(tokenizer(text)["input_ids"])


@torch.no_grad()
def score_items(model: Any, tokenizer: Any, spec: TaskSpec, items: Sequence[Item], device: torch.device,
                batch: int = 8) -> list[dict[str, tuple[Any, list[float]]]]:
    """Per item: criterion -> (label, probability of each level in spec order)."""
    tok = hf_tokenize(tokenizer)
    tries: dict[str, AnswerTrie] = {c.name: build_trie(tok, spec, c) for c in spec.criteria}
    queries: list[tuple[int, str, tuple[int, ...], list[int]]] = []  # (item, criterion, trie prefix, token ids)
    for i, it in enumerate(items):
        for c in spec.criteria:
            prompt = tok(render_prompt(spec, it.fields, c))
            for prefix, _ in tries[c.name].branches:
                queries.append((i, c.name, prefix, prompt + list(prefix)))
    was_training = model.training
    model.eval()
    cond: dict[tuple[int, str, tuple[int, ...]], dict[int, float]] = {}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for s in range(0, len(queries), batch):
        chunk = queries[s:s + batch]
        width = max(len(q[3]) for q in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, q in enumerate(chunk):
            ids[r, : len(q[3])] = torch.tensor(q[3])
            mask[r, : len(q[3])] = 1
        rows = torch.arange(len(chunk))
        cols = torch.tensor([len(q[3]) - 1 for q in chunk])
        logits = answer_logits(model, ids.to(device), mask.to(device), rows.to(device), cols.to(device)).float()
        for r, (i, cname, prefix, _) in enumerate(chunk):
            kids = dict(tries[cname].branches)[prefix]
            lg = logits[r, list(kids)].cpu().numpy().astype(np.float64)
            e = np.exp(lg - lg.max())
            cond[(i, cname, prefix)] = dict(zip(kids, (e / e.sum()).tolist()))
    if was_training:
        model.train()
    out = []
    for i in range(len(items)):
        res = {}
        for c in spec.criteria:
            probs = level_probs(tries[c.name], lambda prefix: cond.get((i, c.name, prefix)))  # noqa: B023
            res[c.name] = (c.scale[int(np.argmax(probs))].value, probs)
        out.append(res)
    return out


def validate(model: Any, tokenizer: Any, spec: TaskSpec, items: Sequence[Item], device: torch.device) -> dict[str, Any]:
    """The runtime's agreement report of the model's labels against the items' human ratings."""
    scores = score_items(model, tokenizer, spec, items, device)
    preds = {it.id: {k: v[0] for k, v in sc.items()} for it, sc in zip(items, scores)}
    humans = {it.id: it.ratings for it in items}
    return agreement(spec, preds, humans)


def selection_alpha(report: dict[str, Any]) -> float:
    """The number checkpoints are chosen by: the pooled alpha (undefined counts as -1)."""
    a = report["pooled"].get("alpha")
    return -1.0 if a is None else float(a)
