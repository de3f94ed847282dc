"""annotate-cli's output records: how a result or an error is written, and how the file is read back.

    write_jsonl_line(out, result_record("s1", scores, stamp))   # {"id","labels","scores"?,"probs",stamp}
    write_jsonl_line(out, error_record(err, stamp))            # {"id","error":{file,line,field,message},stamp}
    preds = read_predictions("labels.jsonl", spec)             # [Prediction], checked against the spec
    labels, scores = by_id(preds)                              # by item id, error records left out

Every writer (annotate's job, its worker pool, Ray's actors) and every reader (agree, its report,
convert) goes through here, so the format has one definition.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data import InputError, Row, coerce_label, iter_rows, record_id
from .spec import Criterion, TaskSpec

PROB_DIGITS = 6  # probabilities and scores are rounded here, so outputs compare byte for byte


@dataclass(frozen=True)
class Score:
    """One criterion's answer for one item: the most probable level, every level's probability,
    and (rating scales) the probability-weighted mean of the levels."""

    label: int | float | str
    probs: dict[int | float | str, float]
    score: float | None = None
    raw_score: float | None = None
    """The probability-weighted mean before the spec's calibration; None where the criterion has none."""
    accept: bool | None = None
    """Whether the criterion's trust rule accepts this label without review (runtime/trust.py);
    None where the spec has no rule for it."""
    interval: tuple[float, float] | None = None
    """The trust rule's score interval for the raters' mean (rating scales; runtime/trust.py);
    None where the rule holds none."""
    label_set: tuple[int | float | str, ...] | None = None
    """The trust rule's label set, most probable first: the labels that hold a majority label at the
    rule's coverage (labels; runtime/trust.py); None where the rule holds none."""


def jsonl_line(record: dict[str, Any]) -> str:
    """One compact, key-stable JSON line: the one serialisation of every output record."""
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"), allow_nan=False) + "\n"


def write_jsonl_line(fh: Any, record: dict[str, Any]) -> None:
    """jsonl_line, flushed so a killed job loses nothing written."""
    fh.write(jsonl_line(record))
    fh.flush()


def result_record(item_id: str, scores: Mapping[str, Score], stamp: Mapping[str, str] | None = None
                  ) -> dict[str, Any]:
    rec: dict[str, Any] = {"id": item_id, "labels": {k: s.label for k, s in scores.items()}}
    numeric = {k: round(s.score, PROB_DIGITS) for k, s in scores.items() if s.score is not None}
    if numeric:  # rating scales only: labels have no mean
        rec["scores"] = numeric
    raw = {k: round(s.raw_score, PROB_DIGITS) for k, s in scores.items() if s.raw_score is not None}
    if raw:  # criteria with a calibration: the score before it
        rec["raw_scores"] = raw
    rec["probs"] = {k: {str(v): p for v, p in s.probs.items()} for k, s in scores.items()}
    accept = {k: s.accept for k, s in scores.items() if s.accept is not None}
    if accept:  # criteria with a trust rule: whether it accepts the label without review
        rec["accept"] = accept
    intervals = {k: list(s.interval) for k, s in scores.items() if s.interval is not None}
    if intervals:  # rating criteria whose rule holds a score interval: where the raters' mean lies
        rec["intervals"] = intervals
    sets = {k: list(s.label_set) for k, s in scores.items() if s.label_set is not None}
    if sets:  # label criteria whose rule holds a label set: where the raters' most frequent label lies
        rec["sets"] = sets
    return {**rec, **(stamp or {})}


def error_record(err: InputError, stamp: Mapping[str, str]) -> dict[str, Any]:
    return {"id": err.item_id, "error": err.to_record(), **stamp}


@dataclass(frozen=True)
class Prediction:
    """One output record read back: a result, or an error record (`error` set, nothing else)."""

    id: str
    line: int
    labels: dict[str, Any]
    scores: dict[str, float]
    probs: dict[str, dict[str, float]]
    model_sha256: str
    error: dict[str, Any] | None = None
    accept: dict[str, bool] = field(default_factory=dict)
    """Per criterion with a trust rule: whether it accepted the label without review."""
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Per rating criterion whose rule holds one: the score interval for the raters' mean."""
    sets: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    """Per label criterion whose rule holds one: the label set, most probable first."""

    def accepted(self, criterion: str) -> bool:
        """Whether a trust rule accepted this criterion's label (False where none marked it)."""
        return self.accept.get(criterion, False)

    def confidence(self, criterion: str) -> float:
        """The chosen label's probability."""
        return float(self.probs.get(criterion, {}).get(str(self.labels.get(criterion)), math.nan))


def by_id(preds: list[Prediction]) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, float]]]:
    """The result records' labels and scores by item id (error records left out): what agreement takes."""
    ok = [p for p in preds if p.error is None]
    return {p.id: p.labels for p in ok}, {p.id: p.scores for p in ok}


