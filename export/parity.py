"""Does the exported file label like the model it came from, and agree with humans as well?

    annotate-cli parity models/runs/NAME/merged annotator.gguf data/emobank-test-50.jsonl

Four layers, each against THRESHOLDS (the one place they live):

a. tokens        the prompt token ids of every item and criterion, HF tokenizer vs the GGUF's;
b. distributions mean KL(HF || GGUF) of the allowed-label distributions, per criterion;
c. labels        Krippendorff's alpha between HF labels and GGUF labels, per criterion, at the
                 spec's level (exact agreement stands in where alpha is undefined: one label only);
d. humans        alpha with the human labels before (HF) and after (GGUF) export, and the drop.

HF side: the merged fp32 model scored by training's validator (train/evaluate.py); GGUF side:
the runtime's Annotator, exactly as annotate-cli runs it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from edge_annotator.runtime.data import check_item, iter_rows, ratings_of
from edge_annotator.runtime.metrics import agreement, criterion_agreement
from edge_annotator.runtime.prompt import render_prompt
from edge_annotator.runtime.spec import spec_from_json

THRESHOLDS: dict[str, Any] = {
    "tokens_identical": 1.0,
    "label_alpha": {"F32": 0.98, "F16": 0.98, "Q8_0": 0.98, "Q5_K_M": 0.95, "Q4_K_M": 0.95, "Q4_0": 0.95},
    "human_alpha_drop": 0.02,
}


def _kl(p: list[float], q: list[float]) -> float:
    eps = 1e-12
    return float(sum(a * math.log((a + eps) / (b + eps)) for a, b in zip(p, q) if a > 0))


def parity(merged: str | Path, gguf: str | Path, data: str | Path, max_items: int | None = None,
           threads: int | None = None, thresholds: dict[str, Any] = THRESHOLDS) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edge_annotator.runtime.annotator import Annotator
    from edge_annotator.runtime.engine import LlamaEngine, LlamaModel
    from edge_annotator.runtime.gguf_meta import model_info
    from edge_annotator.train.evaluate import score_items
    from edge_annotator.train.examples import Item

    merged, gguf = Path(merged), Path(gguf)
    spec = spec_from_json((merged / "spec.json").read_text(), str(merged / "spec.json"))
    llm = LlamaModel(gguf)
    info = model_info(llm)
    if info.spec is None or info.spec.sha256 != spec.sha256:
        raise ValueError(f"{gguf} does not embed the spec of {merged} (spec sha256 differs)")
    items: list[Item] = []
    for row in iter_rows(data):
        it = check_item(row, spec)
        items.append(Item(it.id, it.fields, ratings_of(row, spec)))
        if max_items and len(items) >= max_items:
            break
    eng = LlamaEngine(llm, n_threads=threads)
    hf_tok = AutoTokenizer.from_pretrained(merged)
    # a. tokens
    same = total = 0
    first_diff = None
    for it in items:
        for c in spec.criteria:
            p = render_prompt(spec, it.fields, c)
            ok = eng.tokenize(p) == list(hf_tok(p)["input_ids"])
            same += ok
            total += 1
            if not ok and first_diff is None:
                first_diff = f"item {it.id}, criterion {c.name}"
    # b-d. labels and distributions on both sides
    g_scores = Annotator(eng, spec).score_many([it.fields for it in items])
    eng.close()
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32, use_safetensors=True).eval()
    h_scores = score_items(model, hf_tok, spec, items, torch.device("cpu"))
    quant = info.quantization or "?"
    label_min = thresholds["label_alpha"].get(quant, min(thresholds["label_alpha"].values()))
    per: list[dict[str, Any]] = []
    for c in spec.criteria:
        kls, g_lab, h_lab = [], {}, {}
        for it, g, h in zip(items, g_scores, h_scores):
            assert isinstance(g, dict)
            g_lab[it.id] = g[c.name].label
            h_lab[it.id] = h[c.name][0]
            kls.append(_kl(h[c.name][1], [g[c.name].probs[v] for v in c.values]))
        la = criterion_agreement(c, g_lab, {i: [v] for i, v in h_lab.items()})
        alpha, exact = la.get("alpha"), la.get("exact", 0.0)
        per.append({"criterion": c.name, "kl_mean": float(np.mean(kls)), "kl_max": float(np.max(kls)),
                    "label_alpha": alpha, "label_exact": exact,
                    "labels_pass": (alpha if alpha is not None else exact) >= label_min})
    humans = {it.id: it.ratings for it in items if it.ratings}
    h_rep = agreement(spec, {it.id: {k: v[0] for k, v in h.items()} for it, h in zip(items, h_scores)}, humans)
    g_rep = agreement(spec, {it.id: {k: s.label for k, s in g.items()} for it, g in zip(items, g_scores)  # type: ignore[union-attr]
                             }, humans)
    for p, hc, gc in zip(per, h_rep["criteria"], g_rep["criteria"]):
        p["human_alpha_hf"], p["human_alpha_gguf"] = hc.get("alpha"), gc.get("alpha")
    a_h, a_g = h_rep["pooled"].get("alpha"), g_rep["pooled"].get("alpha")
    drop = (a_h - a_g) if a_h is not None and a_g is not None else 0.0
    checks = {
        "tokens": same / total >= thresholds["tokens_identical"] if total else True,
        "labels": all(p["labels_pass"] for p in per),
        "humans": drop <= thresholds["human_alpha_drop"],
    }
    return {
        "merged": str(merged), "gguf": str(gguf), "quantization": quant, "items": len(items),
        "tokens": {"identical": same, "total": total, "share": same / total if total else 1.0,
                   "first_diff": first_diff},
        "criteria": per,
        "humans": {"alpha_hf": a_h, "alpha_gguf": a_g, "drop": drop, "items": len(humans)},
        "thresholds": {"tokens_identical": thresholds["tokens_identical"], "label_alpha": label_min,
                       "human_alpha_drop": thresholds["human_alpha_drop"]},
        "checks": checks, "pass": all(checks.values()),
    }
