"""Does the exported file score like the model it came from, and agree with humans as well?

    annotate-cli parity models/runs/NAME/merged annotator.gguf data/emobank-test-50.jsonl

Per criterion, each against THRESHOLDS (the one place they live, per quantization type):

a. tokens        the prompt token ids of every item and criterion, HF tokenizer vs the GGUF's;
b. distributions mean KL(HF || GGUF) of the allowed-label distributions (reported);
c. scores        mean and max |score HF - score GGUF| for rating scales (the probability-weighted
                 mean of the levels, what annotate-cli writes as `scores`);
d. labels        the share of items whose label flips decisively: the HF model preferred its label
                 to the GGUF's by more than FLIP_MARGIN in probability (a flip between two levels
                 the model holds nearly tied, 0.50 against 0.49, says nothing about the export and
                 shows in the score change anyway; every flip is reported). Krippendorff's alpha between HF and GGUF
                 labels is reported but does not decide: when one label dominates it is
                 ill-conditioned (one flip among 98 "3"s gives 0.85);
e. humans        alpha with the human labels before (HF) and after (GGUF) export, and the drop:
                 the score's alpha for rating scales, the label's for label sets (as training's
                 select_by: score chooses checkpoints).

HF side: the merged fp32 model scored by training's validator (hf/score.py); GGUF side:
the runtime's Annotator, exactly as annotate-cli runs it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_annotator.runtime.data import Item
from edge_annotator.runtime.metrics import criterion_agreement
from edge_annotator.runtime.prompt import render_prompt
from edge_annotator.runtime.records import Score
from edge_annotator.runtime.spec import Criterion, TaskSpec, spec_from_json

from .quants import QUANTS

# Measured (docs/export.md) on the demo's Gemma 3 270M fine-tune, 200 held-out EmoBank
# sentences, per criterion V / A / D:
#   Q8_0, and Q4_K_M with the adapted tensors at Q8_0 (the default; the same tensors): mean |delta
#   score| 0.0039 / 0.0029 / 0.0026, max 0.042 / 0.014 / 0.016, no label flipped, score alpha with
#   the readers 0.2542 -> 0.2542;
#   Q4_K_M throughout (--adapted-type same): mean 0.050 / 0.043 / 0.049, max 0.19 / 0.17 / 0.11,
#   1 label of 200 flipped (label alpha HF vs GGUF 0.66 on Arousal for that one flip), score alpha
#   0.254 -> 0.219.
# The 8-bit bounds sit 2.5x above what 8 bits cost; the 4- and 5-bit ones below what 4 bits
# throughout cost, because that file agreed with the readers 0.035 worse: the gate refuses it.
# A flip counts against the gate when HF's probability of its own label exceeds its probability of
# the GGUF's label by more than this: above the largest probability change an 8-bit export made on
# the demo's fine-tune (its scores moved at most 0.042), so a flip it gates is not a near-tie.
FLIP_MARGIN = 0.05

THRESHOLDS: dict[str, Any] = {  # per quantization type from export/quants.py, where the types live
    "tokens_identical": 1.0,
    **{key: {q.name: getattr(q, key) for q in QUANTS.values()}
       for key in ("label_flip_share", "score_delta_mean", "score_delta_max")},
    "human_alpha_drop": 0.02,
}


def thresholds_for(quant: str, thresholds: dict[str, Any] = THRESHOLDS) -> dict[str, float]:
    """The bounds for one quantization type; an unknown type gets the loosest of each."""
    def pick(key: str) -> float:
        table = thresholds[key]
        return float(table.get(quant, max(table.values())))

    return {"tokens_identical": thresholds["tokens_identical"], "label_flip_share": pick("label_flip_share"),
            "score_delta_mean": pick("score_delta_mean"), "score_delta_max": pick("score_delta_max"),
            "human_alpha_drop": thresholds["human_alpha_drop"]}


def _kl(p: list[float], q: list[float]) -> float:
    eps = 1e-12
    return float(sum(a * math.log((a + eps) / (b + eps)) for a, b in zip(p, q) if a > 0))


def parity(merged: str | Path, gguf: str | Path, data: str | Path, max_items: int | None = None,
           threads: int | None = None, thresholds: dict[str, Any] = THRESHOLDS, gpu_layers: int = 0) -> dict[str, Any]:
    """Score DATA's items with the merged HF model (fp32) and the GGUF, and compare: prompt tokens,
    each criterion's distributions, scores and labels, and alpha with the humans on both sides."""
    rep = parity_many(merged, [gguf], data, max_items, threads, thresholds, gpu_layers)[0]
    rep.pop("gguf_seconds")  # a timing: the report's bytes stay the same run to run
    return rep