def read_predictions(path: str | Path, spec: TaskSpec, need_probs: bool = True) -> list[Prediction]:
    """annotate-cli's JSONL (or Parquet) output, each record checked against the spec (`prediction_of`):
    InputError names the file, line and field of the first that is not one, or of a second result
    record for one item."""
    out = []
    first_line: dict[str, int] = {}
    for row in iter_rows(path):
        p = prediction_of(row, spec, need_probs)
        if p.error is None:
            if p.id in first_line:
                raise InputError(row.path, row.line, f"a second result for item '{p.id}' (the first is at line "
                                 f"{first_line[p.id]}): one record per item", "id", p.id)
            first_line[p.id] = row.line
        out.append(p)
    return out


def prediction_of(row: Row, spec: TaskSpec, need_probs: bool = True) -> Prediction:
    """One output record read back. Labels must be levels of their criterion (a value inside the
    range on an interval scale), probabilities finite numbers in [0, 1] keyed by level, scores
    finite numbers. With need_probs=False (agree, which also compares labels from elsewhere) a
    record may carry labels alone; probs, if there, are checked."""
    if row.error:
        raise row.error
    d = row.data
    assert d is not None
    if "id" not in d:
        raise InputError(row.path, row.line, "not an annotate-cli output record: no 'id'", "id")
    sha = d.get("model_sha256", "")
    sha = sha if isinstance(sha, str) else ""
    if "error" in d:  # an error record: its id may be missing (the record it stands for had none)
        if d["id"] is not None and (not isinstance(d["id"], str | int) or isinstance(d["id"], bool)):
            raise InputError(row.path, row.line, f"must be a string or an integer, got {type(d['id']).__name__}", "id")
        err = d["error"] if isinstance(d["error"], dict) else {"message": str(d["error"])}
        return Prediction(str(d["id"]), row.line, {}, {}, {}, sha, err)
    item_id = record_id(row)
    names = set(spec.criterion_names)
    labels, probs, scores = d.get("labels"), d.get("probs"), d.get("scores") or {}
    if not isinstance(labels, dict) or set(labels) != names:
        raise InputError(row.path, row.line, f"must map every criterion of spec '{spec.name}' "
                         f"({', '.join(sorted(names))}) to a label", "labels", item_id)
    labels = {c.name: _level(labels[c.name], c, row, item_id) for c in spec.criteria}
    if probs is None and not need_probs:
        probs = {}
    elif not isinstance(probs, dict) or set(probs) != names:
        raise InputError(row.path, row.line, "must map every criterion to its levels' probabilities",
                         "probs", item_id)
    for c in spec.criteria:
        if c.name in probs:
            _check_probs(probs[c.name], c, row, item_id)
    if not isinstance(scores, dict) or not all(k in names and _finite(v) for k, v in scores.items()):
        raise InputError(row.path, row.line, "must map criteria to finite numbers", "scores", item_id)
    accept = d.get("accept", {})
    if not isinstance(accept, dict) or not all(k in names and isinstance(v, bool) for k, v in accept.items()):
        raise InputError(row.path, row.line, "must map criteria to true or false", "accept", item_id)
    intervals = d.get("intervals", {})
    if not isinstance(intervals, dict) or not all(
            k in names and isinstance(v, list) and len(v) == 2 and all(_finite(x) for x in v) and v[0] <= v[1]
            for k, v in intervals.items()):
        raise InputError(row.path, row.line, "must map criteria to [low, high] (finite numbers, low <= high)",
                         "intervals", item_id)
    sets = d.get("sets", {})
    if not isinstance(sets, dict) or not all(k in names and isinstance(v, list) and v for k, v in sets.items()):
        raise InputError(row.path, row.line, "must map criteria to non-empty lists of their labels", "sets", item_id)
    by_name = {c.name: c for c in spec.criteria}
    return Prediction(item_id, row.line, labels, {k: float(v) for k, v in scores.items()}, probs, sha, None, accept,
                      {k: (float(v[0]), float(v[1])) for k, v in intervals.items()},
                      {k: tuple(_level(x, by_name[k], row, item_id, "sets") for x in v) for k, v in sets.items()})


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _level(v: Any, c: Criterion, row: Row, item_id: str, where: str = "labels") -> int | float | str:
    """A predicted label checked as a human label is: a level (or, on an interval scale, a value in range)."""
    try:
        return coerce_label(v, c, row.path, row.line, where)
    except InputError as e:
        raise InputError(row.path, row.line, e.reason, e.field, item_id) from None


def _check_probs(got: Any, c: Criterion, row: Row, item_id: str) -> None:
    levels = {str(v) for v in c.values}
    where = f"probs.{c.name}"
    if not isinstance(got, dict):
        raise InputError(row.path, row.line, "must map the criterion's levels to probabilities", where, item_id)
    for k, p in got.items():
        if k not in levels:
            raise InputError(row.path, row.line, f"{k!r} is not a level of '{c.name}' ({', '.join(sorted(levels))})",
                             where, item_id)
        if not _finite(p) or not -1e-9 <= p <= 1 + 1e-6:
            raise InputError(row.path, row.line, f"level {k}: {p!r} is not a probability (a number in [0, 1])",
                             where, item_id)
