"""A linear head per criterion on the model's own hidden state: the head route.

The answer-token route scores the levels with the output layer's rows for the answers' tokens,
applied to the final hidden state at the criterion's cue. The head route replaces them with a
linear map, fitted on the labelled items' own states (export/heads.py), read at one of these taps
(runtime/engine.py: decode_tree reads llama.cpp's tensors as it decodes):

    cue@-1    the final hidden state at the criterion's cue ("result_norm", what the answer tokens read)
    cue@N     the residual stream after layer N at the cue
    last@N    ... at the item's last token (before any cue: one state for every criterion)
    mean@N    ... averaged over the item's tokens

Middle layers carry more of a rater's judgement than the last (measured on USR PersonaChat and
EmoBank: docs/recipes.md); which tap a criterion reads is chosen by cross-validation. The map:

    softmax   probs = softmax(W h + b) over the levels; label the likeliest; score the
              probability-weighted mean of the levels (as the answer-token route's)
    ridge     s = w . h + b, the raters' mean predicted directly (rating scales); probs a normal of
              the cross-validated residual sd around s over the levels; label the likeliest (the
              level nearest s); score s, clipped to the scale

A criterion's head is one such map or an ensemble of up to MAX_MEMBERS (`{"members": [...],
"weights": [...]}`), each at its own tap and kind: the levels' probabilities are the members'
weighted mean, and a rating scale's score is the weighted mean of the members' scores. Where
several candidates cross-validate within a hair of each other, which one wins is luck (other CPU
kernels move the states enough to flip it), and their mean scored above the single pick on the
test splits (docs/recipes.md).

The head travels in the spec, beside the criterion's calibration (`Criterion.head`), so every
path that carries the spec carries it, and the spec's sha256 names it. Its numbers are float32
little-endian, base64 in the JSON: exact, and a tenth of the size of decimal text.

    head = Head.from_dict(criterion.head, len(criterion.scale))
    probs, score = head.apply(levels, lambda tap: state_at[tap])   # float32 (n_embd,) at each of head.taps
"""

from __future__ import annotations

import base64
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

KINDS = ("softmax", "ridge")
MAX_DIM = 1 << 16
MAX_MEMBERS = 10
TAP_AT = ("cue", "last", "mean")


@dataclass(frozen=True, order=True)
class Tap:
    """Where a head reads the model: at the criterion's cue, the item's last token or its mean, after
    layer `layer` (-1: the final hidden state, at the cue only)."""

    at: str
    layer: int

    @property
    def name(self) -> str:
        return f"{self.at}@{self.layer}"

    @classmethod
    def parse(cls, text: Any) -> Tap:
        at, _, layer = str(text).partition("@")
        if at not in TAP_AT or not layer.lstrip("-").isdigit() or len(layer) > 4:
            raise ValueError(f"'tap' must be one of {', '.join(a + '@N' for a in TAP_AT)}, got {text!r}")
        tap = cls(at, int(layer))
        if tap.layer < -1 or (tap.layer == -1 and at != "cue"):
            raise ValueError(f"'tap' {text!r}: layer -1 (the final state) is read at the cue only")
        return tap

    @property
    def per_criterion(self) -> bool:
        return self.at == "cue"


def pack(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a, dtype="<f4").tobytes()).decode("ascii")


def unpack(s: str, n: int) -> np.ndarray:
    """N float32s from base64 text; ValueError where it is not exactly that."""
    try:
        raw = base64.b64decode(s.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError) as e:
        raise ValueError(f"not base64 ({e})") from None
    if len(raw) != 4 * n:
        raise ValueError(f"{len(raw) // 4} numbers where {n} belong")
    a = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    if not np.isfinite(a).all():
        raise ValueError("holds a number that is not finite")
    return a


@dataclass(frozen=True)
class LinearHead:
    kind: str
    tap: Tap
    dim: int
    w: np.ndarray
    """softmax: (levels, dim); ridge: (dim,)."""
    b: np.ndarray
    """softmax: (levels,); ridge: (1,)."""
    sigma: float = 1.0
    """ridge: the residual sd the probabilities spread by."""
    info: Mapping[str, Any] | None = None
    """How it was fitted (method, lambda, items, cross-validated alpha): carried, never read."""

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], levels: int) -> LinearHead:
        """The head a spec holds; ValueError naming what is wrong (spec.py turns it into a SpecError)."""
        kind, dim = d.get("kind"), d.get("dim")
        if kind not in KINDS:
            raise ValueError(f"'kind' must be one of {', '.join(KINDS)}, got {kind!r}")
        tap = Tap.parse(d.get("tap"))
        if not isinstance(dim, int) or isinstance(dim, bool) or not 1 <= dim <= MAX_DIM:
            raise ValueError(f"'dim' must be a whole number from 1 to {MAX_DIM}, got {dim!r}")
        rows = levels if kind == "softmax" else 1
        if not isinstance(d.get("w"), str) or not isinstance(d.get("b"), str):
            raise ValueError("'w' and 'b' must be base64 text of float32 numbers")
        try:
            w, b = unpack(d["w"], rows * dim), unpack(d["b"], rows)
        except ValueError as e:
            raise ValueError(f"'w' or 'b': {e}") from None
        sigma = d.get("sigma", 1.0)
        if not isinstance(sigma, int | float) or isinstance(sigma, bool) or not 0 < sigma < math.inf:
            raise ValueError(f"'sigma' must be a positive number, got {sigma!r}")
        info = d.get("info")
        if info is not None and not isinstance(info, dict):
            raise ValueError("'info' must be a mapping")
        return cls(kind, tap, dim, w.reshape(rows, dim) if kind == "softmax" else w, b, float(sigma), info)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind, "tap": self.tap.name, "dim": self.dim, "w": pack(self.w),
                             "b": pack(self.b)}
        if self.kind == "ridge":
            d["sigma"] = self.sigma
        if self.info:
            d["info"] = dict(self.info)
        return d

    def apply(self, values: list[float], hidden: np.ndarray) -> tuple[list[float], float | None]:
        """The levels' probabilities and, for ridge, the score (None: the caller takes the
        probability-weighted mean). VALUES: the criterion's levels as numbers (ridge's scale; a
        softmax head does not read them)."""
        h = np.asarray(hidden, dtype=np.float64)
        if h.shape != (self.dim,):
            raise ValueError(f"a hidden state of {h.shape[0]} numbers; this head reads {self.dim}")
        if self.kind == "softmax":
            z = self.w.astype(np.float64) @ h + self.b.astype(np.float64)
            e = np.exp(z - z.max())
            return (e / e.sum()).tolist(), None
        s = float(self.w.astype(np.float64) @ h + float(self.b[0]))
        s = min(max(s, values[0]), values[-1])
        return normal_levels(values, np.array([s]), self.sigma)[0].tolist(), s