def parity_many(merged: str | Path, ggufs: list[str | Path] | list[Path], data: str | Path,
                max_items: int | None = None, threads: int | None = None, thresholds: dict[str, Any] = THRESHOLDS,
                gpu_layers: int = 0) -> list[dict[str, Any]]:
    """parity() for several files exported from one merged model (quantization routes side by side):
    every GGUF scored first (a file that cannot load stops it before the slow side), the HF model once.
    Each report also holds `gguf_seconds`, the GGUF's scoring time (one process, batch 1)."""
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edge_annotator.hf.score import score_items
    from edge_annotator.runtime.engine import LlamaModel
    from edge_annotator.runtime.gguf_meta import model_info

    merged = Path(merged)
    spec = spec_from_json((merged / "spec.json").read_text(), str(merged / "spec.json"))
    items: list[Item] = []
    hf_tok: Any = None
    sides = []
    for gguf in map(Path, ggufs):
        llm = LlamaModel(gguf, n_gpu_layers=gpu_layers)  # first: a file that cannot load stops it at once
        try:
            info = model_info(llm)
            if info.spec is None or info.spec.sha256 != spec.sha256:
                raise ValueError(f"{gguf} does not embed the spec of {merged} (spec sha256 differs)")
            if hf_tok is None:
                items = _read_items(data, spec, max_items)
                hf_tok = AutoTokenizer.from_pretrained(merged)
            t0 = time.perf_counter()
            sides.append((gguf, _gguf_side(llm, info.quantization or "?", spec, items, hf_tok, threads),
                          time.perf_counter() - t0))
        finally:
            llm.close()
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32, use_safetensors=True).eval()
    h_scores = score_items(model, hf_tok, spec, items)
    out = []
    for gguf, g, seconds in sides:
        th = thresholds_for(g.quant, thresholds)
        per = [_criterion_row(c, items, g.scores, h_scores, th) for c in spec.criteria]
        humans = _humans(spec, items, h_scores, g.scores, per)
        checks = {
            "tokens": g.same / g.total >= th["tokens_identical"] if g.total else True,
            "labels": all(p["labels_pass"] for p in per),
            "scores": all(p.get("scores_pass", True) for p in per),
            "humans": humans["drop"] <= th["human_alpha_drop"],
        }
        out.append({
            "merged": str(merged), "gguf": str(gguf), "quantization": g.quant, "items": len(items),
            "tokens": {"identical": g.same, "total": g.total, "share": g.same / g.total if g.total else 1.0,
                       "first_diff": g.first_diff},
            "criteria": per, "humans": humans, "thresholds": th, "checks": checks, "pass": all(checks.values()),
            "gguf_seconds": round(seconds, 2),
        })
    return out


def _read_items(data: str | Path, spec: TaskSpec, max_items: int | None) -> list[Item]:
    """DATA's items (the first MAX_ITEMS), rows sharing an id being one item with every row's
    ratings (fit's split of a ratings CSV has one row per rater), with or without ratings: each
    item is scored once and set against its raters' consensus."""
    from edge_annotator.runtime.labels import read_labelled

    items = read_labelled(data, spec, rated=False).items
    return items[:max_items] if max_items else items


@dataclass
class _GGUFSide:
    quant: str
    same: int  # prompts the two tokenizers split identically, of `total`
    total: int
    first_diff: str | None
    scores: list[dict[str, Score]]


def _gguf_side(llm: Any, quant: str, spec: TaskSpec, items: list[Item], hf_tok: Any, threads: int | None
               ) -> _GGUFSide:
    """The GGUF's tokens for every prompt (against the HF tokenizer's) and its scores."""
    from edge_annotator.runtime.annotator import Annotator
    from edge_annotator.runtime.engine import LlamaEngine

    with LlamaEngine(llm, n_threads=threads) as eng:  # the context freed before the model (the caller's)
        same = total = 0
        first_diff = None
        for it in items:
            for c in spec.criteria:
                p = render_prompt(spec, it.fields, c)
                ok = eng.tokenize(p) == list(hf_tok(p)["input_ids"])
                same, total = same + ok, total + 1
                if not ok and first_diff is None:
                    first_diff = f"item {it.id}, criterion {c.name}"
        scored = Annotator(eng, spec).score_many([it.fields for it in items])
    scores: list[dict[str, Score]] = []
    for it, g in zip(items, scored):
        if isinstance(g, Exception):
            raise ValueError(f"item {it.id} ({it.path}:{it.line}) could not be scored by the GGUF: {g}")
        scores.append(g)
    return _GGUFSide(quant, same, total, first_diff, scores)


