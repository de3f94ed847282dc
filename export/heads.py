"""The head route: a linear head per criterion, fitted on the model's own hidden states.

    annotate-cli head base.gguf labels.csv --spec tasks/support.yaml -o support-head.gguf

Every labelled item is read by the GGUF as `annotate` reads it, and its states are kept at the
candidate taps (runtime/annotator.py: Annotator.features; runtime/linear_head.py: Tap): the final
hidden state at each criterion's cue, and the residual stream at the cue, the item's last token
and averaged over the item, after layers a third, half and two thirds of the way up. They are
llama.cpp's own numbers, so the head is fitted on exactly what the runtime will feed it, on this
file. Per criterion and tap, candidates are fitted on those states (standardized, the scaling
folded into the weights):

    ridge    the raters' mean, least squares with an L2 penalty (rating scales); closed form for
             every penalty at once from one SVD
    softmax  the raters' distribution over the levels, cross-entropy with an L2 penalty (every
             criterion; a label set's only kind); L-BFGS in the states' principal components

each over a grid of penalties, all scored by k-fold cross-validated alpha (a rating scale's score
against the raters' mean, interval; a label set's label against the majority, nominal). Items
that share a context (the fields before the last) stay in one fold. The head is a weighted mean
of candidates, built by forward selection on the out-of-fold predictions (MEMBERS steps, default
10, each adding the candidate that most raises the mean's cross-validated alpha) and refitted on
every item: the single best is a pick among near-ties that other CPU kernels flip, and the mean
scored above it on the test splits (docs/recipes.md). It is written into the spec
(runtime/linear_head.py), which goes into a copy of the GGUF. Nothing is random but the folds,
which are seeded.

Fitting is numpy only (no torch): the command runs on a runtime install.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import click
import numpy as np

from edge_annotator.runtime.data import Item
from edge_annotator.runtime.errors import UserError
from edge_annotator.runtime.linear_head import MAX_MEMBERS, Head, LinearHead, Tap, normal_levels
from edge_annotator.runtime.metrics import _alpha, _code, consensus
from edge_annotator.runtime.options import Command, base_model_option
from edge_annotator.runtime.prompt import leading_inputs, shared_groups
from edge_annotator.runtime.records import Score
from edge_annotator.runtime.spec import Criterion, TaskSpec

FOLDS = 5
RIDGE = (1e-3, 1e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 100.0)
"""Ridge penalties, times the items: the penalty's scale follows the data (standardized states)."""
SOFTMAX = (1e-3, 1e-2, 0.1, 1.0)
"""Softmax penalties on the mean cross-entropy, (alpha / 2) |W|^2."""
MIN_ITEMS = 2 * FOLDS
MEMBERS = MAX_MEMBERS
"""Forward-selection steps that build a criterion's head (at most this many distinct members)."""
POOL = 30
"""Candidates forward selection chooses among: the best by cross-validated alpha alone."""


@dataclass(frozen=True)
class Candidate:
    tap: Tap
    kind: str
    penalty: float

    @property
    def name(self) -> str:
        return f"{self.tap.name} {self.kind} {self.penalty:g}"


def candidate_taps(n_layer: int) -> list[Tap]:
    """The final state at the cue, and at the cue, the item's last token and its mean after the
    layers a third, half and two thirds of the way up (Gemma 3 270M: 5, 8 and 11 of 0..17)."""
    mids = sorted({max(0, min(n_layer - 2, round(n_layer * f) - 1)) for f in (1 / 3, 1 / 2, 2 / 3)})
    return [Tap("cue", -1)] + [Tap(at, layer) for layer in mids for at in ("cue", "last", "mean")]


@dataclass(frozen=True)
class HeadFit:
    """One criterion's head, the candidates it averages (best first) and what cross-validation
    measured for every candidate."""

    criterion: str
    head: Head | None
    chosen: tuple[Candidate, ...]
    cv: dict[str, float | None]
    items: int


def _folds(groups: Sequence[str], seed: int) -> np.ndarray:
    """Fold of each item: its group (its id, or the context it shares with other items) ordered by
    a seeded hash among the groups, which are dealt round-robin: items of one context are never
    on both sides of a fold (no RNG state)."""
    keys = sorted(set(groups), key=lambda g: hashlib.sha256(f"{seed}\0{g}".encode()).hexdigest())
    fold_of = {g: k % FOLDS for k, g in enumerate(keys)}
    return np.array([fold_of[g] for g in groups], dtype=np.int64)