def normal_levels(values: list[float], scores: np.ndarray, sigma: float) -> np.ndarray:
    """A ridge head's probabilities: per score (already clipped to the scale), a normal of sd SIGMA
    around it over the levels, normalized (rows x levels)."""
    z = -0.5 * ((np.asarray(values, dtype=np.float64)[None, :] - scores[:, None]) / sigma) ** 2
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class Head:
    """A criterion's head: one LinearHead, or the mean of several (each at its own tap)."""

    members: tuple[LinearHead, ...]
    info: Mapping[str, Any] | None = None
    """How the ensemble was chosen (members' candidates, cross-validated alpha): carried, never read."""
    weights: tuple[float, ...] | None = None
    """Each member's weight (None: equal); the mean divides by their sum."""

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], levels: int) -> Head:
        """The head a spec holds, one map or `{"members": [...]}`; ValueError naming what is wrong."""
        if "members" not in d:
            one = LinearHead.from_dict(d, levels)
            return cls((replace(one, info=None),), one.info)  # the info is the head's, as an ensemble's
        members, info, weights = d["members"], d.get("info"), d.get("weights")
        if set(d) - {"members", "weights", "info"}:
            raise ValueError("an ensemble holds 'members', 'weights' and 'info' only, not "
                             f"{', '.join(sorted(set(d) - {'members', 'weights', 'info'}))}")
        if not isinstance(members, list) or not 1 <= len(members) <= MAX_MEMBERS:
            raise ValueError(f"'members' must be a list of 1 to {MAX_MEMBERS} heads")
        if weights is not None and not (
                isinstance(weights, list) and len(weights) == len(members)
                and all(isinstance(w, int | float) and not isinstance(w, bool) and 0 < w < math.inf for w in weights)):
            raise ValueError(f"'weights' must be a list of {len(members)} positive numbers, one per member")
        if info is not None and not isinstance(info, dict):
            raise ValueError("'info' must be a mapping")
        out = []
        for k, m in enumerate(members):
            if not isinstance(m, dict):
                raise ValueError(f"member {k + 1}: must be a mapping (kind, tap, dim, w, b)")
            try:
                out.append(LinearHead.from_dict(m, levels))
            except ValueError as e:
                raise ValueError(f"member {k + 1}: {e}") from None
        if len({m.dim for m in out}) > 1:
            raise ValueError(f"the members read states of different sizes ({', '.join(str(m.dim) for m in out)})")
        return cls(tuple(out), info, tuple(float(w) for w in weights) if weights is not None else None)

    def to_dict(self) -> dict[str, Any]:
        if len(self.members) == 1:
            return replace(self.members[0], info=self.info).to_dict()
        d: dict[str, Any] = {"members": [replace(m, info=None).to_dict() for m in self.members]}
        if self.weights is not None:
            d["weights"] = [int(w) if float(w).is_integer() else w for w in self.weights]
        if self.info:
            d["info"] = dict(self.info)
        return d

    @property
    def dim(self) -> int:
        return self.members[0].dim

    @property
    def taps(self) -> tuple[Tap, ...]:
        return tuple(sorted({m.tap for m in self.members}))

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(sorted({m.kind for m in self.members}))

    def describe(self) -> str:
        """'a ridge head at cue@-1', 'the mean of 10 heads (ridge 6, softmax 4) at 5 taps'."""
        if len(self.members) == 1:
            return f"a {self.members[0].kind} head at {self.members[0].tap.name}"
        kinds = ", ".join(f"{k} {sum(m.kind == k for m in self.members)}" for k in self.kinds)
        mean = "weighted mean" if self.weights is not None and len(set(self.weights)) > 1 else "mean"
        return f"the {mean} of {len(self.members)} heads ({kinds}) at {len(self.taps)} taps"

    def apply(self, values: list[float], state: Callable[[Tap], np.ndarray]) -> tuple[list[float], float | None]:
        """The levels' probabilities (the members' weighted mean) and the score (None where the
        caller takes the probability-weighted mean: one softmax member, or a label set). STATE: the
        hidden state at a tap."""
        if len(self.members) == 1:
            return self.members[0].apply(values, state(self.members[0].tap))
        got = [m.apply(values, state(m.tap)) for m in self.members]
        probs = np.average([p for p, _ in got], axis=0, weights=self.weights)
        if not values:
            return probs.tolist(), None
        scores = [s if s is not None else float(np.dot(values, p)) for p, s in got]
        return probs.tolist(), float(np.average(scores, weights=self.weights))