def _criterion_row(c: Criterion, items: list[Item], g_scores: list[dict[str, Score]],
                   h_scores: list[dict[str, Score]], th: dict[str, float]) -> dict[str, Any]:
    """One criterion, HF against GGUF: KL of the distributions, label flips, score changes."""
    kls, flips, decisive, deltas, cal_deltas, g_lab, h_lab = [], 0, 0, [], [], {}, {}
    for it, g, h in zip(items, g_scores, h_scores):
        gs, hs = g[c.name], h[c.name]
        g_lab[it.id], h_lab[it.id] = gs.label, hs.label
        kls.append(_kl([hs.probs[v] for v in c.values], [gs.probs[v] for v in c.values]))
        flips += gs.label != hs.label
        decisive += gs.label != hs.label and hs.probs[hs.label] - hs.probs[gs.label] > FLIP_MARGIN
        if gs.score is not None and hs.score is not None:
            # gated on the model's own score: the calibration is one fixed map on both sides, and
            # its steep isotonic steps would stretch a 0.002 change into 0.3 (reported beside)
            g_raw = gs.raw_score if gs.raw_score is not None else gs.score
            h_raw = hs.raw_score if hs.raw_score is not None else hs.score
            deltas.append(abs(g_raw - h_raw))
            cal_deltas.append(abs(gs.score - hs.score))
    la = criterion_agreement(c, g_lab, {i: [v] for i, v in h_lab.items()})
    counts = {str(v): n for v in c.values if (n := sum(1 for x in h_lab.values() if x == v))}
    row: dict[str, Any] = {"criterion": c.name, "kl_mean": float(np.mean(kls)), "kl_max": float(np.max(kls)),
                           "label_flips": flips, "label_flips_decisive": decisive,
                           "label_flip_share": decisive / len(items),
                           "labels_hf": counts, "top_label_share_hf": max(counts.values()) / len(items),
                           "label_alpha": la.get("alpha"), "label_exact": la.get("exact", 0.0)}
    row["labels_pass"] = row["label_flip_share"] <= th["label_flip_share"]
    if deltas:
        row |= {"score_delta_mean": float(np.mean(deltas)), "score_delta_max": float(np.max(deltas)),
                "calibrated_score_delta_mean": float(np.mean(cal_deltas)),
                "calibrated_score_delta_max": float(np.max(cal_deltas))}
        row["scores_pass"] = (row["score_delta_mean"] <= th["score_delta_mean"]
                              and row["score_delta_max"] <= th["score_delta_max"])
    return row


def _humans(spec: TaskSpec, items: list[Item], h_scores: list[dict[str, Score]], g_scores: list[dict[str, Score]],
            per: list[dict[str, Any]]) -> dict[str, Any]:
    """Alpha with the human ratings on each side (added to each criterion's row) and pooled, and its drop."""
    from edge_annotator.hf.score import report_of, selection_alpha

    h_rep = report_of(spec, items, h_scores)
    g_rep = report_of(spec, items, g_scores)
    for p, hc, gc in zip(per, h_rep["criteria"], g_rep["criteria"]):
        p["human_alpha_hf"], p["human_alpha_gguf"] = hc.get("alpha"), gc.get("alpha")
        if "score_alpha" in hc:
            p["human_score_alpha_hf"], p["human_score_alpha_gguf"] = hc["score_alpha"], gc.get("score_alpha")
        if "macro_f1" in hc:
            p["human_macro_f1_hf"], p["human_macro_f1_gguf"] = hc["macro_f1"], gc.get("macro_f1")
    has_humans = any(it.ratings for it in items)
    a_h = selection_alpha(h_rep) if has_humans else None
    a_g = selection_alpha(g_rep) if has_humans else None
    drop = (a_h - a_g) if a_h is not None and a_g is not None else 0.0
    return {"alpha_hf": a_h, "alpha_gguf": a_g, "drop": drop, "items": sum(1 for it in items if it.ratings),
            "measure": "score alpha for rating scales, label alpha for label sets (pooled)",
            "label_alpha_hf": h_rep["pooled"].get("alpha"), "label_alpha_gguf": g_rep["pooled"].get("alpha"),
            "score_alpha_hf": h_rep["pooled"].get("score_alpha"),
            "score_alpha_gguf": g_rep["pooled"].get("score_alpha")}