def _targets(c: Criterion, ratings: Sequence[Sequence[Any]]) -> tuple[np.ndarray, np.ndarray]:
    """Per item: the raters' mean (NaN for a label set) and their distribution over the levels (a
    rating between two levels of an interval scale is shared between them)."""
    values = [float(v) for v in c.values] if c.is_numeric else None
    dist = np.zeros((len(ratings), len(c.scale)))
    mean = np.full(len(ratings), np.nan)
    for i, rs in enumerate(ratings):
        for r in rs:
            if values is None:
                dist[i, c.values.index(r)] += 1
                continue
            x = float(r)
            k = int(np.searchsorted(values, x))
            if k < len(values) and values[k] == x:
                dist[i, k] += 1
            else:  # between values[k-1] and values[k]
                t = (x - values[k - 1]) / (values[k] - values[k - 1])
                dist[i, k - 1] += 1 - t
                dist[i, k] += t
        dist[i] /= dist[i].sum()
        if values is not None:
            mean[i] = float(np.mean([float(r) for r in rs]))
    return mean, dist


def _standardize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mu = x.mean(axis=0)
    sd = x.std(axis=0)
    sd[sd < 1e-8] = 1.0
    return (x - mu) / sd, mu, sd


def _ridge_all(z: np.ndarray, y: np.ndarray, penalties: Sequence[float]) -> list[tuple[np.ndarray, float]]:
    """(w, b) on standardized states Z for each penalty (times n), from one SVD."""
    ym = float(y.mean())
    u, s, vt = np.linalg.svd(z, full_matrices=False)
    uy = u.T @ (y - ym)
    n = len(y)
    return [(vt.T @ (s / (s ** 2 + a * n) * uy), ym) for a in penalties]


def _lbfgs(f: Callable[[np.ndarray], tuple[float, np.ndarray]], x0: np.ndarray, iters: int = 300,
           memory: int = 10, tol: float = 1e-7) -> np.ndarray:
    """Minimize a smooth convex f (value, gradient) by L-BFGS with a backtracking line search."""
    x = x0.copy()
    fx, g = f(x)
    ss: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    for _ in range(iters):
        if float(np.abs(g).max()) < tol:
            break
        q = g.copy()
        alphas = []
        for s_, y_ in zip(reversed(ss), reversed(ys)):
            a = float(s_ @ q) / float(y_ @ s_)
            alphas.append(a)
            q -= a * y_
        if ys:
            q *= float(ss[-1] @ ys[-1]) / float(ys[-1] @ ys[-1])
        for (s_, y_), a in zip(zip(ss, ys), reversed(alphas)):
            q += (a - float(y_ @ q) / float(y_ @ s_)) * s_
        d = -q
        slope = float(g @ d)
        if slope >= 0:  # not a descent direction: start the memory again
            d, slope, ss, ys = -g, -float(g @ g), [], []
        step = 1.0
        while True:
            xn = x + step * d
            fn, gn = f(xn)
            if fn <= fx + 1e-4 * step * slope or step < 1e-10:
                break
            step *= 0.5
        s_, y_ = xn - x, gn - g
        if float(s_ @ y_) > 1e-12:
            ss.append(s_)
            ys.append(y_)
            if len(ss) > memory:
                ss.pop(0)
                ys.pop(0)
        if fx - fn < tol * max(1.0, abs(fx)):
            x, fx, g = xn, fn, gn
            break
        x, fx, g = xn, fn, gn
    return x


def _softmax_fit(z: np.ndarray, t: np.ndarray, penalty: float) -> tuple[np.ndarray, np.ndarray]:
    """(W, b) minimizing mean cross-entropy to the soft targets T + (penalty / 2) |W|^2, on
    standardized states Z, solved in Z's principal components (the optimum lies in their span)."""
    n, k = t.shape
    u, s, vt = np.linalg.svd(z, full_matrices=False)
    keep = s > 1e-8 * s[0]
    f_ = u[:, keep] * s[keep]  # n x r: the states in their components
    r = f_.shape[1]

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        beta, b = theta[: r * k].reshape(r, k), theta[r * k:]
        logits = f_ @ beta + b
        logits -= logits.max(axis=1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        p = np.exp(logp)
        val = -float((t * logp).sum()) / n + 0.5 * penalty * float((beta ** 2).sum())
        d = (p - t) / n
        return val, np.concatenate([(f_.T @ d + penalty * beta).ravel(), d.sum(axis=0)])

    theta = _lbfgs(loss, np.zeros(r * k + k))
    beta, b = theta[: r * k].reshape(r, k), theta[r * k:]
    return (vt[keep].T @ beta).T, b  # W: k x d on the standardized states


def _fit_one(cd: Candidate, x: np.ndarray, mean: np.ndarray, dist: np.ndarray) -> LinearHead:
    """A head on raw states X (standardization folded in)."""
    z, mu, sd = _standardize(x)
    if cd.kind == "ridge":
        ((w, b),) = _ridge_all(z, mean, [cd.penalty])
        w_raw = w / sd
        return LinearHead("ridge", cd.tap, x.shape[1], w_raw.astype(np.float32),
                          np.array([b - float(w_raw @ mu)], dtype=np.float32))
    wz, bz = _softmax_fit(z, dist, cd.penalty)
    w_raw = wz / sd
    return LinearHead("softmax", cd.tap, x.shape[1], w_raw.astype(np.float32), (bz - w_raw @ mu).astype(np.float32))


def _predict(c: Criterion, head: Head, x: dict[Tap, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Scores (rating scales) and label indexes of each item, as the runtime gives them; X: per tap,
    items x n_embd."""
    values = [float(v) for v in c.values] if c.is_numeric else []
    n = len(next(iter(x.values())))
    scores, labels = np.empty(n), np.empty(n, dtype=np.int64)
    for i in range(n):
        probs, raw = head.apply(values, lambda t: x[t][i])  # noqa: B023
        labels[i] = int(np.argmax(probs))
        scores[i] = raw if raw is not None else (sum(v * p for v, p in zip(values, probs)) if values else np.nan)
    return scores, labels


def _cv_alpha(c: Criterion, scores: np.ndarray, labels: np.ndarray, mean: np.ndarray,
              ratings: Sequence[Sequence[Any]]) -> float | None:
    """What the candidates are compared by: a rating scale's score (interval alpha against the
    raters' mean), a label set's label (nominal alpha against the raters' majority)."""
    if c.is_numeric:
        return _alpha([scores.tolist(), mean.tolist()], "interval")
    gold = [_code(c, consensus(c, rs)) for rs in ratings]
    return _alpha([labels.astype(float).tolist(), gold], "nominal")


@dataclass
class OutOfFold:
    """Every candidate's out-of-fold predictions of one criterion's items: what choosing among them
    and averaging them is measured by."""

    cands: list[Candidate]
    scores: dict[Candidate, np.ndarray]
    """Rating scales: each item's score (NaN for a label set)."""
    probs: dict[Candidate, np.ndarray]
    """Items x levels."""
    sigma: dict[Candidate, float]
    """A ridge candidate's residual sd, which its probabilities spread by."""
    cv: dict[str, float | None]
    mean: np.ndarray
    dist: np.ndarray

    def alpha(self, c: Criterion, members: Sequence[Candidate], ratings: Sequence[Sequence[Any]]) -> float | None:
        """The cross-validated alpha of MEMBERS' mean (scores and probabilities averaged; a candidate
        listed twice weighs twice, as build_head weighs it)."""
        s = np.mean([self.scores[cd] for cd in members], axis=0)
        p = np.mean([self.probs[cd] for cd in members], axis=0)
        return _cv_alpha(c, s, p.argmax(axis=1), self.mean, ratings)


def cross_validate(c: Criterion, states: dict[Tap, np.ndarray], ratings: Sequence[Sequence[Any]],
                   groups: Sequence[str], seed: int = 0) -> OutOfFold:
    """Every candidate (each tap in STATES, items x n_embd, with every kind and penalty) fitted on
    k-1 folds and predicting the k-th."""
    n = len(groups)
    mean, dist = _targets(c, ratings)
    folds = _folds(groups, seed)
    values = [float(v) for v in c.values] if c.is_numeric else []
    cands = [Candidate(t, k, a) for t in states for k, grid in (("ridge", RIDGE), ("softmax", SOFTMAX))
             if k == "softmax" or c.is_numeric for a in grid]
    pred_s = {cd: np.full(n, np.nan) for cd in cands}
    pred_p = {cd: np.empty((n, len(c.scale))) for cd in cands if cd.kind == "softmax"}
    for k in range(FOLDS):
        tr, te = folds != k, folds == k
        for tap, x in states.items():
            z, mu, sd = _standardize(x[tr])
            zt = (x[te] - mu) / sd
            if c.is_numeric:
                for a, (w, b) in zip(RIDGE, _ridge_all(z, mean[tr], RIDGE)):
                    pred_s[Candidate(tap, "ridge", a)][te] = np.clip(zt @ w + b, values[0], values[-1])
            for a in SOFTMAX:
                cd = Candidate(tap, "softmax", a)
                wz, bz = _softmax_fit(z, dist[tr], a)
                logits = zt @ wz.T + bz
                p = np.exp(logits - logits.max(axis=1, keepdims=True))
                pred_p[cd][te] = p / p.sum(axis=1, keepdims=True)
                if values:
                    pred_s[cd][te] = pred_p[cd][te] @ np.asarray(values)
    # a ridge candidate's probabilities spread by its out-of-fold residual sd, as its head's will
    sigma = {cd: max(float(np.sqrt(np.mean((pred_s[cd] - mean) ** 2))), 0.05) for cd in cands if cd.kind == "ridge"}
    for cd, sg in sigma.items():
        pred_p[cd] = normal_levels(values, pred_s[cd], sg)
    cv = {cd.name: _cv_alpha(c, pred_s[cd], pred_p[cd].argmax(axis=1), mean, ratings) for cd in cands}
    return OutOfFold(cands, pred_s, pred_p, sigma, cv, mean, dist)


def ranked(oof: OutOfFold) -> list[Candidate]:
    """The candidates best first by cross-validated alpha; at a tie the softmax (it gives every
    level its own probability), then the grid's order."""
    return sorted(oof.cands, key=lambda cd: (-_or_worst(oof.cv[cd.name]), cd.kind != "softmax"))


def _or_worst(a: float | None) -> float:
    return -math.inf if a is None else a


def choose(oof: OutOfFold, c: Criterion, ratings: Sequence[Sequence[Any]], steps: int) -> list[Candidate]:
    """The candidates a head averages, one per step (a candidate picked twice weighs twice), by
    forward selection with replacement (Caruana et al., 2004) on the out-of-fold predictions:
    start from the best candidate, and STEPS - 1 times add the one (again, if it is best) whose
    addition gives the mean the best cross-validated alpha, among the POOL best alone. Where one
    tap carries the rating the best is added again and again; where several near-ties do, their
    mean."""
    pool = ranked(oof)[:POOL]
    picked = [pool[0]]
    for _ in range(steps - 1):
        alphas = [oof.alpha(c, [*picked, cd], ratings) for cd in pool]
        best = max(range(len(pool)), key=lambda k: _or_worst(alphas[k]))  # noqa: B023
        picked.append(pool[best])  # at a tie the first: the better alone
    return picked


def fit_member(cd: Candidate, x: np.ndarray, oof: OutOfFold) -> LinearHead:
    """Candidate CD fitted on every item's states X (a ridge's probabilities spread by its
    out-of-fold residual sd)."""
    h = _fit_one(cd, x, oof.mean, oof.dist)
    return replace(h, sigma=oof.sigma[cd]) if cd.kind == "ridge" else h


def build_head(picked: Sequence[Candidate], states: dict[Tap, np.ndarray], oof: OutOfFold,
               info: dict[str, Any] | None = None) -> Head:
    """The mean of PICKED (choose's steps, or any list of candidates), each distinct candidate
    fitted once on STATES and weighted by how often it was picked."""
    top = tuple(dict.fromkeys(picked))
    weights = tuple(float(picked.count(cd)) for cd in top)
    return Head(tuple(fit_member(cd, states[cd.tap], oof) for cd in top), info,
                None if len(set(weights)) == 1 else weights)


def fit_criterion(c: Criterion, states: dict[Tap, np.ndarray], ratings: Sequence[Sequence[Any]],
                  groups: Sequence[str], seed: int = 0, members: int = MEMBERS) -> HeadFit:
    """Fit one criterion's head: every candidate scored by k-fold cross-validation
    (cross_validate), and the weighted mean of those `choose` picks in MEMBERS steps, refitted on
    every item. GROUPS: each item's id, or the context it shares with others (kept in one fold)."""
    n = len(groups)
    if n < MIN_ITEMS or len(set(groups)) < FOLDS:
        return HeadFit(c.name, None, (), {}, n)
    oof = cross_validate(c, states, ratings, groups, seed)
    picked = choose(oof, c, ratings, max(1, members))
    top = tuple(dict.fromkeys(picked))
    info: dict[str, Any] = {"items": n, "groups": len(set(groups)), "folds": FOLDS, "seed": seed,
                            "cv_alpha": oof.alpha(c, picked, ratings)}
    if len(top) == 1:
        info["penalty"] = top[0].penalty
    else:
        info["members"] = [cd.name for cd in top]
    return HeadFit(c.name, build_head(picked, states, oof, info), top, oof.cv, n)


def context_groups(spec: TaskSpec, items: Sequence[Item]) -> list[str]:
    """Each item's cross-validation group: the fields before the last (several responses to one
    dialogue, several answers to one question) where items share them as training does
    (runtime/prompt.py: leading_inputs, shared_groups); else its own id."""
    keys = [leading_inputs(spec, it.fields) for it in items]
    if not spec.inputs[:-1] or shared_groups(keys) is None:
        return [it.id for it in items]
    return [json.dumps(k, ensure_ascii=False) for k in keys]


def fit_heads(spec: TaskSpec, items: Sequence[Item], states: dict[Tap, np.ndarray], seed: int = 0,
              members: int = MEMBERS) -> list[HeadFit]:
    """Per criterion, its head from the items that rate it; STATES: per tap, items x criteria x
    n_embd at a cue, items x n_embd at the item."""
    out = []
    groups = context_groups(spec, items)
    for ci, c in enumerate(spec.criteria):
        rows = [i for i, it in enumerate(items) if any(c.name in r for r in it.ratings)]
        ratings = [[r[c.name] for r in items[i].ratings if c.name in r] for i in rows]
        mine = {t: (x[rows, ci] if t.per_criterion else x[rows]).astype(np.float64) for t, x in states.items()}
        out.append(fit_criterion(c, mine, ratings, [groups[i] for i in rows], seed, members))
    return out


def with_heads(spec: TaskSpec, fits: Sequence[HeadFit]) -> TaskSpec:
    """The spec with each criterion's head (a criterion without one keeps the answer tokens) and no
    calibration where a head replaces the answer tokens (the map was fitted on their scores)."""
    by = {f.criterion: f.head for f in fits if f.head is not None}
    return replace(spec, criteria=tuple(
        replace(c, head=by[c.name].to_dict(), calibration=()) if c.name in by else c for c in spec.criteria))


def states_of(model: str | Path, spec: TaskSpec, items: Sequence[Item], threads: int | None = None,
              progress: Callable[[int], None] | None = None,
              taps: Sequence[Tap] | None = None, base: Path | None = None) -> dict[Tap, np.ndarray]:
    """Every item's states at TAPS (default: candidate_taps), read by MODEL as annotate reads: per
    tap items x criteria x n_embd at a cue, items x n_embd at the item (float32); an item too long
    for the context stops it, naming the item. BASE: an adapter MODEL's base GGUF where it is not
    beside it."""
    from edge_annotator.runtime.annotator import Annotator
    from edge_annotator.runtime.engine import LlamaEngine

    plain = replace(spec, criteria=tuple(replace(c, head=None) for c in spec.criteria))
    with LlamaEngine(model, n_threads=threads, base=base) as eng:
        ann = Annotator(eng, plain)
        taps = list(taps or candidate_taps(eng.n_layer))
        out: dict[Tap, list[np.ndarray]] = {t: [] for t in taps}
        for start in range(0, len(items), 16):
            chunk = items[start:start + 16]
            for it, got in zip(chunk, ann.features([it.fields for it in chunk], taps)):
                if isinstance(got, Exception):
                    raise UserError(f"{it.path}:{it.line}: item {it.id}: {got}")
                for t in taps:
                    out[t].append(got[t])
            if progress:
                progress(len(chunk))
    return {t: np.stack(v).astype(np.float32) for t, v in out.items()}


def summary(fits: Sequence[HeadFit]) -> dict[str, Any]:
    """What goes into provenance and the command's table: per criterion the head (what it is, the
    candidates it averages), the items, its cross-validated alpha and every candidate's."""
    return {f.criterion: {"head": f.head.describe() if f.head else None, "members": [cd.name for cd in f.chosen],
                          "items": f.items, "cv_alpha": (f.head.info or {}).get("cv_alpha") if f.head else None,
                          "candidates": f.cv} for f in fits}


def provenance_of(model: Path, labels: Path, fits: Sequence[HeadFit], seconds: dict[str, float],
                  base: Path | None = None) -> dict[str, Any]:
    from edge_annotator.runtime.gguf_meta import read_model_info

    before = read_model_info(model, base).provenance or {}
    return {**before, "heads": {"fitted_on": labels.name, "labels_sha256": hashlib.sha256(labels.read_bytes())
                              .hexdigest(), "model": model.name, "seconds": seconds, "criteria": summary(fits)}}


def timed(f: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    return f(), round(time.perf_counter() - t0, 2)


@dataclass(frozen=True)
class HeadRun:
    """What head_annotator did: the fits written, the seconds spent reading and fitting, and with
    HELD_OUT the held-out items' scores by heads fitted without them."""

    fits: list[HeadFit]
    seconds: dict[str, float]
    held_out: list[dict[str, Score]] | None = None


def head_annotator(model: Path, spec: TaskSpec, items: Sequence[Item], out: Path, labels: Path,
                   threads: int | None = None, seed: int = 0, progress: Callable[[int], None] | None = None,
                   provenance: dict[str, Any] | None = None, base: Path | None = None, members: int = MEMBERS,
                   held_out: int = 0) -> HeadRun:
    """The head route whole: ITEMS read by MODEL, a head per criterion fitted on their states, and
    OUT written (MODEL with the heads in SPEC, PROVENANCE added to the command's own). BASE: an
    adapter MODEL's base GGUF where it is not beside it. `head`, `fit --route head|auto` and
    scripts/head_route.py all take this one path.

    HELD_OUT > 0: the last HELD_OUT items are also scored by heads fitted on the others alone, from
    the same states (what `annotate` would give them: fit --route auto compares that with the
    fine-tune's scores on the same items); OUT's heads are still fitted on every item."""
    states, read_s = timed(lambda: states_of(model, spec, items, threads, progress, base=base))
    scored, seconds = None, {"states": read_s}
    if held_out:
        k = len(items) - held_out
        rest, seconds["fit_held_out"] = timed(lambda: fit_heads(spec, items[:k], {t: x[:k] for t, x in states.items()},
                                                                 seed, members))
        scored = scores_of(with_heads(spec, rest), {t: x[k:] for t, x in states.items()})
    fits, seconds["fit"] = timed(lambda: fit_heads(spec, items, states, seed, members))
    prov = provenance_of(model, labels, fits, seconds, base) | (provenance or {})
    write_annotator(model, out, with_heads(spec, fits), prov)
    return HeadRun(fits, seconds, scored)


def scores_of(spec: TaskSpec, states: dict[Tap, np.ndarray]) -> list[dict[str, Score]]:
    """Each item's scores by SPEC's heads from its STATES (per tap, items x criteria x n_embd at a
    cue, items x n_embd at the item), as the annotator computes them from the same states
    (runtime/annotator.py: head_score); criteria without a head are left out."""
    from edge_annotator.runtime.annotator import head_score

    heads = [(ci, c, Head.from_dict(c.head, len(c.scale))) for ci, c in enumerate(spec.criteria) if c.head]
    n = len(next(iter(states.values()))) if states else 0
    return [{c.name: head_score(c, head, lambda t: states[t][i, ci] if t.per_criterion else states[t][i])  # noqa: B023
             for ci, c, head in heads} for i in range(n)]


def write_annotator(model: Path, out: Path, spec: TaskSpec, provenance: dict[str, Any]) -> Path:
    """MODEL copied to OUT with SPEC (its heads) embedded; a LoRA adapter file stays one, naming the
    same base (which must then be beside OUT, or given with --base-model)."""
    from edge_annotator.runtime.adapter_file import BASE_FILE, BASE_SHA256, adapter_fields

    from .metadata import embed_spec

    kv = adapter_fields(model)
    extra = {k: kv[k] for k in (BASE_FILE, BASE_SHA256) if kv and kv.get(k)}
    return embed_spec(model, out, spec, provenance, extra=extra or None)


@click.command("head", cls=Command)
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("labels", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The annotator GGUF to write: MODEL with the spec and its heads embedded.")
@click.option("--spec", "spec_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Task spec YAML [default: the one MODEL embeds].")
@click.option("--threads", type=click.IntRange(min=1), default=None, envvar="ANNOTATE_THREADS", show_envvar=True,
              help="CPU threads reading the items [default: all cores].")
@click.option("--seed", type=int, default=0, show_default=True, help="The cross-validation folds' seed.")
@click.option("--members", type=click.IntRange(1, MAX_MEMBERS), default=MEMBERS, show_default=True,
              help="Forward-selection steps building each criterion's head: at most this many candidates, "
                   "averaged (1: the single best by cross-validated alpha).")
@base_model_option
@click.option("--force", is_flag=True, help="Replace an existing output file (never MODEL or LABELS).")
def head_command(model: Path, labels: Path, out: Path, spec_path: Path | None, threads: int | None, seed: int,
                 members: int, base_model: Path | None, force: bool) -> None:
    """Fit a linear head per criterion on MODEL's own hidden states for the items of LABELS (human
    ratings, any layout `fit` reads), and write MODEL with them as OUT: an annotator in minutes, on
    a base model or a fine-tuned one, with no training of the model.

    Each criterion's candidates (ridge on the raters' mean, or softmax over the levels, at a grid of
    penalties, at ten taps) are scored by 5-fold cross-validated alpha; the head is a weighted mean
    of up to --members of them, added one at a time where they raise that alpha, and the table shows
    its alpha and the best single candidate's. `annotate`,
    `serve` and the rest then score that criterion with its head.

    \b
    Examples:
      annotate-cli head models/gemma-3-270m-q4_k_m.gguf ratings.csv --spec tasks/support.yaml -o support.gguf
      annotate-cli head support-finetuned.gguf ratings.csv -o support-head.gguf --threads 2
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from edge_annotator.runtime.files import check_output
    from edge_annotator.runtime.gguf_meta import read_model_info, resolve_spec
    from edge_annotator.runtime.labels import read_labelled
    from edge_annotator.runtime.spec import load_spec

    err = Console(stderr=True)
    check_output(out, [model, labels, spec_path], force)
    spec = resolve_spec(read_model_info(model, base_model), load_spec(spec_path) if spec_path else None)
    items = [it for it in read_labelled(labels, spec, strict=False).items if it.ratings]
    if len(items) < MIN_ITEMS:
        raise UserError(f"{labels}: {len(items)} rated items; a head needs at least {MIN_ITEMS}")
    with Progress(TextColumn("[bold]reading items"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err) as bar:
        task = bar.add_task("states", total=len(items))
        done = head_annotator(model, spec, items, out, labels, threads, seed, lambda n: bar.advance(task, n),
                              base=base_model, members=members)
    fits, seconds = done.fits, done.seconds
    from rich.table import Table

    t = Table(title=f"{out.name}: a head per criterion, {len(items)} items ({seconds['states']:.0f} s reading them, "
                    f"{seconds['fit']:.0f} s fitting)")
    for col in ("criterion", "head", "best candidate", "items", "5-fold alpha", "best candidate's",
                "final state at the cue"):
        t.add_column(col, justify="left" if col in ("criterion", "head", "best candidate") else "right")
    for f in fits:
        final = max((v for c, v in f.cv.items() if c.startswith("cue@-1 ") and v is not None), default=None)
        best = f.chosen[0].name if f.chosen else ""
        t.add_row(f.criterion, f.head.describe() if f.head else "none (too few items)", best, str(f.items),
                  *(f"{v:.3f}" if v is not None else "n/a" for v in
                    ((f.head.info or {}).get("cv_alpha") if f.head else None, f.cv.get(best), final)))
    err.print(t)
    click.echo(out)
